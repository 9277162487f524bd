"""run.py's answer to mistakes in the user's input: one line (two at most) starting with "error:",
exit status 2, no traceback, nothing written; --help exits 0 and lists modes, configs and variants."""

import fcntl
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocess runs of run.py: `pytest -m 'not slow'` skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
    proc = subprocess.run(
        [sys.executable, "run.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


USER_ERRORS = [
    (["--config.train.epochz=3"], "did you mean train.epochs?"),
    (["--config.train.epochs=0"], "train.epochs = 0: must be an integer >= 1"),
    (["--config.train.batch_size=-4", "--config.fit.pool_ratio=2"], "train.batch_size = -4"),
    (["--config.train.epochs=abc"], "train.epochs takes a number"),
    (["--config.scoring.ot=fast"], "scoring.ot = 'fast': must be one of paper | exact | code"),
    (["--config=configs/demo.py:bogus"], "unknown config variant 'bogus'"),
    (["--config=configs/nope.py"], "no such config file"),
    (["--mode=bogus"], "--mode=bogus"),
    (
        ["--config.data.name=folder", "--config.data.manual_dir=/nonexistent/parts"],
        "/nonexistent/parts does not exist",
    ),
    (["--config.model.backbone.weights=/nonexistent/b.pth"], "backbone weights not found: '/nonexistent/b.pth'"),
    (["--config.data.name=folder", "--config.data.manual_dir=run.py"], "run.py is a file, not a folder"),
    (["--config.data.eval_batch_size=1000000"], "data.eval_batch_size = 1000000: must be an integer in [1, 1024]"),
    (["--workdir=/etc/hostname", "--mode=train"], "--workdir /etc/hostname is a file, not a folder"),
    (["--workdir=/etc/hostname/wd", "--mode=train"], "Not a directory '/etc/hostname/wd'"),
    (["--mode=eval"], "does not exist: train first"),
    (["--mode=predict", "--config.predict.input=/nonexistent"], "does not exist: train first"),
]


@pytest.fixture(scope="module")
def user_error_runs(tmp_path_factory, tfds_dir):
    """run.py on each case of USER_ERRORS, as many at a time as there are cores (each is mostly the
    import of jax and the config check): {case index: (workdir, exit status, stdout, stderr)}."""
    jobs = []
    for k, (extra, _) in enumerate(USER_ERRORS):
        wd = tmp_path_factory.mktemp(f"case{k}") / "wd"
        args = ["--config=configs/demo.py:smoke", f"--workdir={wd}", f"--config.data.tfds_dir={tfds_dir}"]
        args = [a for a in args if not (a.startswith("--config=") and any(e.startswith("--config=") for e in extra))]
        jobs.append((k, wd, [sys.executable, "run.py", *args, *extra]))
    results, running = {}, []
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    while jobs or running:
        while jobs and len(running) < max(1, os.cpu_count() or 1):
            k, wd, cmd = jobs.pop(0)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append((k, wd, proc))
        k, wd, proc = running.pop(0)
        out, err = proc.communicate(timeout=300)
        results[k] = (wd, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("case", range(len(USER_ERRORS)), ids=[e[1][:40] for e in USER_ERRORS])
def test_user_errors_are_one_line_with_status_2(user_error_runs, case):
    wd, rc, out, err = user_error_runs[case]
    expected = USER_ERRORS[case][1]
    assert rc == 2, out[-2000:] + err[-2000:]
    assert "Traceback" not in out + err
    tail = err[err.index("error: ") :].strip().splitlines()
    assert len(tail) <= 2 and expected in " ".join(tail), err[-1500:]
    assert not wd.exists()  # nothing written, not even the workdir


def test_a_second_run_on_a_locked_workdir_is_refused_at_once(tmp_path, tfds_dir):
    wd = tmp_path / "wd"
    wd.mkdir()
    with open(wd / ".maskad.lock", "a+") as f:  # another run holding the lock, as workdir.locked does
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("pid 4242 on somehost, --mode=train, since 2026-11-29 10:00:00")
        f.flush()
        rc, out, err = _run(
            "--config=configs/demo.py:smoke", f"--workdir={wd}", f"--config.data.tfds_dir={tfds_dir}", "--mode=train"
        )
    assert rc == 2 and "in use by another run (pid 4242 on somehost" in err and "Traceback" not in err
    assert sorted(os.listdir(wd)) == [".maskad.lock"]  # no config.json, no checkpoints


def test_verbose_shows_the_traceback():
    rc, out, err = _run("--config=configs/demo.py:smoke", "--config.train.epochs=0", "--verbose")
    assert rc == 1 and "Traceback" in err and "ConfigError" in err


def test_help_exits_0_and_lists_modes_configs_and_variants():
    rc, out, err = _run("--help")
    assert rc == 0
    for word in (
        "train_and_eval",
        "predict",
        "configs/folder.py",
        "smoke",
        "ablation=<row>",
        "--config.train.epochs=5",
        "maskad_jax/configs/default.py",
        "--verbose",
    ):
        assert word in out, word

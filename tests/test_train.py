"""Training: device-count invariance, a real two-process mesh, kill-and-resume, config mismatch."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import FAST_COMPILE, forced_devices_env, loopback_coordinator, train_specs

from configs import default
from maskad_jax.common.specs import resolve
from maskad_jax.training.checkpoints import CheckpointMismatchError
from maskad_jax.training.optim import decay_mask
from maskad_jax.training.train import train

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_losses.py")


def _run(devices, extra=(), script=SCRIPT):
    return subprocess.Popen(
        [sys.executable, script, *extra],
        env=forced_devices_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _losses(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_same_losses_on_1_and_4_devices_and_on_two_processes():
    """train.devices = all: the data-parallel mesh over 4 forced host devices, and over two processes of
    2 devices each, gives the one-device losses; auto on a CPU trains on one device (no collective)."""
    one = _losses(_run(1))
    four = _losses(_run(4))
    auto = _losses(_run(4, ["--train-devices", "auto"]))
    assert one["devices"] == 1 and four["devices"] == 4 and four["mesh"] == 4
    assert auto["devices"] == 4 and auto["mesh"] == 1
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5)
    np.testing.assert_allclose(auto["losses"], one["losses"], rtol=1e-5)
    coord = ["--coordinator", loopback_coordinator(), "--num-processes", "2"]
    procs = [_run(2, coord + ["--process-id", str(i)]) for i in range(2)]
    results = [_losses(p) for p in procs]
    for r in results:  # several processes gather their batches on the host (train.device_cache_gb unused)
        assert r["devices"] == 4 and r["mesh"] == 4 and r["processes"] == 2
        np.testing.assert_allclose(r["losses"], one["losses"], rtol=1e-5)


@pytest.mark.slow
def test_long_cpu_training_at_a_high_step_rate_does_not_abort(tmp_path):
    """Issue #24: run.py on the smoke config (its two forced host devices) for 9000 steps at a few
    hundred steps/s with the loss read every 3000 steps. With the data-parallel mesh over both CPU
    devices and steps queued ahead this aborted in XLA's all-reduce rendezvous (SIGABRT after 16-112
    s, benchmarks/RESULTS.md); the default (train.devices = auto: one device on a CPU) has no
    collective to wait in."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "--config=configs/demo.py:smoke",
            f"--workdir={tmp_path / 'wd'}",
            f"--config.data.tfds_dir={tmp_path / 'tfds'}",
            "--mode=train",
            "--config.train.epochs=3000",
            "--config.train.log_every=3000",
            "--config.train.checkpoint_every=100000",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
        # compiled at full optimisation (not the tests' FAST_COMPILE, conftest.py): the step rate the abort needed
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(FAST_COMPILE, "")),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "step 9000/9000" in proc.stdout and "trained to step 9000" in proc.stdout


@pytest.mark.slow
def test_two_processes_each_extract_a_share_of_the_feature_cache(tmp_path):
    """feature_cache.extract_features under jax.distributed: each process runs the backbone on its share
    of the split and every process ends with the whole cache, equal to one process's."""
    from tfds_builders import prepare

    tfds = str(tmp_path / "tfds")
    prepare("synthetic", tfds, config="tiny")  # built once here, read by the processes below
    script = os.path.join(os.path.dirname(__file__), "scripts", "extract_features.py")
    single = _run(2, [tfds, str(tmp_path / "one.npz")], script)
    _losses_or_fail(single)
    coord = ["--coordinator", loopback_coordinator(), "--num-processes", "2"]
    procs = [_run(2, [tfds, str(tmp_path / f"p{i}.npz")] + coord + ["--process-id", str(i)], script) for i in range(2)]
    for proc in procs:
        _losses_or_fail(proc)
    one = np.load(tmp_path / "one.npz")
    assert int(one["processes"]) == 1 and len(one["keys"]) == 24
    for i in range(2):
        got = np.load(tmp_path / f"p{i}.npz")
        assert int(got["processes"]) == 2 and int(got["devices"]) == 4
        np.testing.assert_array_equal(got["keys"], one["keys"])  # the same images in the same order
        np.testing.assert_allclose(got["h_in"], one["h_in"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["h_tgt"], one["h_tgt"], rtol=1e-5, atol=1e-5)


def _losses_or_fail(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def _tiny_config(**train):
    c = default.get_config()
    r = c.model.reconstructor
    r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 32, 1, 1, 2
    c.train.epochs, c.train.batch_size, c.train.warmup_epochs, c.train.log_every = 3, 8, 1, 1000
    c.train.checkpoint_every = 2
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def _features():
    return np.random.default_rng(0).normal(size=(24, 4, 4, 8)).astype(np.float32)


def test_kill_and_resume_ends_with_the_same_parameters(tmp_path):
    c, h = _tiny_config(), _features()
    full = train(*train_specs(c), h, None, str(tmp_path / "full"), log=lambda *_: None)
    part = train(
        *train_specs(c), h, None, str(tmp_path / "resumed"), log=lambda *_: None, max_steps=5
    )  # "killed" after step 5
    assert part.steps == 5
    messages = []
    rest = train(*train_specs(c), h, None, str(tmp_path / "resumed"), log=messages.append)
    assert any("resumed from step 5" in m for m in messages)
    assert [s for s, _ in rest.losses] == list(range(5, 9))
    np.testing.assert_allclose([loss for _, loss in rest.losses], [loss for _, loss in full.losses[5:]], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(rest.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_checkpoint_of_another_model_config_is_refused(tmp_path):
    h = _features()
    train(*train_specs(_tiny_config()), h, None, str(tmp_path), log=lambda *_: None, max_steps=2)
    other = _tiny_config()
    other.model.reconstructor.embed_dim = 64
    with pytest.raises(CheckpointMismatchError, match="another model config"):
        train(*train_specs(other), h, None, str(tmp_path), log=lambda *_: None)


def test_device_cache_and_host_gathering_give_the_same_losses():
    h = _features()
    tgt = h * 0.5 + 1.0  # a separate target view exercises the second cache
    on = train(*train_specs(_tiny_config(epochs=2)), h, tgt, None, log=lambda *_: None)
    off = train(*train_specs(_tiny_config(epochs=2, device_cache_gb=0.0)), h, tgt, None, log=lambda *_: None)
    assert len(on.losses) == len(off.losses) == 6
    np.testing.assert_allclose([loss for _, loss in on.losses], [loss for _, loss in off.losses], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(on.params), jax.tree.leaves(off.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_cudnn_attention_setting_trains_with_einsum_and_says_so():
    c = _tiny_config(epochs=1)
    c.model.reconstructor.attention = "jax_cudnn"  # would fail on this CPU if it reached the model
    said = []
    res = train(*train_specs(c), _features(), None, None, log=said.append)
    ref = train(*train_specs(_tiny_config(epochs=1)), _features(), None, None, log=lambda *_: None)
    assert any("jax_cudnn is for scoring only" in m for m in said)
    np.testing.assert_allclose([loss for _, loss in res.losses], [loss for _, loss in ref.losses], rtol=1e-6)


def test_loss_falls_on_structured_features():
    """Features with spatial structure (smooth fields) can be inpainted: the loss must drop."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(48, 1, 1, 8)).astype(np.float32)
    ramp = np.linspace(-1, 1, 4, dtype=np.float32)[None, :, None, None]
    h = base + ramp * base[:, :, :, ::-1]
    h = np.broadcast_to(h, (48, 4, 4, 8)).copy()
    c = _tiny_config(epochs=30, batch_size=16, lr=1e-2, weight_decay=0.0)
    res = train(*train_specs(c), h, None, None, log=lambda *_: None)
    losses = [loss for _, loss in res.losses]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_weight_decay_mask_follows_the_released_code():
    params = {
        "input_proj": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)},
        "mask_token": np.zeros(3),
        "cls_token": np.zeros(3),
        "rel_pos_bias": {"table": np.zeros((4, 2))},
        "encoder_0": {"gamma_1": np.zeros(3), "norm1": {"scale": np.zeros(3)}, "attn": {"q_bias": np.zeros(3)}},
    }
    m = decay_mask(params)
    assert m["input_proj"]["kernel"] and m["mask_token"] and m["rel_pos_bias"]["table"]
    assert not (
        m["input_proj"]["bias"]
        or m["cls_token"]
        or m["encoder_0"]["gamma_1"]
        or m["encoder_0"]["norm1"]["scale"]
        or m["encoder_0"]["attn"]["q_bias"]
    )


def test_bfloat16_switch_trains_with_float32_parameters():
    c32, c16 = _tiny_config(), _tiny_config()
    c16.model.dtype = "bfloat16"
    h = _features()
    a = train(*train_specs(c32), h, None, None, log=lambda *_: None, max_steps=4)
    b = train(*train_specs(c16), h, None, None, log=lambda *_: None, max_steps=4)
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(b.params))
    la, lb = np.array([loss for _, loss in a.losses]), np.array([loss for _, loss in b.losses])
    assert np.isfinite(lb).all()
    np.testing.assert_allclose(lb, la, rtol=0.05)  # bf16 matmuls: close to float32, not equal
    assert not np.array_equal(la, lb)


def test_diverging_training_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    """lr 1e12: the loss turns NaN within a few steps. The run stops with TrainingDivergedError
    instead of finishing with rc 0, and no checkpoint holds non-finite parameters."""
    from maskad_jax.training.checkpoints import TrainingDivergedError, checkpoint_manager, restore_trained

    c = _tiny_config(lr=1e12, checkpoint_every=1, max_to_keep=20)
    with pytest.raises(TrainingDivergedError, match="diverged") as err:
        train(*train_specs(c), _features(), None, str(tmp_path), log=lambda *_: None)
    assert "train.lr" in str(err.value) or "learning rate" in str(err.value)
    steps = checkpoint_manager(str(tmp_path), c.train).all_steps()
    assert 0 < len(steps) < 9  # stopped early, with the good checkpoints before it
    from maskad_jax.models.reconstructor import build_reconstructor
    from maskad_jax.training.optim import make_optimizer
    from maskad_jax.training.train import model_fingerprint

    model = build_reconstructor(resolve(c).model, 8, (4, 4))
    params, step = restore_trained(
        str(tmp_path),
        c.train,
        "train",
        lambda k: model.init(k, np.zeros((1, 4, 4, 8)), np.zeros((1, 16), bool))["params"],
        lambda t, s: make_optimizer(c.train, t, s),
        model_fingerprint(resolve(c).model, c.data.image_size, c.train.target, 8),
    )
    assert step == max(steps) and all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


def _largest_file(folder):
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_checkpoint_is_named_and_resuming_falls_back_to_the_previous_one(tmp_path, damage):
    from maskad_jax.models.reconstructor import build_reconstructor
    from maskad_jax.training.checkpoints import CheckpointCorruptError, restore_trained
    from maskad_jax.training.optim import make_optimizer
    from maskad_jax.training.train import model_fingerprint

    c, h = _tiny_config(), _features()
    full = train(*train_specs(c), h, None, str(tmp_path / "full"), log=lambda *_: None)
    wd = str(tmp_path / "wd")
    train(*train_specs(c), h, None, wd, log=lambda *_: None)  # checkpoints at steps 6, 8 and 9 are kept
    victim = _largest_file(os.path.join(wd, "checkpoints", "9", "state"))
    data = bytearray(open(victim, "rb").read())
    if damage == "flip":
        mid = len(data) // 2
        data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    else:
        data = data[: len(data) // 2]
    open(victim, "wb").write(bytes(data))
    model = build_reconstructor(resolve(c).model, 8, (4, 4))
    init = lambda k: model.init(k, np.zeros((1, 4, 4, 8)), np.zeros((1, 16), bool))["params"]  # noqa: E731
    with pytest.raises(CheckpointCorruptError, match=os.path.join("checkpoints", "9")):
        restore_trained(
            wd,
            c.train,
            "train",
            init,
            lambda t, s: make_optimizer(c.train, t, s),
            model_fingerprint(resolve(c).model, c.data.image_size, c.train.target, 8),
        )
    said = []
    res = train(*train_specs(c), h, None, wd, log=said.append)  # resuming: falls back to step 8 and redoes step 9
    assert any("falling back to the checkpoint at step 8" in m for m in said), said
    assert any("resumed from step 8" in m for m in said)
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(res.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_pools_file_is_named(tmp_path, damage):
    from maskad_jax.engine.fit_state import Fit, FitCorruptError
    from maskad_jax.training.fit import fit_pools

    c = default.get_config()
    pools = fit_pools(_features(), None, ["a"] * 24, c.fit, 0)
    pools.save(str(tmp_path / "fit"))
    assert Fit.load(str(tmp_path / "fit")).pool_in.shape == pools.pool_in.shape
    path = tmp_path / "fit" / "fit.npz"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:100]
    path.write_bytes(bytes(data))
    with pytest.raises(FitCorruptError, match="fit.npz"):
        Fit.load(str(tmp_path / "fit"))


def test_a_resumed_run_records_each_step_once(tmp_path):
    """The record of steps replayed after a resume replaces the first attempt's (no step twice)."""
    c, h = _tiny_config(log_every=1, checkpoint_every=4), _features()
    train(
        *train_specs(c), h, None, str(tmp_path), log=lambda *_: None, max_steps=6
    )  # "killed" after step 6, last checkpoint 4
    train(*train_specs(c), h, None, str(tmp_path), log=lambda *_: None)  # resumes from 4, replays 5 and 6
    steps = [json.loads(line)["step"] for line in open(tmp_path / "train_log.jsonl")]
    assert steps == list(range(1, 10))

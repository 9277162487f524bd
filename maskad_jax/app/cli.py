"""MaskAD in JAX: train, fit, evaluate and predict from a config (run.py and the `maskad-jax` command).

    python run.py --config=configs/demo.py                      # the embedded default: runs anywhere
    python run.py --config=configs/folder.py --config.data.manual_dir=/data/my_parts --workdir=runs/parts
    python run.py --config=configs/mvtec.py --config.data.manual_dir=/data/mvtec_ad --workdir=runs/mvtec
    python run.py --config=configs/mvtec.py --workdir=runs/mvtec --mode=eval
    python run.py --config=configs/mvtec.py --workdir=runs/mvtec --mode=predict --config.predict.input=some/folder
    python run.py --config=configs/mvtec.py --workdir=runs/mvtec --mode=export   # then runs/mvtec/export/serve.py x.png
    python run.py --config=configs/folder.py --config.data.manual_dir=/data/my_parts --workdir=runs/parts \
        --mode=update --config.new_images.input=/data/new_good_parts   # more good parts, no retraining
    python run.py --config=configs/mvtec.py --workdir=/mnt/shared/mvtec --coordinator=auto  # every host of a pod

Modes (--mode): train_and_eval (default) | train | eval (reuse the workdir's checkpoint and fit) |
predict (score new images with them) | export (the trained model as one artifact that scores
images without this package: <workdir>/export/, docs/deploy.md) | update (new good images join the
pools, thresholds recalibrated, the reconstructor kept: maskad_jax/app/update.py) | serve (an HTTP
service over <workdir>/export: maskad_jax/runtime/serve_http.py, docs/deploy.md).
Configs: configs/demo.py (synthetic data, CPU-sized), folder.py (any folder in MVTec layout),
mvtec.py, visa.py, realiad.py (the paper's setup). Variants after a colon, comma-separated:
smoke (tiny, for tests), cpu (the CPU-sized model), paper (folder.py only), code (the released
code's choices), ablation=<row> (a Table-2 row: rec_only, parallel, parallel_ref, parallel_mpo,
no_rec, rec_ref_mpo, full, mpo_only, default), e.g. --config=configs/folder.py:ablation=mpo_only.
Any config field is set with --config.<field>=<value>, e.g. --config.train.epochs=5; every field
is explained where it is defined, in maskad_jax/configs/default.py.
Exit status: 0 done, 2 a problem with the input (config, data, files, workdir; one line says
what and how to fix it, --verbose adds the traceback), 1 a bug (with its traceback).
"""

import errno
import os
import sys

# XLA's CPU flags (maskad_jax/common/xla_env.py), before JAX starts: every core as a device, YNNPACK
# fusions off on jaxlib 0.10 (faster here, and the same programs as the Python API's)
from maskad_jax.common.xla_env import compilation_cache, set_cpu_flags  # noqa: E402

set_cpu_flags(force_devices=True)

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from maskad_jax.app.detector import apply_overrides, workdir_config  # noqa: E402
from maskad_jax.app.pipeline import train_and_evaluate  # noqa: E402
from maskad_jax.common.errors import UserError  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_NAMES = ("demo", "folder", "mvtec", "visa", "realiad")

config_flags.DEFINE_config_file(
    "config",
    os.path.join(CONFIGS, "demo.py"),
    "a config: a name (demo, folder, mvtec, visa, realiad: shipped in the package) or an ml_collections config "
    "file's path, with :variants. Left out with a --workdir that holds a trained run, the workdir's own "
    "config.json is read back (the --config.<field> overrides still apply); else demo",
)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and heatmaps (default runs/<config name>)")
flags.DEFINE_enum(
    "mode", "train_and_eval", ["train_and_eval", "train", "eval", "predict", "export", "update", "serve"], "what to run"
)
flags.DEFINE_string(
    "xla_cache",
    None,
    "persistent XLA compilation cache: a rerun (eval after train, predict, resume) reuses the "
    "compiled programs instead of compiling again (tens of seconds on a CPU). Default "
    "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/maskad_jax/xla; 'none' turns it off",
)
flags.DEFINE_string(
    "coordinator",
    None,
    "several processes (hosts) as one job via jax.distributed: host:port of process 0 (then "
    "--num_processes and --process_id), or 'auto' where JAX detects the cluster (Cloud TPU pods, "
    "SLURM). Every process runs the same command; the workdir must be storage they all see",
)
flags.DEFINE_integer("num_processes", None, "with --coordinator=host:port: how many processes")
flags.DEFINE_integer("process_id", None, "with --coordinator=host:port: this process's index, 0 .. num_processes-1")
flags.DEFINE_bool("verbose", False, "show the traceback of input errors too (they print one line otherwise)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax/TFDS chatter out of the progress lines
    _distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    compilation_cache(FLAGS.xla_cache)
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("runs", config.get("name", "run"))
    try:
        if not _config_given(sys.argv) and os.path.isfile(os.path.join(workdir, "config.json")):
            config = _workdir_config(workdir, FLAGS.config, sys.argv)
        result = train_and_evaluate(config, workdir, FLAGS.mode)
    except UserError as e:
        if FLAGS.verbose:
            raise
        _fail(str(e))
    except KeyboardInterrupt:
        print(f"interrupted: --mode={FLAGS.mode} stopped; nothing half-written is left to be used", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # the file system said no: permissions, a full disk, a file where a folder should be
        if FLAGS.verbose or e.errno not in _FILE_SYSTEM_ERRORS:
            raise
        where = " ".join(repr(f) for f in (e.filename, e.filename2) if f)
        _fail(f"{e.strerror or e} {where}: check the workdir and the output folders (free space, permissions)")
    if "mean" in result:
        print("results in", workdir, "(%):", {k: round(100 * v, 1) for k, v in result["mean"].items()})


def _config_given(argv) -> bool:
    return any(a == "--config" or a.startswith("--config=") for a in argv[1:])


def _override_fields(argv) -> list[str]:
    """The fields that --config.<field>[=value] (and --noconfig.<field>) arguments set, in order."""
    out = []
    for a in argv[1:]:
        for prefix in ("--config.", "--noconfig."):
            if a.startswith(prefix):
                out.append(a[len(prefix) :].split("=", 1)[0])
    return out


def _workdir_config(workdir, parsed, argv):
    """The workdir's training config (config.json), with this command's --config.<field> overrides (their
    values as absl parsed them onto the default config, which has the same fields)."""
    fields = _override_fields(argv)
    overrides = {}
    for f in fields:
        node = parsed
        for part in f.split("."):
            node = node[part]
        overrides[f] = node
    config = apply_overrides(workdir_config(workdir), overrides)
    said = f", with {', '.join('--config.' + f for f in fields)}" if fields else ""
    print(f"config: {os.path.join(workdir, 'config.json')} (the workdir's training config){said}", file=sys.stderr)
    return config


# OSError numbers that are the file system's answer to a user's folder, not a bug: reported in one line
_FILE_SYSTEM_ERRORS = {
    getattr(errno, n)
    for n in ("EACCES", "EPERM", "ENOSPC", "EDQUOT", "EROFS", "ENOTDIR", "EISDIR", "EEXIST", "ENOTEMPTY", "ELOOP")
    if hasattr(errno, n)
}


def _fail(message: str):
    """A user error: at most two lines on stderr, exit status 2 (tracebacks are for bugs)."""
    lines = [ln for ln in str(message).strip().splitlines() if ln.strip()] or ["(no message)"]
    text = lines[0] if len(lines) == 1 else lines[0] + "\n  " + " ".join(ln.strip() for ln in lines[1:])
    print(f"error: {text}", file=sys.stderr, flush=True)
    sys.exit(2)


def _parse_flags(argv):
    """absl's flag parsing, with a bad flag or config (a missing file, an unknown variant, a field that
    does not exist, a value of the wrong type) reported in one line instead of a traceback."""
    if any(a in ("--help", "-h", "-?", "--helpshort") for a in argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl's own --help exits 1
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError, ImportError) as e:
        if "--verbose" in argv:
            raise
        about_config = not isinstance(e, flags.Error) or "--config" in str(e)
        _fail(_config_problem(argv, e) if about_config else f"{e} (see python run.py --help)")


def _config_problem(argv, error) -> str:
    """A readable account of what went wrong while loading --config and its --config.* overrides."""
    import difflib

    spec = ([a.split("=", 1)[1] for a in argv if a.startswith("--config=")] or ["demo"])[-1]
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        return (
            f"--config={spec}: no such config file or name (the names: {', '.join(CONFIG_NAMES)}; or a path such "
            f"as configs/folder.py)"
        )
    try:
        from ml_collections.config_flags import config_flags as cf

        config = cf._ConfigFileParser(name="config").parse(spec)  # noqa: SLF001  (the parser absl itself uses)
    except Exception as e:  # the config file or its variant is what failed: its last line says why
        last = [ln for ln in str(e).splitlines() if ln.strip()][-1].strip()
        return f"--config={spec}: {last.split(': ', 1)[-1] if 'Error: ' in last else last}"
    for arg in argv:
        if arg.startswith("--config."):
            problem = _override_problem(config, *arg[len("--config.") :].partition("=")[::2], difflib)
            if problem:
                return problem
    return "--config: " + " ".join(str(error).replace("\\n", " ").split()).strip("'")


def _override_problem(config, field, value, difflib):
    """Why --config.<field>=<value> cannot apply to config, or None."""
    node, walked = config, []
    for part in field.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            near = difflib.get_close_matches(part, keys, n=1)
            hint = f"; did you mean {'.'.join(walked + near)}?" if near else ""
            return (
                f"--config.{field}: {'.'.join(walked + [part])} is not a config field{hint} (the fields are "
                f"explained in maskad_jax/configs/default.py)"
            )
        node, walked = node[part], walked + [part]
    kind = type(node)
    if kind in (int, float) and not isinstance(node, bool):
        try:
            kind(value)
        except ValueError:
            return f"--config.{field}={value}: {field} takes a number ({kind.__name__}), e.g. --config.{field}={node}"
    return None


def _distributed(coordinator, num_processes, process_id):
    """jax.distributed.initialize from --coordinator/--num_processes/--process_id (nothing without them)."""
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise app.UsageError("--num_processes and --process_id need --coordinator")
        return
    if coordinator == "auto":
        jax.distributed.initialize()
        return
    if num_processes is None or process_id is None:
        raise app.UsageError(f"--coordinator={coordinator} needs --num_processes and --process_id")
    if not 0 <= process_id < num_processes:
        raise app.UsageError(f"--process_id={process_id} must be in 0 .. {num_processes - 1}")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def config_names(argv) -> list:
    """argv with --config=NAME[:variants] (a config shipped in the package) written as its file's path."""
    out = []
    for a in argv:
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
            name, sep, variant = spec.partition(":")
            if name in CONFIG_NAMES and not os.path.exists(name):
                a = f"--config={os.path.join(CONFIGS, name + '.py')}{sep}{variant}"
        out.append(a)
    return out


def console(argv=None):
    """run.py and the `maskad-jax` command: the same flags (python run.py --help)."""
    argv = config_names(list(sys.argv if argv is None else argv))
    main_module = sys.modules.get("__main__")
    if main_module is not None and not getattr(main_module, "__doc__", None):
        main_module.__doc__ = __doc__  # absl's --help prints the main module's text
    app.run(main, argv=argv, flags_parser=_parse_flags)

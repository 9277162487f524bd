"""MaskAD in JAX: train, fit and evaluate from a config.

    python run.py --config=configs/demo.py
    python run.py --config=configs/mvtec.py --config.data.manual_dir=/data/mvtec_ad --workdir=runs/mvtec
    python run.py --config=configs/mvtec.py --workdir=runs/mvtec --mode=eval
    python run.py --config=configs/mvtec.py --workdir=runs/mvtec --mode=predict --config.predict.input=some/folder
    python run.py --config=configs/mvtec.py --workdir=/mnt/shared/mvtec --coordinator=auto  # every host of a pod
"""
import os

# On a CPU, XLA runs each convolution on one core; presenting every core as a device lets the
# data-parallel code use them all. Harmless on GPU/TPU hosts (the accelerator stays the default).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    _n = max(1, min(os.cpu_count() or 1, 8))
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}").strip()
# XLA's CPU backend (jaxlib 0.10) hands matmuls, reductions and elementwise ops to YNNPACK by
# default; with that off (Eigen matmuls, XLA's own loops) the reconstructor trained 15-20% faster
# and scored about 15% faster on a 2-core CPU (benchmarks/RESULTS.md). CPU-only: GPUs/TPUs ignore it.
# Only for the jaxlib it was measured on (the flag is experimental; an unknown flag aborts XLA).
try:
    from importlib.metadata import version as _version
    _jaxlib = _version("jaxlib")
except Exception:  # not installed the usual way: leave XLA's defaults
    _jaxlib = ""
if _jaxlib.startswith("0.10.") and "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] += " --xla_cpu_experimental_ynn_fusion_type="

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/demo.py", "ml_collections config file (path[:variant])")
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and heatmaps (default runs/<config name>)")
flags.DEFINE_enum("mode", "train_and_eval", ["train_and_eval", "train", "eval", "predict"], "what to run")
flags.DEFINE_string("xla_cache", None,
                    "persistent XLA compilation cache: a rerun (eval after train, predict, resume) reuses the "
                    "compiled programs instead of compiling again (tens of seconds on a CPU). Default "
                    "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/maskad_jax/xla; 'none' turns it off")
flags.DEFINE_string("coordinator", None,
                    "several processes (hosts) as one job via jax.distributed: host:port of process 0 (then "
                    "--num_processes and --process_id), or 'auto' where JAX detects the cluster (Cloud TPU pods, "
                    "SLURM). Every process runs the same command; the workdir must be storage they all see")
flags.DEFINE_integer("num_processes", None, "with --coordinator=host:port: how many processes")
flags.DEFINE_integer("process_id", None, "with --coordinator=host:port: this process's index, 0 .. num_processes-1")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from absl import logging
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax/TFDS chatter out of the progress lines
    _distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    _compilation_cache(FLAGS.xla_cache)
    from maskad_jax.pipeline import train_and_evaluate
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("runs", config.get("name", "run"))
    result = train_and_evaluate(config, workdir, FLAGS.mode)
    if "mean" in result:
        print("results in", workdir, {k: round(100 * v, 1) for k, v in result["mean"].items()})


def _distributed(coordinator, num_processes, process_id):
    """jax.distributed.initialize from --coordinator/--num_processes/--process_id (nothing without them)."""
    import jax
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


def _compilation_cache(path):
    """Point JAX's persistent compilation cache at `path` (see --xla_cache)."""
    import jax
    if path is None and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return  # JAX reads it (and its JAX_PERSISTENT_CACHE_* settings) itself
    if path is None:
        path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "maskad_jax", "xla")
        jax.config.update("jax_compilation_cache_max_size", 2 * 2 ** 30)  # least recently used entries go first
    if path.lower() in ("", "none", "off"):
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_compilation_cache_dir", path)


if __name__ == "__main__":
    app.run(main)

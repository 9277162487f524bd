#!/bin/bash
# The accelerator measurements of benchmarks/RESULTS.md in one script (about 6 minutes on one H200).
# Run from the repository root on a machine with JAX for its accelerator; OUT (default /tmp/out)
# receives the log. Packages missing there (ott-jax, jaxopt, ml_collections) can be put in .whl/.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*"; }
{
  log versions
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import jax, flax, optax, ott; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'ott', ott.__version__, jax.devices())"
  log "training, paper config, bfloat16, batch 80, feature cache on the device"
  timeout 150 python3 benchmarks/training.py --model paper --steps 300 --log-every 50 --channels 272 --dtype bfloat16
  log "scoring, paper config, bfloat16, batch 64: fused vs loop, whole step with B4"
  timeout 170 python3 benchmarks/scoring.py --model paper --channels 272 --dtype bfloat16 --batch 64 --repeats 5 --backbone
  log "training, paper config, float32, batch 80 (memory against a 24 GB card)"
  timeout 100 python3 benchmarks/training.py --model paper --steps 100 --log-every 25 --channels 272 --dtype float32
  log "training, paper config, bfloat16, batch 80, batches gathered on the host"
  timeout 80 python3 benchmarks/training.py --model paper --steps 150 --log-every 50 --channels 272 --dtype bfloat16 --host-cache
  log done
} 2>&1 | tee "$OUT/gpu_check.log"

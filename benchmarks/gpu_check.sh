#!/bin/bash
# The accelerator measurements of benchmarks/RESULTS.md (each part about 5 minutes on one H200):
#   bash benchmarks/gpu_check.sh main        # training and scoring throughput and memory, paper config
#   bash benchmarks/gpu_check.sh attention   # cuDNN attention; the authors' per-image structure in PyTorch
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
part=${1:-main}
main() {
  log "training, paper config, bfloat16, batch 80, feature cache on the device"
  timeout 150 python3 benchmarks/training.py --model paper --steps 300 --log-every 50 --channels 272 --dtype bfloat16
  log "scoring, paper config, bfloat16, batch 64: fused vs loop, whole step with B4"
  timeout 170 python3 benchmarks/scoring.py --model paper --channels 272 --dtype bfloat16 --batch 64 --repeats 5 --backbone
  log "training, paper config, float32, batch 80 (memory against a 24 GB card)"
  timeout 100 python3 benchmarks/training.py --model paper --steps 100 --log-every 25 --channels 272 --dtype float32
  log "training, paper config, bfloat16, batch 80, batches gathered on the host"
  timeout 80 python3 benchmarks/training.py --model paper --steps 150 --log-every 50 --channels 272 --dtype bfloat16 --host-cache
}
attention() {
  log "attention implementations agree (bfloat16)"
  timeout 60 python3 benchmarks/attention_check.py --dtype bfloat16
  log "scoring, paper config, bfloat16, batch 64, cuDNN attention"
  timeout 120 python3 benchmarks/scoring.py --model paper --channels 272 --dtype bfloat16 --batch 64 --repeats 5 --backbone --no-loop --attention jax_cudnn
  log "the authors' per-image structure, PyTorch eager, float32, paper and small"
  timeout 60 python3 benchmarks/authors_structure_torch.py --model paper --device cuda --images 6
  timeout 40 python3 benchmarks/authors_structure_torch.py --model small --device cuda --images 6
  log "training, paper config, bfloat16, batch 80, cuDNN attention"
  timeout 80 python3 benchmarks/training.py --model paper --steps 300 --log-every 50 --channels 272 --dtype bfloat16 --attention jax_cudnn
}
{
  log versions
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import jax, flax, optax, ott; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'ott', ott.__version__, jax.devices())"
  "$part"
  log done
} 2>&1 | tee "$OUT/gpu_check_$part.log"

#!/usr/bin/env bash
# Bitwise behaviour of one checkout, for comparing two versions (the proof of a refactoring):
#
#   git worktree add /tmp/old <old commit>
#   bash benchmarks/behaviour_check.sh /tmp/old  OUT/old  [TRAINED_DEMO_WORKDIR]
#   bash benchmarks/behaviour_check.sh .         OUT/new  [TRAINED_DEMO_WORKDIR]
#   diff -r OUT/old/digests OUT/new/digests && echo identical
#
# Runs, with that checkout's code (PYTHONPATH) and one shared TFDS folder: the smoke config from
# scratch with learning curves (train, fit, calibrate, eval, report), then on that workdir the paper's
# formula (ablation=full) and the released code's scoring with the test-set normalisation (eval) and
# predict on its sample images; the flow M_po from scratch, on the reconstructor's features and on a
# second (Lite0) backbone; tiles (1 x 2) from scratch. With a trained demo workdir (python run.py
# --config=configs/demo.py, made once by either version), its copies are scored under the shipped
# scoring and the paper's formula. Each workdir's digest (benchmarks/behaviour_digest.py) goes to
# OUT/digests/. About 7 minutes on 2 CPU cores (the demo evals are 2 of them).
set -uo pipefail
CODE=$(cd "$1" && pwd); OUT=$(mkdir -p "$2" && cd "$2" && pwd); DEMO=${3:-}
TFDS=${TFDS:-$OUT/../tfds}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT/digests"
cd "$CODE"
export PYTHONPATH="$CODE"
run() {
  local name=$1; shift
  python run.py --xla_cache="$OUT/xla" "$@" --config.data.tfds_dir="$TFDS" > "$OUT/$name.log" 2>&1 \
    || { echo "FAILED $name (see $OUT/$name.log)"; return 1; }
}
SMOKE=configs/demo.py:smoke
run smoke --config=$SMOKE --workdir="$OUT/smoke" --config.train.eval_every=1
cp -r "$OUT/smoke" "$OUT/smoke_full"
run smoke_full --config=$SMOKE,ablation=full --workdir="$OUT/smoke_full" --mode=eval
cp -r "$OUT/smoke" "$OUT/smoke_tm"
run smoke_tm --config=$SMOKE,code --workdir="$OUT/smoke_tm" --mode=eval --config.train.target=same \
  --config.model.reconstructor.encoder_depth=1 --config.model.reconstructor.decoder_depth=1 \
  --config.train.weight_decay=0.04 --config.train.mask_probs="(0.3333333333333333, 0.3333333333333333, 0.3333333333333333)"
run smoke_predict --config=$SMOKE --workdir="$OUT/smoke" --mode=predict --config.predict.input="$OUT/smoke/samples"
run flow --config=$SMOKE --workdir="$OUT/flow" --config.scoring.mpo=flow
run flowbb --config=$SMOKE --workdir="$OUT/flowbb" --config.scoring.mpo=flow --config.flow.features=backbone \
  --config.flow.backbone.arch=efficientnet-lite0 --config.flow.backbone.weights=packaged \
  --config.flow.backbone.padding=static --config.scoring.mpo_fusion=product
run tiles --config=$SMOKE --workdir="$OUT/tiles" --config.data.tiles="(1, 2)"
if [ -n "$DEMO" ]; then
  for v in shipped full; do
    rm -rf "$OUT/demo_$v"; cp -r "$DEMO" "$OUT/demo_$v"; rm -f "$OUT/demo_$v"/.lock*
    cfg=configs/demo.py; [ $v = full ] && cfg=configs/demo.py:ablation=full
    run demo_$v --config=$cfg --workdir="$OUT/demo_$v" --mode=eval
  done
fi
for w in smoke smoke_full smoke_tm flow flowbb tiles demo_shipped demo_full; do
  [ -d "$OUT/$w" ] && python "$HERE/behaviour_digest.py" "$OUT/$w" > "$OUT/digests/$w.json" 2>/dev/null
done
echo "digests in $OUT/digests"

"""MaskAD in JAX: train, fit, evaluate and predict from a config.

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

from maskad_jax.app.cli import console

if __name__ == "__main__":
    console()

"""MVTec-AD (15 classes) with the paper's hyperparameters (B4 features, dim-768 5+5-block reconstructor, 600 epochs).

    python run.py --config=configs/mvtec.py --config.data.manual_dir=/data/mvtec --workdir=runs/mvtec
Variants (comma-separated): code, cpu, smoke, ablation=<row>; see maskad_jax/configs/variants.py.
The B4 weights come from a file: see README "Backbone weights".
"""

from maskad_jax.configs import default, variants


def get_config(variant: str = ""):
    c = default.get_config()
    c.name = "mvtec"
    c.data.name = "mvtec_ad"
    return variants.apply(c, variant)

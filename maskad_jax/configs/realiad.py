"""Real-IAD (30 classes, single view) with the paper's hyperparameters (B4 features, dim-768 5+5-block
reconstructor, 600 epochs).

    python run.py --config=configs/realiad.py --config.data.manual_dir=/data/realiad --workdir=runs/realiad
Variants (comma-separated): code, cpu, smoke, ablation=<row>; see maskad_jax/configs/variants.py.
The B4 weights come from a file: see README "Backbone weights".
"""

from maskad_jax.configs import default, variants


def get_config(variant: str = ""):
    c = default.get_config()
    c.name = "realiad"
    c.data.name = "real_iad"
    return variants.apply(c, variant)

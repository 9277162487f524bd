"""The embedded default: the procedural synthetic dataset, packaged Lite0 weights, a CPU-sized model.

Runs anywhere with no download:  python run.py --config=configs/demo.py
Variants (comma-separated): smoke (tiny: tests and notebooks), code, ablation=<row>; see maskad_jax/configs/variants.py.
"""

from maskad_jax.configs import default, variants


def get_config(variant: str = ""):
    c = default.get_config()
    c.name = "demo"
    c.data.name = "synthetic"
    c.data.config = "default"
    variants.cpu(c)  # 20 epochs of the CPU-sized model
    parts = [v.strip() for v in (variant or "").split(",") if v.strip()]
    if "smoke" in parts:
        c.data.config = "tiny"
        c.train.epochs = 2
        c.train.warmup_epochs = 1
    c = variants.apply(c, ",".join(parts))
    if "smoke" in parts:
        c.train.epochs = 2  # 2 epochs of 3 steps on the tiny set
    return c

"""Any directory of classes in MVTec layout (set data.manual_dir); CPU-sized model by default.

    python run.py --config=configs/folder.py --config.data.manual_dir=../shared/data/mtd --workdir=runs/mtd

Variants (comma-separated): paper (B4 and the paper's reconstructor; needs the B4 weights and an
accelerator), code, smoke, ablation=<row>; see maskad_jax/configs/variants.py. Without "paper" the CPU-sized
model (variant cpu) applies.
"""

from maskad_jax.configs import default, variants


def get_config(variant: str = ""):
    c = default.get_config()
    c.name = "folder"
    c.data.name = "folder"
    # Your own parts: the whole image, squashed to the square (every pixel inspected at the input's
    # full resolution; pad would keep the aspect but spend the canvas on padding). The benchmark configs
    # keep the papers' centre crop. docs/results.md compares them on the whole image.
    c.data.geometry = "resize"
    parts = [v.strip() for v in (variant or "").split(",") if v.strip()]
    if "paper" in parts:
        parts.remove("paper")
    elif "smoke" not in parts:
        parts.insert(0, "cpu")
    return variants.apply(c, ",".join(parts))

"""Any directory of classes in MVTec layout (set data.manual_dir), with a CPU-sized model by default.

    python run.py --config=configs/folder.py --config.data.manual_dir=../shared/data/mtd --workdir=runs/mtd

Variants: "" (CPU-sized: Lite0 packaged weights, dim-256 4-block reconstructor), "paper" (B4 and
the paper's reconstructor; needs the B4 weights and an accelerator), "smoke" (tiny, for tests).
"""
from configs import default


def get_config(variant: str = ""):
    c = default.get_config()
    c.name = "folder"
    c.data.name = "folder"
    if variant in ("", "smoke"):
        c.model.backbone.arch = "efficientnet-lite0"
        c.model.backbone.weights = "packaged"
        r = c.model.reconstructor
        r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 256, 2, 2, 8
        c.train.epochs = 10
        c.train.batch_size = 16
        c.train.warmup_epochs = 1
        c.train.log_every = 25
        c.train.checkpoint_every = 200
        c.scoring.num_random = 2
        c.scoring.num_block = 2
        c.scoring.prototype_ratios = (0.03, 0.07)
    if variant == "smoke":
        c.name = "folder_smoke"
        c.data.image_size = 64
        r = c.model.reconstructor
        r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 32, 1, 1, 2
        c.train.epochs = 1
        c.train.batch_size = 8
        c.scoring.sinkhorn_iterations = 20
    elif variant not in ("", "paper"):
        raise ValueError(f"unknown variant {variant!r} of configs/folder.py (known: paper, smoke)")
    return c

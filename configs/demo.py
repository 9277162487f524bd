"""The embedded default: the procedural synthetic dataset, packaged Lite0 weights, a CPU-sized model.

Runs anywhere with no download:  python run.py --config=configs/demo.py
Variant ":smoke" shrinks everything further for tests (tiny images, a few steps).
"""
from configs import default


def get_config(variant: str = ""):
    c = default.get_config()
    c.name = "demo"
    c.data.name = "synthetic"
    c.data.config = "default"
    c.model.backbone.arch = "efficientnet-lite0"
    c.model.backbone.weights = "packaged"
    r = c.model.reconstructor
    r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 256, 2, 2, 8
    c.train.epochs = 20
    c.train.batch_size = 16
    c.train.warmup_epochs = 2
    c.train.log_every = 25
    c.train.checkpoint_every = 200
    c.fit.pool_ratio = 0.1
    c.scoring.num_random = 2
    c.scoring.num_block = 2
    c.scoring.prototype_ratios = (0.03, 0.07)
    if variant == "smoke":
        c.name = "demo_smoke"
        c.data.config = "tiny"
        c.data.image_size = 64
        c.data.eval_batch_size = 8
        r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 32, 1, 1, 2
        c.train.epochs = 2
        c.train.batch_size = 8
        c.train.warmup_epochs = 1
        c.train.log_every = 1
        c.scoring.sinkhorn_iterations = 20
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/demo.py (known: smoke)")
    return c

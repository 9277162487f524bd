"""Variants shared by the dataset configs: `configs/<dataset>.py:<variant>[,<variant>...]`.

code            the released code's choices as far as they can be known (docs/method.md §10)
smoke           tiny everything (Lite0 packaged weights, 64 px, a few steps): tests and notebooks
cpu             a CPU-sized model: Lite0 packaged weights, dim-256 4-block reconstructor, 7 masks,
                20 epochs, and the best-measured scoring at that size (Rec in reference units and
                a two-grid kNN M_po, its fine grid PatchCore-style, joined in held-out normal units;
                the pixel map from M_po)
ablation=<row>  a row of the paper's Table 2 (see ABLATIONS); scoring switches only, so an
                existing checkpoint can be evaluated under each row with --mode=eval
"""

from maskad_jax.common.errors import ConfigError
from maskad_jax.engine.ablations import ABLATIONS, apply_row  # noqa: F401  (the rows live in the package)


def code(c):
    c.train.target = "unnormalized"
    c.train.weight_decay = 0.05
    c.train.mask_probs = (0.5, 0.5, 0.0)
    c.model.reconstructor.encoder_depth, c.model.reconstructor.decoder_depth = 10, 0
    s = c.scoring
    s.zero_mask = False
    s.ot = "code"
    s.epsilon = 0.1  # absolute, as the released code
    s.error_units = "absolute"
    s.combine = "code"
    s.squared_error = False
    s.prototype_ratios = (0.01, 0.03, 0.05, 0.07)
    s.num_random, s.num_block = 4, 4
    s.mpo_normalisation = "test_max"
    s.knn_fine, s.mpo_fusion, s.pixel_map = False, "product", "score"


def cpu(c):
    c.model.backbone.arch = "efficientnet-lite0"
    c.model.backbone.weights = "packaged"
    r = c.model.reconstructor
    r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 256, 2, 2, 8
    # 20 epochs: the learning curves on magnetic tiles flatten after about 15 (docs/results.md), and
    # train + eval of the folder config stays near 25 minutes on 2 CPU cores
    c.train.epochs, c.train.batch_size, c.train.warmup_epochs = 20, 16, 2
    # The best-measured scoring at this scale (docs/results.md, "Which parts of MaskAD help"): the
    # reconstruction error in units of the reference branch's error, times M_po. AssDis (the OT term)
    # cost pixel accuracy on both development sets at this scale, so it is off here; the full formula
    # stays one switch away (--config.scoring.use_assdis=True, or the ablation=full row).
    c.scoring.error_units = "reference"
    c.scoring.use_assdis = False
    # Localisation (issue #23, docs/results.md): M_po on two grids; the terms joined in held-out
    # normal units; the pixel map from M_po, the image score from both terms.
    c.scoring.knn_fine = True
    c.scoring.mpo_fusion = "sum"
    c.scoring.pixel_map = "mpo"
    # The fine grid's stride-16 tap interpolated onto the stride-8 grid (PatchCore's join), not
    # repeated (issue #35): pixel AP and AUPRO within 0.2 points or above on every class of the
    # shared sets, +1.6 pixel AP on tire (docs/results.md, "The fine embedding's join").
    c.fit.fine_join = "bilinear"
    c.train.log_every, c.train.checkpoint_every = 25, 200
    c.scoring.num_random, c.scoring.num_block, c.scoring.prototype_ratios = 2, 2, (0.03, 0.07)
    c.flow.epochs, c.flow.batch_size, c.flow.log_every, c.flow.checkpoint_every = 30, 16, 100, 500


def smoke(c):
    cpu(c)
    c.data.image_size = 64
    c.data.eval_batch_size = 8
    r = c.model.reconstructor
    r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 32, 1, 1, 2
    c.train.epochs, c.train.batch_size, c.train.log_every = 1, 8, 1
    c.scoring.sinkhorn_iterations = 20
    c.flow.blocks, c.flow.cond_dim, c.flow.epochs, c.flow.batch_size, c.flow.log_every = 2, 16, 1, 8, 1


def apply(c, variant: str, known=("code", "smoke", "cpu")):
    for v in filter(None, (x.strip() for x in (variant or "").split(","))):
        if v.startswith("ablation="):
            row = v.split("=", 1)[1]
            apply_row(c.scoring, row)
            c.name = f"{c.name}_{row}"
        elif v in known:
            {"code": code, "smoke": smoke, "cpu": cpu}[v](c)
            c.name = f"{c.name}_{v}"
        else:
            raise ConfigError(f"unknown config variant {v!r}; known: {', '.join(known)}, ablation=<row>")
    return c

"""Variants shared by the dataset configs: `configs/<dataset>.py:<variant>[,<variant>...]`.

  code            the released code's choices as far as they can be known (method-spec section 10)
  smoke           tiny everything (Lite0 packaged weights, 64 px, a few steps): tests and notebooks
  cpu             a CPU-sized model: Lite0 packaged weights, dim-256 4-block reconstructor, 7 masks
  ablation=<row>  a row of the paper's Table 2 (see ABLATIONS); scoring switches only, so an
                  existing checkpoint can be evaluated under each row with --mode=eval
"""

# Table 2's rows as switch sets. The paper does not define its rows precisely; our reading:
# prototype-oriented masks belong to the multi-branch ("parallel") masking; "M_po" is the final
# multiplication by the abnormality map; "reference" adds the reference branch and AssDis.
ABLATIONS = {
    "rec_only": dict(prototype_ratios=(), num_random=1, num_block=0, zero_mask=False, use_reference=False,
                     use_mpo=False),
    "parallel": dict(use_reference=False, use_mpo=False),
    "parallel_ref": dict(use_mpo=False),
    "parallel_mpo": dict(use_reference=False),
    "no_rec": dict(use_rec=False),  # AssDis x M_po, everything else on
    "full": dict(),
    "mpo_only": dict(use_rec=False, use_reference=False),  # the nearest-neighbour baseline alone
}


def code(c):
    c.train.target = "unnormalized"
    c.train.weight_decay = 0.05
    c.train.mask_probs = (0.5, 0.5, 0.0)
    c.model.reconstructor.encoder_depth, c.model.reconstructor.decoder_depth = 10, 0
    s = c.scoring
    s.zero_mask = False
    s.ot = "code"
    s.combine = "code"
    s.squared_error = False
    s.prototype_ratios = (0.01, 0.03, 0.05, 0.07)
    s.num_random, s.num_block = 4, 4
    s.mpo_normalisation = "test_max"


def cpu(c):
    c.model.backbone.arch = "efficientnet-lite0"
    c.model.backbone.weights = "packaged"
    r = c.model.reconstructor
    r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 256, 2, 2, 8
    c.train.epochs, c.train.batch_size, c.train.warmup_epochs = 10, 16, 1
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
            if row not in ABLATIONS:
                raise ValueError(f"unknown ablation row {row!r}; known: {', '.join(ABLATIONS)}")
            for k, val in ABLATIONS[row].items():
                setattr(c.scoring, k, val)
            c.name = f"{c.name}_{row}"
        elif v in known:
            {"code": code, "smoke": smoke, "cpu": cpu}[v](c)
            c.name = f"{c.name}_{v}"
        else:
            raise ValueError(f"unknown config variant {v!r}; known: {', '.join(known)}, ablation=<row>")
    return c

"""Config validation in one place, before any heavy work (feature extraction, training, files).

validate(config, mode) raises errors.ConfigError naming every field whose value the run cannot use
(its message lists all of them, the first first). The field meanings are in configs/default.py.
"""

from __future__ import annotations

import math

from maskad_jax.common.errors import ConfigError
from maskad_jax.engine.ablations import ABLATIONS
from maskad_jax.engine.scoring import CHOICES as SCORING_CHOICES
from maskad_jax.models.reconstructor import ATTENTION_IMPLEMENTATIONS
from maskad_jax.training.thresholds import fixed_thresholds

DATASETS = ("synthetic", "mvtec_ad", "visa", "real_iad", "folder")
MODES = ("train_and_eval", "train", "eval", "predict", "export", "update", "serve")


class _Checker:
    def __init__(self, config):
        self.config, self.problems = config, []

    def get(self, field):
        node = self.config
        for part in field.split("."):
            node = node[part]
        return node

    def need(self, ok: bool, field: str, what: str):
        if not ok:
            self.problems.append(f"{field} = {self.get(field)!r}: {what}")

    def integer(self, field, low=None, high=None):
        v = self.get(field)
        ok = isinstance(v, int) and not isinstance(v, bool)
        ok = ok and (low is None or v >= low) and (high is None or v <= high)
        span = (f" >= {low}" if high is None else f" in [{low}, {high}]") if low is not None else ""
        self.need(ok, field, f"must be an integer{span}")

    def number(self, field, low=None, high=None, low_open=False):
        v = self.get(field)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (low is None or (v > low if low_open else v >= low)) and (high is None or v <= high)
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        self.need(ok, field, "must be a finite number" + (f" {lo}" if lo else "") + (f" and {hi}" if hi else ""))

    def choice(self, field, allowed):
        self.need(self.get(field) in allowed, field, f"must be one of {' | '.join(map(str, allowed))}")


def _geometry(c, config):
    c.integer("data.image_size", 32, 4096)
    c.choice("data.geometry", ("crop", "resize", "pad"))
    c.choice("eval.frame", ("auto", "input", "image"))
    tiles = tuple(config.data.tiles)
    c.need(
        tiles == ()
        or (len(tiles) == 2 and all(isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 16 for t in tiles)),
        "data.tiles",
        "must be () or (rows, cols), each an integer from 1 to 16",
    )
    c.number("data.tile_overlap", 0, 0.75)


def _mode_fields(c, config, mode):
    """The fields one mode needs."""
    if mode == "serve":
        c.integer("serve.port", 1, 65535)
        c.integer("serve.max_batch", 1, 4096)
        c.number("serve.max_wait_ms", 0, 10000)
        c.integer("serve.max_bytes", 1)
        c.integer("serve.max_images", 1, 4096)
        c.choice("serve.runtime", ("auto", "stablehlo", "onnx"))
    if mode == "update":
        c.need(
            bool(config.new_images.input),
            "new_images.input",
            "is needed with --mode=update: a folder of new good images",
        )
    if mode == "predict":
        c.need(bool(config.predict.input), "predict.input", "is needed with --mode=predict: an image or a folder")


def _thresholds(c, config):
    c.choice("predict.threshold_rule", ("quantile", "f1", "auto"))
    try:  # a number, a mapping or "a=0.5,b=0.7"; the class names are checked against the model's later
        fixed_thresholds(config.predict.threshold, None)
    except ConfigError as e:
        c.problems.append(str(e))


def validate(config, mode: str = "train_and_eval") -> None:
    c = _Checker(config)
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {' | '.join(MODES)}, got {mode!r}")
    c.choice("data.name", DATASETS)
    c.need(
        config.data.name != "folder" or bool(config.data.manual_dir),
        "data.manual_dir",
        "is needed for data.name = 'folder': the folder of classes in MVTec layout",
    )
    _geometry(c, config)
    # images per scoring batch; above 1024 one batch of 224 px images alone needs over 600 MB of input
    # and far more in the program (a million would ask for tens of GB before the first image)
    c.integer("data.eval_batch_size", 1, 1024)
    c.integer("data.num_workers", 0)
    _model(c)
    _train(c)
    c.number("fit.pool_ratio", 0, 1, low_open=True)
    c.integer("fit.projection_dim", 0)
    c.number("fit.calibration_fraction", 0, 0.9)
    c.integer("fit.max_pool_tokens", 1)
    c.number("fit.fine_pool_ratio", 0, 1, low_open=True)
    strides = tuple(config.model.backbone.strides)
    c.need(
        not config.scoring.knn_fine
        or (len(config.fit.fine_strides) > 0 and all(s in strides for s in config.fit.fine_strides)),
        "fit.fine_strides",
        f"must be some of the backbone's tap strides {strides} (model.backbone.strides) for scoring.knn_fine",
    )
    _scoring(c)
    if config.scoring.mpo == "flow":
        _flow(c)
    c.choice("eval.protocol", ("exact", "binned", "ader"))
    c.integer("eval.bins", 2)
    c.number("predict.threshold_quantile", 0, 1, low_open=True)
    _thresholds(c, config)
    c.need(
        bool(config.export.platforms) and set(config.export.platforms) <= {"cpu", "cuda", "rocm", "tpu"},
        "export.platforms",
        "must be a non-empty subset of cpu | cuda | rocm | tpu",
    )
    c.choice("export.onnx", ("auto", "yes", "no"))
    c.integer("export.onnx_batch", 1)
    _mode_fields(c, config, mode)
    if c.problems:
        more = f" (and {len(c.problems) - 1} more: {'; '.join(c.problems[1:])})" if len(c.problems) > 1 else ""
        raise ConfigError(f"invalid config: {c.problems[0]}{more}")


def _model(c):
    c.choice("model.dtype", ("float32", "bfloat16"))
    c.choice("model.backbone.padding", ("static", "tf-same"))
    c.choice("model.backbone.depthwise", ("auto", "conv", "shifts"))
    r = "model.reconstructor"
    for f in ("embed_dim", "num_heads"):
        c.integer(f"{r}.{f}", 1)
    for f in ("encoder_depth", "decoder_depth"):
        c.integer(f"{r}.{f}", 0)
    rc = c.config.model.reconstructor
    c.need(rc.encoder_depth + rc.decoder_depth >= 1, f"{r}.encoder_depth", "with decoder_depth must give >= 1 block")
    c.need(
        isinstance(rc.num_heads, int) and rc.num_heads > 0 and rc.embed_dim % rc.num_heads == 0,
        f"{r}.embed_dim",
        f"must be a multiple of num_heads ({rc.num_heads})",
    )
    c.number(f"{r}.mlp_ratio", 0, low_open=True)
    c.number(f"{r}.drop_path", 0, 1)
    c.choice(f"{r}.attention", ATTENTION_IMPLEMENTATIONS)


def _train(c):
    t = "train"
    c.integer(f"{t}.epochs", 1)
    c.integer(f"{t}.batch_size", 1)
    c.number(f"{t}.warmup_epochs", 0)
    c.number(f"{t}.lr", 0, low_open=True)
    c.number(f"{t}.min_lr", 0)
    c.number(f"{t}.weight_decay", 0)
    c.number(f"{t}.clip_norm", 0, low_open=True)
    c.choice(f"{t}.target", ("same", "unnormalized"))
    probs = c.config.train.mask_probs
    c.need(
        len(probs) == 3 and all(isinstance(p, (int, float)) and p >= 0 for p in probs) and sum(probs) > 0,
        f"{t}.mask_probs",
        "must be three non-negative numbers (random, block, foreground) with a positive sum",
    )
    for f in ("random_ratio", "block_ratio", "foreground_ratio"):
        c.number(f"{t}.{f}", 0, 1, low_open=True)
    for f in ("log_every", "checkpoint_every", "max_to_keep"):
        c.integer(f"{t}.{f}", 1)
    c.number(f"{t}.device_cache_gb", 0)
    c.integer(f"{t}.eval_every", 0)
    c.integer(f"{t}.eval_images", 2)
    c.need(
        all(r in ABLATIONS for r in c.config.train.eval_rows),
        f"{t}.eval_rows",
        f"every row must be one of {' | '.join(ABLATIONS)}",
    )


def _scoring(c):
    s = "scoring"
    for field, allowed in SCORING_CHOICES.items():
        c.choice(f"{s}.{field}", allowed)
    c.choice(f"{s}.mpo_normalisation", ("calibration", "test_max"))
    c.choice(f"{s}.devices", ("auto", "all", "one"))
    c.choice("train.devices", ("auto", "all", "one"))
    sc = c.config.scoring
    c.need(
        all(isinstance(r, (int, float)) and 0 < r <= 1 for r in sc.prototype_ratios),
        f"{s}.prototype_ratios",
        "every ratio must be in (0, 1]",
    )
    for f in ("num_random", "num_block", "branches_per_step"):
        c.integer(f"{s}.{f}", 0)
    for f in ("random_ratio", "block_ratio"):
        c.number(f"{s}.{f}", 0, 1, low_open=True)
    c.need(
        len(sc.prototype_ratios) + sc.num_random + sc.num_block + int(sc.zero_mask) >= 1,
        f"{s}.num_random",
        "with prototype_ratios, num_block and zero_mask must give at least one test mask",
    )
    c.number(f"{s}.sigma", 0)
    c.number(f"{s}.epsilon", 0, low_open=True)
    c.integer(f"{s}.sinkhorn_iterations", 1)
    c.choice(f"{s}.ot_sequential", (False, True))
    for f in ("knn_fine",):
        c.choice(f"{s}.{f}", (False, True))
    c.need(
        not (sc.knn_fine and sc.mpo == "knn" and sc.mpo_normalisation == "test_max"),
        f"{s}.knn_fine",
        "has no test-set normalisation: use scoring.mpo_normalisation = calibration with it",
    )


def _flow(c):
    f = "flow"
    c.choice(f"{f}.features", ("reconstructor", "backbone"))
    for k in ("blocks", "epochs", "batch_size", "log_every", "checkpoint_every", "max_to_keep"):
        c.integer(f"{f}.{k}", 1)
    c.need(
        isinstance(c.config.flow.cond_dim, int) and c.config.flow.cond_dim > 0 and c.config.flow.cond_dim % 4 == 0,
        f"{f}.cond_dim",
        "must be a positive multiple of 4",
    )
    c.number(f"{f}.lr", 0, low_open=True)
    c.number(f"{f}.pool_ratio", 0, 1, low_open=True)
    c.choice(f"{f}.clamp_form", ("current", "legacy"))

"""Config validation in one place, before any heavy work (feature extraction, training, files).

validate(config, mode) raises errors.ConfigError naming every field whose value the run cannot use
(its message lists all of them, the first first). The per-field checks come from each field's allowed
values in common/specs.py; the checks across fields are here. The field meanings are in
maskad_jax/configs/default.py.
"""

from __future__ import annotations

import math

from maskad_jax.common import specs
from maskad_jax.common.errors import ConfigError
from maskad_jax.engine.ablations import ABLATIONS
from maskad_jax.engine.thresholds import fixed_thresholds

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


def _fields(c, section: str, cls):
    """The per-field checks of one section, from the specs' metadata (common/specs.py)."""
    for f in specs.config_fields(cls):
        m, name = f.metadata, f"{section}.{f.name}"
        if m.get("choices") is not None:
            c.choice(name, m["choices"])
        elif m.get("kind") == "int":
            c.integer(name, m["low"], m["high"])
        elif m.get("kind") == "number":
            c.number(name, m["low"], m["high"], low_open=m["low_open"])
        elif specs.nested_spec(f) is not None:
            _fields(c, name, specs.nested_spec(f))


def _data(c, config):
    c.need(
        config.data.name != "folder" or bool(config.data.manual_dir),
        "data.manual_dir",
        "is needed for data.name = 'folder': the folder of classes in MVTec layout",
    )
    tiles = tuple(config.data.tiles)
    c.need(
        tiles == ()
        or (len(tiles) == 2 and all(isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 16 for t in tiles)),
        "data.tiles",
        "must be () or (rows, cols), each an integer from 1 to 16",
    )


def _mode_fields(c, config, mode):
    """The fields one mode needs."""
    if mode == "serve":
        _fields(c, "serve", specs.ServeSpec)
    if mode == "update":
        c.need(
            bool(config.new_images.input),
            "new_images.input",
            "is needed with --mode=update: a folder of new good images",
        )
    if mode == "predict":
        c.need(bool(config.predict.input), "predict.input", "is needed with --mode=predict: an image or a folder")


def _thresholds(c, config):
    try:  # a number, a mapping or "a=0.5,b=0.7"; the class names are checked against the model's later
        fixed_thresholds(config.predict.threshold, None)
    except ConfigError as e:
        c.problems.append(str(e))


# the cross-field checks of each section, after its per-field ones
_CROSS = {"data": _data, "model": lambda c, config: _model(c), "train": lambda c, config: _train(c)}


def validate(config, mode: str = "train_and_eval") -> None:
    c = _Checker(config)
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {' | '.join(MODES)}, got {mode!r}")
    for section, cls in specs.SECTIONS.items():
        if section == "serve" or (section == "flow" and config.scoring.mpo != "flow"):
            continue  # checked only when used
        _fields(c, section, cls)
        _CROSS.get(section, lambda c, config: None)(c, config)
        if section == "fit":
            strides = tuple(config.model.backbone.strides)
            c.need(
                not config.scoring.knn_fine
                or (len(config.fit.fine_strides) > 0 and all(s in strides for s in config.fit.fine_strides)),
                "fit.fine_strides",
                f"must be some of the backbone's tap strides {strides} (model.backbone.strides) for scoring.knn_fine",
            )
        elif section == "scoring":
            _scoring(c)
        elif section == "flow":
            _flow(c)
        elif section == "predict":
            _thresholds(c, config)
        elif section == "export":
            c.need(
                bool(config.export.platforms) and set(config.export.platforms) <= {"cpu", "cuda", "rocm", "tpu"},
                "export.platforms",
                "must be a non-empty subset of cpu | cuda | rocm | tpu",
            )
    _mode_fields(c, config, mode)
    if c.problems:
        more = f" (and {len(c.problems) - 1} more: {'; '.join(c.problems[1:])})" if len(c.problems) > 1 else ""
        raise ConfigError(f"invalid config: {c.problems[0]}{more}")


def _model(c):
    r = "model.reconstructor"
    rc = c.config.model.reconstructor
    c.need(rc.encoder_depth + rc.decoder_depth >= 1, f"{r}.encoder_depth", "with decoder_depth must give >= 1 block")
    c.need(
        isinstance(rc.num_heads, int) and rc.num_heads > 0 and rc.embed_dim % rc.num_heads == 0,
        f"{r}.embed_dim",
        f"must be a multiple of num_heads ({rc.num_heads})",
    )


def _train(c):
    t = "train"
    probs = c.config.train.mask_probs
    c.need(
        len(probs) == 3 and all(isinstance(p, (int, float)) and p >= 0 for p in probs) and sum(probs) > 0,
        f"{t}.mask_probs",
        "must be three non-negative numbers (random, block, foreground) with a positive sum",
    )
    c.need(
        all(r in ABLATIONS for r in c.config.train.eval_rows),
        f"{t}.eval_rows",
        f"every row must be one of {' | '.join(ABLATIONS)}",
    )


def _scoring(c):
    s = "scoring"
    sc = c.config.scoring
    c.need(
        all(isinstance(r, (int, float)) and 0 < r <= 1 for r in sc.prototype_ratios),
        f"{s}.prototype_ratios",
        "every ratio must be in (0, 1]",
    )
    c.need(
        len(sc.prototype_ratios) + sc.num_random + sc.num_block + int(sc.zero_mask) >= 1,
        f"{s}.num_random",
        "with prototype_ratios, num_block and zero_mask must give at least one test mask",
    )
    c.need(
        not (sc.knn_fine and sc.mpo == "knn" and sc.mpo_normalisation == "test_max"),
        f"{s}.knn_fine",
        "has no test-set normalisation: use scoring.mpo_normalisation = calibration with it",
    )


def _flow(c):
    c.need(
        isinstance(c.config.flow.cond_dim, int) and c.config.flow.cond_dim > 0 and c.config.flow.cond_dim % 4 == 0,
        "flow.cond_dim",
        "must be a positive multiple of 4",
    )

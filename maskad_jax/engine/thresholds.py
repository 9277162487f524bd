"""Decision thresholds per class, and a score a person can read.

A class's threshold comes from one of three rules (predict.threshold_rule, maskad_jax/configs/default.py):
  quantile  the predict.threshold_quantile quantile of the scores of normal training images held out
            of the pools (0.99: about 1% false alarms on normal parts like those; the default).
  f1        the F1-optimal threshold on labelled images the user supplies (data.validation: good and
            defective images, never the test set), found when the model is fitted or updated.
  auto      f1 for the classes that have validation thresholds, quantile for the others.
predict.threshold overrides them: one number for every class, or per class ({"screw": 0.5} in
Python or on the command line, or "screw=0.5,nut=0.7"); classes it does not name keep the rule.

The normalised score is (score - m) / (threshold - m), m the median held-out normal score of the
class: 0 is a typical good part, 1.0 the threshold, 2 as far again above it. It is undefined (None)
when the threshold is not above m (a fixed threshold that flags most good parts).
"""

from __future__ import annotations

import numpy as np

from maskad_jax.common.errors import ConfigError
from maskad_jax.common.specs import PredictSpec, ScoringSpec
from maskad_jax.engine.fit_state import scoring_signature

RULES = ("quantile", "f1", "auto")


def fixed_thresholds(value, class_names) -> dict:
    """predict.threshold as {class: number} for the classes it fixes ({} when it fixes none).

    value: a number (-1, the default: none; else every class), a mapping class -> number, or "a=0.5,b=0.7"
    (a class named twice is refused). Any other negative number is refused: it read as "none" before.
    class_names: the model's classes (a number fixes all of them; None: only the form is checked)."""
    if isinstance(value, bool):
        raise ConfigError(f"predict.threshold must be a number or a per-class mapping, got {value!r}")
    if isinstance(value, (int, float)):
        if not np.isfinite(value):
            raise ConfigError(f"predict.threshold must be a finite number, got {value!r}")
        if value < 0 and value != -1:
            raise ConfigError(
                f"predict.threshold {value:g}: -1 (the default) means the calibrated thresholds; another negative "
                f"number is ambiguous: give it per class (e.g. 'screw={value:g}') if you mean it as a threshold"
            )
        return {} if value == -1 else {c: float(value) for c in class_names or ()}
    if isinstance(value, str):
        try:
            pairs = [(k.strip(), float(v)) for k, v in (item.split("=", 1) for item in value.split(",") if item)]
        except ValueError:
            raise ConfigError(
                f"predict.threshold {value!r}: write a number, or class=number pairs separated by commas"
            ) from None
        twice = sorted({k for k, _ in pairs if sum(1 for j, _ in pairs if j == k) > 1})
        if twice:
            raise ConfigError(f"predict.threshold {value!r} names class(es) {twice} more than once: give each once")
        value = dict(pairs)
    if not hasattr(value, "items"):
        raise ConfigError(f"predict.threshold must be a number or a per-class mapping, got {value!r}")
    out = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ConfigError(f"predict.threshold[{k!r}] must be a finite number, got {v!r}")
        out[str(k)] = float(v)
    unknown = [] if class_names is None else sorted(set(out) - set(class_names))
    if unknown:
        raise ConfigError(f"predict.threshold names class(es) {unknown} the model does not have: {list(class_names)}")
    return out


def f1_threshold(scores, labels) -> tuple[float, float]:
    """(threshold, F1) maximising F1 when images scoring >= threshold are called defective; ties go
    to the higher threshold (fewer alarms). labels: 1 = defective; needs at least one."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if not y.any():
        raise ValueError("an F1-optimal threshold needs at least one defective image")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last of each run of equal scores: a threshold at that score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    f1 = 2 * tp / (2 * tp + fp + (y.sum() - tp))
    best = int(np.argmax(f1))  # the first maximum: the highest threshold
    return float(s[last][best]), float(f1[best])


def class_threshold(pc: PredictSpec, sc: ScoringSpec, pools, cls: str, of: str = "score") -> float:
    """The decision threshold of a class (of = "map": the level outlining a map's regions).

    With scoring.pixel_map = mpo the map has its own scale: its level is always the quantile of the
    held-out images' map maxima, whatever fixes the score's."""
    own_map = of == "map" and sc.pixel_map != "score"
    fixed = fixed_thresholds(pc.threshold, pools.class_names)
    if cls in fixed and not own_map:
        return fixed[cls]
    signature = None if own_map and cls in fixed else scoring_signature(sc)
    rule = pc.threshold_rule
    if not own_map and rule in ("f1", "auto"):
        val = pools.val_thresholds.get(cls)
        if val is not None:
            pools.threshold(cls, pc.threshold_quantile, signature)  # the calibration's scoring check
            return float(val["threshold"])
        if rule == "f1":
            raise ConfigError(
                f"predict.threshold_rule = 'f1' and class {cls!r} has no threshold from labelled validation "
                f"images: give data.validation (good and defective images of the class) when training or "
                f"with --mode=update, or use threshold_rule 'auto' or 'quantile'"
            )
    return pools.threshold(cls, pc.threshold_quantile, signature, of)


def threshold_images(pc: PredictSpec, pools, cls: str) -> int:
    """How many images a class's decision threshold rests on: the held-out good images its quantile is
    taken over, or the labelled validation images of its F1 threshold; 0 for a number given."""
    if cls in fixed_thresholds(pc.threshold, pools.class_names):
        return 0
    val = pools.val_thresholds.get(cls)
    if pc.threshold_rule in ("f1", "auto") and val is not None:
        return int(val["good"]) + int(val["defective"])
    return len(pools.cal_scores.get(cls) or [])


def target_false_alarm(pc: PredictSpec, pools, cls: str) -> float | None:
    """The share of good parts a class's threshold is meant to flag: 1 - predict.threshold_quantile
    when the quantile rule sets it; None when a number or an F1 threshold does (they target none)."""
    if cls in fixed_thresholds(pc.threshold, pools.class_names):
        return None
    if pc.threshold_rule in ("f1", "auto") and pools.val_thresholds.get(cls) is not None:
        return None
    return float(1.0 - pc.threshold_quantile)


def false_alarms(pc: PredictSpec, sc: ScoringSpec, pools, scores, labels, class_of) -> dict:
    """Per class, on the test set's good images (labels 0): how many the decision threshold flags
    (score >= threshold, as predict decides), their rate and the rate the threshold targets
    (docs/metrics.md, "False alarms"). A class without a usable threshold gets threshold None."""
    scores, labels, class_of = np.asarray(scores), np.asarray(labels), np.asarray(class_of)
    out = {}
    for cls in pools.class_names:
        good = (class_of == cls) & (labels == 0)
        try:
            thr = class_threshold(pc, sc, pools, cls)
        except (ValueError, ConfigError):  # no calibration for this scoring (an ablation row), or no F1 threshold
            thr = None
        flagged = int((scores[good] >= thr).sum()) if thr is not None else None
        out[cls] = {
            "threshold": thr,
            "good_images": int(good.sum()),
            "false_alarms": flagged,
            "rate": flagged / int(good.sum()) if flagged is not None and good.any() else None,
            "target": target_false_alarm(pc, pools, cls),
            "threshold_images": threshold_images(pc, pools, cls),
        }
    return out


MIN_THRESHOLD_IMAGES = 20  # below this a quantile threshold is warned about (0.99 of 20 is their maximum)


def class_thresholds(pc: PredictSpec, sc: ScoringSpec, pools) -> list[float]:
    """class_threshold of every pool, in the pools' order."""
    return [class_threshold(pc, sc, pools, c) for c in pools.class_names]


def normal_medians(pools) -> list[float]:
    """The median held-out normal score of every pool (NaN when the fit has none)."""
    return [
        float(np.median(pools.cal_scores[c])) if pools.cal_scores.get(c) else float("nan") for c in pools.class_names
    ]


def normalised(score: float, threshold: float, median: float) -> float | None:
    """(score - median) / (threshold - median); None when the threshold is not above the median."""
    if not (np.isfinite(median) and threshold > median):
        return None
    return float((score - median) / (threshold - median))


def threshold_rule(pc: PredictSpec, pools=None) -> str:
    """One line saying where the thresholds come from."""
    names = pools.class_names if pools is not None else ()
    fixed = fixed_thresholds(pc.threshold, names) if pools is not None else {}
    quant = (
        f"the {pc.threshold_quantile:g} quantile of the scores of normal training images held out of the pools "
        f"(predict.threshold_quantile)"
    )
    if pools is not None and fixed and len(fixed) == len(names) and len(set(fixed.values())) == 1:
        return f"threshold {next(iter(fixed.values())):g}, set by predict.threshold"
    parts = []
    if fixed:
        parts.append("set by predict.threshold for " + ", ".join(f"{k} {v:g}" for k, v in fixed.items()))
    with_val = [c for c in names if c not in fixed and pools.val_thresholds.get(c)] if pools is not None else []
    if pc.threshold_rule in ("f1", "auto") and with_val:
        parts.append(f"F1-optimal on the validation images for {', '.join(with_val)}")
    if pc.threshold_rule != "f1" and (pools is None or len(fixed) + len(with_val) < len(names)):
        parts.append(quant)
    return "threshold per class: " + "; ".join(parts)

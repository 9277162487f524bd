"""Fit after training: nominal token pools (greedy k-center) and calibration statistics per class.

For each class (or one shared pool with fit.per_class=False), its normal training images are split
by a seeded permutation: `calibration_fraction` of them are held out, the rest give the pool's
tokens (input features, and the paired target features when training regressed the unnormalised
view). The pool keeps ceil(pool_ratio x tokens) of them, chosen by greedy k-center. The held-out
images' tokens give `cal_scale`, the mean L2 distance of a normal token to its nearest pool token:
M_po divides by it, so an image is scored on its own, never against the rest of a test set.
With the fine embedding (scoring.knn_fine) a second pool per class is fitted the same way on its
tokens (k-center at fit.fine_pool_ratio), with its own calibration scale.
After training, calibration (calibration.calibrate) scores the held-out images and adds to the fit
their image scores, their pixel maps' maxima, and per class the mean and spread of the two terms
(term_stats) that scoring.mpo_fusion = sum standardises; all under one scoring signature.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile

import jax.numpy as jnp
import numpy as np

from maskad_jax.common import specs
from maskad_jax.common.digests import sha256_file
from maskad_jax.common.errors import ConfigError, DataError, MissingInputError, UserError
from maskad_jax.common.specs import DataSpec, ScoringSpec
from maskad_jax.engine.coreset import greedy_kcenter, nearest


class PoolsCorruptError(UserError, ValueError):
    """fit/pools.npz or pools.json cannot be read or differs from its saved digest."""


ASPECT_TOLERANCE = 1.1  # an image may be this much wider or narrower than its class's training images


def scoring_difference(calibrated: dict, now: dict) -> str:
    """The differing scoring fields, as "scoring.<field> <value> at calibration, <value> now; ..."."""
    diff = [k for k in sorted(set(now) | set(calibrated)) if now.get(k) != calibrated.get(k)]
    return "; ".join(f"scoring.{k} {calibrated.get(k)!r} at calibration, {now.get(k)!r} now" for k in diff)


def scoring_signature(sc: ScoringSpec) -> dict:
    """The scoring settings held-out scores are computed under (common/specs.scoring_signature: every
    scoring field but the placement ones): a threshold calibrated from them is a threshold for these
    settings only (another scoring gives scores of another scale)."""
    return specs.scoring_signature(sc)


@dataclasses.dataclass
class Pools:
    pool_in: np.ndarray  # (K, P, C) padded
    pool_tgt: np.ndarray  # (K, P, C); equal to pool_in when the target is h itself
    valid: np.ndarray  # (K, P) bool
    cal_scale: np.ndarray  # (K,)
    class_names: tuple  # names of the K pools ('*' for a shared pool)
    calibration: dict  # class -> positions (into the training set) of the held-out images
    cal_scores: dict = dataclasses.field(default_factory=dict)  # class -> image scores of those images
    src: np.ndarray | None = None  # (K, P) training-set position of each pool token's image (-1: padding)
    cal_scoring: dict | None = None  # scoring_signature the cal_scores were computed under (None: older fits)
    fine_in: np.ndarray | None = None  # (K, P2, Cf) the fine pools (scoring.knn_fine), padded
    fine_valid: np.ndarray | None = None  # (K, P2) bool
    fine_cal_scale: np.ndarray | None = None  # (K,)
    term_stats: np.ndarray | None = None  # (K, 4): held-out normal mean, std of P and of M_po (under cal_scoring)
    cal_map_max: dict = dataclasses.field(default_factory=dict)  # class -> the held-out images' pixel-map maxima
    geometry: dict | None = None  # {"geometry": data.geometry, "image_size": data.image_size} the pools were fitted at
    # class -> {"threshold", "f1", "good", "defective"}: F1-optimal thresholds on data.validation (thresholds.py)
    val_thresholds: dict = dataclasses.field(default_factory=dict)
    ignore: np.ndarray | None = (
        None  # (K, S, S) bool: each class's ignore region in the input frame (data.ignore_masks)
    )
    added: list = dataclasses.field(default_factory=list)  # --mode=update: [{"class", "files": {name: sha256}, ...}]

    def require_geometry(self, d: DataSpec) -> None:
        """Refuse a run whose data.geometry or data.image_size differs from the fit's (older fits: crop)."""
        fitted = self.geometry or {"geometry": "crop", "image_size": None}
        now = {"geometry": d.geometry, "image_size": int(d.image_size)}
        if fitted["geometry"] != now["geometry"] or fitted["image_size"] not in (None, now["image_size"]):
            raise ConfigError(
                f"this workdir's model was fitted with data.geometry = {fitted['geometry']!r} at data.image_size = "
                f"{fitted['image_size']}, and this run asks for {now['geometry']!r} at {now['image_size']}: use the "
                f"training config's geometry (images must reach the model as they did in training)"
            )

    def aspect_range(self, cls: str):
        """[min, max] width/height of the class's training images (the fit's record), or None."""
        return (self.geometry or {}).get("aspect", {}).get(cls)

    def shape_fits(self, cls: str, width: int, height: int) -> bool:
        """Whether an image's aspect ratio lies within the class's training range, ASPECT_TOLERANCE
        either way (True when the fit has no record): predict notes, and update refuses, the others."""
        aspect = self.aspect_range(cls)
        a = width / height
        return not aspect or aspect[0] / ASPECT_TOLERANCE <= a <= aspect[1] * ASPECT_TOLERANCE

    def calibrated_for(self, sc: ScoringSpec, terms_only: bool = False) -> bool:
        """Whether the calibration was computed under this config's scoring (terms_only: whether its
        term_stats still hold, which fields acting after the terms do not change)."""
        if self.cal_scoring is None:
            return False
        drop = specs.after_terms_fields() if terms_only else ()
        return {k: v for k, v in self.cal_scoring.items() if k not in drop} == {
            k: v for k, v in scoring_signature(sc).items() if k not in drop
        }

    def threshold(self, cls: str, quantile: float, scoring: dict | None = None, of: str = "score") -> float:
        """A decision threshold: the given quantile of the held-out normal images' scores of a pool
        (of = "score"), or of their pixel maps' maxima (of = "map": the level at which a map's
        region counts as over the threshold; the same as the score's when the pixel map is the
        score's own map, and the score's for older fits that did not record map maxima).

        scoring: the scoring_signature of the run that will compare scores with it; refused when it
        differs from the calibration's (the scores would be of another scale)."""
        if scoring is not None and self.cal_scoring is not None and scoring != self.cal_scoring:
            what = scoring_difference(self.cal_scoring, scoring)
            raise ConfigError(
                f"the calibrated thresholds are for the scoring the model was trained with, and this run's differs "
                f"({what}): score with the training config's scoring, or set predict.threshold explicitly"
            )
        scores = (self.cal_map_max.get(cls) if of == "map" else None) or self.cal_scores.get(cls) or []
        if not scores:
            raise ConfigError(f"no calibration scores for pool {cls!r}; set predict.threshold explicitly")
        return float(np.quantile(np.asarray(scores), quantile))

    def pool_index(self, class_names_of_images) -> np.ndarray:
        if self.class_names == ("*",):
            return np.zeros(len(class_names_of_images), np.int32)
        lookup = {c: i for i, c in enumerate(self.class_names)}
        missing = sorted({c for c in class_names_of_images if c not in lookup})
        if missing:
            raise DataError(
                f"no nominal pool for class(es) {missing}; the model was fitted on {list(self.class_names)}"
            )
        return np.asarray([lookup[c] for c in class_names_of_images], np.int32)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        extra = {} if self.src is None else {"src": self.src}
        if self.fine_in is not None:
            extra.update(fine_in=self.fine_in, fine_valid=self.fine_valid, fine_cal_scale=self.fine_cal_scale)
        if self.ignore is not None:
            extra["ignore"] = self.ignore
        if not (np.all(np.isfinite(self.cal_scale)) and all(np.all(np.isfinite(v)) for v in self.cal_scores.values())):
            raise FloatingPointError(
                f"refusing to save the fit to {directory}: its calibration is not finite (NaN "
                f"features or scores: check the backbone weights and the training)"
            )
        npz = os.path.join(directory, "pools.npz")
        np.savez(npz, pool_in=self.pool_in, pool_tgt=self.pool_tgt, valid=self.valid, cal_scale=self.cal_scale, **extra)
        with open(os.path.join(directory, "pools.json"), "w") as f:
            json.dump(
                {
                    "npz_sha256": sha256_file(npz),
                    "class_names": list(self.class_names),
                    "calibration": {k: [int(i) for i in v] for k, v in self.calibration.items()},
                    "cal_scores": {k: [float(x) for x in v] for k, v in self.cal_scores.items()},
                    "cal_scoring": self.cal_scoring,
                    "term_stats": None if self.term_stats is None else np.asarray(self.term_stats).tolist(),
                    "cal_map_max": {k: [float(x) for x in v] for k, v in self.cal_map_max.items()},
                    "geometry": self.geometry,
                    "val_thresholds": self.val_thresholds,
                    "added": self.added,
                },
                f,
            )

    @classmethod
    def load(cls, directory: str) -> "Pools":
        path = os.path.join(directory, "pools.npz")
        if not os.path.isfile(path):
            raise MissingInputError(f"no fitted pools at {path}: run --mode=train or train_and_eval first")
        meta_path = os.path.join(directory, "pools.json")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise PoolsCorruptError(f"{meta_path} is missing or unreadable ({e}): rerun --mode=train") from None
        digest = meta.get("npz_sha256")
        if digest is not None and sha256_file(path) != digest:
            raise PoolsCorruptError(
                f"{path} is corrupt: its contents differ from the digest in pools.json (a "
                f"truncated copy or bit rot); rerun --mode=train to refit"
            )
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            return cls(
                arrays["pool_in"],
                arrays["pool_tgt"],
                arrays["valid"],
                arrays["cal_scale"],
                tuple(meta["class_names"]),
                {k: np.asarray(v, int) for k, v in meta["calibration"].items()},
                meta.get("cal_scores", {}),
                arrays.get("src"),
                meta.get("cal_scoring"),
                arrays.get("fine_in"),
                arrays.get("fine_valid"),
                arrays.get("fine_cal_scale"),
                None if meta.get("term_stats") is None else np.asarray(meta["term_stats"], np.float32),
                meta.get("cal_map_max", {}),
                meta.get("geometry"),
                meta.get("val_thresholds", {}),
                arrays.get("ignore"),
                meta.get("added", []),
            )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise PoolsCorruptError(
                f"{path} is unreadable ({type(e).__name__}: {e}); rerun --mode=train to refit"
            ) from None


def fit_pools(
    h_in: np.ndarray,
    h_tgt: np.ndarray | None,
    class_names_of_images,
    fit_cfg,
    seed: int,
    fine: np.ndarray | None = None,
    image_of: np.ndarray | None = None,
) -> Pools:
    """h_in (N, gh, gw, C) features of the normal training images; their class names. fine (N, fh, fw,
    Cf): their fine embeddings, for the fine pools (scoring.knn_fine). image_of (N,): with tiles
    (tiling.py), each row's image: images, not tiles, are held out."""
    names = np.asarray(class_names_of_images)
    groups = (
        {"*": np.arange(len(names))}
        if not fit_cfg.per_class
        else {c: np.nonzero(names == c)[0] for c in sorted(set(names.tolist()))}
    )
    pools, fine_pools, cal_pos = [], [], {}
    for gi, (cls, pos) in enumerate(groups.items()):
        rng = np.random.default_rng([seed, gi])
        cal, fit = _held_out(pos, rng, fit_cfg.calibration_fraction, image_of)
        pools.append(_kcenter_pool(h_in, h_tgt, fit, cal, fit_cfg.pool_ratio, fit_cfg, seed, rng))
        if fine is not None:  # its own generator: the token pool's draws stay as they were
            frng = np.random.default_rng([seed, gi, 1])
            fine_pools.append(_kcenter_pool(fine, None, fit, cal, fit_cfg.fine_pool_ratio, fit_cfg, seed, frng))
        cal_pos[cls] = cal
    pool_in, pool_tgt, valid, src, cal_scale = _stack(pools)
    out = Pools(pool_in, pool_tgt, valid, cal_scale, tuple(groups), cal_pos, src=src)
    if fine is not None:
        out.fine_in, _, out.fine_valid, _, out.fine_cal_scale = _stack(fine_pools)
    return out


def _held_out(pos, rng, fraction, image_of=None):
    """(held-out positions, pool positions) of one class: `fraction` of its images (at least one,
    never all), drawn by rng; with image_of, whole images (all their tiles) at a time."""
    if image_of is None:
        pos = pos[rng.permutation(len(pos))]
        n_cal = int(round(fraction * len(pos)))
        n_cal = min(max(n_cal, 1), len(pos) - 1) if len(pos) > 1 else 0
        return pos[:n_cal], pos[n_cal:]
    images = np.unique(image_of[pos])
    cal_images, _ = _held_out(images, rng, fraction)
    held = np.isin(image_of[pos], cal_images)
    return pos[held], pos[~held]


def _kcenter_pool(feats, feats_tgt, fit, cal, ratio, fit_cfg, seed, rng):
    """One class's pool: greedy k-center over the tokens of the images at `fit` (at most
    fit.max_pool_tokens of them, a random subset above it), and the calibration scale: the mean
    distance of the held-out images' (`cal`) tokens to it. (tokens in, tokens tgt, src, scale)."""
    c_dim = feats.shape[-1]
    tok_in = feats[fit].reshape(-1, c_dim)
    tok_tgt = (feats_tgt if feats_tgt is not None else feats)[fit].reshape(-1, c_dim)
    tok_src = np.repeat(fit, feats.shape[1] * feats.shape[2])
    if len(tok_in) > fit_cfg.max_pool_tokens:
        sub = rng.choice(len(tok_in), fit_cfg.max_pool_tokens, replace=False)
        tok_in, tok_tgt, tok_src = tok_in[sub], tok_tgt[sub], tok_src[sub]
    k = int(np.ceil(ratio * len(tok_in)))
    sel = greedy_kcenter(tok_in, k, start=0, projection_dim=fit_cfg.projection_dim, seed=seed)
    if len(cal):
        scale = mean_nearest(feats[cal], tok_in[sel])
    else:  # a single image: no held-out data; distances of pool tokens would be 0, so use 1
        scale = 1.0
    return tok_in[sel], tok_tgt[sel], tok_src[sel], scale


def mean_nearest(queries: np.ndarray, pool: np.ndarray) -> float:
    """The mean L2 distance of the query tokens (..., C) to their nearest pool token (a calibration scale)."""
    d, _ = nearest(jnp.asarray(queries.reshape(-1, queries.shape[-1])), jnp.asarray(pool))
    return float(jnp.mean(jnp.sqrt(d)))


def save_replacing(pools: Pools, directory: str) -> None:
    """Save the fit beside `directory` and move its files over the old ones (pools.npz, then
    pools.json, which holds the npz's digest: an interrupted swap is refused at load, never used)."""
    tmp = directory.rstrip(os.sep) + ".new"
    pools.save(tmp)
    for name in ("pools.npz", "pools.json"):
        os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    os.rmdir(tmp)


def _stack(pools):
    """Per-class pools padded to one (K, P, C) layout: (in, tgt, valid, src, scales)."""
    p = max(len(a) for a, _, _, _ in pools)
    c_dim = pools[0][0].shape[-1]
    pool_in = np.zeros((len(pools), p, c_dim), np.float32)
    pool_tgt = np.zeros_like(pool_in)
    valid = np.zeros((len(pools), p), bool)
    src = np.full((len(pools), p), -1, np.int32)
    for i, (a, b, sr, _) in enumerate(pools):
        pool_in[i, : len(a)], pool_tgt[i, : len(b)], valid[i, : len(a)], src[i, : len(sr)] = a, b, True, sr
    return pool_in, pool_tgt, valid, src, np.asarray([sc for _, _, _, sc in pools], np.float32)

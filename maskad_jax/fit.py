"""Fit after training: nominal token pools (greedy k-center) and calibration statistics per class.

For each class (or one shared pool with fit.per_class=False), its normal training images are split
by a seeded permutation: `calibration_fraction` of them are held out, the rest give the pool's
tokens (input features, and the paired target features when training regressed the unnormalised
view). The pool keeps ceil(pool_ratio x tokens) of them, chosen by greedy k-center. The held-out
images' tokens give `cal_scale`, the mean L2 distance of a normal token to its nearest pool token:
M_po divides by it, so an image is scored on its own, never against the rest of a test set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile

import jax.numpy as jnp
import numpy as np

from maskad_jax.coreset import greedy_kcenter, nearest
from maskad_jax.digests import sha256_file
from maskad_jax.errors import ConfigError, DataError, MissingInputError, UserError


class PoolsCorruptError(UserError, ValueError):
    """fit/pools.npz or pools.json cannot be read or differs from its saved digest."""


# scoring fields that change how the work is laid out, not the scores (left out of the calibration's signature)
PLACEMENT_ONLY = ("branches_per_step", "devices", "ot_sequential")


def scoring_signature(config) -> dict:
    """The scoring settings held-out scores are computed under: a threshold calibrated from them
    is a threshold for these settings only (another scoring gives scores of another scale)."""
    fields = json.loads(config.scoring.to_json(sort_keys=True))
    return {k: v for k, v in fields.items() if k not in PLACEMENT_ONLY}


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

    def threshold(self, cls: str, quantile: float, scoring: dict | None = None) -> float:
        """A decision threshold: the given quantile of the held-out normal images' scores of a pool.

        scoring: the scoring_signature of the run that will compare scores with it; refused when it
        differs from the calibration's (the scores would be of another scale)."""
        if scoring is not None and self.cal_scoring is not None and scoring != self.cal_scoring:
            cal = self.cal_scoring
            diff = [k for k in sorted(set(scoring) | set(cal)) if scoring.get(k) != cal.get(k)]
            what = "; ".join(f"scoring.{k} {cal.get(k)!r} at calibration, {scoring.get(k)!r} now" for k in diff)
            raise ConfigError(
                f"the calibrated thresholds are for the scoring the model was trained with, and this run's differs "
                f"({what}): score with the training config's scoring, or set predict.threshold explicitly"
            )
        scores = self.cal_scores.get(cls) or []
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
            )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise PoolsCorruptError(
                f"{path} is unreadable ({type(e).__name__}: {e}); rerun --mode=train to refit"
            ) from None


def fit_pools(h_in: np.ndarray, h_tgt: np.ndarray | None, class_names_of_images, fit_cfg, seed: int) -> Pools:
    """h_in (N, gh, gw, C) features of the normal training images; their class names."""
    names = np.asarray(class_names_of_images)
    groups = (
        {"*": np.arange(len(names))}
        if not fit_cfg.per_class
        else {c: np.nonzero(names == c)[0] for c in sorted(set(names.tolist()))}
    )
    c_dim = h_in.shape[-1]
    pools, cals, cal_scale, cal_pos = [], [], [], {}
    for gi, (cls, pos) in enumerate(groups.items()):
        rng = np.random.default_rng([seed, gi])
        pos = pos[rng.permutation(len(pos))]
        n_cal = int(round(fit_cfg.calibration_fraction * len(pos)))
        n_cal = min(max(n_cal, 1), len(pos) - 1) if len(pos) > 1 else 0
        cal, fit = pos[:n_cal], pos[n_cal:]
        tok_in = h_in[fit].reshape(-1, c_dim)
        tok_tgt = (h_tgt if h_tgt is not None else h_in)[fit].reshape(-1, c_dim)
        tok_src = np.repeat(fit, h_in.shape[1] * h_in.shape[2])
        if len(tok_in) > fit_cfg.max_pool_tokens:
            sub = rng.choice(len(tok_in), fit_cfg.max_pool_tokens, replace=False)
            tok_in, tok_tgt, tok_src = tok_in[sub], tok_tgt[sub], tok_src[sub]
        k = int(np.ceil(fit_cfg.pool_ratio * len(tok_in)))
        sel = greedy_kcenter(tok_in, k, start=0, projection_dim=fit_cfg.projection_dim, seed=seed)
        pools.append((tok_in[sel], tok_tgt[sel], tok_src[sel]))
        if n_cal:
            d, _ = nearest(jnp.asarray(h_in[cal].reshape(-1, c_dim)), jnp.asarray(tok_in[sel]))
            cal_scale.append(float(jnp.mean(jnp.sqrt(d))))
        else:  # a single image: no held-out data; distances of pool tokens would be 0, so use 1
            cal_scale.append(1.0)
        cal_pos[cls] = cal
        cals.append(cal)
    p = max(len(a) for a, _, _ in pools)
    pool_in = np.zeros((len(pools), p, c_dim), np.float32)
    pool_tgt = np.zeros_like(pool_in)
    valid = np.zeros((len(pools), p), bool)
    src = np.full((len(pools), p), -1, np.int32)
    for i, (a, b, s) in enumerate(pools):
        pool_in[i, : len(a)], pool_tgt[i, : len(b)], valid[i, : len(a)], src[i, : len(s)] = a, b, True, s
    return Pools(pool_in, pool_tgt, valid, np.asarray(cal_scale, np.float32), tuple(groups), cal_pos, src=src)

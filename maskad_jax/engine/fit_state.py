"""The fit: what training leaves beside the reconstructor's checkpoint, as immutable, versioned parts.

  NominalPools   per class, the k-center pools of normal tokens (and of the fine grid), their
                 calibration scales, which training images were held out of them
  Calibration    the held-out images' scores and pixel-map maxima, the terms' statistics, and the
                 scoring they were computed under (a threshold holds for that scoring only)
  InputContract  how images must reach the model: geometry, image size, each class's aspect range,
                 ignore regions
  val_thresholds F1-optimal thresholds on data.validation (engine/thresholds.py)
  updates        the record of --mode=update (class, files and their SHA-256, tokens added)

`Fit` holds them (`dataclasses.replace` gives a changed copy; nothing is assigned in place) and keeps
the read-only names the scoring code uses (pool_in, cal_scores, geometry, ...). It is written as ONE
file, <dir>/fit.npz (the arrays, and the parts' JSON with `format_version` and a SHA-256 of the
arrays), to a temporary name and renamed over the old one: a crash at any point leaves either the old
fit or the new one, whole. Fits written before format 2 (pools.npz + pools.json) are read by one
migration (_from_v1) and replaced by fit.npz at the next save. Eval, predict and export read a fit
through this module only; training/fit.py makes one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile

import numpy as np

from maskad_jax.common import specs
from maskad_jax.common.errors import ConfigError, DataError, MissingInputError, UserError
from maskad_jax.common.specs import DataSpec, ScoringSpec

FORMAT_VERSION = 2  # 1: pools.npz + pools.json (up to a4eff19); 2: one fit.npz with the parts
FILE = "fit.npz"
LEGACY = ("pools.npz", "pools.json")
ASPECT_TOLERANCE = 1.1  # an image may be this much wider or narrower than its class's training images


class FitCorruptError(UserError, ValueError):
    """A fit file that cannot be read or differs from its recorded digest."""


PoolsCorruptError = FitCorruptError  # the name earlier versions raised


def scoring_signature(sc: ScoringSpec) -> dict:
    """The scoring settings held-out scores are computed under (common/specs.scoring_signature)."""
    return specs.scoring_signature(sc)


def scoring_difference(calibrated: dict, now: dict) -> str:
    """The differing scoring fields, as "scoring.<field> <value> at calibration, <value> now; ..."."""
    diff = [k for k in sorted(set(now) | set(calibrated)) if now.get(k) != calibrated.get(k)]
    return "; ".join(f"scoring.{k} {calibrated.get(k)!r} at calibration, {now.get(k)!r} now" for k in diff)


@dataclasses.dataclass(frozen=True)
class NominalPools:
    pool_in: np.ndarray  # (K, P, C) padded
    pool_tgt: np.ndarray  # (K, P, C); equal to pool_in when the target is h itself
    valid: np.ndarray  # (K, P) bool
    cal_scale: np.ndarray  # (K,) mean distance of held-out normal tokens to the pool (M_po's unit)
    class_names: tuple  # names of the K pools ('*' for a shared pool)
    held_out: dict  # class -> positions (into the training set) of the images held out of the pool
    src: np.ndarray | None = None  # (K, P) training-set position of each token's image (-1: none)
    fine_in: np.ndarray | None = None  # (K, P2, Cf) the fine pools (scoring.knn_fine), padded
    fine_valid: np.ndarray | None = None  # (K, P2) bool
    fine_cal_scale: np.ndarray | None = None  # (K,)
    # what the fine pools' tokens are: {"strides": [...], "join": "repeat" | "bilinear"} (fit.fine_*);
    # None for fits without fine pools, or made before it was recorded (then: join "repeat")
    fine_embedding: dict | None = None


@dataclasses.dataclass(frozen=True)
class Calibration:
    scores: dict = dataclasses.field(default_factory=dict)  # class -> the held-out images' scores
    map_max: dict = dataclasses.field(default_factory=dict)  # class -> their pixel maps' maxima
    term_stats: np.ndarray | None = None  # (K, 4): held-out mean, std of P and of M_po
    scoring: dict | None = None  # the scoring_signature they were computed under (None: not calibrated)


@dataclasses.dataclass(frozen=True)
class InputContract:
    geometry: str = "crop"  # data.geometry the pools were fitted under
    image_size: int | None = None  # data.image_size (None: fits that did not record it)
    aspect: dict = dataclasses.field(default_factory=dict)  # class -> [min, max] width / height of its images
    ignore: np.ndarray | None = None  # (K, S, S) bool: each class's ignore region in the input frame


@dataclasses.dataclass(frozen=True)
class Fit:
    nominal: NominalPools
    calibration: Calibration = Calibration()
    contract: InputContract = InputContract()
    val_thresholds: dict = dataclasses.field(default_factory=dict)  # class -> {"threshold", "f1", ...}
    updates: tuple = ()  # --mode=update: ({"class", "files": {name: sha256}, ...}, ...)

    # -- read-only names used by the scoring code -------------------------------------------------
    pool_in = property(lambda self: self.nominal.pool_in)
    pool_tgt = property(lambda self: self.nominal.pool_tgt)
    valid = property(lambda self: self.nominal.valid)
    cal_scale = property(lambda self: self.nominal.cal_scale)
    class_names = property(lambda self: self.nominal.class_names)
    held_out = property(lambda self: self.nominal.held_out)
    src = property(lambda self: self.nominal.src)
    fine_in = property(lambda self: self.nominal.fine_in)
    fine_valid = property(lambda self: self.nominal.fine_valid)
    fine_cal_scale = property(lambda self: self.nominal.fine_cal_scale)
    cal_scores = property(lambda self: self.calibration.scores)
    cal_map_max = property(lambda self: self.calibration.map_max)
    term_stats = property(lambda self: self.calibration.term_stats)
    cal_scoring = property(lambda self: self.calibration.scoring)
    ignore = property(lambda self: self.contract.ignore)
    added = property(lambda self: list(self.updates))

    @property
    def geometry(self) -> dict:
        c = self.contract
        return {"geometry": c.geometry, "image_size": c.image_size, "aspect": dict(c.aspect)}

    def with_nominal(self, **changes) -> "Fit":
        return dataclasses.replace(self, nominal=dataclasses.replace(self.nominal, **changes))

    def require_geometry(self, d: DataSpec) -> None:
        """Refuse a run whose data.geometry or data.image_size differs from the fit's."""
        c = self.contract
        if c.geometry != d.geometry or c.image_size not in (None, int(d.image_size)):
            raise ConfigError(
                f"this workdir's model was fitted with data.geometry = {c.geometry!r} at data.image_size = "
                f"{c.image_size}, and this run asks for {d.geometry!r} at {int(d.image_size)}: use the "
                f"training config's geometry (images must reach the model as they did in training)"
            )

    def aspect_range(self, cls: str):
        """[min, max] width/height of the class's training images (the fit's record), or None."""
        return self.contract.aspect.get(cls)

    def shape_fits(self, cls: str, width: int, height: int) -> bool:
        """Whether an image's aspect ratio lies within the class's training range, ASPECT_TOLERANCE
        either way (True when the fit has no record): predict notes, and update refuses, the others."""
        aspect = self.aspect_range(cls)
        a = width / height
        return not aspect or aspect[0] / ASPECT_TOLERANCE <= a <= aspect[1] * ASPECT_TOLERANCE

    def calibrated_for(self, sc: ScoringSpec, terms_only: bool = False) -> bool:
        """Whether the calibration was computed under this scoring (terms_only: whether its term_stats
        still hold, which fields acting after the terms do not change)."""
        if self.cal_scoring is None:
            return False
        drop = specs.after_terms_fields() if terms_only else ()
        mine = {k: v for k, v in self.cal_scoring.items() if k not in drop}
        return mine == {k: v for k, v in scoring_signature(sc).items() if k not in drop}

    def threshold(self, cls: str, quantile: float, scoring: dict | None = None, of: str = "score") -> float:
        """The given quantile of the held-out normal images' scores of a pool (of = "score"), or of
        their pixel maps' maxima (of = "map"; the score's when the fit has none). scoring: the
        signature of the run that compares scores with it; refused when it differs from the calibration's."""
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

    # -- the file ---------------------------------------------------------------------------------

    def save(self, directory: str) -> str:
        """Write <directory>/fit.npz in one step (a temporary file renamed over it); the path."""
        self._require_finite(directory)
        arrays, meta = _to_file(self)
        meta["arrays_sha256"] = _arrays_digest(arrays)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, FILE)
        tmp = f"{path}.{os.getpid()}.partial"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        for name in LEGACY:  # a fit of format 1 this one replaces (fit.npz is read first: safe to crash here)
            if os.path.isfile(os.path.join(directory, name)):
                os.remove(os.path.join(directory, name))
        return path

    def _require_finite(self, directory):
        scales_ok = np.all(np.isfinite(self.cal_scale))
        if not (scales_ok and all(np.all(np.isfinite(v)) for v in self.cal_scores.values())):
            raise FloatingPointError(
                f"refusing to save the fit to {directory}: its calibration is not finite (NaN "
                f"features or scores: check the backbone weights and the training)"
            )

    @classmethod
    def load(cls, directory: str) -> "Fit":
        """The fit in directory: fit.npz, or a format-1 fit (pools.npz + pools.json) migrated."""
        path = os.path.join(directory, FILE)
        if not os.path.isfile(path):
            if os.path.isfile(os.path.join(directory, LEGACY[0])):
                return _from_v1(directory)
            raise MissingInputError(f"no fit at {path}: run --mode=train or train_and_eval first")
        arrays, meta = read_file(path)
        return _from_file(arrays, meta, path)


def exists(directory: str) -> bool:
    """Whether directory holds a fit (of any format)."""
    return os.path.isfile(os.path.join(directory, FILE)) or os.path.isfile(os.path.join(directory, LEGACY[0]))


def read_meta(directory: str) -> dict:
    """The parts' JSON record of the fit in directory (format 2; for tools and tests)."""
    return read_file(os.path.join(directory, FILE))[1]


def read_file(path: str) -> tuple[dict, dict]:
    """(arrays, meta) of a fit.npz, checked: its format version and the arrays' digest."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files if k != "meta"}
            meta = json.loads(bytes(z["meta"]).decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise FitCorruptError(f"{path} is unreadable ({type(e).__name__}: {e}); rerun --mode=train to refit") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FitCorruptError(
            f"{path} has format_version {version!r}; this maskad-jax reads up to {FORMAT_VERSION}: upgrade it"
        )
    if meta.get("arrays_sha256") != _arrays_digest(arrays):
        raise FitCorruptError(
            f"{path} is corrupt: its arrays differ from the digest recorded in it (a truncated copy or bit rot); "
            f"rerun --mode=train to refit"
        )
    return arrays, meta


def _arrays_digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


_NOMINAL_ARRAYS = ("pool_in", "pool_tgt", "valid", "cal_scale", "src", "fine_in", "fine_valid", "fine_cal_scale")


def _to_file(fit: Fit) -> tuple[dict, dict]:
    n, c, k = fit.nominal, fit.calibration, fit.contract
    arrays = {name: getattr(n, name) for name in _NOMINAL_ARRAYS if getattr(n, name) is not None}
    if c.term_stats is not None:
        arrays["term_stats"] = np.asarray(c.term_stats, np.float32)
    if k.ignore is not None:
        arrays["ignore"] = k.ignore
    meta = {
        "format_version": FORMAT_VERSION,
        "nominal": {
            "class_names": list(n.class_names),
            "held_out": {a: [int(i) for i in v] for a, v in n.held_out.items()},
            "fine_embedding": n.fine_embedding,
        },
        "calibration": {
            "scores": {a: [float(x) for x in v] for a, v in c.scores.items()},
            "map_max": {a: [float(x) for x in v] for a, v in c.map_max.items()},
            "scoring": c.scoring,
        },
        "contract": {"geometry": k.geometry, "image_size": k.image_size, "aspect": k.aspect},
        "val_thresholds": fit.val_thresholds,
        "updates": list(fit.updates),
    }
    return arrays, meta


def _from_file(arrays: dict, meta: dict, path: str) -> Fit:
    try:
        nominal = NominalPools(
            **{name: arrays.get(name) for name in _NOMINAL_ARRAYS},
            class_names=tuple(meta["nominal"]["class_names"]),
            held_out={a: np.asarray(v, int) for a, v in meta["nominal"]["held_out"].items()},
            fine_embedding=meta["nominal"].get("fine_embedding"),
        )
        cal = meta["calibration"]
        return Fit(
            nominal,
            Calibration(cal["scores"], cal["map_max"], arrays.get("term_stats"), cal["scoring"]),
            InputContract(**meta["contract"], ignore=arrays.get("ignore")),
            meta["val_thresholds"],
            tuple(meta["updates"]),
        )
    except (KeyError, TypeError) as e:
        raise FitCorruptError(f"{path} lacks part of the fit ({e}); rerun --mode=train to refit") from None


def _from_v1(directory: str) -> Fit:
    """The one migration: a fit of format 1 (pools.npz, and pools.json with the npz's digest)."""
    npz, meta_path = (os.path.join(directory, n) for n in LEGACY)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        raw = open(npz, "rb").read()
    except (OSError, json.JSONDecodeError) as e:
        raise FitCorruptError(f"{meta_path} or {npz} is missing or unreadable ({e}): rerun --mode=train") from None
    if meta.get("npz_sha256") not in (None, hashlib.sha256(raw).hexdigest()):
        raise FitCorruptError(
            f"{npz} is corrupt: its contents differ from the digest in pools.json (a truncated copy or bit rot); "
            f"rerun --mode=train to refit"
        )
    try:
        with np.load(io.BytesIO(raw)) as z:
            a = {k: z[k] for k in z.files}
        geometry = meta.get("geometry") or {"geometry": "crop", "image_size": None}
        term_stats = meta.get("term_stats")
        return Fit(
            NominalPools(
                a["pool_in"],
                a["pool_tgt"],
                a["valid"],
                a["cal_scale"],
                tuple(meta["class_names"]),
                {k: np.asarray(v, int) for k, v in meta["calibration"].items()},
                a.get("src"),
                a.get("fine_in"),
                a.get("fine_valid"),
                a.get("fine_cal_scale"),
            ),
            Calibration(
                meta.get("cal_scores", {}),
                meta.get("cal_map_max", {}),
                None if term_stats is None else np.asarray(term_stats, np.float32),
                meta.get("cal_scoring"),
            ),
            InputContract(
                geometry["geometry"], geometry.get("image_size"), geometry.get("aspect", {}), a.get("ignore")
            ),
            meta.get("val_thresholds", {}),
            tuple(meta.get("added", [])),
        )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise FitCorruptError(f"{npz} is unreadable ({type(e).__name__}: {e}); rerun --mode=train to refit") from None

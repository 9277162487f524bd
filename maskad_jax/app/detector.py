"""The trained model as one object: `maskad_jax.load(path)` -> Detector; `detector.predict(images)`.

    import maskad_jax
    det = maskad_jax.load("runs/demo")            # a workdir (or its export folder: runs/demo/export)
    r = det.predict("part.png")                   # a path, a PIL image, a uint8 array, or a list of them
    r.score, r.normalised, r.anomalous, r.threshold, r.class_name, r.map.shape, r.regions
    r.save("out")                                 # maps/<name>.npy and .png, overlays/<name>.png

A Detector reads everything it needs from the folder it is loaded from: a workdir's config.json,
checkpoint and fit, or an export's manifest and scorer; no config file, no dataset. Both run the same
test-time program (export.scoring_program: nearest pool, scoring, thresholds): from a workdir it is
jitted here with the trained state as an argument, from an export it is the serialised StableHLO (or
ONNX) program. Inputs go through the one image path of the export's runtime
(runtime/serve_export.decode and inputs_of), batched to powers of two up to data.eval_batch_size, so
the program compiles once per batch size and is reused across calls (JAX's persistent compilation
cache, which run.py and `load` switch on, keeps it for the next process). `--mode=predict` is
`Detector.predict` writing its results into predictions/<date-time>/ (predict.py): the numbers are the
same. `update`, `export` and `evaluate` run the pipeline's modes (pipeline.py) on the detector's
workdir, as run.py does; `load` and `train` are in api.py (exported as maskad_jax.load, maskad_jax.train).
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections
import numpy as np
from PIL import Image

from maskad_jax.app.overlay import overlay
from maskad_jax.common import progress
from maskad_jax.common.errors import ConfigError, ImageInputError, MissingInputError, NonFiniteError
from maskad_jax.configs.default import get_config as default_config
from maskad_jax.runtime import serve_export


@dataclasses.dataclass
class Prediction:
    """One image's result. map: (height, width) float32 at the image's own size (NaN where the geometry
    did not look: crop's sides); regions: where the defect is, reported exactly when the image is
    anomalous: the connected areas of the map at or above map_threshold, or, when its map stays under
    it, the area around the map's peak (box (x0, y0, x1, y1) and area in the image's pixels, peak, by:
    "threshold" or "peak"; serve_export.decided_regions), largest peak first; region_level: the map
    level that outlines them (None for a normal image); normalised: 0 is a typical good part, 1.0 the
    threshold (None when the class has no calibration scores)."""

    score: float
    normalised: float | None
    anomalous: bool
    threshold: float
    class_name: str
    map: np.ndarray = dataclasses.field(repr=False)
    map_threshold: float
    regions: list
    inspected_fraction: float
    threshold_images: int | None = None  # how many images the threshold rests on (0: a number given)
    region_level: float | None = None  # the map level outlining the regions (None: a normal image, none)
    source: str = "<array>"
    note: str = ""
    image: Image.Image | None = dataclasses.field(default=None, repr=False)  # the RGB image as scored

    def row(self) -> dict:
        """The fields of predictions/<run>/scores.json (predict.py) for this image."""
        return {
            "file": self.source,
            "class": self.class_name,
            "score": self.score,
            "normalised_score": self.normalised,
            "threshold": self.threshold,
            "anomalous": self.anomalous,
            "regions": self.regions,
            "region_level": self.region_level,
            "inspected_fraction": round(float(self.inspected_fraction), 4),
            "threshold_images": self.threshold_images,
        }

    def save(self, folder: str, name: str = "image") -> dict:
        """Write maps/<name>.npy (the map), maps/<name>.png (255 = twice the map's threshold) and
        overlays/<name>.png (the heatmap over the image, its regions outlined) under folder; their paths."""
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"save: name {name!r} must be a plain file name (no folders)")
        paths = {
            "map": os.path.join(folder, "maps", name + ".npy"),
            "map_png": os.path.join(folder, "maps", name + ".png"),
            "overlay": os.path.join(folder, "overlays", name + ".png"),
        }
        for sub in ("maps", "overlays"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        np.save(paths["map"], self.map)
        level = max(2 * self.map_threshold, 1e-12)
        scaled = np.clip(np.nan_to_num(self.map, nan=0.0) / level * 255, 0, 255).astype(np.uint8)
        Image.fromarray(scaled, "L").save(paths["map_png"])
        if self.image is not None:
            image01 = np.asarray(self.image, np.float32) / 255.0
            Image.fromarray(overlay(image01, self.map, 0.0, level, self.region_level)).save(paths["overlay"])
        else:
            del paths["overlay"]
        return paths


def as_rgb(x, source: str = "<array>") -> tuple[Image.Image, int]:
    """(RGB image, frames) of one input: a path, bytes, a PIL image or a uint8 array (H, W, 3), (H, W, 4)
    or (H, W) (uint16 (H, W) too). Decoded by the export's runtime (serve_export.decode), so an image
    reaches the model exactly as in training and in serve.py; ImageInputError names the input."""
    try:
        if isinstance(x, (str, os.PathLike, bytes, bytearray)):
            return serve_export.decode(os.fspath(x) if isinstance(x, os.PathLike) else x)
        if isinstance(x, Image.Image):
            serve_export.check_aspect(*x.size)
            return serve_export.to_rgb(serve_export.upright(x)), int(getattr(x, "n_frames", 1) or 1)
        if isinstance(x, np.ndarray):
            return _array_image(x), 1
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageInputError(f"{source}: {e}") from None
    raise ImageInputError(
        f"{source}: a {type(x).__name__} is not an image; give a path, a PIL image or a uint8 array (H, W[, 3])"
    )


def _array_image(a: np.ndarray) -> Image.Image:
    shape = a.shape
    if not (a.ndim == 2 or (a.ndim == 3 and shape[2] in (1, 3, 4))):
        raise ValueError(f"an array of shape {shape}; images are (H, W), (H, W, 3) or (H, W, 4)")
    if a.dtype == np.uint16 and a.ndim == 2:
        return serve_export.to_rgb(Image.fromarray(np.ascontiguousarray(a)))
    if a.dtype != np.uint8:
        raise ValueError(f"an array of dtype {a.dtype}; give uint8 (0-255), e.g. (x * 255).round().astype('uint8')")
    serve_export.check_aspect(shape[1], shape[0])
    a = np.ascontiguousarray(a[..., 0] if a.ndim == 3 and shape[2] == 1 else a)
    mode = "L" if a.ndim == 2 else ("RGB" if a.shape[2] == 3 else "RGBA")
    return serve_export.to_rgb(Image.fromarray(a, mode))


class Detector:
    """A trained MaskAD model, loaded from a workdir or an export folder (`load`)."""

    def __init__(self, run, contract: dict, source: str, trained=None, config=None, modes=None):
        self._run, self.contract, self.source = run, contract, source
        self.trained, self.config = trained, config  # from a workdir: app/trained.Trained and its ConfigDict
        # f(class name, width, height) -> a note when the image's shape is outside the class's training
        # images' (Trained.shape_note); None from an export
        self._notes = None if trained is None else trained.shape_note
        self._modes = modes  # f(config, workdir, mode) -> result: the pipeline (api.py hands it in)
        pre = contract.get("preprocess") or {}
        self.image_size = int(contract["input"]["shape"][1])
        self.geometry, self.tiles = pre.get("geometry", "crop"), pre.get("tiles")
        self.max_batch = int(contract.get("max_batch", 32))

    @property
    def classes(self) -> list[str]:
        return list(self.contract["classes"])

    @property
    def thresholds(self) -> dict:
        """{class: the decision threshold its scores are compared with}."""
        return dict(self.contract["thresholds"])

    @property
    def workdir(self) -> str | None:
        return None if self.trained is None else self.source

    def __repr__(self):
        kind = "workdir" if self.trained is not None else "export"
        return f"Detector({kind} {self.source!r}, classes {self.classes}, {self.geometry} at {self.image_size} px)"

    def predict(self, images):
        """Score one image (a path, a PIL image, a uint8 array (H, W, 3) or (H, W)) or a list of them:
        a Prediction, or a list in the same order. Nothing is written (Prediction.save writes)."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        names = [_name(x, i, single) for i, x in enumerate(items)]
        out = []
        for chunk in self._chunks(len(items)):
            decoded = [as_rgb(items[i], names[i]) for i in chunk]
            out += self.score_decoded([d[0] for d in decoded], [names[i] for i in chunk], [d[1] for d in decoded])
        return out[0] if single else out

    def _chunks(self, n: int):
        """Index ranges of at most max_batch model inputs (an image's tiles count each)."""
        per = max(1, self.max_batch // _tile_count(self.tiles))
        return [range(a, min(n, a + per)) for a in range(0, n, per)]

    def score_decoded(self, rgbs, names, frames=None) -> list[Prediction]:
        """Predictions of RGB PIL images (already decoded: as_rgb), scored together."""
        loaded = [serve_export.inputs_of(img, self.image_size, self.geometry, self.tiles) for img in rgbs]
        results = serve_export.score_loaded(self._padded_run, self.contract, loaded)
        preds = []
        for k, ((row, full), img, name) in enumerate(zip(results, rgbs, names)):
            if not (np.isfinite(row["score"]) and np.isfinite(row["threshold"])):
                raise NonFiniteError(
                    f"{name}: its score ({row['score']}) or the threshold of class {row['class']!r} "
                    f"({row['threshold']}) is not finite; the checkpoint or the fit is damaged: retrain"
                )
            notes = [f"{frames[k]} frames: the first is scored"] if frames and frames[k] > 1 else []
            notes += [self._notes(row["class"], *img.size)] if self._notes else []
            preds.append(
                Prediction(
                    score=row["score"],
                    normalised=row["normalised_score"],
                    anomalous=row["anomalous"],
                    threshold=row["threshold"],
                    class_name=row["class"],
                    map=full,
                    map_threshold=float(self.contract.get("map_thresholds", {}).get(row["class"], row["threshold"])),
                    regions=row["regions"],
                    inspected_fraction=float(np.isfinite(full).mean()),
                    threshold_images=row.get("threshold_images"),
                    region_level=row["region_level"],
                    source=name,
                    note="; ".join(n for n in notes if n),
                    image=img,
                )
            )
        return preds

    def _padded_run(self, images, keys, *boxes):
        """The program over any number of inputs (serve_export.padded_run: chunks of max_batch, each
        padded to a power of two, so only a few batch sizes are ever compiled); a map that is not
        finite is refused."""
        return serve_export.padded_run(self._checked_run, self.max_batch)(images, keys, *boxes)

    def _checked_run(self, *args):
        out = self._run(*args)
        if not np.all(np.isfinite(out["map"])):
            raise NonFiniteError("the anomaly map is not finite; the checkpoint or the fit is damaged: retrain")
        return out

    # -- the modes as methods (workdir detectors only) --------------------------------------------

    def _require_workdir(self, what: str):
        if self.trained is None or self._modes is None:
            raise ConfigError(
                f"{what} needs the workdir the model was trained in, loaded with maskad_jax.load; {self.source} "
                f"is {'an export' if self.trained is None else 'not such a load'}"
            )

    def _mode(self, mode: str, overrides: dict | None = None) -> dict:
        return self._modes(apply_overrides(self.config, overrides or {}), self.source, mode)

    def update(self, images: str, class_name: str = "") -> "Detector":
        """--mode=update: the good images in the folder `images` join class_name's pools, thresholds
        recalibrated, the reconstructor kept; returns the updated detector (this one is left as it was)."""
        self._require_workdir("update")
        self._mode("update", {"new_images.input": os.fspath(images), "new_images.class_name": class_name})
        return self._modes(self.config, self.source, "load")

    def export(self, onnx: str | None = None) -> str:
        """--mode=export: <workdir>/export/ (docs/deploy.md); its path (maskad_jax.load(path) loads it).
        onnx: "auto", "yes" or "no" for this export (export.onnx, maskad_jax/configs/default.py); None
        keeps the config's."""
        self._require_workdir("export")
        return self._mode("export", None if onnx is None else {"export.onnx": onnx})["export"]

    def evaluate(self) -> dict:
        """--mode=eval on the workdir's test split (its dataset must be where training found it):
        the metrics per class and their mean, as metrics.json."""
        self._require_workdir("evaluate")
        return self._mode("eval")


def _tile_count(tiles) -> int:
    return int(tiles["rows"]) * int(tiles["cols"]) if tiles else 1


def _name(x, i: int, single: bool) -> str:
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x)
    filename = getattr(x, "filename", "") if isinstance(x, Image.Image) else ""
    return filename or ("<array>" if single else f"<array {i}>")


def apply_overrides(config, overrides: dict):
    """A copy of config with {"section.field": value} set (an unknown field is refused, naming it)."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        node, parts = config, key.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise ConfigError(f"override {key!r}: {p} is not a config field (maskad_jax/configs/default.py)")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"override {key!r}: {parts[-1]} is not a field of {'.'.join(parts[:-1])}")
        node[parts[-1]] = tuple(value) if isinstance(value, list) else value
    return config


def workdir_config(workdir: str):
    """The training config a workdir was made with (its config.json), as an ml_collections ConfigDict."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise MissingInputError(
            f"{workdir} has no config.json: it is not a trained workdir (train first: run.py --mode=train)"
        )
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise MissingInputError(f"{path} cannot be read ({e}): it is the training config; retrain") from None
    added = []
    merged = _over_defaults(saved, default_config().to_dict(), "", added)
    if added:  # fields this version has and the workdir's version had not: their defaults are what it ran with
        progress.log(f"{path} predates {len(added)} config field(s); their defaults apply: {', '.join(added)}")
    return ml_collections.ConfigDict(merged)


def _over_defaults(saved: dict, default: dict, prefix: str, added: list) -> dict:
    """saved laid over default, recursively; the dotted names of the fields only default has, in added."""
    out = dict(saved)
    for key, value in default.items():
        if key not in saved:
            out[key] = value
            added.append(prefix + key)
        elif isinstance(value, dict) and isinstance(saved[key], dict):
            out[key] = _over_defaults(saved[key], value, f"{prefix}{key}.", added)
    return out

"""Per-class ignore regions (data.ignore_masks): a folder of <class>.png, white = ignore.

Each mask is in the frame of the class's images (their size, or at least their aspect ratio) and
reaches the model's input frame through the same geometry as the images (NEAREST). Scoring zeroes
the map there before the image score (scoring.keep_mask), so a fixture, a label or a moving part
never raises an alarm; calibration, eval, predict and the export all read it from the fit.
"""

from __future__ import annotations

import os

import numpy as np

from maskad_jax.common.errors import ConfigError, DataError
from maskad_jax.data.preprocess import ImageDecodeError, open_image, preprocess_mask

EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


def load_ignore_masks(folder: str, class_names, size: int, geometry: str, aspect=None) -> np.ndarray | None:
    """(K, S, S) bool in the pools' class order (False for a class without a mask), or None when the
    folder is "". Refuses a missing folder, a mask for a class the model does not have, an unreadable
    image, a mask that ignores every pixel, and (aspect: {class: [min, max] width / height of its
    images}) a mask shaped otherwise than its class's images, which the geometry would stretch."""
    if not folder:
        return None
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
        raise DataError(f"data.ignore_masks {folder}: no such folder (it holds <class>.png, white = ignore)")
    if tuple(class_names) == ("*",):
        raise ConfigError(
            "data.ignore_masks needs a pool per class (fit.per_class = True): one shared pool would mix their regions"
        )
    files = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(folder)) if f.lower().endswith(EXTENSIONS)}
    unknown = sorted(set(files) - set(class_names))
    if unknown:
        raise DataError(
            f"data.ignore_masks {folder}: {', '.join(files[u] for u in unknown)} name(s) no class of the model "
            f"({', '.join(class_names)}); name each mask <class>.png"
        )
    if not files:
        raise DataError(f"data.ignore_masks {folder}: no mask images ({', '.join(EXTENSIONS)}) in it")
    out = np.zeros((len(class_names), size, size), bool)
    for k, cls in enumerate(class_names):
        if cls not in files:
            continue
        path = os.path.join(folder, files[cls])
        try:
            mask = open_image(path, source=path)
        except (ImageDecodeError, ValueError, OSError) as e:
            raise DataError(f"data.ignore_masks: {path} cannot be read as a mask ({e})") from None
        _check_shape(path, mask.size, (aspect or {}).get(cls), cls)
        out[k] = preprocess_mask(mask, size, geometry).astype(bool)
        if out[k].all():
            raise DataError(
                f"data.ignore_masks: {path} ignores every pixel of class {cls!r}: nothing would be inspected"
            )
    return out


TOLERANCE = 1.1  # as the fit's aspect check (engine/fit_state.ASPECT_TOLERANCE)


def _check_shape(path, size, aspect, cls):
    if not aspect:
        return
    w, h = size
    if not aspect[0] / TOLERANCE <= w / h <= aspect[1] * TOLERANCE:
        raise DataError(
            f"data.ignore_masks: {path} is {w} x {h} (width/height {w / h:.3g}) and class {cls!r}'s images "
            f"{aspect[0]:.3g} to {aspect[1]:.3g}: the geometry would stretch it over other pixels; draw it on an "
            f"image of the class, at its size"
        )

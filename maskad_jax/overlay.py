"""Heatmap images and file names: a colour map of an anomaly map, blended over the image, with the outline of the
region at or above a threshold."""

from __future__ import annotations

import zlib

import numpy as np
from scipy import ndimage

# A perceptually ordered blue -> cyan -> yellow -> red ramp (5 anchor colours, linear between).
_ANCHORS = np.array([[0, 0, 130], [0, 120, 255], [0, 230, 200], [255, 230, 0], [220, 0, 0]], np.float64)


def colormap(values01: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8."""
    v = np.clip(values01, 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    t = (v - lo)[..., None]
    return (_ANCHORS[lo] * (1 - t) + _ANCHORS[lo + 1] * t).astype(np.uint8)


def overlay(
    image01: np.ndarray, amap: np.ndarray, lo: float, hi: float, threshold: float | None = None, alpha: float = 0.45
) -> np.ndarray:
    """image (H, W, 3) in [0, 1], map (H, W) scaled to [lo, hi] -> (H, W, 3) uint8 with an outline in
    white; where the map is NaN (not inspected) the image is shown darkened, without heat."""
    seen = np.isfinite(amap)
    heat = colormap((np.where(seen, amap, lo) - lo) / max(hi - lo, 1e-12)).astype(np.float64)
    out = np.where(seen[..., None], (1 - alpha) * image01 * 255 + alpha * heat, 0.5 * image01 * 255)
    if threshold is not None:
        region = seen & (np.where(seen, amap, -np.inf) >= threshold)
        edge = region & ~ndimage.binary_erosion(region, iterations=1, border_value=0)
        out[edge] = 255
    return np.clip(out, 0, 255).astype(np.uint8)


def safe_name(relative_path: str, suffix: str) -> str:
    """A flat file name from a relative path: letters, digits, '-', '_' only, so it cannot leave its folder."""
    stem = relative_path.rsplit(".", 1)[0] if "." in relative_path.rsplit("/", 1)[-1] else relative_path
    flat = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_") else "_" for ch in stem).strip("_") or "image"
    return flat[:180] + suffix


def unique_names(relative_paths, suffix: str) -> list[str]:
    """safe_name of each path, made unique: paths that flatten to one name (`a b.png` and `a_b.png`)
    get a short hash of their original path appended, so each keeps its own file whatever the order;
    a path listed again gets a counter."""
    flat = [safe_name(p, "") for p in relative_paths]
    owners: dict[str, set] = {}
    for p, f in zip(relative_paths, flat):
        owners.setdefault(f, set()).add(p)
    out, used = [], {}
    for p, f in zip(relative_paths, flat):
        name = f if len(owners[f]) == 1 else f"{f[:170]}_{zlib.crc32(p.encode()) & 0xFFFFFFFF:08x}"
        used[name] = used.get(name, 0) + 1
        out.append((name if used[name] == 1 else f"{name}_{used[name]}") + suffix)
    return out

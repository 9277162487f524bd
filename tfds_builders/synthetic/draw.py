"""Procedural images for the synthetic dataset: three classes, four kinds of drawn defect, exact masks.

Classes:
  weave    a woven texture (two crossed gratings, small random tilt and phase per image)
  speckle  smoothed random noise: every image a different pattern of the same statistics
  disc     an object: a grey disc with a ring of holes, at a jittered position and random rotation
Defects: scratch (a thin line), spot (a small dark disc), stain (a soft colour blob) and, for the
disc, missing (a bite out of the rim). Their contrast is drawn from a range that starts low, so
some defects are subtle: a model that only detects gross changes scores visibly lower.

Everything is a pure function of a numpy Generator, so a (seed, class, split, index) tuple always
gives the same image and mask. Defects stay inside the central crop that preprocessing keeps.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CLASSES = ("weave", "speckle", "disc")
DEFECTS = {
    "weave": ("scratch", "spot", "stain"),
    "speckle": ("scratch", "spot", "stain"),
    "disc": ("scratch", "spot", "stain", "missing"),
}
_COLOURS = {"weave": (0.75, 0.62, 0.45), "speckle": (0.55, 0.6, 0.7), "disc": (0.7, 0.7, 0.72)}


def _grid(size):
    return np.mgrid[0:size, 0:size].astype(np.float64)


def _weave(rng, size):
    y, x = _grid(size) / size
    th = rng.normal(0.0, 0.03)
    u, v = x * np.cos(th) + y * np.sin(th), -x * np.sin(th) + y * np.cos(th)
    g = 0.55 + 0.22 * np.sin(2 * np.pi * 16 * u + rng.uniform(0, 2 * np.pi)) * np.sin(
        2 * np.pi * 16 * v + rng.uniform(0, 2 * np.pi)
    )
    img = g[..., None] * np.asarray(_COLOURS["weave"])
    return img + rng.normal(0, 0.02, img.shape), np.ones((size, size), bool)


def _speckle(rng, size):
    n = ndimage.gaussian_filter(rng.normal(size=(size, size)), 2.5)
    n = 0.5 + 0.18 * n / n.std()
    img = n[..., None] * np.asarray(_COLOURS["speckle"]) * 1.4
    return img + rng.normal(0, 0.015, img.shape), np.ones((size, size), bool)


def _disc(rng, size):
    y, x = _grid(size)
    cy, cx = size / 2 + rng.uniform(-6, 6, 2)
    r = size * 0.36
    d = np.hypot(y - cy, x - cx)
    obj = d < r
    rot = rng.uniform(0, 2 * np.pi)
    for k in range(6):
        a = rot + k * np.pi / 3
        hy, hx = cy + 0.6 * r * np.sin(a), cx + 0.6 * r * np.cos(a)
        obj &= np.hypot(y - hy, x - hx) > 0.12 * r
    shade = 0.85 + 0.15 * (1 - d / r)
    img = np.full((size, size, 3), 0.12) + obj[..., None] * (shade[..., None] * np.asarray(_COLOURS["disc"]) - 0.12)
    return img + rng.normal(0, 0.015, img.shape), obj


_BASE = {"weave": _weave, "speckle": _speckle, "disc": _disc}


def _contrast(rng):
    return rng.uniform(0.08, 0.35)  # low end: subtle defects


def _centre_point(rng, size, obj, margin):
    ys, xs = np.nonzero(obj[margin : size - margin, margin : size - margin])
    i = rng.integers(len(ys))
    return ys[i] + margin, xs[i] + margin


def _scratch(img, obj, rng, size, margin):
    y, x = _grid(size)
    y0, x0 = _centre_point(rng, size, obj, margin)
    a, length = rng.uniform(0, np.pi), rng.uniform(30, 80)
    dy, dx = np.sin(a), np.cos(a)
    t = np.clip((y - y0) * dy + (x - x0) * dx, -length / 2, length / 2)
    dist = np.hypot(y - (y0 + t * dy), x - (x0 + t * dx))
    mask = (dist <= rng.uniform(1.0, 2.0)) & obj
    img[mask] += rng.choice([-1, 1]) * _contrast(rng)
    return mask


def _spot(img, obj, rng, size, margin):
    y, x = _grid(size)
    y0, x0 = _centre_point(rng, size, obj, margin)
    mask = (np.hypot(y - y0, x - x0) <= rng.uniform(4, 10)) & obj
    img[mask] *= 1 - 1.5 * _contrast(rng)
    return mask


def _stain(img, obj, rng, size, margin):
    y, x = _grid(size)
    y0, x0 = _centre_point(rng, size, obj, margin)
    w = np.exp(-((y - y0) ** 2 + (x - x0) ** 2) / (2 * rng.uniform(6, 14) ** 2)) * obj
    shift = rng.normal(size=3)
    shift = shift / np.linalg.norm(shift) * _contrast(rng) * 1.5
    img += w[..., None] * shift
    return w > 0.35


def _missing(img, obj, rng, size, margin):
    ys, xs = np.nonzero(obj)
    cy, cx = ys.mean(), xs.mean()
    r = np.sqrt(obj.sum() / np.pi) * 1.05
    a = rng.uniform(0, 2 * np.pi)
    y, x = _grid(size)
    by, bx = cy + r * np.sin(a), cx + r * np.cos(a)
    mask = (np.hypot(y - by, x - bx) <= rng.uniform(10, 20)) & obj
    img[mask] = 0.12 + rng.normal(0, 0.015, (int(mask.sum()), 3))
    return mask


_DEFECT_FNS = {"scratch": _scratch, "spot": _spot, "stain": _stain, "missing": _missing}


def draw(rng: np.random.Generator, cls: str, defect: str | None, size: int = 256):
    """(uint8 RGB image, bool mask) of class `cls` with `defect` (None or 'good' for a normal image)."""
    img, obj = _BASE[cls](rng, size)
    mask = np.zeros((size, size), bool)
    if defect not in (None, "good"):
        margin = int(size * 0.16)  # inside the 224/256 centre crop, with room to spare
        for _ in range(20):  # redraw until the defect covers some pixels
            mask = _DEFECT_FNS[defect](img, obj, rng, size, margin)
            if mask.sum() >= 4:
                break
    img = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    return img, mask

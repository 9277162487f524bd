"""Large images as tiles (data.tiles = (rows, cols), data.tile_overlap): each image is cut into
rows x cols overlapping tiles, each tile reaches the model under data.geometry like an image of its
own, and the tiles' maps are stitched back onto the image (the maximum where tiles overlap: a defect
seen by any tile counts). A small defect then covers several tokens of a tile where it would cover
less than one of the whole image squashed to the input.

Everywhere a split is used (features, pools, training, calibration, the test loop) a tiled split is
a split of tiles: `tiled` repeats each image's row once per tile and records the tile's rectangle
(`crops`) and its image (`image_of`). What is decided per image is then put back together: the
held-out normal images are split into pool and calibration by image (no tile of a held-out image in
the pool), an image's score is the maximum of its tiles' scores (so the thresholds are quantiles of
image scores), and the metrics are computed on the stitched maps, in the whole-image frame.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from maskad_jax.runtime.serve_export import stitch_tiles, tile_boxes  # the export's loader holds the arithmetic

__all__ = ["tile_boxes", "stitch_tiles", "tiled", "untiled", "image_max", "image_level", "tiles_on"]


def tiles_on(tiles) -> bool:
    """Whether data.tiles asks for more than one tile."""
    t = tuple(tiles)
    return bool(t) and t[0] * t[1] > 1


def tiled(data, rows: int, cols: int, overlap: float):
    """The split as a split of tiles: row i of the image j is tile i % (rows * cols) of image j's
    row i // (rows * cols); crops (M, 4) hold each tile's rectangle in its image's pixels."""
    if data is None:
        return None
    t = rows * cols
    rep = lambda a: None if a is None else np.repeat(np.asarray(a), t, axis=0)  # noqa: E731
    crops = np.concatenate([np.asarray(tile_boxes(int(w), int(h), rows, cols, overlap)) for w, h in data.sizes])
    names = tuple(f"{n}#tile{k}" for n in data.file_names for k in range(t))
    return dataclasses.replace(
        data,
        indices=rep(data.indices),
        labels=rep(data.labels),
        class_ids=rep(data.class_ids),
        defect_types=tuple(d for d in data.defect_types for _ in range(t)),
        file_names=names,
        has_mask=rep(data.has_mask),
        sizes=np.stack([crops[:, 2] - crops[:, 0], crops[:, 3] - crops[:, 1]], axis=1),
        crops=crops.astype(np.int64),
        image_of=np.repeat(np.arange(len(data.indices)), t),
    )


def untiled(data):
    """The image-level split of a tiled one (its first tile's rows, the crops dropped)."""
    first = np.flatnonzero(np.r_[True, data.image_of[1:] != data.image_of[:-1]])
    pick = lambda a: None if a is None else np.asarray(a)[first]  # noqa: E731
    sizes = np.stack([data.crops[:, 2], data.crops[:, 3]], axis=1)  # the last tile reaches the image's corner
    last = np.r_[first[1:] - 1, len(data.image_of) - 1]
    return dataclasses.replace(
        data,
        indices=pick(data.indices),
        labels=pick(data.labels),
        class_ids=pick(data.class_ids),
        defect_types=tuple(data.defect_types[i] for i in first),
        file_names=tuple(data.file_names[i].rsplit("#tile", 1)[0] for i in first),
        has_mask=pick(data.has_mask),
        sizes=sizes[last],
        crops=None,
        image_of=None,
    )


def image_max(values, image_of) -> tuple[np.ndarray, np.ndarray]:
    """(the images in order of first appearance, each one's maximum of `values` over its tiles)."""
    values, image_of = np.asarray(values), np.asarray(image_of)
    images, first, inverse = np.unique(image_of, return_index=True, return_inverse=True)
    out = np.full(len(images), -np.inf, np.float64)
    np.maximum.at(out, inverse, values.astype(np.float64))
    order = np.argsort(first, kind="stable")
    return images[order], out[order].astype(values.dtype)


def image_level(cal: dict, calibration: dict, image_of) -> dict:
    """calibration.calibrate's per-tile held-out scores and map maxima as per-image maxima (the scores
    thresholds compare an image's score with); calibration: class -> the tiles' positions."""
    if image_of is None:
        return cal
    out, image_of = dict(cal), np.asarray(image_of)
    for key in ("cal_scores", "cal_map_max"):
        out[key] = {
            cls: image_max(np.asarray(v, np.float64), image_of[np.asarray(calibration[cls], int)])[1].tolist()
            for cls, v in cal[key].items()
        }
    return out

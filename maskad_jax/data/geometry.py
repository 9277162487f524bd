"""How an image of any shape becomes the model's square input, and how a map goes back.

Three geometries (data.geometry):
  crop    the shorter side to S (LANCZOS), the centre S x S kept: the released code's and the
          benchmarks' geometry. Of a non-square image only the middle is seen.
  resize  the whole image to S x S (LANCZOS), its aspect ratio not kept: every pixel is seen.
  pad     the longer side to S (aspect kept), centred on an S x S canvas of the mean ImageNet grey;
          the canvas outside the image (the padding) is left out of maps, scores and metrics.

A Placement says where the image sits: the box of the S x S input frame that shows image content
(`box`, the whole frame except with pad) and the part of the original image it shows (`region`,
the whole image except with crop). `to_input` applies the geometry, `to_original` maps an input-frame
map back onto the original image's pixel grid (the part a crop never saw filled with `fill`), and
`content_mask` is the input frame's box as a mask. Masks go the same way with NEAREST.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from maskad_jax.common.errors import ConfigError
from maskad_jax.runtime import serve_export

GEOMETRIES = serve_export.GEOMETRIES
PAD_FILL = serve_export.PAD_FILL  # the export's loader holds the arithmetic, so both place images alike


@dataclasses.dataclass(frozen=True)
class Placement:
    size: int  # S: the input frame is S x S
    original: tuple[int, int]  # (width, height) of the original image
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the input frame holding image content
    region: tuple[float, float, float, float]  # (u0, v0, u1, v1) of the original image that the box shows

    @property
    def seen_fraction(self) -> float:
        """The share of the original image's area that the input shows."""
        u0, v0, u1, v1 = self.region
        return (u1 - u0) * (v1 - v0) / (self.original[0] * self.original[1])


def check(geometry: str) -> str:
    if geometry not in GEOMETRIES:
        raise ConfigError(f"data.geometry must be {' | '.join(GEOMETRIES)}, got {geometry!r}")
    return geometry


def place(width: int, height: int, size: int, geometry: str) -> Placement:
    """Where an image of width x height sits in the S x S input under the geometry."""
    box, region = serve_export.placement(int(width), int(height), size, check(geometry))
    return Placement(size, (int(width), int(height)), box, region)


def to_input(img: Image.Image, size: int, geometry: str, resample=Image.LANCZOS, fill=PAD_FILL) -> Image.Image:
    """The S x S input image (or mask, with resample=NEAREST and fill=0) of `img` under the geometry."""
    return serve_export.to_input(img, size, check(geometry), resample, fill)


def content_mask(p: Placement) -> np.ndarray:
    """(S, S) bool: the input frame's pixels that show the image (all but pad's padding)."""
    out = np.zeros((p.size, p.size), bool)
    x0, y0, x1, y1 = p.box
    out[y0:y1, x0:x1] = True
    return out


def to_original(amap: np.ndarray, p: Placement, out_size: tuple[int, int] | None = None, fill=np.nan) -> np.ndarray:
    """An (S, S) input-frame map on the original image's grid (out_size = (width, height), default the
    original size: e.g. (S, S) for the whole image squashed to the input's resolution), bilinear; the
    part of the image the input did not show (crop) is `fill`."""
    return serve_export.to_original(amap, p.box, p.region, p.original, out_size, fill)

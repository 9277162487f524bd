"""Image decoding and the one preprocessing shared by training, testing and predict.

Every image goes: decode -> RGB (grey copied to 3 channels, alpha dropped, 16-bit scaled to 8) ->
the geometry to size x size (geometry.py; crop, the default here: shorter side to `size` with
LANCZOS, torchvision `Resize(size)` semantics, then centre crop size x size; resize: the whole image;
pad: letterboxed) -> float32 in [0, 1]. Decoding, the EXIF orientation, the RGB conversion, the
aspect limit and the geometry's arithmetic are runtime/serve_export's (the export's standalone
loader), so training, predict, the Python API and serve.py prepare an image alike. Masks take the
same geometry with NEAREST and are binarised above half their range (binarize_mask).

Normalisation by the backbone's statistics happens on the device (features.py), so the pipeline
ships one [0, 1] view and the model derives both the normalised and the unnormalised views.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from maskad_jax.common.errors import DataError
from maskad_jax.data.geometry import to_input
from maskad_jax.runtime import serve_export


class ImageDecodeError(DataError):
    """An image or mask file that cannot be read."""


# Images longer than this many times their width (or wider than their height) are refused before
# they are decoded: the shorter side goes to the working size, so a 1 x 100000 strip would become a
# 224 x 22,400,000 image (gigabytes) for one centre crop. 32 keeps every camera and line-scan format
# we know (4000 x 1000 is 4); longer strips can be cut into tiles first.
MAX_ASPECT = serve_export.MAX_ASPECT


def to_rgb(img: Image.Image, source: str = "<image>") -> Image.Image:
    """Any Pillow mode as 8-bit RGB (runtime/serve_export.to_rgb, the one conversion the export's
    serve.py also runs): grey -> 3 copies, alpha dropped, 16/32-bit rescaled; errors name the source."""
    try:
        return serve_export.to_rgb(img)
    except ValueError as e:
        raise ImageDecodeError(f"{source}: {e}") from None


def check_shape(size: tuple[int, int], source) -> None:
    """Refuse an image whose aspect ratio exceeds MAX_ASPECT (from its header, before decoding)."""
    try:
        serve_export.check_aspect(*size)
    except ValueError as e:
        raise ImageDecodeError(f"refusing image {os.fspath(source)}: {e} (preprocess.MAX_ASPECT)") from None


def open_image(path_or_bytes, source: str | None = None) -> Image.Image:
    """Open and fully decode an image file (or bytes); errors name the file. Shapes are checked from
    the header before decoding (check_shape); of a multi-frame file (TIFF, GIF) the first frame is
    used, and `img.info["frames"]` says how many it has."""
    source = source or (path_or_bytes if isinstance(path_or_bytes, (str, os.PathLike)) else "<bytes>")
    try:
        f = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
        img = Image.open(f)
        check_shape(img.size, source)
        frames = int(getattr(img, "n_frames", 1) or 1)
        img.load()  # decode now, so a truncated file fails here with its name
        img = serve_export.upright(img)  # its EXIF orientation applied, as serve.py does
        if frames > 1:
            img.info["frames"] = frames
        return img
    except (FileNotFoundError, ImageDecodeError):
        raise
    except Image.DecompressionBombError as e:  # Pillow's guard against huge images (MAX_IMAGE_PIXELS)
        raise ImageDecodeError(
            f"refusing image {os.fspath(source)}: {e} (raise PIL.Image.MAX_IMAGE_PIXELS if the file is genuine)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"cannot read image {os.fspath(source)}: {e}") from e


def resize_shorter_side(img: Image.Image, size: int, resample=Image.LANCZOS) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return img.resize((new_w, new_h), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w < size or h < size:
        raise DataError(f"image of {w}x{h} is smaller than the {size}x{size} crop")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess_image(img: Image.Image, size: int = 224, source: str = "<image>", geometry: str = "crop") -> np.ndarray:
    """(size, size, 3) float32 in [0, 1], under the geometry (crop | resize | pad: geometry.py)."""
    return np.asarray(to_input(to_rgb(img, source), size, geometry, Image.LANCZOS), np.float32) / 255.0


def binarize_mask(mask: Image.Image) -> np.ndarray:
    """(H, W) bool from a mask image of any mode: above half of its range (8- or 16-bit), any channel."""
    arr = np.asarray(mask)
    if arr.ndim == 3:
        arr = arr.max(axis=-1)
    top = 255 if arr.dtype == np.uint8 or arr.max(initial=0) <= 255 else 65535
    return arr.astype(np.float64) > top / 2


def preprocess_mask(mask: Image.Image, size: int = 224, geometry: str = "crop") -> np.ndarray:
    """(size, size) uint8 in {0, 1}, from a mask image of any mode (binarize_mask, then NEAREST)."""
    img = Image.fromarray(binarize_mask(mask).astype(np.uint8) * 255, "L")
    return (np.asarray(to_input(img, size, geometry, Image.NEAREST, fill=0)) > 127).astype(np.uint8)

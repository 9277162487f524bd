"""Image decoding and the one preprocessing shared by training, testing and predict.

Every image goes: decode -> RGB (grey copied to 3 channels, alpha dropped, 16-bit scaled to 8) ->
shorter side to `size` with LANCZOS (torchvision `Resize(size)` semantics: the longer side becomes
int(size * long / short)) -> centre crop size x size (torchvision `CenterCrop`) -> float32 in [0, 1].
Masks take the same geometry with NEAREST and are binarised above half their range (binarize_mask).

Normalisation by the backbone's statistics happens on the device (features.py), so the pipeline
ships one [0, 1] view and the model derives both the normalised and the unnormalised views.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from maskad_jax.errors import DataError


class ImageDecodeError(DataError):
    """An image or mask file that cannot be read."""


def to_rgb(img: Image.Image, source: str = "<image>") -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: grey -> 3 copies, alpha dropped, 16/32-bit rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    if img.mode == "RGB":
        return img
    if img.mode in ("L", "LA", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "1", "LAB", "HSV"):
        return img.convert("RGB")
    raise ImageDecodeError(f"{source}: unsupported image mode {img.mode!r}")


def open_image(path_or_bytes, source: str | None = None) -> Image.Image:
    """Open and fully decode an image file (or bytes); errors name the file."""
    source = source or (path_or_bytes if isinstance(path_or_bytes, (str, os.PathLike)) else "<bytes>")
    try:
        f = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
        img = Image.open(f)
        img.load()  # decode now, so a truncated file fails here with its name
        return img
    except FileNotFoundError:
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


def preprocess_image(img: Image.Image, size: int = 224, source: str = "<image>") -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]."""
    img = center_crop(resize_shorter_side(to_rgb(img, source), size, Image.LANCZOS), size)
    return np.asarray(img, np.float32) / 255.0


def binarize_mask(mask: Image.Image) -> np.ndarray:
    """(H, W) bool from a mask image of any mode: above half of its range (8- or 16-bit), any channel."""
    arr = np.asarray(mask)
    if arr.ndim == 3:
        arr = arr.max(axis=-1)
    top = 255 if arr.dtype == np.uint8 or arr.max(initial=0) <= 255 else 65535
    return arr.astype(np.float64) > top / 2


def preprocess_mask(mask: Image.Image, size: int = 224) -> np.ndarray:
    """(size, size) uint8 in {0, 1}, from a mask image of any mode (binarize_mask, then NEAREST)."""
    img = Image.fromarray(binarize_mask(mask).astype(np.uint8) * 255, "L")
    img = center_crop(resize_shorter_side(img, size, Image.NEAREST), size)
    return (np.asarray(img) > 127).astype(np.uint8)

"""What every anomaly-detection builder shares: the features, validated example encoding, errors.

Each example holds:
  image        RGB PNG (grey copied to 3 channels, alpha dropped, 16-bit scaled to 8 bit)
  mask         1-channel PNG of the image's size, 255 = defective pixel; all zero for normal images
  label        0 normal, 1 anomalous
  defect_type  'good' for normal images, else the defect's name
  class_name   the object/texture class (ClassLabel over the dataset's classes)
  file_name    the image's path relative to the dataset root
  has_mask     whether the mask is ground truth (False: a defective image without a mask, which
               counts for the image metrics only)

Every check names the file it is about. Source files are only read, never written.
"""

from __future__ import annotations

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from maskad_jax.common.errors import DataError
from maskad_jax.data.preprocess import ImageDecodeError, binarize_mask, open_image, to_rgb


class DatasetLayoutError(DataError):
    """The dataset on disk does not have the layout the builder reads."""


def features(class_names) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=["normal", "anomalous"]),
            "defect_type": tfds.features.Text(),
            "class_name": tfds.features.ClassLabel(names=list(class_names)),
            "file_name": tfds.features.Text(),
            "has_mask": tfds.features.Tensor(shape=(), dtype=np.bool_),
        }
    )


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_rgb(path: str) -> tuple[bytes, tuple[int, int]]:
    """PNG bytes of the image as 8-bit RGB, and its (width, height). Errors name the file."""
    img = open_image(path)
    size = img.size
    if img.format == "PNG" and img.mode == "RGB":
        with open(path, "rb") as f:
            return f.read(), size
    return png_bytes(to_rgb(img, path)), size


def encode_mask(path: str | None, size: tuple[int, int], image_path: str) -> bytes:
    """1-channel 0/255 PNG; an all-zero one when path is None."""
    if path is None:
        return png_bytes(Image.new("L", size, 0))
    try:
        mask = open_image(path)
    except FileNotFoundError:
        raise DatasetLayoutError(f"mask {path} of defective image {image_path} does not exist") from None
    if mask.size != size:
        raise DatasetLayoutError(
            f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is {size[0]}x{size[1]}"
        )
    return png_bytes(Image.fromarray(binarize_mask(mask).astype(np.uint8) * 255, "L"))


def make_example(root: str, image_path: str, mask_path: str | None, defect_type: str, class_name: str):
    """(key, example) for one image; raises DatasetLayoutError/ImageDecodeError naming the file. A
    defective image without a mask (mask_path None) gets an empty mask and has_mask False."""
    label = 0 if defect_type == "good" else 1
    if not os.path.isfile(image_path):
        raise DatasetLayoutError(f"image {image_path} does not exist")
    image, size = encode_rgb(image_path)
    mask = encode_mask(mask_path, size, image_path)
    rel = os.path.relpath(image_path, root)
    return rel, {
        "image": image,
        "mask": mask,
        "label": label,
        "defect_type": defect_type,
        "class_name": class_name,
        "file_name": rel,
        "has_mask": bool(label == 0 or mask_path is not None),
    }


def image_files(folder: str) -> list[str]:
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
    return sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(exts) and not f.startswith(".")
    )


def what_is(path) -> str:
    """Why a path is not a usable data folder, in a few words."""
    path = os.path.expanduser(os.fspath(path or ""))
    if not path:
        return "is not set"
    if os.path.isfile(path):
        return "is a file, not a folder"
    if os.path.lexists(path) and not os.path.exists(path):
        return "is a broken link"
    return "does not exist"


def require_manual_dir(dl_manager, name: str, instructions: str) -> str:
    manual = dl_manager.manual_dir
    if manual is None or not os.path.isdir(os.fspath(manual)):
        raise DatasetLayoutError(f"{name}: manual_dir {manual} {what_is(manual)}.\n{instructions}")
    return os.fspath(manual)


def warn_missing_classes(name: str, root: str, expected, present) -> None:
    missing = [c for c in expected if c not in present]
    if missing:
        logging.warning("%s: %s lacks the classes %s; building the %d present ones", name, root, missing, len(present))


def require_nonempty(examples: list, what: str) -> list:
    if not examples:
        raise DatasetLayoutError(f"{what} is empty")
    return examples


__all__ = [
    "DatasetLayoutError",
    "ImageDecodeError",
    "features",
    "make_example",
    "image_files",
    "png_bytes",
    "require_manual_dir",
    "require_nonempty",
]

"""Walk one class folder in MVTec-AD layout (used by the mvtec_ad and folder builders).

    <root>/<cls>/train/good/*.png
    <root>/<cls>/test/good/*.png
    <root>/<cls>/test/<defect>/<name>.png
    <root>/<cls>/ground_truth/<defect>/<name>_mask.png

Defect types are sorted, files are sorted inside each type (the released code's order).
"""
from __future__ import annotations

import os

from tfds_builders.common import DatasetLayoutError, image_files


def _mask_for(root: str, cls: str, defect: str, image_path: str) -> str:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    gt_dir = os.path.join(root, cls, "ground_truth", defect)
    for ext in (".png", ".bmp", ".jpg", ".tif", ".tiff"):
        cand = os.path.join(gt_dir, f"{stem}_mask{ext}")
        if os.path.isfile(cand):
            return cand
    raise DatasetLayoutError(f"defective image {image_path} has no mask: expected {os.path.join(gt_dir, stem + '_mask.png')}")


def class_items(root: str, cls: str, split: str) -> list[tuple[str, str | None, str]]:
    """[(image path, mask path or None, defect type)] of one class and split ('train' or 'test')."""
    base = os.path.join(root, cls, split)
    if not os.path.isdir(base):
        raise DatasetLayoutError(f"class {cls!r}: folder {base} does not exist")
    items = []
    if split == "train":
        good = os.path.join(base, "good")
        if not os.path.isdir(good):
            raise DatasetLayoutError(f"class {cls!r}: folder {good} does not exist")
        items = [(p, None, "good") for p in image_files(good)]
    else:
        for defect in sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))):
            for p in image_files(os.path.join(base, defect)):
                items.append((p, None if defect == "good" else _mask_for(root, cls, defect, p), defect))
    if not items:
        raise DatasetLayoutError(f"class {cls!r}: split {split!r} under {base} has no images")
    return items


def discover_classes(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise DatasetLayoutError(f"dataset root {root} does not exist")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "train")))
    if not classes:
        raise DatasetLayoutError(f"no class folder with a train/ subfolder under {root} (expected MVTec layout "
                                 f"<root>/<class>/train/good, <root>/<class>/test/<defect>, "
                                 f"<root>/<class>/ground_truth/<defect>/<name>_mask.png)")
    return classes

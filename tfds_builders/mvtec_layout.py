"""Walk one class folder in MVTec-AD layout (used by the mvtec_ad and folder builders).

    <root>/<cls>/train/good/*.png                       required
    <root>/<cls>/test/good/*.png                        optional (no test/ at all: nothing to evaluate)
    <root>/<cls>/test/<defect>/<name>.png               optional
    <root>/<cls>/ground_truth/<defect>/<name>_mask.png  optional per image: a defective test image
                                                        without one counts for the image metrics only

Or a plain folder of images (no class folder with train/ under it): one class of normal training
images, named after the folder (its parent's name when the folder is called good, train, ...).
Defect types are sorted, files are sorted inside each type (the released code's order).
"""

from __future__ import annotations

import os

from absl import logging

from tfds_builders.common import DatasetLayoutError, image_files, what_is

GENERIC_NAMES = {"good", "train", "images", "image", "normal", "ok", "pass", "parts"}


def _mask_for(root: str, cls: str, defect: str, image_path: str) -> str | None:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    gt_dir = os.path.join(root, cls, "ground_truth", defect)
    for ext in (".png", ".bmp", ".jpg", ".tif", ".tiff"):
        cand = os.path.join(gt_dir, f"{stem}_mask{ext}")
        if os.path.isfile(cand):
            return cand
    return None


def plain_class(root: str) -> str | None:
    """The class name of a plain folder of images (images directly in root and no class folders),
    else None."""
    if not os.path.isdir(root) or not image_files(root):
        return None
    name = os.path.basename(os.path.abspath(root).rstrip("/"))
    if name.lower() in GENERIC_NAMES:
        name = os.path.basename(os.path.dirname(os.path.abspath(root).rstrip("/"))) or name
    return name


def class_items(root: str, cls: str, split: str) -> list[tuple[str, str | None, str]]:
    """[(image path, mask path or None, defect type)] of one class and split ('train' or 'test').

    Whatever the walk would otherwise pass over silently is reported (logged with its paths):
    subfolders nested inside an image folder, masks without an image, and ground-truth folders of
    a defect type that has no test folder."""
    if plain_class(root) == cls and not os.path.isdir(os.path.join(root, cls, "train")):
        if split == "test":
            return []
        _warn_nested(root)
        return [(p, None, "good") for p in image_files(root)]
    base = os.path.join(root, cls, split)
    if split == "test" and not os.path.isdir(base):
        return []  # a class without test images: trained and calibrated, not evaluated
    if not os.path.isdir(base):
        raise DatasetLayoutError(f"class {cls!r}: folder {base} does not exist")
    items = []
    if split == "train":
        good = os.path.join(base, "good")
        if not os.path.isdir(good):
            raise DatasetLayoutError(f"class {cls!r}: folder {good} does not exist")
        _warn_nested(good)
        items = [(p, None, "good") for p in image_files(good)]
    else:
        defects = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
        for defect in defects:
            _warn_nested(os.path.join(base, defect))
            for p in image_files(os.path.join(base, defect)):
                items.append((p, None if defect == "good" else _mask_for(root, cls, defect, p), defect))
        _warn_unused_masks(root, cls, defects)
        unmasked = [p for p, m, d in items if d != "good" and m is None]
        if unmasked:
            logging.warning(
                "class %r: %d defective test image(s) have no mask under %s (e.g. %s): they count for the "
                "image metrics only",
                cls,
                len(unmasked),
                os.path.join(root, cls, "ground_truth"),
                os.path.relpath(unmasked[0], root),
            )
    if not items and split == "train":
        raise DatasetLayoutError(f"class {cls!r}: split {split!r} under {base} has no images")
    return items


def _warn_nested(folder: str) -> None:
    nested = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if nested:
        logging.warning("%s: its subfolders %s are not read (images must sit directly in the folder)", folder, nested)


def _warn_unused_masks(root: str, cls: str, defects: list) -> None:
    """Ground-truth folders without a test folder, and masks without an image, listed."""
    gt = os.path.join(root, cls, "ground_truth")
    if not os.path.isdir(gt):
        return
    for defect in sorted(d for d in os.listdir(gt) if os.path.isdir(os.path.join(gt, d))):
        if defect not in defects:
            logging.warning(
                "%s: no test folder %s for these masks; they are not used",
                os.path.join(gt, defect),
                os.path.join(root, cls, "test", defect),
            )
            continue
        stems = {os.path.splitext(os.path.basename(p))[0] for p in image_files(os.path.join(root, cls, "test", defect))}
        orphans = [
            os.path.basename(m)
            for m in image_files(os.path.join(gt, defect))
            if os.path.splitext(os.path.basename(m))[0].removesuffix("_mask") not in stems
        ]
        if orphans:
            logging.warning(
                "%s: %d mask(s) without an image in test/%s, not used: %s",
                os.path.join(gt, defect),
                len(orphans),
                defect,
                orphans[:10] + (["..."] if len(orphans) > 10 else []),
            )


def discover_classes(root: str, warn: bool = False) -> list[str]:
    """The subfolders of root that hold a train/ folder. A folder with a differently cased train
    folder (Train/, TRAIN/) is refused; with warn (when the dataset is prepared) other subfolders
    are listed in a warning, never dropped silently."""
    if not os.path.isdir(root):
        raise DatasetLayoutError(f"dataset root {root} {what_is(root)}")
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    classes = [d for d in subdirs if os.path.isdir(os.path.join(root, d, "train"))]
    for d in subdirs:
        if d in classes:
            continue
        cased = [e for e in os.listdir(os.path.join(root, d)) if e.lower() == "train"]
        if cased:
            raise DatasetLayoutError(
                f"class folder {os.path.join(root, d)} has {cased[0]}/ instead of train/ (names are "
                f"case-sensitive): rename it to train/"
            )
    ignored = [d for d in subdirs if d not in classes]
    if warn and ignored and classes:
        logging.warning(
            "%s: the subfolders %s have no train/ folder and are not classes (MVTec layout: "
            "<class>/train/good, <class>/test/<defect>, <class>/ground_truth/<defect>)",
            root,
            ignored,
        )
    if not classes and plain_class(root):
        return [plain_class(root)]
    if not classes:
        raise DatasetLayoutError(
            f"no class folder with a train/ subfolder under {root}, and no images in it (expected MVTec "
            f"layout <root>/<class>/train/good, optionally <root>/<class>/test/<defect> and "
            f"<root>/<class>/ground_truth/<defect>/<name>_mask.png; or a folder of good images)"
        )
    return classes

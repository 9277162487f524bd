"""Input pipelines: grain over TFDS data sources, with the shared preprocessing.

- `SplitData.load(builder, split, classes)`: the examples of a split (optionally some classes),
  with their labels, classes and file names read once without decoding any image.
- `train_batches(...)`: seeded shuffle, repeat, batch; each process reads its own share
  (process_index::process_count); starts at any step, so a resumed run sees the same order.
- `eval_batches(...)`: in order; the last batch is padded and carries `valid` = 0 on the padding,
  so every image is scored exactly once.
Each element: image (S, S, 3) float32 in [0, 1], mask (S, S) uint8 (the input frame), label, class_id,
index (position in the split), image_key (content hash, see image_key), valid, box (4,) int32 (the
input frame's content box, geometry.Placement), original (2,) int32 (width, height), and
mask_image (S, S) uint8: the mask of the whole image at S x S, for metrics on the whole image.
"""

from __future__ import annotations

import dataclasses
import io

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from maskad_jax.common.errors import ConfigError, DataError
from maskad_jax.data.geometry import place
from maskad_jax.data.preprocess import preprocess_image, preprocess_mask
from maskad_jax.runtime import serve_export


class _QuietTfds:
    """Drops two TFDS log lines that say nothing useful here: that OpenCV is missing (PIL decodes the
    PNGs) and that a builder config is custom (every folder dataset's is)."""

    NOISE = ("OpenCV is not installed", "Using custom data configuration")

    def filter(self, record) -> bool:
        return not any(str(record.msg).startswith(n) for n in self.NOISE)


logging.get_absl_logger().addFilter(_QuietTfds())


def _header_size(image) -> tuple[int, int]:
    """(width, height) of an encoded image from its header (nothing decoded); (0, 0) if unreadable."""
    try:
        with Image.open(io.BytesIO(bytes(image))) as im:
            return im.size
    except (OSError, ValueError):
        return (0, 0)


@dataclasses.dataclass(frozen=True)
class SplitData:
    source: object  # random-access TFDS data source (decodes images)
    indices: np.ndarray  # positions in the source of the selected examples, sorted by file name
    labels: np.ndarray
    class_ids: np.ndarray
    defect_types: tuple[str, ...]
    file_names: tuple[str, ...]
    class_names: tuple[str, ...]  # all classes of the dataset; class_ids index this
    has_mask: np.ndarray | None = None  # (N,) bool: False for a defective image without a ground-truth mask
    sizes: np.ndarray | None = None  # (N, 2) int: each image's (width, height), read from its header
    crops: np.ndarray | None = None  # (N, 4) a tiled split's tile rectangles in their images (tiling.py)
    image_of: np.ndarray | None = None  # (N,) a tiled split's image of each tile

    def __len__(self):
        return len(self.indices)

    @classmethod
    def load(cls, builder, split: str, classes=None, required: bool = True) -> "SplitData | None":
        """The split's examples (of `classes`, default all). A split the dataset does not have (a
        dataset of good images has no test split) is an error, or None when not required."""
        info_classes = tuple(builder.info.features["class_name"].names)
        if split not in set(builder.info.splits.keys()):
            if not required:
                return None
            raise DataError(f"dataset {builder.name} has no {split!r} split (no {split} images were found)")
        if classes:
            unknown = [c for c in classes if c not in info_classes]
            if unknown:
                raise ConfigError(
                    f"unknown class(es) {unknown} for dataset {builder.name}; it has {list(info_classes)}"
                )
        raw = builder.as_data_source(
            split=split, decoders={"image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()}
        )
        keep, labels, cids, defects, names, masked, sizes = [], [], [], [], [], [], []
        wanted = None if not classes else {info_classes.index(c) for c in classes}
        for i in range(len(raw)):
            r = raw[i]
            if wanted is not None and r["class_name"] not in wanted:
                continue
            keep.append(i)
            labels.append(r["label"])
            cids.append(r["class_name"])
            defects.append(_text(r["defect_type"]))
            names.append(_text(r["file_name"]))
            masked.append(bool(r.get("has_mask", True)))
            sizes.append(_header_size(r["image"]))
        order = np.argsort(np.asarray(names, dtype=object), kind="stable")  # class/split/defect/file order
        keep, labels, cids, masked = [np.asarray(v)[order].tolist() for v in (keep, labels, cids, masked)]
        sizes = np.asarray(sizes, np.int64).reshape(-1, 2)[order]
        defects, names = [defects[i] for i in order], [names[i] for i in order]
        if not keep and required:
            raise DataError(
                f"dataset {builder.name} split {split!r} has no examples"
                + (f" of classes {list(classes)}" if classes else "")
            )
        if not keep:
            return None
        if classes and required:
            empty = [c for c in classes if info_classes.index(c) not in set(cids)]
            if empty:
                raise DataError(f"dataset {builder.name} split {split!r} has no examples of class(es) {empty}")
        return cls(
            builder.as_data_source(split=split),
            np.asarray(keep),
            np.asarray(labels, np.int32),
            np.asarray(cids, np.int32),
            tuple(defects),
            tuple(names),
            info_classes,
            np.asarray(masked, bool),
            sizes,
        )

    def present_classes(self) -> list[str]:
        return [self.class_names[i] for i in sorted(set(self.class_ids.tolist()))]


image_key = serve_export.image_key  # the key that seeds an image's test masks, defined once (runtime)


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class Preprocess(grain.transforms.Map):
    def __init__(self, data: SplitData, image_size: int, geometry: str = "crop"):
        self.data, self.size, self.geometry = data, image_size, geometry

    def map(self, position):
        position = int(position)
        record = self.data.source[int(self.data.indices[position])]
        name = self.data.file_names[position]
        raw = Image.fromarray(np.asarray(record["image"]))
        mask_raw = Image.fromarray(np.asarray(record["mask"])[..., 0])
        if self.data.crops is not None:  # a tile (tiling.py): its rectangle is the image from here on
            box = tuple(int(v) for v in self.data.crops[position])
            raw, mask_raw = raw.crop(box), mask_raw.crop(box)
        image = preprocess_image(raw, self.size, source=name, geometry=self.geometry)
        mask = preprocess_mask(mask_raw, self.size, self.geometry)
        if self.data.labels[position] and not mask.any() and np.asarray(record["mask"]).any():
            logging.warning(
                "%s: defective, but its mask is empty after the %s geometry to %d px; it counts for the "
                "image metrics only",
                name,
                self.geometry,
                self.size,
            )
        p = place(raw.size[0], raw.size[1], self.size, self.geometry)
        return {
            "box": np.asarray(p.box, np.int32),
            "original": np.asarray(p.original, np.int32),
            "mask_image": mask if self.geometry == "resize" else preprocess_mask(mask_raw, self.size, "resize"),
            "image": image,
            "mask": mask,
            "label": np.int32(self.data.labels[position]),
            "class_id": np.int32(self.data.class_ids[position]),
            "index": np.int32(position),
            "image_key": image_key(image),
            "valid": np.int32(1),
        }


class _PaddedLoad(grain.transforms.Map):
    """Loads position order[i]; valid[i] = 0 marks padding that repeats a real example."""

    def __init__(self, pre: Preprocess, order: np.ndarray, valid: np.ndarray):
        self.pre, self.order, self.valid = pre, order, valid

    def map(self, i):
        el = self.pre.map(self.order[int(i)])
        el["valid"] = np.int32(self.valid[int(i)])
        return el


def _iterate(ds, num_workers: int):
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if num_workers else 4, prefetch_buffer_size=8))
    if num_workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def train_batches(
    data: SplitData,
    batch_size: int,
    *,
    seed: int,
    image_size: int = 224,
    start_step: int = 0,
    num_workers: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    geometry: str = "crop",
):
    """Endless iterator of per-process batches (batch_size is per process), from `start_step` on."""
    ds = grain.MapDataset.range(len(data)).shuffle(seed=seed).repeat()
    ds = ds[process_index::process_count] if process_count > 1 else ds
    ds = ds.map(Preprocess(data, image_size, geometry)).batch(batch_size, drop_remainder=True)
    ds = ds.slice(slice(start_step, None)) if start_step else ds
    return iter(_iterate(ds, num_workers))


def eval_batches(
    data: SplitData,
    batch_size: int,
    *,
    image_size: int = 224,
    num_workers: int = 0,
    positions=None,
    geometry: str = "crop",
):
    """Ordered batches over `positions` (default: all), the last one padded with valid = 0."""
    positions = np.arange(len(data)) if positions is None else np.asarray(positions)
    n = len(positions)
    padded = int(np.ceil(n / batch_size)) * batch_size
    order = np.concatenate([positions, np.full(padded - n, positions[-1] if n else 0)]).astype(np.int64)
    valid = np.arange(padded) < n
    pre = Preprocess(data, image_size, geometry)
    ds = grain.MapDataset.range(padded).map(_PaddedLoad(pre, order, valid)).batch(batch_size)
    return iter(_iterate(ds, num_workers))

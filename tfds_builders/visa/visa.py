"""VisA (Zou et al., ECCV 2022) from the official release with `split_csv/1cls.csv`.

The csv has the columns object, split, label, image, mask: split is train/test, label is
normal/anomaly, image and mask are paths relative to the root (mask only for anomalies).
"""

from __future__ import annotations

import csv
import os

import tensorflow_datasets as tfds

from tfds_builders import common

__all__ = ["Visa", "VISA_CLASSES"]

VISA_CLASSES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)

INSTRUCTIONS = """\
Download VisA from https://github.com/amazon-science/spot-diff (license CC BY 4.0), extract it,
and make sure split_csv/1cls.csv is in the root (the spot-diff repository ships it). Pass that root
as manual_dir, e.g.
  python run.py --config=configs/visa.py --config.data.manual_dir=/data/visa"""


def read_split_csv(root: str):
    path = os.path.join(root, "split_csv", "1cls.csv")
    if not os.path.isfile(path):
        raise common.DatasetLayoutError(f"visa: {path} does not exist.\n{INSTRUCTIONS}")
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"object", "split", "label", "image", "mask"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise common.DatasetLayoutError(f"{path}: columns {reader.fieldnames}, expected {sorted(need)}")
        for line, row in enumerate(reader, start=2):
            if row["object"] not in VISA_CLASSES:
                raise common.DatasetLayoutError(f"{path} line {line}: unknown class {row['object']!r}")
            if row["split"] not in ("train", "test") or row["label"] not in ("normal", "anomaly"):
                raise common.DatasetLayoutError(
                    f"{path} line {line}: bad split/label {row['split']!r}/{row['label']!r}"
                )
            rows.append(row)
    return rows


class Visa(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.1.0")  # 1.1.0: the has_mask feature
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _info(self):
        return self.dataset_info_from_configs(
            features=common.features(VISA_CLASSES), homepage="https://github.com/amazon-science/spot-diff"
        )

    def _split_generators(self, dl_manager):
        root = common.require_manual_dir(dl_manager, "visa", INSTRUCTIONS)
        rows = read_split_csv(root)
        out = {}
        for split in ("train", "test"):
            chosen = common.require_nonempty([r for r in rows if r["split"] == split], f"visa split {split!r}")
            out[split] = self._generate_examples(root, chosen)
        return out

    def _generate_examples(self, root, rows):
        for row in rows:
            anomalous = row["label"] == "anomaly"
            mask = os.path.join(root, row["mask"]) if anomalous and row["mask"] else None
            defect = "anomaly" if anomalous else "good"
            yield common.make_example(root, os.path.join(root, row["image"]), mask, defect, row["object"])

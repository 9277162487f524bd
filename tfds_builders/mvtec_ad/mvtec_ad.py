"""MVTec-AD (Bergmann et al., CVPR 2019) from the official release in a manual_dir.

All 15 classes go into one dataset (multi-class training is the point); every example carries its
class name. Splits: train (normal images only) and test.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from tfds_builders import common
from tfds_builders.mvtec_layout import class_items

__all__ = ["MvtecAd", "MVTEC_CLASSES"]

SPLITS = ("train", "test")  # the same layout rules as the folder builder (mvtec_layout.py)

MVTEC_CLASSES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)

INSTRUCTIONS = """\
Download MVTec-AD from https://www.mvtec.com/company/research/datasets/mvtec-ad (free registration;
license CC BY-NC-SA 4.0: non-commercial use only), extract it, and pass the folder that holds
bottle/, cable/, ... zipper/ as manual_dir, e.g.
  python run.py --config=configs/mvtec.py --config.data.manual_dir=/data/mvtec_ad"""


class MvtecAd(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.1.0")  # 1.1.0: the has_mask feature
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _info(self):
        return self.dataset_info_from_configs(
            features=common.features(MVTEC_CLASSES), homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad"
        )

    def _split_generators(self, dl_manager):
        root = common.require_manual_dir(dl_manager, "mvtec_ad", INSTRUCTIONS)
        present = [c for c in MVTEC_CLASSES if os.path.isdir(os.path.join(root, c))]
        if not present:
            raise common.DatasetLayoutError(
                f"mvtec_ad: {root} holds none of the class folders {list(MVTEC_CLASSES)}.\n{INSTRUCTIONS}"
            )
        common.warn_missing_classes("mvtec_ad", root, MVTEC_CLASSES, present)
        items = {split: [(cls, it) for cls in present for it in class_items(root, cls, split)] for split in SPLITS}
        return {split: self._generate_examples(root, items[split]) for split in SPLITS if items[split]}

    def _generate_examples(self, root, items):
        for cls, (image, mask, defect) in items:
            yield common.make_example(root, image, mask, defect, cls)

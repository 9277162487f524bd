"""A procedural anomaly-detection dataset made at build time: no download, deterministic from a seed.

It is the embedded default behind `configs/demo.py`. See draw.py for the classes and defects.
Config `default`: 3 classes x (60 train, 20 normal test, 24 defective test) images of 256 x 256.
Config `tiny`: 3 classes x (8 train, 4 normal test, 4 defective test) images of 64 x 64, for tests.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from tfds_builders import common
from tfds_builders.synthetic import draw

__all__ = ["Synthetic", "SyntheticConfig"]


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    seed: int = 0
    image_size: int = 256
    n_train: int = 60
    n_test_good: int = 20
    n_test_defect: int = 24


class Synthetic(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.1.0")  # 1.1.0: the has_mask feature
    BUILDER_CONFIGS = [
        SyntheticConfig(name="default", description="3 classes, 256 px, 60 train / 44 test images per class"),
        SyntheticConfig(
            name="tiny",
            image_size=64,
            n_train=8,
            n_test_good=4,
            n_test_defect=4,
            description="3 classes, 64 px, for tests",
        ),
    ]

    def _info(self):
        return self.dataset_info_from_configs(features=common.features(draw.CLASSES))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split):
        c = self.builder_config
        for ci, cls in enumerate(draw.CLASSES):
            if split == "train":
                plan = ["good"] * c.n_train
            else:
                defects = draw.DEFECTS[cls]
                plan = ["good"] * c.n_test_good + [defects[i % len(defects)] for i in range(c.n_test_defect)]
            for i, defect in enumerate(plan):
                rng = np.random.default_rng([c.seed, ci, 0 if split == "train" else 1, i])
                img, mask = draw.draw(rng, cls, defect, c.image_size)
                name = f"{cls}/{split}/{defect}/{i:03d}.png"
                yield (
                    name,
                    {
                        "image": common.png_bytes(Image.fromarray(img, "RGB")),
                        "mask": common.png_bytes(Image.fromarray(mask.astype(np.uint8) * 255, "L")),
                        "label": 0 if defect == "good" else 1,
                        "defect_type": defect,
                        "class_name": cls,
                        "file_name": name,
                        "has_mask": True,
                    },
                )

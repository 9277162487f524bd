"""Any directory of classes in MVTec layout (users' own data, or ../shared/data/mtd).

    builder = Folder(config=FolderConfig.for_root("/data/my_parts"), data_dir=...)

The classes are the subfolders of the root that hold a train/ folder. The config's name is
derived from the root's absolute path, so two folders never share prepared files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import tensorflow_datasets as tfds

from tfds_builders import common
from tfds_builders.mvtec_layout import class_items, discover_classes

__all__ = ["Folder", "FolderConfig"]


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    root: str = ""

    @classmethod
    def for_root(cls, root: str) -> "FolderConfig":
        root = os.path.abspath(os.path.expanduser(root))
        slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(root.rstrip("/")).lower()).strip("_") or "root"
        digest = hashlib.sha1(root.encode()).hexdigest()[:8]
        return cls(name=f"{slug}_{digest}", root=root, description=f"MVTec-layout folder {root}")


class Folder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = []

    def _info(self):
        if not self.builder_config or not getattr(self.builder_config, "root", ""):
            raise common.DatasetLayoutError("the folder builder needs config=FolderConfig.for_root(path)")
        return self.dataset_info_from_configs(features=common.features(discover_classes(self.builder_config.root)))

    def _split_generators(self, dl_manager):
        root = self.builder_config.root
        classes = discover_classes(root)
        return {split: self._generate_examples(root, classes, split) for split in ("train", "test")}

    def _generate_examples(self, root, classes, split):
        for cls in classes:
            for image, mask, defect in class_items(root, cls, split):
                yield common.make_example(root, image, mask, defect, cls)

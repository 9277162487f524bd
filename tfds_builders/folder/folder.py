"""Any directory of classes in MVTec layout (users' own data, or ../shared/data/mtd), or a plain folder
of good images (one class; tfds_builders/mvtec_layout.py has the layout rules).

    builder = Folder(config=FolderConfig.for_root("/data/my_parts"), data_dir=...)

The classes are the subfolders of the root that hold a train/ folder. The config's name is
derived from the root's absolute path and from a fingerprint of its listing (relative paths,
sizes, modification times), so two folders never share prepared files and a folder that changed
is prepared again instead of being read from a stale copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import tensorflow_datasets as tfds

from tfds_builders import common
from tfds_builders.mvtec_layout import class_items, discover_classes

__all__ = ["Folder", "FolderConfig", "listing_fingerprint", "root_prefix"]

SPLITS = ("train", "test")  # test only when some class has test images (TFDS cannot write an empty split)


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    root: str = ""

    @classmethod
    def for_root(cls, root: str) -> "FolderConfig":
        """The config of a folder as it is now: named <folder>_<path hash>_<listing hash>, so a copy
        prepared before files were added, removed, renamed or rewritten is never reused."""
        root = os.path.abspath(os.path.expanduser(root))
        return cls(
            name=f"{root_prefix(root)}{listing_fingerprint(root)}", root=root, description=f"MVTec-layout folder {root}"
        )


def root_prefix(root: str) -> str:
    """The part of a config name that depends only on the folder's path."""
    slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(root.rstrip("/")).lower()).strip("_") or "root"
    return f"{slug}_{hashlib.sha1(root.encode()).hexdigest()[:8]}_"


def listing_fingerprint(root: str) -> str:
    """A hash of every file under root: relative path, size and modification time."""
    h = hashlib.sha1()
    if os.path.isdir(root):
        for d, dirs, files in os.walk(root):
            dirs.sort()
            for f in sorted(files):
                st = os.stat(os.path.join(d, f))
                h.update(f"{os.path.relpath(os.path.join(d, f), root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:10]


class Folder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.1.0")  # 1.1.0: the has_mask feature
    BUILDER_CONFIGS = []

    def _info(self):
        if not self.builder_config or not getattr(self.builder_config, "root", ""):
            raise common.DatasetLayoutError("the folder builder needs config=FolderConfig.for_root(path)")
        return self.dataset_info_from_configs(features=common.features(discover_classes(self.builder_config.root)))

    def _split_generators(self, dl_manager):
        root = self.builder_config.root
        classes = discover_classes(root, warn=True)
        items = {split: [(cls, it) for cls in classes for it in class_items(root, cls, split)] for split in SPLITS}
        return {split: self._generate_examples(root, items[split]) for split in SPLITS if items[split]}

    def _generate_examples(self, root, items):
        for cls, (image, mask, defect) in items:
            yield common.make_example(root, image, mask, defect, cls)

"""Custom TFDS builders (array_record output, no TensorFlow needed) and a one-call `prepare`.

    builder = prepare("folder", data_dir="~/tensorflow_datasets", manual_dir="../shared/data/mtd")
    source = builder.as_data_source()["test"]

Names: mvtec_ad, visa, real_iad (manual_dir holds the official release), folder (any directory of
classes in MVTec layout; manual_dir is that directory), synthetic (procedural, configs default/tiny).
"""
from __future__ import annotations

import os

from tfds_builders.common import DatasetLayoutError

BUILDER_NAMES = ("mvtec_ad", "visa", "real_iad", "folder", "synthetic")


def get_builder(name: str, data_dir: str, manual_dir: str | None = None, config: str | None = None):
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    if name == "mvtec_ad":
        from tfds_builders.mvtec_ad import MvtecAd as cls
    elif name == "visa":
        from tfds_builders.visa import Visa as cls
    elif name == "real_iad":
        from tfds_builders.real_iad import RealIad as cls
    elif name == "synthetic":
        from tfds_builders.synthetic import Synthetic
        return Synthetic(config=config or "default", data_dir=data_dir, file_format="array_record")
    elif name == "folder":
        from tfds_builders.folder import Folder, FolderConfig
        if not manual_dir:
            raise DatasetLayoutError("the folder dataset needs data.manual_dir: the directory of classes in MVTec layout")
        return Folder(config=FolderConfig.for_root(manual_dir), data_dir=data_dir, file_format="array_record")
    else:
        raise DatasetLayoutError(f"unknown dataset {name!r}; known: {', '.join(BUILDER_NAMES)}")
    return cls(data_dir=data_dir, file_format="array_record")


def prepare(name: str, data_dir: str, manual_dir: str | None = None, config: str | None = None):
    """Build the dataset once (later calls reuse the prepared files) and return its builder."""
    import tensorflow_datasets as tfds
    builder = get_builder(name, data_dir, manual_dir, config)
    if name != "synthetic" and not builder.is_prepared():
        if not manual_dir or not os.path.isdir(os.path.expanduser(manual_dir)):
            how = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", "") or "Point it at a directory of classes in MVTec layout."
            raise DatasetLayoutError(f"{name}: manual_dir {manual_dir} does not exist.\n{how}")
    dl_config = tfds.download.DownloadConfig(manual_dir=os.path.abspath(os.path.expanduser(manual_dir))
                                             if manual_dir else None)
    builder.download_and_prepare(download_config=dl_config)
    return builder

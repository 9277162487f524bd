"""Custom TFDS builders (array_record output, no TensorFlow needed) and a one-call `prepare`.

    builder = prepare("folder", data_dir="~/tensorflow_datasets", manual_dir="../shared/data/mtd")
    source = builder.as_data_source()["test"]

Names: mvtec_ad, visa, real_iad (manual_dir holds the official release), folder (any directory of
classes in MVTec layout; manual_dir is that directory), synthetic (procedural, configs default/tiny).
"""

from __future__ import annotations

import contextlib
import io
import os
import time

from tfds_builders.common import DatasetLayoutError, what_is

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
            raise DatasetLayoutError(
                "the folder dataset needs data.manual_dir: the directory of classes in MVTec layout"
            )
        return Folder(config=FolderConfig.for_root(manual_dir), data_dir=data_dir, file_format="array_record")
    else:
        raise DatasetLayoutError(f"unknown dataset {name!r}; known: {', '.join(BUILDER_NAMES)}")
    return cls(data_dir=data_dir, file_format="array_record")


def prepare(name: str, data_dir: str, manual_dir: str | None = None, config: str | None = None, log=None):
    """Build the dataset once (later calls reuse the prepared files) and return its builder.

    Preparing says so in two lines of its own (from where, into where, how many images); TFDS's
    download banner and progress bars are kept quiet, as nothing is downloaded."""
    import tensorflow_datasets as tfds

    from maskad_jax.common import progress

    log = log or progress.log
    builder = get_builder(name, data_dir, manual_dir, config)
    if builder.is_prepared():
        return builder
    if name != "synthetic" and (not manual_dir or not os.path.isdir(os.path.expanduser(manual_dir))):
        how = (
            getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", "")
            or "Point it at a directory of classes in MVTec layout."
        )
        raise DatasetLayoutError(f"{name}: manual_dir {manual_dir} {what_is(manual_dir)}.\n{how}")
    source = "generated images" if name == "synthetic" else os.path.abspath(os.path.expanduser(manual_dir))
    log(f"preparing the {name} dataset from {source} into {builder.data_dir}" + _stale_note(name, builder))
    dl_config = tfds.download.DownloadConfig(manual_dir=source if manual_dir else None)
    t0 = time.time()
    tfds.disable_progress_bar()
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints a download banner and a "done" line
        builder.download_and_prepare(download_config=dl_config)
    counts = {k: v.num_examples for k, v in builder.info.splits.items()}
    log(
        f"prepared {name}: {counts.get('train', 0)} train and "
        + (f"{counts['test']} test images" if "test" in counts else "no test images (nothing to evaluate)")
        + f" in {time.time() - t0:.0f}s"
    )
    return builder


def _stale_note(name: str, builder) -> str:
    """For the folder dataset: whether an earlier copy of the same folder exists (the folder changed)."""
    if name != "folder":
        return ""
    from tfds_builders.folder import root_prefix

    parent = os.path.dirname(os.path.dirname(builder.data_dir))  # <data_dir>/folder/<config>/<version>
    prefix = root_prefix(builder.builder_config.root)
    old = (
        sorted(d for d in os.listdir(parent) if d.startswith(prefix) and d != builder.builder_config.name)
        if os.path.isdir(parent)
        else []
    )
    if not old:
        return ""
    return (
        f" (the folder changed since {os.path.join(parent, old[-1])} was prepared: its files were added, removed or "
        f"modified, so it is prepared again; the old copy is left in place)"
    )

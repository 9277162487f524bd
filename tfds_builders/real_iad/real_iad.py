"""Real-IAD (Wang et al., CVPR 2024), single-view examples, from the release's per-class JSON files.

Layout: `<root>/<cls>.json` (or `<root>/realiad_jsons/<cls>.json`) with "train" and "test" lists
whose items have image_path, mask_path and anomaly_class ('OK' = normal). Paths are relative to
`<root>/<cls>/` (or to `<root>/`, or `<root>/realiad_1024/`, whichever holds the file).
"""

from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds

from tfds_builders import common

__all__ = ["RealIad", "REAL_IAD_CLASSES"]

REAL_IAD_CLASSES = (
    "audiojack",
    "bottle_cap",
    "button_battery",
    "end_cap",
    "eraser",
    "fire_hood",
    "mint",
    "mounts",
    "pcb",
    "phone_battery",
    "plastic_nut",
    "plastic_plug",
    "porcelain_doll",
    "regulator",
    "rolled_strip_base",
    "sim_card_set",
    "switch",
    "tape",
    "terminalblock",
    "toothbrush",
    "toy",
    "toy_brick",
    "transistor1",
    "u_block",
    "usb",
    "usb_adaptor",
    "vcpill",
    "wooden_beads",
    "woodstick",
    "zipper",
)

INSTRUCTIONS = """\
Request Real-IAD at https://realiad4ad.github.io/Real-IAD/ (license CC BY-NC-SA 4.0, research use),
extract the images and the per-class JSON files, and pass the root as manual_dir, e.g.
  python run.py --config=configs/realiad.py --config.data.manual_dir=/data/realiad"""


def _json_path(root, cls):
    for cand in (os.path.join(root, f"{cls}.json"), os.path.join(root, "realiad_jsons", f"{cls}.json")):
        if os.path.isfile(cand):
            return cand
    return None


def _resolve(root, cls, rel, json_path):
    for base in (os.path.join(root, cls), root, os.path.join(root, "realiad_1024")):
        cand = os.path.join(base, rel)
        if os.path.isfile(cand):
            return cand
    raise common.DatasetLayoutError(f"{json_path}: file {rel!r} not found under {os.path.join(root, cls)} or {root}")


def read_class(root, cls):
    path = _json_path(root, cls)
    if path is None:
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise common.DatasetLayoutError(f"{path}: not valid JSON ({e})") from e
    out = {}
    for split in ("train", "test"):
        if not isinstance(meta.get(split), list):
            raise common.DatasetLayoutError(f"{path}: no {split!r} list")
        items = []
        for i, item in enumerate(meta[split]):
            if "image_path" not in item or "anomaly_class" not in item:
                raise common.DatasetLayoutError(f"{path}: {split}[{i}] lacks image_path or anomaly_class")
            normal = item["anomaly_class"] == "OK"
            if split == "train" and not normal:
                raise common.DatasetLayoutError(f"{path}: train[{i}] is not normal ({item['anomaly_class']})")
            image = _resolve(root, cls, item["image_path"], path)
            mask = None
            if not normal:
                if not item.get("mask_path"):
                    raise common.DatasetLayoutError(f"{path}: defective {item['image_path']} has no mask_path")
                mask = _resolve(root, cls, item["mask_path"], path)
            items.append((image, mask, "good" if normal else str(item["anomaly_class"])))
        out[split] = items
    return out


class RealIad(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.1.0")  # 1.1.0: the has_mask feature
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _info(self):
        return self.dataset_info_from_configs(
            features=common.features(REAL_IAD_CLASSES), homepage="https://realiad4ad.github.io/Real-IAD/"
        )

    def _split_generators(self, dl_manager):
        root = common.require_manual_dir(dl_manager, "real_iad", INSTRUCTIONS)
        per_class = {c: read_class(root, c) for c in REAL_IAD_CLASSES}
        present = {c: v for c, v in per_class.items() if v is not None}
        if not present:
            raise common.DatasetLayoutError(f"real_iad: no <class>.json under {root}.\n{INSTRUCTIONS}")
        common.warn_missing_classes("real_iad", root, REAL_IAD_CLASSES, present)
        return {split: self._generate_examples(root, present, split) for split in ("train", "test")}

    def _generate_examples(self, root, present, split):
        for cls, splits in present.items():
            for image, mask, defect in common.require_nonempty(splits[split], f"real_iad {cls} {split}"):
                yield common.make_example(root, image, mask, defect, cls)

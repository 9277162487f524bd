"""TFDS builders on generated trees in each real layout, bad-input errors, and the grain pipelines."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from maskad_jax.common.errors import DataError
from maskad_jax.data.preprocess import ImageDecodeError
from maskad_jax.data.splits import SplitData, eval_batches, train_batches
from tfds_builders import DatasetLayoutError, prepare


def _img(path, size=(40, 30), mode="RGB", value=None, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        arr = rng.integers(0, 65535, (h, w), dtype=np.uint16) if value is None else np.full((h, w), value, np.uint16)
        img = Image.fromarray(arr)
        assert img.mode == "I;16"
        img.save(path)
        return
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = (
        rng.integers(0, 255, (h, w, channels), dtype=np.uint8)
        if value is None
        else np.full((h, w, channels), value, np.uint8)
    )
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path)


def _mask(path, size=(40, 30), box=(5, 5, 15, 12)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 255
    Image.fromarray(arr, "L").save(path)


def _mvtec_tree(root, classes=("bottle", "grid"), n_train=3, n_good=2, defects=("crack",), n_def=2):
    for ci, c in enumerate(classes):
        for i in range(n_train):
            _img(f"{root}/{c}/train/good/{i:03d}.png", seed=i)
        for i in range(n_good):
            _img(f"{root}/{c}/test/good/{i:03d}.png", mode="L", seed=10 + i)
        for d in defects:
            for i in range(n_def):
                _img(f"{root}/{c}/test/{d}/{i:03d}.png", seed=20 + i)
                _mask(f"{root}/{c}/ground_truth/{d}/{i:03d}_mask.png")


def _snapshot(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def test_mvtec_ad_builder_reads_the_official_layout(tmp_path):
    root = tmp_path / "mvtec"
    _mvtec_tree(str(root))
    before = _snapshot(root)
    b = prepare("mvtec_ad", str(tmp_path / "tfds"), manual_dir=str(root))
    assert _snapshot(root) == before  # the user's data is only read
    train, test = SplitData.load(b, "train"), SplitData.load(b, "test")
    assert len(train) == 6 and len(test) == 8
    assert set(train.present_classes()) == {"bottle", "grid"}
    assert test.labels.sum() == 4
    assert test.file_names[0] == "bottle/test/crack/000.png"  # sorted class/defect/file order
    batch = next(eval_batches(test, 8, image_size=28))
    for i in range(8):
        if batch["label"][i]:
            assert batch["mask"][i].sum() > 0
        else:
            assert batch["mask"][i].sum() == 0
    assert batch["image"].shape == (8, 28, 28, 3) and batch["image"].max() <= 1.0


def test_only_some_classes_and_unknown_class(tmp_path):
    root = tmp_path / "mvtec"
    _mvtec_tree(str(root))
    b = prepare("mvtec_ad", str(tmp_path / "tfds"), manual_dir=str(root))
    assert len(SplitData.load(b, "train", ["grid"])) == 3
    with pytest.raises(ValueError, match="unknown class.*'hamster'"):
        SplitData.load(b, "train", ["hamster"])
    with pytest.raises(ValueError, match="no examples of class.*cable"):
        SplitData.load(b, "train", ["cable"])  # a known MVTec class absent from this copy


def test_visa_builder_reads_the_split_csv(tmp_path):
    root = tmp_path / "visa"
    rows = []
    for c in ("candle", "pcb1"):
        for i in range(3):
            _img(f"{root}/{c}/Data/Images/Normal/{i:03d}.JPG", size=(50, 36), seed=i)
            rows.append([c, "train", "normal", f"{c}/Data/Images/Normal/{i:03d}.JPG", ""])
        _img(f"{root}/{c}/Data/Images/Normal/1{0:02d}.JPG", size=(50, 36))
        rows.append([c, "test", "normal", f"{c}/Data/Images/Normal/100.JPG", ""])
        _img(f"{root}/{c}/Data/Images/Anomaly/000.JPG", size=(50, 36))
        _mask(f"{root}/{c}/Data/Masks/Anomaly/000.png", size=(50, 36))
        rows.append([c, "test", "anomaly", f"{c}/Data/Images/Anomaly/000.JPG", f"{c}/Data/Masks/Anomaly/000.png"])
    os.makedirs(root / "split_csv")
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    b = prepare("visa", str(tmp_path / "tfds"), manual_dir=str(root))
    train, test = SplitData.load(b, "train"), SplitData.load(b, "test")
    assert len(train) == 6 and len(test) == 4 and test.labels.tolist().count(1) == 2
    assert set(test.defect_types) == {"good", "anomaly"}


def test_real_iad_builder_reads_the_json(tmp_path):
    root = tmp_path / "realiad"
    for c in ("audiojack", "usb"):
        meta = {"meta": {"normal_class": "OK"}, "train": [], "test": []}
        for i in range(2):
            rel = f"OK/S{i:04d}/{c}_{i:04d}_OK_C1.jpg"
            _img(f"{root}/{c}/{rel}", seed=i)
            meta["train"].append({"image_path": rel, "mask_path": None, "anomaly_class": "OK", "category": c})
        rel, mrel = f"NG/AK/S0100/{c}_0100_NG_AK_C1.jpg", f"NG/AK/S0100/{c}_0100_NG_AK_C1.png"
        _img(f"{root}/{c}/{rel}")
        _mask(f"{root}/{c}/{mrel}")
        meta["test"].append({"image_path": rel, "mask_path": mrel, "anomaly_class": "AK", "category": c})
        _img(f"{root}/{c}/OK/S0200/{c}_0200_OK_C1.jpg")
        meta["test"].append({"image_path": f"OK/S0200/{c}_0200_OK_C1.jpg", "mask_path": None, "anomaly_class": "OK"})
        (root / f"{c}.json").write_text(json.dumps(meta))
    b = prepare("real_iad", str(tmp_path / "tfds"), manual_dir=str(root))
    test = SplitData.load(b, "test")
    assert len(SplitData.load(b, "train")) == 4 and len(test) == 4
    assert sorted(test.defect_types) == ["AK", "AK", "good", "good"]


def test_folder_builder_on_the_shared_magnetic_tiles(tmp_path, mtd_root):
    b = prepare("folder", str(tmp_path / "tfds"), manual_dir=str(mtd_root))
    train, test = SplitData.load(b, "train"), SplitData.load(b, "test")
    assert len(train) == 762
    assert (test.labels == 0).sum() == 190 and (test.labels == 1).sum() == 388
    raw = b.as_data_source(split="test")
    for i, label in zip(test.indices, test.labels):
        if label:
            assert np.asarray(raw[int(i)]["mask"]).max() == 255, test.file_names[list(test.indices).index(i)]


def test_image_modes_are_converted(tmp_path):
    root = tmp_path / "modes"
    for i, mode in enumerate(["L", "RGBA", "I;16"]):
        _img(f"{root}/part/train/good/{i:03d}.png", mode=mode, value=None if mode != "I;16" else 65535)
    _img(f"{root}/part/test/good/000.png")
    b = prepare("folder", str(tmp_path / "tfds"), manual_dir=str(root))
    batch = next(eval_batches(SplitData.load(b, "train"), 3, image_size=20))
    assert batch["image"].shape == (3, 20, 20, 3)
    grey = batch["image"][0]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 1])  # grey copied to 3 channels
    np.testing.assert_allclose(batch["image"][2], 1.0)  # 16-bit white is white, not clipped garbage


@pytest.mark.parametrize(
    "case,error,match",
    [
        ("no_manual_dir", DatasetLayoutError, "manual_dir .* does not exist"),
        ("mask_size", DatasetLayoutError, "000_mask.png is 20x20 but its image"),
        ("truncated", ImageDecodeError, "cannot read image .*001.png"),
        ("empty_split", DatasetLayoutError, "split 'train' .* has no images"),
    ],
)
def test_bad_inputs_name_the_file(tmp_path, case, error, match):
    root = tmp_path / "mvtec"
    _mvtec_tree(str(root), classes=("bottle",))
    if case == "no_manual_dir":
        root = tmp_path / "nowhere"
    elif case == "mask_size":
        _mask(str(root / "bottle/ground_truth/crack/000_mask.png"), size=(20, 20))
    elif case == "truncated":
        p = root / "bottle/train/good/001.png"
        p.write_bytes(p.read_bytes()[:60])
    elif case == "empty_split":
        for f in os.listdir(root / "bottle/train/good"):
            os.remove(root / "bottle/train/good" / f)
    with pytest.raises(error, match=match):
        prepare("mvtec_ad", str(tmp_path / "tfds"), manual_dir=str(root))


def test_good_images_only_are_a_dataset_without_a_test_split(tmp_path):
    """Issue #25: train/good alone, and a plain folder of images (one class named after the folder,
    or after its parent when the folder is called good)."""
    root = tmp_path / "mine"
    for i in range(3):
        _img(f"{root}/widget/train/good/{i:03d}.png", seed=i)
    b = prepare("folder", str(tmp_path / "tfds"), manual_dir=str(root))
    assert len(SplitData.load(b, "train")) == 3 and SplitData.load(b, "test", required=False) is None
    with pytest.raises(DataError, match="has no 'test' split"):
        SplitData.load(b, "test")
    plain = tmp_path / "parts" / "good"
    for i in range(4):
        _img(f"{plain}/p{i}.jpg", seed=i)
    b = prepare("folder", str(tmp_path / "tfds"), manual_dir=str(plain))
    train = SplitData.load(b, "train")
    assert len(train) == 4 and train.present_classes() == ["parts"] and set(train.defect_types) == {"good"}
    assert SplitData.load(b, "test", required=False) is None


def test_defective_images_without_masks_count_for_the_image_metrics_only(tmp_path, caplog):
    root = tmp_path / "mvtec"
    _mvtec_tree(str(root), classes=("bottle",))
    os.remove(root / "bottle/ground_truth/crack/000_mask.png")
    b = prepare("folder", str(tmp_path / "tfds"), manual_dir=str(root))
    test = SplitData.load(b, "test")
    unmasked = {f for f, m in zip(test.file_names, test.has_mask) if not m}
    assert unmasked == {"bottle/test/crack/000.png"}
    assert "1 defective test image(s) have no mask" in caplog.text
    assert test.labels[list(test.file_names).index("bottle/test/crack/000.png")] == 1


def test_synthetic_is_deterministic_and_has_exact_masks(tmp_path):
    a = prepare("synthetic", str(tmp_path / "a"), config="tiny")
    b = prepare("synthetic", str(tmp_path / "b"), config="tiny")
    da, db = SplitData.load(a, "test"), SplitData.load(b, "test")
    assert da.file_names == db.file_names and len(da) == 24
    ba, bb = next(eval_batches(da, 24, image_size=64)), next(eval_batches(db, 24, image_size=64))
    np.testing.assert_array_equal(ba["image"], bb["image"])
    assert all((m.sum() > 0) == bool(lab) for m, lab in zip(ba["mask"], ba["label"]))


def test_train_batches_are_seeded_resumable_and_shard_by_process(tmp_path):
    b = prepare("synthetic", str(tmp_path / "s"), config="tiny")
    data = SplitData.load(b, "train")
    first = [next_b["index"].tolist() for next_b in _take(train_batches(data, 4, seed=1, image_size=16), 7)]
    again = [next_b["index"].tolist() for next_b in _take(train_batches(data, 4, seed=1, image_size=16), 7)]
    resumed = [x["index"].tolist() for x in _take(train_batches(data, 4, seed=1, image_size=16, start_step=3), 4)]
    assert first == again and first[3:] == resumed
    epoch = sorted(sum(first[:6], []))
    assert epoch == list(range(24))  # 6 batches of 4 = one pass over the 24 images
    p0 = [x["index"].tolist() for x in _take(train_batches(data, 2, seed=1, image_size=16, process_count=2), 3)]
    p1 = [
        x["index"].tolist()
        for x in _take(train_batches(data, 2, seed=1, image_size=16, process_index=1, process_count=2), 3)
    ]
    assert sum(p0, []) + sum(p1, []) and not set(sum(p0, [])) & set(sum(p1, []))
    assert sorted(sum(p0, []) + sum(p1, [])) == sorted(sum(first[:3], []))


def test_eval_batches_pad_the_last_batch(tmp_path):
    b = prepare("synthetic", str(tmp_path / "s"), config="tiny")
    data = SplitData.load(b, "test", ["disc"])
    batches = list(eval_batches(data, 5, image_size=16))
    valid = np.concatenate([x["valid"] for x in batches])
    idx = np.concatenate([x["index"] for x in batches])
    assert len(valid) == 10 and valid.sum() == 8
    assert sorted(idx[valid == 1].tolist()) == list(range(8))


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_folder_dataset_is_prepared_again_when_the_folder_changes(tmp_path):
    """The prepared copy is keyed by the folder's listing: adding training images and a class gives a
    new copy with them (the earlier one was reused silently: "10 train, 6 test")."""
    root = tmp_path / "parts"
    _mvtec_tree(str(root), classes=("bottle",))
    said = []
    b1 = prepare("folder", str(tmp_path / "tfds"), manual_dir=str(root), log=said.append)
    assert len(SplitData.load(b1, "train")) == 3 and any("preparing the folder dataset" in m for m in said)
    said.clear()
    assert prepare("folder", str(tmp_path / "tfds"), manual_dir=str(root), log=said.append).data_dir == b1.data_dir
    assert not said  # unchanged: reused, nothing prepared
    for i in range(3, 7):
        _img(f"{root}/bottle/train/good/{i:03d}.png", seed=i)
    _mvtec_tree(str(root), classes=("cable",))
    b2 = prepare("folder", str(tmp_path / "tfds"), manual_dir=str(root), log=said.append)
    assert b2.data_dir != b1.data_dir and any("the folder changed since" in m for m in said)
    train = SplitData.load(b2, "train")
    assert len(train) == 10 and train.present_classes() == ["bottle", "cable"]


def test_layout_problems_are_reported_not_skipped_silently(tmp_path, caplog):
    root = tmp_path / "parts"
    _mvtec_tree(str(root), classes=("bottle",))
    _img(f"{root}/bottle/test/crack/deeper/000.png")  # a nested folder
    _mask(f"{root}/bottle/ground_truth/crack/999_mask.png")  # a mask without an image
    _mask(f"{root}/bottle/ground_truth/scratch/000_mask.png")  # masks of a defect without a test folder
    os.makedirs(root / "notes")  # not a class
    with caplog.at_level("WARNING"):
        prepare("folder", str(tmp_path / "tfds"), manual_dir=str(root), log=lambda *_: None)
    text = caplog.text
    assert "deeper" in text and "999_mask.png" in text and "scratch" in text and "notes" in text
    _img(f"{root}/cable/Train/good/000.png")  # a misspelled train folder: refused, not dropped
    with pytest.raises(DatasetLayoutError, match="Train/ instead of train/"):
        prepare("folder", str(tmp_path / "tfds2"), manual_dir=str(root), log=lambda *_: None)


def test_decompression_bomb_names_the_file(tmp_path):
    import struct
    import zlib

    from maskad_jax.data.preprocess import open_image

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path = tmp_path / "huge.png"  # a 100000 x 100000 header on a few bytes
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(ImageDecodeError, match="huge.png"):
        open_image(str(path))

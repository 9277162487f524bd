"""The fit as immutable, versioned parts in one file (engine/fit_state.py): a round trip of every part,
the migration of fits written before format 2, a save interrupted at any point leaving a whole fit, and
the refusal of corrupt or newer files."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

from maskad_jax.engine import fit_state
from maskad_jax.engine.fit_state import Calibration, Fit, FitCorruptError, InputContract, NominalPools


def _fit(seed=0, updates=()):
    rng = np.random.default_rng(seed)
    nominal = NominalPools(
        rng.normal(size=(2, 5, 3)).astype(np.float32),
        rng.normal(size=(2, 5, 3)).astype(np.float32),
        np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool),
        np.array([0.5, 0.25], np.float32),
        ("a", "b"),
        {"a": np.array([0, 3]), "b": np.array([7])},
        src=np.array([[0, 1, 2, -1, -1], [4, 5, 6, 8, 9]], np.int32),
        fine_in=rng.normal(size=(2, 4, 2)).astype(np.float32),
        fine_valid=np.ones((2, 4), bool),
        fine_cal_scale=np.array([1.5, 2.5], np.float32),
    )
    cal = Calibration(
        {"a": [1.0, 2.0], "b": [3.0]}, {"a": [0.5, 0.6], "b": [0.7]}, np.ones((2, 4), np.float32), {"x": 1}
    )
    contract = InputContract("resize", 64, {"a": [1.0, 1.5], "b": [2.0, 2.0]}, np.zeros((2, 64, 64), bool))
    return Fit(nominal, cal, contract, {"a": {"threshold": 1.5, "f1": 0.8, "good": 2, "defective": 1}}, tuple(updates))


def _same(x, y):
    for part in ("nominal", "calibration", "contract"):
        a, b = getattr(x, part), getattr(y, part)
        for f in dataclasses.fields(a):
            u, v = getattr(a, f.name), getattr(b, f.name)
            if isinstance(u, np.ndarray) or isinstance(v, np.ndarray):
                np.testing.assert_array_equal(u, v, err_msg=f"{part}.{f.name}")
            elif isinstance(u, dict) and u and isinstance(next(iter(u.values())), np.ndarray):
                assert {k: list(w) for k, w in u.items()} == {k: list(w) for k, w in v.items()}
            else:
                assert u == v, f"{part}.{f.name}"
    assert x.val_thresholds == y.val_thresholds and x.updates == y.updates


def test_every_part_survives_one_file_and_is_immutable(tmp_path):
    fit = _fit(updates=[{"class": "a", "files": {"n.png": "00"}, "tokens_added": 2}])
    path = fit.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["fit.npz"] and path == str(tmp_path / "fit.npz")
    back = Fit.load(str(tmp_path))
    _same(fit, back)
    assert fit_state.read_meta(str(tmp_path))["format_version"] == fit_state.FORMAT_VERSION == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        back.val_thresholds = {}
    with pytest.raises(AttributeError):
        back.cal_scores = {}  # the scoring code's names are read-only views of the parts
    assert back.geometry == {"geometry": "resize", "image_size": 64, "aspect": {"a": [1.0, 1.5], "b": [2.0, 2.0]}}


def _write_v1(fit, directory):
    """A fit as versions up to a4eff19 wrote it: pools.npz, then pools.json with the npz's SHA-256."""
    os.makedirs(directory, exist_ok=True)
    n = fit.nominal
    npz = os.path.join(directory, "pools.npz")
    np.savez(
        npz, pool_in=n.pool_in, pool_tgt=n.pool_tgt, valid=n.valid, cal_scale=n.cal_scale, src=n.src,
        fine_in=n.fine_in, fine_valid=n.fine_valid, fine_cal_scale=n.fine_cal_scale, ignore=fit.contract.ignore,
    )  # fmt: skip
    meta = {
        "npz_sha256": hashlib.sha256(open(npz, "rb").read()).hexdigest(),
        "class_names": list(n.class_names),
        "calibration": {k: v.tolist() for k, v in n.held_out.items()},
        "cal_scores": fit.cal_scores,
        "cal_scoring": fit.cal_scoring,
        "term_stats": fit.term_stats.tolist(),
        "cal_map_max": fit.cal_map_max,
        "geometry": fit.geometry,
        "val_thresholds": fit.val_thresholds,
        "added": list(fit.updates),
    }
    with open(os.path.join(directory, "pools.json"), "w") as f:
        json.dump(meta, f)


def test_a_format_1_fit_is_migrated_and_replaced_at_the_next_save(tmp_path):
    fit = _fit(updates=[{"class": "b", "files": {"m.png": "11"}, "tokens_added": 1}])
    _write_v1(fit, str(tmp_path))
    assert fit_state.exists(str(tmp_path))
    old = Fit.load(str(tmp_path))
    _same(fit, old)
    old.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["fit.npz"]
    _same(fit, Fit.load(str(tmp_path)))
    # format 1 without geometry (the oldest fits): crop at any size
    _write_v1(fit, str(tmp_path / "older"))
    meta = json.load(open(tmp_path / "older" / "pools.json"))
    meta["geometry"] = None
    json.dump(meta, open(tmp_path / "older" / "pools.json", "w"))
    oldest = Fit.load(str(tmp_path / "older")).contract
    assert (oldest.geometry, oldest.image_size, oldest.aspect) == ("crop", None, {})


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_a_save_interrupted_at_any_point_leaves_the_old_fit_whole(tmp_path, monkeypatch, fail_at):
    old, new = _fit(0), _fit(1, updates=[{"class": "a", "files": {"z.png": "22"}, "tokens_added": 3}])
    old.save(str(tmp_path))

    def boom(*a, **k):
        raise KeyboardInterrupt  # a crash or an interrupt at this point

    target = {"write": (np, "savez"), "fsync": (os, "fsync"), "replace": (os, "replace")}[fail_at]
    monkeypatch.setattr(*target, boom)
    with pytest.raises(KeyboardInterrupt):
        new.save(str(tmp_path))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["fit.npz"]  # no partial file left
    _same(old, Fit.load(str(tmp_path)))
    new.save(str(tmp_path))
    _same(new, Fit.load(str(tmp_path)))  # the update record is in the same file as the pools


def test_corrupt_and_newer_files_are_refused_naming_them(tmp_path):
    _fit().save(str(tmp_path))
    path = tmp_path / "fit.npz"
    arrays, meta = fit_state.read_file(str(path))
    meta["format_version"] = 99
    np.savez(path, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    with pytest.raises(FitCorruptError, match="format_version 99"):
        Fit.load(str(tmp_path))
    meta["format_version"] = 2
    arrays["pool_in"] = arrays["pool_in"] + 1  # arrays changed after the digest was recorded
    np.savez(path, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    with pytest.raises(FitCorruptError, match="differ from the digest"):
        Fit.load(str(tmp_path))
    with pytest.raises(fit_state.MissingInputError, match="no fit"):
        Fit.load(str(tmp_path / "absent"))

"""serve.py (maskad_jax/runtime/serve_export.py) against what hostile users feed it, on a small exported program
made here (the same interface as --mode=export's scorer: uint8 images and keys in; map, score,
anomalous, class_index, threshold out), so no training is needed: bad images are skipped and
reported while the good ones of the same call are scored, arguments are checked, names are escaped,
maps are named after their inputs, and the manifest cannot be edited, emptied or padded."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from maskad_jax.common.digests import sha256_file
from maskad_jax.runtime import serve_export

SIZE = 32


def _scorer(images, keys):
    """The map is the grey level, the score its max; class 1 for keys that are odd (to see them)."""
    m = images.astype(jnp.float32).mean(-1) / 255.0
    score = m.max(axis=(1, 2))
    thr = jnp.full(score.shape, 0.5, jnp.float32)
    return {"map": m, "score": score, "anomalous": score >= thr, "class_index": keys % 2, "threshold": thr}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    (b,) = jax.export.symbolic_shape("b")
    args = (jax.ShapeDtypeStruct((b, SIZE, SIZE, 3), jnp.uint8), jax.ShapeDtypeStruct((b,), jnp.int32))
    exported = jax.export.export(jax.jit(_scorer), platforms=("cpu",))(*args)
    (folder / "scorer.stablehlo").write_bytes(bytes(exported.serialize()))
    shutil.copyfile(serve_export.__file__, folder / "serve.py")
    manifest = {
        "input": {"shape": ["batch", SIZE, SIZE, 3]},
        "classes": ["even", "odd"],
        "thresholds": {"even": 0.5, "odd": 0.5},
        "onnx": None,
        "files": {n: sha256_file(str(folder / n)) for n in ("scorer.stablehlo", "serve.py")},
    }
    serve_export.write_manifest(str(folder), manifest)
    return folder


def _png(path, value=200, size=(48, 40)):
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return str(path)


def _serve(export_dir, *args, capsys):
    rc = serve_export.main(["--export", str(export_dir), *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_images_are_skipped_and_reported_and_the_good_ones_scored(export_dir, tmp_path, capsys):
    good = [_png(tmp_path / "a.png", 250), _png(tmp_path / "b.png", 10)]
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(open(good[0], "rb").read()[:60])
    huge = Image.new("L", (1, 1))  # a header that claims 100000 x 100000 pixels: refused before decoding
    huge.save(tmp_path / "huge.png")
    data = bytearray((tmp_path / "huge.png").read_bytes())
    data[16:24] = (100000).to_bytes(4, "big") + (100000).to_bytes(4, "big")
    (tmp_path / "huge.png").write_bytes(bytes(data))
    os.symlink(tmp_path / "loop2.png", tmp_path / "loop1.png")
    os.symlink(tmp_path / "loop1.png", tmp_path / "loop2.png")
    thin = Image.new("RGB", (100000, 1))
    thin.save(tmp_path / "thin.png")
    rc, out, err = _serve(export_dir, tmp_path, tmp_path / "missing.png", capsys=capsys)
    assert rc == 0
    lines = out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == good  # both good images, in order, once each
    assert lines[0].split("\t")[4] == "anomalous" and lines[1].split("\t")[4] == "normal"
    for name in ("zero.png", "truncated.png", "huge.png", "loop1.png", "loop2.png", "thin.png", "missing.png"):
        assert f"skipped {tmp_path / name}:" in err, name
    assert "aspect ratio" in err and "scored 2 of 9 images; 7 skipped" in err


def test_nothing_to_score_is_status_2(export_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _serve(export_dir, empty, capsys=capsys)
    assert rc == 2 and "no images" in err
    (tmp_path / "zero.png").write_bytes(b"")
    rc, out, err = _serve(export_dir, tmp_path / "zero.png", capsys=capsys)
    assert rc == 2 and out == "" and "scored 0 of 1 images" in err


@pytest.mark.parametrize("batch", ["0", "-1", "x"])
def test_batch_must_be_a_positive_integer(export_dir, tmp_path, capsys, batch):
    with pytest.raises(SystemExit) as e:
        serve_export.main(["--export", str(export_dir), "--batch", batch, _png(tmp_path / "a.png")])
    assert e.value.code == 2 and "--batch" in capsys.readouterr().err


def test_names_with_tabs_and_newlines_keep_one_line_per_image(export_dir, tmp_path, capsys):
    odd = _png(tmp_path / "tab\tand\nnewline\\.png")
    rc, out, _ = _serve(export_dir, odd, capsys=capsys)
    assert rc == 0
    (line,) = out.strip().split("\n")
    fields = line.split("\t")
    assert len(fields) == 7 and fields[0].endswith("tab\\tand\\nnewline\\\\.png")


def test_maps_are_named_after_their_inputs_and_a_used_out_folder_is_refused(export_dir, tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a, b = _png(tmp_path / "x" / "p.png", 250), _png(tmp_path / "y" / "p.png", 10)
    out_dir = tmp_path / "maps"
    rc, _, _ = _serve(export_dir, a, b, "--out", out_dir, capsys=capsys)
    names = sorted(n for n in os.listdir(out_dir) if n != "scores.json")
    assert rc == 0 and len(names) == 2 and all(n.endswith("p.png.npy") for n in names)
    rows = json.loads((out_dir / "scores.json").read_text())  # each map's image, score and regions
    assert sorted(r["map"] for r in rows) == names and all("regions" in r for r in rows)
    amap = np.load(out_dir / [n for n in names if "x_p" in n][0])
    assert amap.shape == (40, 48) and np.nanmax(amap) == pytest.approx(250 / 255)  # the original size; crop: NaN sides
    assert np.isnan(amap[:, 0]).all() and np.isfinite(amap[:, 24]).all()
    rc, _, err = _serve(export_dir, a, "--out", out_dir, capsys=capsys)  # a second run would overwrite the first's
    assert rc == 2 and "not an empty folder" in err and sorted(os.listdir(out_dir)) == sorted(names + ["scores.json"])


def _copy(export_dir, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(export_dir, folder)
    return folder


def _edit(folder, change):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.update(files={}),  # turned every digest check off before
        lambda m: m["thresholds"].update(even=99.0),  # used silently before
        lambda m: m.update(classes=["odd", "even"]),  # printed wrong labels before
    ],
    ids=["files emptied", "threshold edited", "classes reordered"],
)
def test_an_edited_manifest_is_refused(export_dir, tmp_path, capsys, change):
    folder = _copy(export_dir, tmp_path)
    _edit(folder, change)
    rc, _, err = _serve(folder, _png(tmp_path / "a.png"), capsys=capsys)
    assert rc == 2 and "manifest.json: differs from its digest" in err


def test_the_manifest_must_list_every_file_and_have_its_digest(export_dir, tmp_path, capsys):
    folder = _copy(export_dir, tmp_path)
    (folder / "extra.bin").write_bytes(b"x")
    rc, _, err = _serve(folder, _png(tmp_path / "a.png"), capsys=capsys)
    assert rc == 2 and "not listed" in err and "extra.bin" in err
    os.remove(folder / "extra.bin")
    os.remove(folder / serve_export.MANIFEST_DIGEST)
    rc, _, err = _serve(folder, _png(tmp_path / "a.png"), capsys=capsys)
    assert rc == 2 and "manifest.sha256" in err
    # a manifest rewritten consistently but without the scorer in its list is still refused
    folder2 = _copy(export_dir, tmp_path / "second")
    manifest = json.loads((folder2 / "manifest.json").read_text())
    del manifest["files"]["scorer.stablehlo"]
    os.remove(folder2 / "scorer.stablehlo")
    serve_export.write_manifest(str(folder2), manifest)
    rc, _, err = _serve(folder2, _png(tmp_path / "a.png"), capsys=capsys)
    assert rc == 2 and "does not list ['scorer.stablehlo']" in err


def test_a_truncated_scorer_is_refused(export_dir, tmp_path, capsys):
    folder = _copy(export_dir, tmp_path)
    data = (folder / "scorer.stablehlo").read_bytes()
    (folder / "scorer.stablehlo").write_bytes(data[: len(data) // 2])
    rc, _, err = _serve(folder, _png(tmp_path / "a.png"), capsys=capsys)
    assert rc == 2 and "SHA-256 differs" in err


def test_non_finite_float_images_are_refused(export_dir, tmp_path, capsys):
    Image.fromarray(np.full((40, 40), np.nan, np.float32), "F").save(tmp_path / "nan.tif")
    rc, _, err = _serve(export_dir, tmp_path / "nan.tif", _png(tmp_path / "ok.png"), capsys=capsys)
    assert rc == 0 and "nan.tif: 1600 of 1600 pixels are not finite" in err


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda m: m.update(classes=["even"]), "'thresholds' must have one number per class"),
        (lambda m: m.update(classes=[]), "'classes' must be a non-empty list"),
        (lambda m: m["thresholds"].update(even="high"), "not a finite number"),
        (lambda m: m.update(map_thresholds={"bolt": 1.0}), "'map_thresholds' names classes"),
    ],
    ids=["a class removed", "no classes", "a threshold not a number", "a map level of no class"],
)
def test_a_manifest_edited_and_digested_again_is_refused_in_one_line(export_dir, tmp_path, capsys, change, words):
    """#33 item 8: a class list changed with the digest recomputed raised KeyError (exit 1) before."""
    folder = _copy(export_dir, tmp_path)
    _edit(folder, change)
    manifest = json.loads((folder / "manifest.json").read_text())
    serve_export.write_manifest(str(folder), manifest)  # its digest recomputed: only the contract check is left
    rc, _, err = _serve(folder, _png(tmp_path / "a.png"), capsys=capsys)
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err


def _peaked_map():
    """10 x 12 zeros, a 3 x 3 plateau at 0.5 around (row 5, col 5) with 1.0 at its centre, and a lone
    0.3 pixel far from it."""
    amap = np.zeros((10, 12), np.float32)
    amap[4:7, 4:7] = 0.5
    amap[5, 5] = 1.0
    amap[1, 10] = 0.3
    return amap


def test_regions_follow_the_decision_by_the_maps_threshold_or_its_peak():
    amap = _peaked_map()
    # a normal image has none, whatever its map shows
    assert serve_export.decided_regions(amap, 0.2, anomalous=False) == ([], None)
    # anomalous, the map over its threshold 0.25: the plateau and the lone pixel, highest peak first
    regions, level = serve_export.decided_regions(amap, 0.25, anomalous=True)
    assert level == 0.25
    assert regions == [
        {"box": [4, 4, 7, 7], "area": 9, "peak": 1.0, "by": "threshold"},
        {"box": [10, 1, 11, 2], "area": 1, "peak": pytest.approx(0.3), "by": "threshold"},
    ]
    # anomalous, the map under its threshold 2.0 (the score's other term decided): the area around the
    # peak at half its height above the median (0): level 0.5, the plateau alone (the 0.3 pixel is under it)
    regions, level = serve_export.decided_regions(amap, 2.0, anomalous=True)
    assert level == 0.5 and regions == [{"box": [4, 4, 7, 7], "area": 9, "peak": 1.0, "by": "peak"}]
    # NaN where not inspected is never a region; a map with nothing inspected has none to give
    amap[:, :2] = np.nan
    assert serve_export.decided_regions(amap, 2.0, anomalous=True)[1] == 0.5
    assert serve_export.decided_regions(np.full((4, 4), np.nan), 1.0, anomalous=True) == ([], None)


def test_scored_rows_carry_regions_exactly_when_anomalous(tmp_path):
    """score_loaded with a map threshold above the score's: an anomalous image whose map stays under it
    still gets a region (by its peak); a normal one whose map passes it gets none."""
    manifest = {
        "input": {"shape": ["batch", SIZE, SIZE, 3]},
        "classes": ["even", "odd"],
        "thresholds": {"even": 0.5, "odd": 0.5},
        "map_thresholds": {"even": 0.9, "odd": 0.1},
    }
    bright = np.zeros((SIZE, SIZE, 3), np.uint8)
    bright[10:14, 10:14] = 200  # map max 0.78: over the score threshold 0.5, under even's map threshold 0.9
    dim = np.zeros((SIZE, SIZE, 3), np.uint8)
    dim[20:22, 3:5] = 60  # map max 0.24: normal, yet over odd's map threshold 0.1
    loaded = [serve_export.inputs_of(Image.fromarray(a), SIZE, "resize", None) for a in (bright, dim)]

    def run(images, keys):
        out = {k: np.asarray(v) for k, v in _scorer(jnp.asarray(images), jnp.asarray(keys)).items()}
        out["class_index"] = np.asarray([0, 1], np.int32)  # bright is "even", dim is "odd"
        return out

    (row_b, _), (row_d, _) = serve_export.score_loaded(run, manifest, loaded)
    assert row_b["anomalous"] and [r["by"] for r in row_b["regions"]] == ["peak"]
    assert row_b["regions"][0]["box"] == [10, 10, 14, 14]
    assert not row_d["anomalous"] and row_d["regions"] == [] and row_d["region_level"] is None

"""What hostile or unlucky inputs do to decoding, predict's output folders and the export swap
(issue #24): refused in one line before memory is spent, reported instead of skipped silently, and
never a half-written or overwritten artifact. Failures the test user (root) cannot cause through
permissions are injected with monkeypatch."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from maskad_jax.app import export as export_lib
from maskad_jax.app import predict as predict_lib
from maskad_jax.common.errors import DataError, MissingInputError
from maskad_jax.data.preprocess import ImageDecodeError, open_image, preprocess_image


def test_long_thin_images_are_refused_from_the_header(tmp_path):
    Image.new("L", (100000, 1)).save(tmp_path / "strip.png")  # a few hundred bytes on disk
    assert os.path.getsize(tmp_path / "strip.png") < 2000
    with pytest.raises(ImageDecodeError, match=r"100000 x 1 pixels, an aspect ratio over the limit of 32"):
        open_image(str(tmp_path / "strip.png"))
    Image.new("RGB", (640, 20)).save(tmp_path / "ok.png")  # 32:1 is still taken
    assert preprocess_image(open_image(str(tmp_path / "ok.png")), 64).shape == (64, 64, 3)


def test_non_finite_float_pixels_are_refused(tmp_path):
    arr = np.zeros((30, 30), np.float32)
    arr[3, 4] = np.inf
    arr[5] = np.nan
    Image.fromarray(arr, "F").save(tmp_path / "bad.tif")
    with pytest.raises(ImageDecodeError, match=r"31 of 900 pixels are not finite"):
        preprocess_image(open_image(str(tmp_path / "bad.tif")), 32, source="bad.tif")


def test_a_multi_frame_image_says_how_many_frames_it_has(tmp_path):
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "green", "blue")]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    img = open_image(str(tmp_path / "stack.tif"))
    assert img.info["frames"] == 3 and np.asarray(img.convert("RGB"))[0, 0, 0] == 255  # the first frame


def test_unreadable_folders_are_named_not_reported_as_empty(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    walk = os.walk

    def walk_denying_sub(top, onerror=None, **kw):
        for d, dirs, files in walk(top, onerror=onerror, **kw):
            if os.path.basename(d) == "sub":
                onerror(PermissionError(13, "Permission denied", d))
                continue
            yield d, dirs, files

    monkeypatch.setattr(predict_lib.os, "walk", walk_denying_sub)
    said = []
    root, rels, unreadable = predict_lib.collect_inputs(str(tmp_path), said.append)
    assert rels == ["a.png"] and unreadable == [str(tmp_path / "sub")]
    assert "cannot read folder" in said[0] and "Permission denied" in said[0]
    monkeypatch.setattr(predict_lib.os, "access", lambda *a: False)
    with pytest.raises(MissingInputError, match="cannot be read \\(permission denied\\)"):
        predict_lib.collect_inputs(str(tmp_path), said.append)


def test_latest_is_replaced_never_written_through_a_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me\n")
    wd = tmp_path / "wd"
    (wd / "predictions").mkdir(parents=True)
    os.symlink(outside, wd / "predictions" / "latest.txt")
    final, partial = predict_lib.output_folder(str(wd))
    assert partial == final + ".partial" and os.path.isdir(partial) and not os.path.exists(final)
    predict_lib.point_latest(str(wd), os.path.basename(final))
    assert outside.read_text() == "keep me\n"
    assert not os.path.islink(wd / "predictions" / "latest.txt")
    assert (wd / "predictions" / "latest.txt").read_text().strip() == os.path.basename(final)


def test_predictions_or_latest_of_the_wrong_kind_are_one_line_errors(tmp_path):
    (tmp_path / "a" / "predictions").mkdir(parents=True)
    (tmp_path / "a" / "predictions" / "latest.txt").mkdir()
    with pytest.raises(DataError, match="latest.txt is a folder"):
        predict_lib.point_latest(str(tmp_path / "a"), "x")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "predictions").write_text("")
    with pytest.raises(DataError, match="predictions is not a folder"):
        predict_lib.output_folder(str(tmp_path / "b"))


def _folder(path, text):
    path.mkdir()
    (path / "manifest.json").write_text(text)
    (path / "scorer.stablehlo").write_text(text)
    return path


def test_export_swap_keeps_the_previous_artifact_when_the_new_one_cannot_take_its_place(tmp_path, monkeypatch):
    out, new = _folder(tmp_path / "export", "old"), _folder(tmp_path / "export.partial", "new")
    rename = os.rename

    def failing_rename(a, b):
        if str(a).endswith("export.partial"):
            raise OSError(28, "No space left on device", str(a))
        return rename(a, b)

    monkeypatch.setattr(export_lib.os, "rename", failing_rename)
    with pytest.raises(OSError, match="No space left"):
        export_lib.swap_in(str(new), str(out))
    assert (out / "manifest.json").read_text() == "old" and (out / "scorer.stablehlo").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["export", "export.partial"]


def test_export_swap_puts_the_new_artifact_in_place_even_when_the_old_cannot_be_deleted(tmp_path, monkeypatch):
    """Before: export/ was emptied ignoring errors, then the new one moved in; one entry that could
    not be deleted left neither the old scorer nor the new one in export/."""
    out, new = _folder(tmp_path / "export", "old"), _folder(tmp_path / "export.partial", "new")
    said = []
    monkeypatch.setattr(export_lib.progress, "log", said.append)
    monkeypatch.setattr(export_lib.shutil, "rmtree", lambda p, onerror=None: None)  # a read-only entry
    export_lib.swap_in(str(new), str(out))
    assert (out / "manifest.json").read_text() == "new" and not (tmp_path / "export.partial").exists()
    (left,) = [p for p in os.listdir(tmp_path) if p.startswith("export.previous-")]
    assert (tmp_path / left / "manifest.json").read_text() == "old" and left in said[0]
    shutil.rmtree(tmp_path / left)


def test_eval_batch_size_is_bounded_by_the_config_check():
    from configs import demo
    from maskad_jax.app import config_check
    from maskad_jax.common.errors import ConfigError

    c = demo.get_config("smoke")
    c.data.eval_batch_size = 1000000
    with pytest.raises(ConfigError, match=r"data.eval_batch_size = 1000000: must be an integer in \[1, 1024\]"):
        config_check.validate(c, "predict")

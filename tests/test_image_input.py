"""One image-input path: training's loader, predict and the API, validation, and the export's serve.py
turn every Pillow mode (16-bit, palette, LA, CMYK, 1-bit, RGBA) and an EXIF-rotated photo into the same
model inputs; to_rgb and image_key are defined once (in the export's standalone runtime)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from maskad_jax.app.detector import as_rgb
from maskad_jax.app.scored_files import _load_chunk
from maskad_jax.common.specs import DataSpec
from maskad_jax.data import preprocess, splits
from maskad_jax.data.preprocess import preprocess_image
from maskad_jax.runtime import serve_export
from tfds_builders.common import encode_rgb

SIZE = 32


def _base(w=48, h=40):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 5 % 256, y * 6 % 256, (x * y) % 256], -1).astype(np.uint8)


def _odd_images(folder):
    rgb = _base()
    grey = rgb[..., 0]
    files = {}

    def save(name, img, **kw):
        files[name] = str(folder / name)
        img.save(files[name], **kw)

    save("grey16.png", Image.fromarray(grey.astype(np.uint16) * 257))
    save("palette.png", Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=64))
    save("la.png", Image.fromarray(np.stack([grey, grey // 2], -1), "LA"))
    save("rgba.png", Image.fromarray(np.concatenate([rgb, grey[..., None]], -1), "RGBA"))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95)
    save("bits.png", Image.fromarray(grey > 128))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    save("rotated.jpg", Image.fromarray(rgb), exif=exif, quality=95)
    return files


@pytest.mark.parametrize("geometry", ["crop", "resize", "pad"])
def test_every_route_gives_the_same_inputs(tmp_path, geometry):
    files = _odd_images(tmp_path)
    d = DataSpec(
        name="folder", config="", manual_dir="", tfds_dir="", classes=(), image_size=SIZE, geometry=geometry,
        validation="", ignore_masks="", tiles=(), tile_overlap=0.0, num_workers=0, eval_batch_size=8,
    )  # fmt: skip
    for name, path in files.items():
        served = serve_export.preprocess(path, SIZE, geometry)[0][0][0]  # serve.py
        rgb, _ = as_rgb(path, name)  # the API and --mode=predict
        api = serve_export.inputs_of(rgb, SIZE, geometry)[0][0][0]
        png, size = encode_rgb(path)  # training: the TFDS builders store this, Preprocess.map reads it
        stored = Image.fromarray(np.asarray(Image.open(io.BytesIO(png))))
        trained = preprocess_image(stored, SIZE, source=name, geometry=geometry)
        rows = []
        validation = _load_chunk([(name, -1)], str(tmp_path), d, rows, print)["images"][0]  # data.validation
        assert rows == []
        np.testing.assert_array_equal(api, served, err_msg=name)
        np.testing.assert_array_equal(trained, served.astype(np.float32) / 255.0, err_msg=name)
        np.testing.assert_array_equal(validation, trained, err_msg=name)
        assert splits.image_key(trained) == serve_export.image_key(served)
        assert size == rgb.size
    assert as_rgb(files["rotated.jpg"])[0].size == (40, 48)  # upright: width and height swapped


def test_the_conversions_are_defined_once():
    assert splits.image_key is serve_export.image_key
    src = open(preprocess.__file__).read()
    assert "def to_rgb" in src and "serve_export.to_rgb(img)" in src  # the data layer's wraps the runtime's
    for path in ("app/predict.py", "app/detector.py", "app/scored_files.py", "data/splits.py"):
        text = open(os.path.join(os.path.dirname(preprocess.__file__), "..", path)).read()
        assert "def to_rgb" not in text and "def image_key" not in text and "crc32" not in text, path


def test_16_bit_and_float_arrays_and_exif_of_a_pil_image(tmp_path):
    grey16 = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    via_array, _ = as_rgb(grey16)
    Image.fromarray(grey16).save(tmp_path / "g.png")
    via_file, _ = as_rgb(str(tmp_path / "g.png"))
    np.testing.assert_array_equal(np.asarray(via_array), np.asarray(via_file))
    rotated = _odd_images(tmp_path)["rotated.jpg"]
    assert as_rgb(Image.open(rotated))[0].size == (40, 48)

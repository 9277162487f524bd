"""report.html is self-contained and complete: every image embedded and decodable, nothing loaded
from elsewhere, the plots and tables there, hostile names escaped, and no console error in a real
(headless) browser. Built from a synthetic result, so no training is needed."""

import base64
import io
import os
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from configs import demo
from maskad_jax.app.overlay import unique_names
from maskad_jax.app.report import write_report
from maskad_jax.common.specs import resolve
from maskad_jax.engine.metrics import METRIC_NAMES, curve_points

HOSTILE = '<script>alert(1)</script> "x" & y'


def _result():
    rng = np.random.default_rng(0)
    classes = {}
    for name in ("bottle", HOSTILE):
        labels = np.r_[np.zeros(6, int), np.ones(6, int)]
        scores = rng.normal(size=12) + labels
        maps = rng.uniform(size=(12, 16, 16))
        masks = np.zeros((12, 16, 16), bool)
        masks[6:, 4:9, 4:9] = True
        maps[masks] += 0.5
        classes[name] = {
            "scores": scores,
            "labels": labels,
            "defects": ["good"] * 6 + ["crack"] * 3 + [HOSTILE] * 3,
            "threshold": 0.9,
            "image_curves": curve_points(scores, labels),
            "pixel_curves": curve_points(maps, masks),
        }
    examples = [
        {
            "class": name,
            "kind": "highest",
            "file": f"{name}/test/crack/000.png",
            "score": 1.5,
            "label": 1,
            "image": rng.uniform(size=(16, 16, 3)),
            "map": rng.uniform(size=(16, 16)),
            "mask": np.pad(np.ones((4, 4)), 6),
            "scale": [0.0, 1.0],
        }
        for name in classes
    ]
    per_class = {name: dict.fromkeys(METRIC_NAMES, 0.8) for name in classes}
    return {
        "per_class": per_class,
        "mean": dict.fromkeys(METRIC_NAMES, 0.8),
        "num_test_images": 24,
        "test_images_per_second": 3.0,
        "train_seconds": 10.0,
        "total_seconds": 20.0,
        "report_data": {"classes": classes, "examples": examples, "threshold_quantile": 0.99},
    }


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.refs, self.scripts = [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if key in a and not a[key].startswith(("data:", "#")):
                self.refs.append(a[key])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    s = resolve(demo.get_config("smoke"))
    run = dict(data=s.data, model=s.model, train=s.train, scoring=s.scoring, protocol=s.eval.protocol)
    write_report(str(path), dict(run, config_json=s.config_json), _result(), "/tmp/wd")
    return path


def test_report_is_self_contained_and_every_image_decodes(report):
    html = report.read_text()
    p = _Collect()
    p.feed(html)
    assert p.refs == [] and p.scripts == 0  # nothing loaded from anywhere else; the hostile name stays text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for img in p.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).verify()
    alts = [img["alt"] for img in p.imgs]
    for what in ("score distributions", "image ROC and PR curves", "pixel ROC and PR curves"):
        assert sum(what in a for a in alts) == 2, what  # one per class
    assert sum(a.endswith("000.png") for a in alts) == 2  # the overlays
    for text in ("predict threshold 0.9", "I-AUROC vs good", "defect type", "efficientnet-lite0", "total 20 s"):
        assert text in html, text


def test_report_opens_in_a_headless_browser_without_console_errors(report):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra")
    problems = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page()
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
        page.goto(report.as_uri())
        shown = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        browser.close()
    assert problems == []
    assert shown and all(shown)  # every embedded image decoded by the browser


def test_output_names_are_unique_and_stable():
    """Two inputs that flatten to one name keep separate files (a collision overwrote one overlay)."""
    names = unique_names(["a b.png", "a_b.png", "c/d.png", "c/d.png"], ".png")
    assert len(set(names)) == 4 and names[2] == "c_d.png" and names[3] == "c_d_2.png"
    assert names[:2] == unique_names(["a b.png", "a_b.png"], ".png")  # the same names in another run
    assert all(n.replace("_", "").replace("-", "").replace(".png", "").isalnum() for n in names)
    assert os.sep not in "".join(names)

"""The HTTP inspection service (#27) over a smoke model's export, started as a user would
(`export/serve.py --http PORT`): the API's numbers equal --mode=predict's on the same files, bad
input gets a 4xx and the service keeps answering, concurrent requests are batched, the token is
required, and the browser page shows an overlay and a decision in a real headless chromium."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from helpers import FAST_COMPILE
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # trains, exports and starts a service
TOKEN = "s3cret-token"


def _run(*args):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip())
    proc = subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, data=None, headers=None, token=TOKEN):
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _multipart(files, field="image"):
    boundary = "maskadboundary"
    body = b""
    for name, data in files:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                f"Content-Type: image/png\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A trained smoke workdir, its export, predict's results on its sample images, and the service."""
    base = tmp_path_factory.mktemp("svc")
    work = base / "run"
    # pad: the exported program then takes the content boxes too (manifest input.boxes)
    common = [
        "--config=configs/demo.py:smoke",
        f"--workdir={work}",
        f"--config.data.tfds_dir={base / 'tfds'}",
        "--config.data.geometry=pad",
    ]
    _run(*common)
    first = sorted(os.listdir(work / "samples"))[0]  # and a wide one: pad's box then leaves out real padding
    Image.open(work / "samples" / first).convert("RGB").resize((96, 40)).save(work / "samples" / "wide.png")
    _run(*common, "--mode=export", "--config.export.onnx=no")
    _run(*common, "--mode=predict", f"--config.predict.input={work / 'samples'}")
    latest = (work / "predictions" / "latest.txt").read_text().strip()
    predicted = {r["file"]: r for r in json.loads((work / "predictions" / latest / "scores.json").read_text())}
    (base / "token").write_text(TOKEN + "\n")
    tmpdir = base / "server_tmp"
    tmpdir.mkdir()
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(work / "export" / "serve.py"),
            "--http",
            str(port),
            "--token-file",
            str(base / "token"),
            "--max-bytes",
            "400000",
            "--max-wait-ms",
            "200",
            "--max-batch",
            "16",
            # budgets by pixels (#33): small enough to test cheaply
            "--max-pixels",
            "10000000",
            "--max-request-pixels",
            "20000000",
            "--max-request-bytes",
            "3000000",
            "--display-size",
            "256",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, TMPDIR=str(tmpdir)),  # where a framework would spool uploads: must stay empty
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if _request(url + "/v1/health")[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the service did not start: " + proc.stdout.read())
    yield {"url": url, "samples": work / "samples", "predicted": predicted, "base": base, "proc": proc, "port": port}
    proc.terminate()
    proc.wait(timeout=30)


def test_scores_equal_predict_on_the_same_files(service):
    files = sorted(os.listdir(service["samples"]))
    body, headers = _multipart([(f, (service["samples"] / f).read_bytes()) for f in files])
    status, raw = _request(service["url"] + "/v1/score", body, headers)
    assert status == 200, raw
    status, health = _request(service["url"] + "/v1/health")
    assert json.loads(health)["geometry"] == "pad"
    rows = {r["file"]: r for r in json.loads(raw)["images"]}
    for f in files:
        want, got = service["predicted"][f], rows[f]
        assert got["class"] == want["class"] and got["anomalous"] == want["anomalous"]
        # the exported program and predict's jit round floats alike to ~1e-6 of the scores' scale
        assert got["score"] == pytest.approx(want["score"], rel=1e-5, abs=2e-5)
        assert got["threshold"] == pytest.approx(want["threshold"])
        assert got["normalised_score"] == pytest.approx(want["normalised_score"], rel=1e-4, abs=1e-4)
        assert [r["box"] for r in got["regions"]] == [r["box"] for r in want["regions"]]
    one = (service["samples"] / files[0]).read_bytes()  # a raw body, with the map and overlay asked for
    status, raw = _request(service["url"] + "/v1/score?maps=1", one, {"Content-Type": "image/png"})
    row = json.loads(raw)["images"][0]
    overlay = Image.open(io.BytesIO(__import__("base64").b64decode(row["overlay_png"])))
    assert status == 200 and overlay.size == Image.open(service["samples"] / files[0]).size


def _png(size=(64, 64), value=128):
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_input_gets_a_4xx_and_the_service_keeps_answering(service):
    url, png = service["url"] + "/v1/score", _png()
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # 400 M pixels in a few KB
    big = np.random.default_rng(0).integers(0, 255, (400, 400, 3), np.uint8)
    big_png = io.BytesIO()
    Image.fromarray(big).save(big_png, format="PNG")  # ~480 KB, over --max-bytes 400000
    cases = [
        (b"not an image at all", {"Content-Type": "image/png"}, 415),
        (png[: len(png) // 2], {"Content-Type": "image/png"}, 400),  # truncated
        (bomb.getvalue(), {"Content-Type": "image/png"}, 413),
        (big_png.getvalue(), {"Content-Type": "image/png"}, 413),
        (*_multipart([("a.png", png)], field="file"), 400),  # wrong field name
        (png, {"Content-Type": "text/plain"}, 400),
    ]
    for body, headers, want in cases:
        status, raw = _request(url, body, headers)
        assert status == want, (want, raw)
        assert "\n" not in json.loads(raw)["error"].strip()
    status, raw = _request(url + "?class=bolt", png, {"Content-Type": "image/png"})
    assert status == 400 and "bolt" in json.loads(raw)["error"]
    assert _request(service["url"] + "/v1/health")[0] == 200
    assert _request(url, png, {"Content-Type": "image/png"})[0] == 200


def test_the_token_is_required(service):
    assert _request(service["url"] + "/v1/health", token=None)[0] == 401
    assert _request(service["url"] + "/v1/score", _png(), {"Content-Type": "image/png"}, token="wrong")[0] == 401
    assert _request(service["url"] + "/metrics", token=None)[0] == 401


def test_concurrent_requests_all_succeed_and_are_batched(service):
    files = sorted(os.listdir(service["samples"]))
    data = [(service["samples"] / f).read_bytes() for f in files]
    results, start = [None] * 16, threading.Barrier(16)

    def client(i):
        start.wait()
        results[i] = _request(service["url"] + "/v1/score", data[i % len(data)], {"Content-Type": "image/png"})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 200 for status, _ in results), [r[1][:200] for r in results if r[0] != 200]
    metrics = _request(service["url"] + "/metrics")[1].decode()
    count = float(next(ln.split()[-1] for ln in metrics.splitlines() if ln.startswith("maskad_batch_size_count")))
    total = float(next(ln.split()[-1] for ln in metrics.splitlines() if ln.startswith("maskad_batch_size_sum")))
    assert total / count > 1.5  # some calls of the program scored several requests' images together
    assert "maskad_images_scored_total" in metrics and 'maskad_requests_total{endpoint="score",status="200"}' in metrics


def test_the_page_shows_an_overlay_and_a_decision_in_a_browser(service):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra")
    sample = str(service["samples"] / sorted(os.listdir(service["samples"]))[0])
    problems = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page()
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(service["url"] + "/")
        page.fill("#token", TOKEN)
        page.set_input_files("#files", sample)
        page.wait_for_selector("img.overlay", timeout=60000)
        decision = page.text_content(".decision")
        shown = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        # the slider recolours without scoring again: at 0 every image is anomalous
        page.eval_on_selector_all(
            "input.threshold", "all => all.forEach(s => { s.value = 0; s.dispatchEvent(new Event('input')); })"
        )
        after = page.text_content(".decision")
        browser.close()
    assert problems == []
    assert decision in ("normal", "anomalous") and shown and all(shown) and after == "anomalous"


# ------------------------------------------------------------------ hostile load (#33), each finding a test


def _gradient_png(w, h):
    """A w x h grey PNG of a few KB (a smooth gradient compresses well): many pixels, few bytes."""
    row = (np.arange(w) * 255 // max(1, w - 1)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(row, (h, w)).copy(), "L").save(buf, format="PNG")
    return buf.getvalue()


def _peak_rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


def test_pixels_not_bytes_bound_what_a_request_costs(service):
    url = service["url"] + "/v1/score"
    huge = _gradient_png(4000, 4000)  # 16 M pixels in a few KB: over --max-pixels
    assert len(huge) < 100_000
    status, raw = _request(url, huge, {"Content-Type": "image/png"})
    assert status == 413 and "--max-pixels" in json.loads(raw)["error"]
    many = _multipart([(f"g{i}.png", _gradient_png(2900, 2900)) for i in range(3)])  # 25 M pixels together
    status, raw = _request(url, *many)
    assert status == 413 and "--max-request-pixels" in json.loads(raw)["error"]
    two = _multipart([(f"g{i}.png", _gradient_png(3000, 3000)) for i in range(2)])
    status, raw = _request(url + "?maps=1", *two)
    assert status == 200
    for row in json.loads(raw)["images"]:
        overlay = Image.open(io.BytesIO(__import__("base64").b64decode(row["overlay_png"])))
        assert max(overlay.size) == 256  # built at --display-size, not at the image's 3000 x 3000
    assert _peak_rss_mb(service["proc"].pid) < 2000


def test_bodies_are_counted_as_they_arrive_and_never_spooled(service):
    import http.client

    host, port = "127.0.0.1", service["port"]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    headers = {"Content-Type": "image/png", "Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"}
    conn.putrequest("POST", "/v1/score")
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    status = None
    try:
        for _ in range(40):  # 40 chunks of 256 KB: 10 MB, over --max-request-bytes 3 MB
            chunk = b"\0" * (256 * 1024)
            conn.send(f"{len(chunk):X}\r\n".encode() + chunk + b"\r\n")
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the service answered and closed before the whole body was sent
    status = conn.getresponse().status
    conn.close()
    assert status == 413
    declared = _request(
        service["url"] + "/v1/score", b"x", {"Content-Type": "image/png", "Content-Length": "999999999"}
    )
    assert declared[0] in (400, 413)
    noise = np.random.default_rng(1).integers(0, 255, (700, 700, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")  # a part of about 1.5 MB: spooled to disk by the framework before
    status, _ = _request(service["url"] + "/v1/score", *_multipart([("n.png", buf.getvalue())]))
    assert status == 413  # over --max-bytes, parsed in memory
    assert os.listdir(service["base"] / "server_tmp") == []


def test_health_answers_while_a_heavy_request_is_scored(service):
    body, headers = _multipart([(f"g{i}.png", _gradient_png(3000, 3000)) for i in range(2)])
    done = {}

    def heavy():
        done["heavy"] = _request(service["url"] + "/v1/score?maps=1", body, headers)[0]
        done["heavy_at"] = time.perf_counter()

    thread = threading.Thread(target=heavy)
    thread.start()
    time.sleep(0.3)
    status = _request(service["url"] + "/v1/health")[0]
    health_at = time.perf_counter()
    thread.join()
    assert status == 200 and done["heavy"] == 200
    assert health_at < done["heavy_at"]  # answered while the heavy request was still being worked on


def test_a_request_over_max_batch_uses_only_compiled_batch_sizes(service):
    png = (service["samples"] / sorted(os.listdir(service["samples"]))[0]).read_bytes()
    status, raw = _request(service["url"] + "/v1/score", *_multipart([(f"s{i}.png", png) for i in range(20)]))
    assert status == 200 and len(json.loads(raw)["images"]) == 20  # 20 inputs, --max-batch 16: two calls
    metrics = _request(service["url"] + "/metrics")[1].decode()
    uncompiled = [ln for ln in metrics.splitlines() if ln.startswith("maskad_uncompiled_batches_total")]
    assert uncompiled and float(uncompiled[0].split()[-1]) == 0.0


def test_the_page_keeps_classes_and_thresholds_behind_the_token(service):
    status, html = _request(service["url"] + "/", token=None)
    html = html.decode()
    assert status == 200 and "const thresholds = {};" in html
    classes = json.loads(_request(service["url"] + "/v1/health")[1])["classes"]
    assert classes and not any(f'"{c}"' in html for c in classes)


def test_query_flags_are_checked(service):
    url, png = service["url"] + "/v1/score", _png()
    status, raw = _request(url + "?maps=2", png, {"Content-Type": "image/png"})
    assert status == 400 and "maps=1" in json.loads(raw)["error"]
    status, raw = _request(url + "?maps=True", png, {"Content-Type": "image/png"})
    assert status == 200 and "overlay_png" in json.loads(raw)["images"][0]


def test_a_port_in_use_is_reported_before_compiling(service):
    export = service["samples"].parent / "export"
    proc = subprocess.run(
        [sys.executable, str(export / "serve.py"), "--http", str(service["port"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "cannot listen" in proc.stderr, proc.stderr[-500:]
    assert "compiled for" not in proc.stdout

"""Latency and throughput of the HTTP service (serve.py --http) against direct calls of the same
exported scorer, one run, the same images.

    python run.py --config=configs/demo.py --workdir=runs/demo --mode=export --config.export.onnx=no
    python benchmarks/serve_http.py runs/demo/export runs/demo/samples --requests 64

(a) direct: serve.py's own functions in this process (preprocess, then score_loaded), one image per
call, then 16 per call; (b) the service on a free loopback port, started as a user would, with
1 client sending one image per request one after another, then 16 clients at once. Each request is
one raw image body; latency is the time from sending to the parsed reply. Prints p50/p99 latency
and images/s of each, and the ratios to (a).
"""

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request


def load_serve(folder):
    spec = importlib.util.spec_from_file_location("serve", os.path.join(folder, "serve.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def direct(serve, folder, images, per_call):
    manifest = serve.load_manifest(folder)
    run = serve.choose_runtime(folder, manifest, "stablehlo")
    size = manifest["input"]["shape"][1]
    pre = manifest.get("preprocess", {})
    geometry, tiles = pre.get("geometry", "crop"), pre.get("tiles")
    serve.score_loaded(run, manifest, [serve.preprocess(images[0], size, geometry, tiles)] * per_call)  # compile
    lat, t0 = [], time.perf_counter()
    for s in range(0, len(images), per_call):
        t = time.perf_counter()
        loaded = [serve.preprocess(p, size, geometry, tiles) for p in images[s : s + per_call]]
        serve.score_loaded(run, manifest, loaded)
        lat.append(time.perf_counter() - t)
    return lat, len(images) / (time.perf_counter() - t0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, data):
    t = time.perf_counter()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "image/png"}, method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        json.loads(r.read())
    return time.perf_counter() - t


def service(folder, images, clients, max_batch):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(folder, "serve.py"), "--http", str(port), "--max-batch", str(max_batch)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1/score"
    bodies = [open(p, "rb").read() for p in images]
    try:
        for _ in range(600):
            try:
                post(url, bodies[0])  # started, and compiled for a batch of one
                break
            except OSError:
                time.sleep(0.2)
        for _ in range(2):  # compile the batch sizes concurrency produces
            threads = [threading.Thread(target=post, args=(url, bodies[i % len(bodies)])) for i in range(clients)]
            [t.start() for t in threads]
            [t.join() for t in threads]
        lat, lock = [], threading.Lock()
        todo = list(range(len(bodies)))

        def client():
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                d = post(url, bodies[i])
                with lock:
                    lat.append(d)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        return lat, len(bodies) / (time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export")
    ap.add_argument("images")
    ap.add_argument("--requests", type=int, default=64, help="images sent (the folder's, repeated)")
    args = ap.parse_args()
    files = sorted(os.path.join(args.images, f) for f in os.listdir(args.images) if f.lower().endswith(".png"))
    images = [files[i % len(files)] for i in range(args.requests)]
    serve = load_serve(args.export)
    rows = []
    for name, (lat, rate) in (
        ("direct, 1 image per call", direct(serve, args.export, images, 1)),
        ("direct, 16 images per call", direct(serve, args.export, images, 16)),
        ("service, 1 client", service(args.export, images, 1, 16)),
        ("service, 16 clients", service(args.export, images, 16, 16)),
    ):
        rows.append((name, 1000 * statistics.median(lat), 1000 * pct(lat, 0.99), rate))
    base = {1: rows[0][3], 16: rows[1][3]}
    print("| how | p50 ms | p99 ms | images/s | ratio to direct (same batching) |")
    print("|---|---|---|---|---|")
    for (name, p50, p99, rate), ref in zip(rows, (base[1], base[16], base[1], base[16])):
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {rate:.2f} | {rate / ref:.2f} |")


if __name__ == "__main__":
    main()

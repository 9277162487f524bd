"""A load test of the HTTP service (#33): memory and latency under huge images, many small ones,
chunked bodies and concurrent clients, all on 127.0.0.1.

    python benchmarks/serve_load.py EXPORT_FOLDER [--seconds 20] [--clients 16]

Starts `EXPORT_FOLDER/serve.py --http` with its default limits, then runs for --seconds, at once:
  - huge:    a loop posting 2 grey 6000 x 6000 PNGs (36 M pixels each, a few hundred KB) with ?maps=1
  - bombs:   a loop posting one 9400 x 9400 PNG (over --max-pixels: 413) and 16 x 6000 x 6000 in one request
             (over --max-request-pixels: 413)
  - chunked: a loop sending a 150 MB chunked body (over --max-request-bytes: 413 while it arrives)
  - small:   --clients threads posting the export's sample-sized images (64 x 64) as fast as they can
  - health:  GET /v1/health every 50 ms
The service's resident memory (VmRSS, sampled every 20 ms; VmHWM at the end) and the latency of
/v1/health and of the small requests (median, 95th percentile, max) are printed, with the count of
each status. Every request loop is bounded by --seconds and stops by itself.
"""

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
from PIL import Image


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _gradient(w, h):
    return _png(np.broadcast_to((np.arange(w) * 255 // (w - 1)).astype(np.uint8), (h, w)).copy())


def _multipart(files):
    boundary = "loadtestboundary"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{n}"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for n, data in files
    )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _post(port, path, body, ctype, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    conn.request("POST", path, body=body, headers={"Content-Type": ctype})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, time.perf_counter() - t0


def _chunked(port, total_mb):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.putrequest("POST", "/v1/score")
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b"\0" * (1 << 20)
    try:
        for _ in range(total_mb):
            conn.send(f"{len(chunk):X}\r\n".encode() + chunk + b"\r\n")
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        status = conn.getresponse().status
    except (ConnectionResetError, http.client.RemoteDisconnected):
        status = "reset"
    conn.close()
    return status


def _rss_mb(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, os.path.join(args.export, "serve.py"), "--http", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for _ in range(600):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/v1/health")
            if c.getresponse().status == 200:
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        sys.exit("the service did not start: " + proc.stdout.read())
    base_rss = _rss_mb(proc.pid)
    size = 64
    small = _png(np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8))
    huge = _multipart([(f"h{i}.png", _gradient(6000, 6000)) for i in range(2)])
    over_image = _gradient(9400, 9400)
    over_request = _multipart([(f"b{i}.png", _gradient(6000, 6000)) for i in range(16)])
    stop = time.perf_counter() + args.seconds
    results = {k: [] for k in ("huge", "bombs", "chunked", "small", "health")}
    rss = []

    def loop(name, fn, pause=0.0):
        while time.perf_counter() < stop:
            try:
                results[name].append(fn())
            except OSError as e:
                results[name].append((f"error {type(e).__name__}", 0.0))
            time.sleep(pause)

    threads = [
        threading.Thread(target=loop, args=("huge", lambda: _post(port, "/v1/score?maps=1", *huge, timeout=300))),
        threading.Thread(target=loop, args=("bombs", lambda: _post(port, "/v1/score", over_image, "image/png"))),
        threading.Thread(target=loop, args=("bombs", lambda: _post(port, "/v1/score", *over_request))),
        threading.Thread(target=loop, args=("chunked", lambda: (_chunked(port, 150), 0.0))),
        threading.Thread(target=loop, args=("health", lambda: _get(port), 0.05)),
    ] + [
        threading.Thread(target=loop, args=("small", lambda: _post(port, "/v1/score", small, "image/png")))
        for _ in range(args.clients)
    ]

    def sample():
        while time.perf_counter() < stop + 5:
            rss.append(_rss_mb(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sampler.join()
    peak = _rss_mb(proc.pid, "VmHWM")
    proc.terminate()
    proc.wait(timeout=30)
    print(f"{args.seconds:.0f} s of load on {args.export} ({args.clients} small-image clients)")
    print(f"  resident memory: {base_rss:.0f} MB idle, {max(rss):.0f} MB sampled maximum, {peak:.0f} MB peak (VmHWM)")
    for name, rows in results.items():
        statuses = {}
        for status, _ in rows:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        times = sorted(t * 1000 for s, t in rows if s == 200)
        lat = ""
        if times:
            p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
            lat = f"  ms: median {statistics.median(times):.1f}, p95 {p95:.1f}, max {times[-1]:.1f}"
        print(f"  {name:<8} {len(rows):5d} requests  statuses {json.dumps(statuses)}{lat}")


def _get(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    t0 = time.perf_counter()
    conn.request("GET", "/v1/health")
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, time.perf_counter() - t0


if __name__ == "__main__":
    main()

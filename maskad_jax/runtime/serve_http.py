"""An HTTP inspection service over an exported scorer (copied as <export>/serve_http.py; started by
`python <export>/serve.py --http PORT` or `run.py --mode=serve`). Imports nothing of maskad_jax: the
export's serve.py hands it its own functions (`loader`).

    POST /v1/score     one or several images: multipart (field "image", repeated) or a raw body
                       (Content-Type image/*). Per image: class, score, normalised score (1.0 = the
                       threshold), threshold, decision, regions over the map's threshold (box, area,
                       peak); ?maps=1 adds the map and the overlay as base64 PNG; ?class=NAME says
                       which class you expect (400 if the model has none such; "class_matches").
    GET  /v1/health    model digest, classes, thresholds, geometry and versions (manifest.json).
    GET  /metrics      Prometheus text: requests by endpoint and status, request latency, images
                       scored, batch sizes.
    GET  /             a page to drop images on (plain HTML and JS, served here, no CDN).

Requests that arrive together are scored together: a queue in front of the compiled program takes
up to --max-batch images (their tiles counted) or waits at most --max-wait-ms for more. Bad input
gets a 4xx with a one-line reason and the service goes on: not an image (415), corrupt or truncated
(400), a decompression bomb or a body over --max-bytes (413), an unknown class or wrong field names
(400). Request bodies stay in memory; nothing reaches the file system. It binds to 127.0.0.1
unless --host says otherwise; --token-file makes /v1/* and /metrics require
`Authorization: Bearer <token>`.
"""

import asyncio
import base64
import hmac
import io
import json
import threading
import time

import numpy as np
from PIL import Image

try:  # the optional extra [serve]: pip install 'maskad-jax[serve]'
    import uvicorn
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route
except ImportError as e:  # pragma: no cover - reported by serve.py in one line
    raise ImportError(
        f"the HTTP service needs starlette, uvicorn, python-multipart and prometheus-client ({e}): "
        "pip install 'maskad-jax[serve]'"
    ) from None

PAGE = "serve_page.html"  # the browser page, beside this file


class BadInput(Exception):
    def __init__(self, status, reason):
        super().__init__(reason)
        self.status, self.reason = status, reason


class Batcher:
    """Scores the images of concurrent requests together: at most max_batch model inputs per call of
    the program, waiting at most max_wait seconds for more once one request is queued."""

    def __init__(self, score, max_batch, max_wait, on_batch):
        self.score, self.max_batch, self.max_wait, self.on_batch = score, max_batch, max_wait, on_batch
        self.queue, self.lock = None, threading.Lock()

    async def submit(self, loaded):
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._work())
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((loaded, done))
        return await done

    async def _work(self):
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            size = sum(len(inputs) for inputs, _ in items[0][0])
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                try:
                    item = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                items.append(item)
                size += sum(len(inputs) for inputs, _ in item[0])
            loaded = [x for group, _ in items for x in group]
            self.on_batch(size)
            try:
                results = await loop.run_in_executor(None, self._locked, loaded)
            except Exception as e:  # noqa: BLE001  (every waiting request gets the error)
                for _, done in items:
                    done.set_exception(e)
                continue
            start = 0
            for group, done in items:
                done.set_result(results[start : start + len(group)])
                start += len(group)

    def _locked(self, loaded):
        """Score under the lock, the batch padded with copies of its last image up to a power of two
        of model inputs: the program is compiled for a few batch sizes only, not for every size
        concurrency happens to produce (each new size costs a compilation)."""
        n = sum(len(inputs) for inputs, _ in loaded)
        padded = list(loaded)
        while sum(len(inputs) for inputs, _ in padded) < 1 << (n - 1).bit_length():
            padded.append(loaded[-1])
        with self.lock:
            return self.score(padded)[: len(loaded)]


def _png_b64(array_u8):
    buf = io.BytesIO()
    Image.fromarray(array_u8).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _visuals(loader, data, full, map_threshold):
    """The map (255 = twice the map's threshold) and the overlay on the image (its bytes), as base64 PNG."""
    level = max(2 * map_threshold, 1e-12)
    scaled = np.clip(np.nan_to_num(full, nan=0.0) / level * 255, 0, 255).astype(np.uint8)
    image01 = np.asarray(loader.decode(data)[0], np.float32) / 255.0
    over = loader.overlay(image01, full, 0.0, level, map_threshold)
    return {"map_png": _png_b64(scaled), "overlay_png": _png_b64(over)}


class Service:
    def __init__(self, loader, manifest, run, args, folder):
        self.loader, self.manifest, self.args = loader, manifest, args
        self.size = manifest["input"]["shape"][1]
        pre = manifest.get("preprocess", {})
        self.geometry, self.tiles = pre.get("geometry", "crop"), pre.get("tiles")
        self.token = None
        if args.token_file:
            with open(args.token_file) as f:
                self.token = f.read().strip()
            if not self.token:
                raise loader.ArtifactError(f"--token-file {args.token_file} is empty")
        with open(f"{folder}/manifest.sha256") as f:
            self.digest = f.read().strip()
        reg = self.registry = CollectorRegistry()
        self.requests = Counter("maskad_requests", "HTTP requests", ["endpoint", "status"], registry=reg)
        self.latency = Histogram(
            "maskad_request_seconds",
            "request latency",
            ["endpoint"],
            registry=reg,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.images = Counter("maskad_images_scored", "images scored", registry=reg)
        self.batch = Histogram(
            "maskad_batch_size",
            "model inputs per call of the program",
            registry=reg,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.batcher = Batcher(
            lambda loaded: loader.score_loaded(run, manifest, loaded),
            args.max_batch,
            args.max_wait_ms / 1000.0,
            self.batch.observe,
        )

    def authorised(self, request):
        if self.token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    def decode(self, data, name):
        """preprocess output for one image's bytes, or BadInput."""
        if len(data) > self.args.max_bytes:
            raise BadInput(413, f"{name}: {len(data)} bytes, over the limit of {self.args.max_bytes} (--max-bytes)")
        try:
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
        except Image.DecompressionBombError as e:
            raise BadInput(413, f"{name}: {e}") from None
        except (OSError, SyntaxError, ValueError):
            raise BadInput(415, f"{name}: not an image Pillow can read") from None
        if w * h > (Image.MAX_IMAGE_PIXELS or float("inf")):
            raise BadInput(
                413, f"{name}: {w} x {h} pixels, over the limit of {Image.MAX_IMAGE_PIXELS} (a decompression bomb?)"
            )
        try:
            loaded = self.loader.preprocess(io.BytesIO(data), self.size, self.geometry, self.tiles)
        except Image.DecompressionBombError as e:
            raise BadInput(413, f"{name}: {e}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise BadInput(400, f"{name}: cannot be decoded ({e})") from None
        return loaded

    async def images_of(self, request):
        """[(name, bytes)] of the request: multipart field "image" (repeated) or a raw image body."""
        ctype = request.headers.get("content-type", "")
        length = int(request.headers.get("content-length") or 0)
        if length > self.args.max_bytes * max(1, self.args.max_images):
            raise BadInput(413, f"request body of {length} bytes is over the limit")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=self.args.max_images, max_fields=self.args.max_images)
            except Exception as e:  # noqa: BLE001  (starlette's multipart errors)
                raise BadInput(400, f"the multipart body cannot be read ({e})") from None
            fields = sorted(set(form.keys()))
            if fields != ["image"]:
                raise BadInput(400, f"multipart fields {fields}: send each image in a field named 'image'")
            out = []
            for item in form.getlist("image"):
                if isinstance(item, str):
                    raise BadInput(400, "field 'image' must be a file, not text")
                out.append((item.filename or "image", await item.read()))
            return out
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return [("body", await request.body())]
        raise BadInput(400, f"Content-Type {ctype or 'none'}: send multipart/form-data (field 'image') or image/*")

    async def score(self, request):
        q = request.query_params
        expected = q.get("class")
        if expected is not None and expected not in self.manifest["classes"]:
            raise BadInput(400, f"class {expected!r} is not one of the model's: {', '.join(self.manifest['classes'])}")
        images = await self.images_of(request)
        if not images:
            raise BadInput(400, "no image in the request")
        if len(images) > self.args.max_images:
            raise BadInput(413, f"{len(images)} images in one request, over the limit of {self.args.max_images}")
        loaded = [self.decode(data, name) for name, data in images]
        results = await self.batcher.submit(loaded)
        self.images.inc(len(results))
        out = []
        for (name, data), (row, full) in zip(images, results):
            row = {"file": name, **row}
            if expected is not None:
                row["class_matches"] = row["class"] == expected
            if q.get("maps") in ("1", "true", "yes"):
                thr = self.manifest.get("map_thresholds", {}).get(row["class"], row["threshold"])
                row.update(_visuals(self.loader, data, full, thr))
            out.append(row)
        return {"images": out}

    def health(self):
        m = self.manifest
        return {
            "status": "ok",
            "manifest_sha256": self.digest,
            "classes": m["classes"],
            "thresholds": m["thresholds"],
            "threshold_rule": m.get("threshold_rule"),
            "geometry": self.geometry,
            "tiles": self.tiles,
            "input_size": self.size,
            "versions": m.get("versions", {}),
            "created": m.get("created"),
        }


def build_app(loader, manifest, run, args, folder):
    service = Service(loader, manifest, run, args, folder)

    def endpoint(name, handler, protected=True):
        async def wrapped(request):
            t0 = time.perf_counter()
            try:
                if protected and not service.authorised(request):
                    raise BadInput(401, "a bearer token is required (Authorization: Bearer <token>)")
                response = await handler(request)
            except BadInput as e:
                response = JSONResponse({"error": e.reason}, status_code=e.status)
            except Exception as e:  # noqa: BLE001  (the service keeps running; the client gets one line)
                response = JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)
            service.requests.labels(name, str(response.status_code)).inc()
            service.latency.labels(name).observe(time.perf_counter() - t0)
            return response

        return wrapped

    async def score(request):
        return JSONResponse(await service.score(request))

    async def health(request):
        return JSONResponse(service.health())

    async def metrics(request):
        return Response(generate_latest(service.registry), media_type="text/plain; version=0.0.4")

    async def page(request):
        with open(f"{folder}/{PAGE}") as f:
            html = f.read()
        return HTMLResponse(html.replace("__CLASSES__", json.dumps(manifest["thresholds"])))

    routes = [
        Route("/v1/score", endpoint("score", score), methods=["POST"]),
        Route("/v1/health", endpoint("health", health), methods=["GET"]),
        Route("/metrics", endpoint("metrics", metrics), methods=["GET"]),
        Route("/", endpoint("page", page, protected=False), methods=["GET"]),
    ]
    return Starlette(routes=routes)


def warm_up(loader, manifest, run, max_batch):
    """Compile the program for every batch size the queue uses (powers of two up to max_batch), so no
    request waits for a compilation; the sizes and the seconds it took."""
    size = manifest["input"]["shape"][1]
    image = np.full((size, size, 3), 128, np.uint8)
    inputs = [(image, ((0, 0, size, size), (0.0, 0.0, float(size), float(size))), (size, size), None)]
    sizes, t0 = [], time.perf_counter()
    while not sizes or sizes[-1] < max_batch:
        sizes.append(1 << len(sizes))
    for n in [1] + sizes[1:]:
        loader.score_loaded(run, manifest, [(inputs, (size, size))] * n)
    return sizes, time.perf_counter() - t0


def serve(loader, manifest, run, args, folder):
    """Run the service until interrupted (uvicorn, one process: the compiled program is loaded once),
    after compiling it for the batch sizes it will use."""
    app = build_app(loader, manifest, run, args, folder)
    sizes, seconds = warm_up(loader, manifest, run, args.max_batch)
    print(f"compiled for batches of {', '.join(map(str, sizes))} model inputs in {seconds:.1f} s", flush=True)
    print(f"serving {folder} on http://{args.host}:{args.http}/ (POST /v1/score, GET /v1/health, /metrics)", flush=True)
    uvicorn.run(app, host=args.host, port=args.http, log_level="warning", access_log=False)
    return 0

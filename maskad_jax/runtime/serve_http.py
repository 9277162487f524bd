"""An HTTP inspection service over an exported scorer (copied as <export>/serve_http.py; started by
`python <export>/serve.py --http PORT` or `run.py --mode=serve`). Imports nothing of maskad_jax: the
export's serve.py hands it its own functions (`loader`).

    POST /v1/score     one or several images: multipart (field "image", repeated) or a raw body
                       (Content-Type image/*). Per image: class, score, normalised score (1.0 = the
                       threshold), threshold, decision, the regions of an anomalous image (box,
                       area, peak, by: serve_export.decided_regions); ?maps=1 adds the map and
                       the overlay as base64 PNG; ?class=NAME says which class you expect (400 if
                       the model has none such; "class_matches").
    GET  /v1/health    model digest, classes, thresholds, geometry and versions (manifest.json).
    GET  /metrics      Prometheus text: requests by endpoint and status, request latency, images
                       scored, batch sizes.
    GET  /             a page to drop images on (plain HTML and JS, served here, no CDN).

Requests that arrive together are scored together: a queue in front of the compiled program takes
up to --max-batch model inputs (tiles counted) or waits at most --max-wait-ms for more; a request
with more inputs is scored in several calls, each padded to a batch size compiled before the
service listens (no request ever waits for a compilation). Bad input gets a 4xx with a one-line
reason and the service goes on: not an image (415), corrupt or truncated (400), a decompression bomb,
an image over --max-pixels, a request over --max-request-pixels, --max-request-bytes or
--max-images (413), an unknown class, wrong field names or a bad query value (400). When the images
being worked on would pass --max-inflight-pixels, or --max-queue requests wait, a request gets 503
with Retry-After. What a request costs is bounded by pixels, not bytes: a small PNG can hold a huge
image, so each image's size is read from its header before it is decoded.
Bodies are read as they arrive and counted (chunked ones too), multipart parsed in memory; nothing
reaches the file system. Decoding, preprocessing and the maps and overlays (float32, at most
--display-size pixels a side) run on a worker pool, never on the event loop, so /v1/health and other
clients stay fast while a heavy request is scored. It binds to 127.0.0.1 unless --host says otherwise
(the port is bound before the program is compiled: a port in use is reported at once);
--token-file makes /v1/*, /metrics and the page's class list require `Authorization: Bearer <token>`.
"""

import asyncio
import base64
import concurrent.futures
import hmac
import io
import json
import os
import socket
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

    try:
        from python_multipart.multipart import MultipartParser, parse_options_header
    except ImportError:  # python-multipart before 0.0.13
        from multipart.multipart import MultipartParser, parse_options_header
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
    """Scores the images of concurrent requests together: up to max_batch model inputs per call of the
    program (score pads and splits: serve_export.padded_run), waiting at most max_wait seconds for more
    once one request is queued; at most max_queue requests wait (then BadInput 503)."""

    def __init__(self, score, max_batch, max_wait, max_queue):
        self.score, self.max_batch, self.max_wait, self.max_queue = score, max_batch, max_wait, max_queue
        self.queue, self.lock, self.waiting = None, threading.Lock(), 0

    async def submit(self, loaded):
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._work())
        if self.waiting >= self.max_queue:
            raise BadInput(503, f"{self.waiting} requests are waiting to be scored (--max-queue): retry shortly")
        self.waiting += 1
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((loaded, done))
        try:
            return await done
        finally:
            self.waiting -= 1

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
        with self.lock:
            return self.score(loaded)


def _png_b64(array_u8):
    buf = io.BytesIO()
    Image.fromarray(array_u8).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _visuals(loader, data, full, map_threshold, region_level, display):
    """The map (255 = twice the map's threshold) and the overlay on the image (its regions outlined at
    region_level; None: none), as base64 PNG, at most `display` pixels a side (float32 and uint8
    throughout: a huge image costs no more than that)."""
    level = max(2 * map_threshold, 1e-12)
    image = loader.decode(data)[0]
    scale = min(1.0, display / max(image.size))
    if scale < 1.0:
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        image = image.resize(size, Image.BILINEAR)
        full = np.asarray(Image.fromarray(np.asarray(full, np.float32), "F").resize(size, Image.NEAREST), np.float32)
    scaled = np.clip(np.nan_to_num(full, nan=0.0) / level * 255, 0, 255).astype(np.uint8)
    image01 = np.asarray(image, np.float32) / np.float32(255.0)
    del image
    over = loader.overlay(image01, full, 0.0, level, region_level)
    return {"map_png": _png_b64(scaled), "overlay_png": _png_b64(over)}


def _flag(value, name):
    """A query flag: 1/true/yes/on or 0/false/no/off (any case); anything else is a 400."""
    if value is None:
        return False
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise BadInput(400, f"?{name}={value}: give {name}=1 (or true) for maps, {name}=0 (or false) for none")


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
            "model inputs per call of the program (after padding to a compiled size)",
            registry=reg,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.compiled = set(loader.buckets(args.max_batch))  # what warm_up compiles
        self.uncompiled = Counter(
            "maskad_uncompiled_batches", "calls with a batch size not compiled before listening", registry=reg
        )
        self.inflight = 0  # pixels of the images admitted and not yet answered
        run = loader.padded_run(run, args.max_batch, on_call=self._observe)
        self.batcher = Batcher(
            lambda loaded: loader.score_loaded(run, manifest, loaded),
            args.max_batch,
            args.max_wait_ms / 1000.0,
            args.max_queue,
        )
        self.workers = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))

    def _observe(self, size):
        self.batch.observe(size)
        if size not in self.compiled:
            self.uncompiled.inc()

    def authorised(self, request):
        if self.token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    def pixels_of(self, data, name):
        """An image's width x height from its header (nothing decoded), or BadInput."""
        if len(data) > self.args.max_bytes:
            raise BadInput(413, f"{name}: {len(data)} bytes, over the limit of {self.args.max_bytes} (--max-bytes)")
        try:
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
        except Image.DecompressionBombError as e:
            raise BadInput(413, f"{name}: {e}") from None
        except (OSError, SyntaxError, ValueError):
            raise BadInput(415, f"{name}: not an image Pillow can read") from None
        if w * h > min(self.args.max_pixels, Image.MAX_IMAGE_PIXELS or float("inf")):
            raise BadInput(413, f"{name}: {w} x {h} pixels, over the limit of {self.args.max_pixels} (--max-pixels)")
        return w * h

    def decode(self, data, name):
        """preprocess output for one image's bytes, or BadInput (run on the worker pool)."""
        try:
            return self.loader.inputs_of(self.loader.decode(data)[0], self.size, self.geometry, self.tiles)
        except Image.DecompressionBombError as e:
            raise BadInput(413, f"{name}: {e}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise BadInput(400, f"{name}: cannot be decoded ({e})") from None

    async def body_of(self, request):
        """The request body, read as it arrives and counted: 413 as soon as it passes --max-request-bytes
        (a declared Content-Length over it is refused before reading; chunked bodies are counted too)."""
        limit = self.args.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadInput(413, f"request body of {declared} bytes, over the limit of {limit} (--max-request-bytes)")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise BadInput(413, f"request body over the limit of {limit} bytes (--max-request-bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def images_of(self, request):
        """[(name, bytes)] of the request: multipart field "image" (repeated) or a raw image body."""
        ctype = request.headers.get("content-type", "")
        if not (ctype.startswith(("multipart/form-data", "image/")) or ctype == "application/octet-stream"):
            raise BadInput(400, f"Content-Type {ctype or 'none'}: send multipart/form-data (field 'image') or image/*")
        body = await self.body_of(request)
        if not ctype.startswith("multipart/form-data"):
            return [("body", body)]
        return self.parts_of(ctype, body)

    def parts_of(self, ctype, body):
        """The "image" parts of a multipart body, parsed in memory (python-multipart's parser)."""
        _, params = parse_options_header(ctype)
        boundary = params.get(b"boundary")
        if not boundary:
            raise BadInput(400, "the multipart body has no boundary in its Content-Type")
        parts, current = [], {}

        def on_header_field(data, start, end):
            current["field"] = current.get("field", b"") + data[start:end]

        def on_header_value(data, start, end):
            current["value"] = current.get("value", b"") + data[start:end]

        def on_header_end():
            current.setdefault("headers", {})[current.pop("field", b"").lower()] = current.pop("value", b"")

        def on_part_begin():
            current.clear()
            current["data"] = io.BytesIO()

        def on_part_data(data, start, end):
            if len(parts) >= self.args.max_images:
                raise BadInput(413, f"over {self.args.max_images} images in one request (--max-images)")
            current["data"].write(data[start:end])

        def on_part_end():
            _, disposition = parse_options_header(current.get("headers", {}).get(b"content-disposition", b""))
            parts.append((disposition, current["data"].getvalue()))

        callbacks = dict(
            on_part_begin=on_part_begin,
            on_part_data=on_part_data,
            on_part_end=on_part_end,
            on_header_field=on_header_field,
            on_header_value=on_header_value,
            on_header_end=on_header_end,
        )
        try:
            parser = MultipartParser(boundary, callbacks)
            parser.write(body)
            parser.finalize()
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001  (python-multipart's parse errors)
            raise BadInput(400, f"the multipart body cannot be read ({e})") from None
        fields = sorted({d.get(b"name", b"").decode("utf-8", "replace") for d, _ in parts})
        if fields != ["image"]:
            raise BadInput(400, f"multipart fields {fields}: send each image in a field named 'image'")
        if any(b"filename" not in d for d, _ in parts):
            raise BadInput(400, "field 'image' must be a file, not text")
        if len(parts) > self.args.max_images:
            raise BadInput(413, f"{len(parts)} images in one request, over the limit of {self.args.max_images}")
        return [(d[b"filename"].decode("utf-8", "replace") or "image", data) for d, data in parts]

    async def score(self, request):
        q = request.query_params
        expected = q.get("class")
        if expected is not None and expected not in self.manifest["classes"]:
            raise BadInput(400, f"class {expected!r} is not one of the model's: {', '.join(self.manifest['classes'])}")
        maps = _flag(q.get("maps"), "maps")
        images = await self.images_of(request)
        if not images:
            raise BadInput(400, "no image in the request")
        if len(images) > self.args.max_images:
            raise BadInput(413, f"{len(images)} images in one request, over the limit of {self.args.max_images}")
        pixels = sum(self.pixels_of(data, name) for name, data in images)
        if pixels > self.args.max_request_pixels:
            raise BadInput(
                413, f"{pixels} pixels in one request, over the limit of {self.args.max_request_pixels} "
                "(--max-request-pixels): send fewer or smaller images"
            )  # fmt: skip
        if self.inflight and self.inflight + pixels > self.args.max_inflight_pixels:
            raise BadInput(503, f"the service is working on {self.inflight} pixels (--max-inflight-pixels): retry")
        self.inflight += pixels
        try:
            return await self._score_admitted(images, expected, maps)
        finally:
            self.inflight -= pixels

    async def _score_admitted(self, images, expected, maps):
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.workers, self.decode, data, name) for name, data in images]
        loaded = await asyncio.gather(*jobs)
        results = await self.batcher.submit(loaded)
        self.images.inc(len(results))
        out = []
        for (name, data), (row, full) in zip(images, results):
            row = {"file": name, **row}
            if expected is not None:
                row["class_matches"] = row["class"] == expected
            if maps:
                thr = self.manifest.get("map_thresholds", {}).get(row["class"], row["threshold"])
                args = (self.loader, data, full, thr, row["region_level"], self.args.display_size)
                row.update(await loop.run_in_executor(self.workers, _visuals, *args))
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
            "inflight_pixels": self.inflight,
            "waiting_requests": self.batcher.waiting,
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
                headers = {"Retry-After": "1"} if e.status == 503 else None
                response = JSONResponse({"error": e.reason}, status_code=e.status, headers=headers)
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
        # with a token, the classes and thresholds are not on the page: it asks /v1/health with the token
        classes = {} if service.token is not None else manifest["thresholds"]
        return HTMLResponse(html.replace("__CLASSES__", json.dumps(classes)))

    routes = [
        Route("/v1/score", endpoint("score", score), methods=["POST"]),
        Route("/v1/health", endpoint("health", health), methods=["GET"]),
        Route("/metrics", endpoint("metrics", metrics), methods=["GET"]),
        Route("/", endpoint("page", page, protected=False), methods=["GET"]),
    ]
    return Starlette(routes=routes)


def warm_up(loader, manifest, run, max_batch):
    """Compile the program for every batch size the queue uses (loader.buckets(max_batch): powers of two
    below it, and it), so no request waits for a compilation; the sizes and the seconds it took."""
    size = manifest["input"]["shape"][1]
    image = np.full((size, size, 3), 128, np.uint8)
    inputs = [(image, ((0, 0, size, size), (0.0, 0.0, float(size), float(size))), (size, size), None)]
    sizes, t0 = loader.buckets(max_batch), time.perf_counter()
    for n in sizes:
        loader.score_loaded(run, manifest, [(inputs, (size, size))] * n)
    return sizes, time.perf_counter() - t0


def bind(host, port):
    """The listening socket, bound before the warm-up: a port in use is reported at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port}: {e.strerror or e} (is another service using the port?)"
        ) from None
    sock.listen(128)
    return sock


def serve(loader, manifest, run, args, folder):
    """Run the service until interrupted (uvicorn, one process: the compiled program is loaded once):
    bind the port, compile the program for the batch sizes it will use, then listen."""
    sock = bind(args.host, args.http)
    app = build_app(loader, manifest, run, args, folder)
    sizes, seconds = warm_up(loader, manifest, run, args.max_batch)
    print(f"compiled for batches of {', '.join(map(str, sizes))} model inputs in {seconds:.1f} s", flush=True)
    print(f"serving {folder} on http://{args.host}:{args.http}/ (POST /v1/score, GET /v1/health, /metrics)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0

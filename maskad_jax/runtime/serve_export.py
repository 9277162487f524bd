"""Score images with an exported maskad-jax model, without maskad-jax (copied as <export>/serve.py).

    python <workdir>/export/serve.py IMAGE_OR_FOLDER [...]          # StableHLO through jax
    python <workdir>/export/serve.py --runtime onnx IMAGE_OR_FOLDER  # scorer.onnx through onnxruntime
    python -m maskad_jax.runtime.serve_export <workdir>/export IMAGE_OR_FOLDER [...]

Needs numpy and pillow, and jax with flatbuffers (scorer.stablehlo) or onnxruntime (scorer.onnx);
imports nothing of maskad_jax. --runtime auto takes jax when it can be imported, else onnxruntime. The
export folder is the one this file sits in unless --export names another. manifest.json is checked
against the digest of its canonical form in manifest.sha256 first (an edited manifest is refused:
integrity against edits and corruption, not a signature), then every file in the folder against its
SHA-256 in the manifest (a changed, truncated, missing or unlisted file is refused). Images reach
the scorer under the model's geometry (manifest "preprocess": crop, resize or pad). Prints one
tab-separated line per image: file, class, score, threshold, anomalous|normal, normalised score
(1.0 = the threshold; empty when undefined), the number of map regions over the map's threshold (a
tab, newline or backslash in a file name is written as \\t, \\n, \\\\); images that cannot be read
are skipped with a line on stderr and counted; exit status 2 when none could be scored. --out DIR
(new or empty) also saves each map at the image's original size as DIR/<name>.npy (NaN where a crop
did not look), the name made from the input's path below the inputs' common folder (a/b.png ->
a_b.png.npy), and DIR/scores.json with every image's row and its regions (box, area, peak).
"""

import argparse
import hashlib
import io
import json
import os
import sys
import zlib

import numpy as np
from PIL import Image, ImageOps

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MANIFEST_DIGEST = "manifest.sha256"  # the SHA-256 of manifest.json's canonical form (canonical_json)
REQUIRED = ("scorer.stablehlo", "serve.py")  # every export has these
MAX_ASPECT = 32  # as maskad_jax.data.preprocess.MAX_ASPECT: longer strips are refused before decoding


class ArtifactError(Exception):
    pass


def canonical_json(manifest) -> bytes:
    """The manifest's canonical form: sorted keys, no whitespace, UTF-8."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def write_manifest(folder, manifest):
    """manifest.json and, beside it, the digest of its canonical form."""
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    with open(os.path.join(folder, MANIFEST_DIGEST), "w") as f:
        f.write(hashlib.sha256(canonical_json(manifest)).hexdigest() + "\n")


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(folder):
    """manifest.json of an export folder, after checking it against its digest, that it lists every
    file of the folder (and the required ones), and every file against its SHA-256."""
    path, digest_path = os.path.join(folder, "manifest.json"), os.path.join(folder, MANIFEST_DIGEST)
    if not os.path.isfile(path):
        raise ArtifactError(f"{path}: not found; is {folder} an export folder (run.py --mode=export)?")
    if not os.path.isfile(digest_path):
        raise ArtifactError(f"{digest_path}: not found; the manifest cannot be checked: re-export")
    try:
        with open(path) as f:
            manifest = json.load(f)
        with open(digest_path) as f:
            expected = f.read().strip()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable ({e}); re-export") from None
    if hashlib.sha256(canonical_json(manifest)).hexdigest() != expected:
        raise ArtifactError(f"{path}: differs from its digest in {MANIFEST_DIGEST} (edited or corrupted); re-export")
    files = manifest.get("files") or {}
    present = {n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)) and not n.startswith(".")}
    unlisted = sorted(present - set(files) - {"manifest.json", MANIFEST_DIGEST})
    missing = [n for n in REQUIRED if n not in files]
    if unlisted or missing:
        what = f"files not listed in it: {unlisted}" if unlisted else f"it does not list {missing}"
        raise ArtifactError(f"{path}: {what}; re-export")
    for name, digest in files.items():
        file = os.path.join(folder, name)
        if os.path.basename(name) != name or not os.path.isfile(file):
            raise ArtifactError(f"{file}: listed in manifest.json but missing")
        if _sha256(file) != digest:
            raise ArtifactError(f"{file}: its SHA-256 differs from manifest.json (changed or truncated); re-export it")
    check_contract(manifest, path)
    return manifest


def check_contract(manifest, path="manifest.json"):
    """ArtifactError (one line) unless the manifest's classes, thresholds and input agree with each other."""
    classes, thr = manifest.get("classes"), manifest.get("thresholds")
    problem = None
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        problem = f"'classes' must be a non-empty list of names, got {classes!r:.80}"
    elif len(set(classes)) != len(classes):
        problem = "'classes' names a class twice"
    elif not isinstance(thr, dict) or sorted(thr) != sorted(classes):
        problem = f"'thresholds' must have one number per class {classes}, got {sorted(thr or {})}"
    elif not all(isinstance(v, (int, float)) and np.isfinite(v) for v in thr.values()):
        problem = "'thresholds' holds a value that is not a finite number"
    else:
        for key in ("map_thresholds", "normal_medians"):
            extra = sorted(set(manifest.get(key) or {}) - set(classes))
            if extra:
                problem = f"'{key}' names classes the model does not have: {extra}"
        shape = (manifest.get("input") or {}).get("shape")
        if not (isinstance(shape, list) and len(shape) == 4 and isinstance(shape[1], int) and shape[1] > 0):
            problem = f"'input.shape' must be ['batch', S, S, 3], got {shape!r}"
    if problem:
        raise ArtifactError(f"{path}: {problem}; re-export")


def to_rgb(img):
    """8-bit RGB of any Pillow mode (the one conversion of training, predict, the API and serve.py): grey
    copied to 3 channels, alpha dropped, palette and CMYK converted, 16/32-bit and float images
    rescaled to 0-255. ValueError for pixels that are not finite or a mode Pillow cannot convert."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{int((~np.isfinite(arr)).sum())} of {arr.size} pixels are not finite (NaN or infinite)")
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ValueError(f"unsupported image mode {img.mode!r} ({e})") from None


def check_aspect(w, h):
    """ValueError for an image whose aspect ratio exceeds MAX_ASPECT (checked from the header, before decoding)."""
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        raise ValueError(f"{w} x {h} pixels, an aspect ratio over the limit of {MAX_ASPECT}; cut long strips first")


def upright(img):
    """The image as it is meant to be seen: its EXIF orientation (a camera's rotation flag) applied."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # an unreadable EXIF block: the pixels as stored
        return img
    return ImageOps.exif_transpose(img) if orientation not in (None, 1) else img


def decode(source):
    """(RGB image, upright, of a path, bytes or file object; its number of frames, of which the first is
    used): the one decoding of training data, predict, the API and serve.py. The shape is checked from
    the header before the pixels are decoded; errors are ValueError or Pillow's OSError."""
    img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    check_aspect(*img.size)
    frames = int(getattr(img, "n_frames", 1) or 1)
    img.load()
    return to_rgb(upright(img)), frames


GEOMETRIES = ("crop", "resize", "pad")
PAD_FILL = (124, 116, 104)  # ImageNet's mean colour, 0-255: padding that looks like nothing in particular


def placement(w, h, size, geometry):
    """Where a w x h image sits in the size x size input (manifest "preprocess"): (box, region), box =
    (x0, y0, x1, y1) of the input holding image content, region = (u0, v0, u1, v1) of the image it
    shows. crop: shorter side to size, centre kept; resize: squashed; pad: longer side to size, centred."""
    if geometry == "resize":
        return (0, 0, size, size), (0.0, 0.0, float(w), float(h))
    if geometry == "pad":
        s = size / max(w, h)
        cw, ch = max(1, min(size, round(w * s))), max(1, min(size, round(h * s)))
        x0, y0 = (size - cw) // 2, (size - ch) // 2
        return (x0, y0, x0 + cw, y0 + ch), (0.0, 0.0, float(w), float(h))
    short, long = (w, h) if w <= h else (h, w)  # crop: torchvision's Resize(size) then CenterCrop(size)
    new_long = int(size * long / short)
    rw, rh = (size, new_long) if w <= h else (new_long, size)
    left, top = int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))
    sx, sy = w / rw, h / rh
    return (0, 0, size, size), (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def to_input(img, size, geometry, resample=Image.LANCZOS, fill=PAD_FILL):
    """The size x size input image (or mask: resample NEAREST, fill 0) of a PIL image under the geometry."""
    if geometry == "resize":
        return img.resize((size, size), resample) if img.size != (size, size) else img
    if geometry == "pad":
        x0, y0, x1, y1 = placement(img.size[0], img.size[1], size, geometry)[0]
        canvas = Image.new(img.mode, (size, size), fill if img.mode == "RGB" else 0)
        canvas.paste(img.resize((x1 - x0, y1 - y0), resample) if img.size != (x1 - x0, y1 - y0) else img, (x0, y0))
        return canvas
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        new_long = int(size * long / short)
        img = img.resize((size, new_long) if w <= h else (new_long, size), resample)
    rw, rh = img.size
    left, top = int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_original(amap, box, region, original, out_size=None, fill=np.nan):
    """An input-frame map on the original image's (width, height) grid (out_size: another grid of the
    same image), bilinear; what the input did not show (crop's sides) is `fill`."""
    w, h = out_size or original
    x0, y0, x1, y1 = box
    content = Image.fromarray(np.asarray(amap, np.float32)[y0:y1, x0:x1], "F")
    u0, v0, u1, v1 = region
    sx, sy = w / original[0], h / original[1]
    a, b = int(round(u0 * sx)), int(round(v0 * sy))
    c, d = max(a + 1, int(round(u1 * sx))), max(b + 1, int(round(v1 * sy)))
    out = np.full((h, w), fill, np.float32)
    out[b:d, a:c] = np.asarray(content.resize((c - a, d - b), Image.BILINEAR), np.float32)
    return out


def tile_boxes(w, h, rows, cols, overlap):
    """The rows x cols tiles of a w x h image, neighbours sharing `overlap` of a tile's size, row by
    row: [(x0, y0, x1, y1)] in pixels (x1, y1 exclusive; the last row and column end at the edge)."""

    def cuts(n, length):
        size = length / (n - (n - 1) * overlap)
        starts = [int(np.floor(k * size * (1 - overlap))) for k in range(n)]
        ends = [min(length, max(a + 1, int(np.ceil(k * size * (1 - overlap) + size)))) for k, a in enumerate(starts)]
        ends[-1] = length
        return list(zip(starts, ends))

    return [(x0, y0, x1, y1) for y0, y1 in cuts(rows, h) for x0, x1 in cuts(cols, w)]


def stitch_tiles(tile_maps, crops, size):
    """One (height, width) map of an image of size (width, height) from its tiles' maps, each on its
    tile's pixel grid (NaN where not inspected): the maximum where tiles overlap."""
    out = np.full((size[1], size[0]), np.nan, np.float32)
    for amap, (x0, y0, x1, y1) in zip(tile_maps, crops):
        out[y0:y1, x0:x1] = np.fmax(out[y0:y1, x0:x1], amap)
    return out


def preprocess(path, size, geometry="crop", tiles=None):
    """The model inputs of the image file at path (decode, then inputs_of)."""
    return inputs_of(decode(path)[0], size, geometry, tiles)


def inputs_of(img, size, geometry="crop", tiles=None):
    """An RGB image's model inputs under the manifest's "preprocess" (geometry, and "tiles": rows, cols,
    overlap): ([(uint8 (size, size, 3) RGB input, its placement (box, region) in its tile or image,
    that tile's or image's (width, height), the tile's rectangle or None)], the image's (width, height))."""
    w, h = img.size
    crops = [None] if not tiles else tile_boxes(w, h, tiles["rows"], tiles["cols"], tiles["overlap"])
    inputs = []
    for crop in crops:
        part = img if crop is None else img.crop(crop)
        pw, ph = part.size
        inputs.append(
            (np.asarray(to_input(part, size, geometry), np.uint8), placement(pw, ph, size, geometry), (pw, ph), crop)
        )
    return inputs, (w, h)


def image_key(image):
    """The int32 key that seeds an image's test masks (manifest 'input.key.rule'), of its model input as
    uint8 (S, S, 3) or as float32 in [0, 1] (the same key: the CRC32 of the float32 bytes of u8 / 255),
    so an image gets the same masks in eval, predict, the API and the export, alone or in any batch."""
    image = np.asarray(image)
    as01 = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else np.asarray(image, np.float32)
    return np.int32(zlib.crc32(np.ascontiguousarray(as01).tobytes()) & 0x7FFFFFFF)


def bucket(n, max_batch):
    """The batch size a run of n inputs is padded to: the next power of two, at most max_batch (larger
    runs go in chunks of max_batch): one compiled program per bucket, whatever the number of images."""
    return min(max_batch, 1 << max(0, int(n) - 1).bit_length())


def buckets(max_batch):
    """Every batch size bucket() gives: the powers of two below max_batch, and max_batch."""
    out = [1]
    while out[-1] < max_batch:
        out.append(min(max_batch, out[-1] * 2))
    return out


def padded_run(run, max_batch, on_call=None):
    """run over any number of inputs: chunks of at most max_batch, each padded with copies of its last
    input to bucket()'s size, so only buckets(max_batch) sizes are ever compiled. on_call(size): told
    each call's batch size."""

    def call(images, keys, *boxes):
        parts = []
        for a in range(0, len(images), max_batch):
            n = min(len(images), a + max_batch) - a
            size = bucket(n, max_batch)
            args = [
                np.concatenate([v[a : a + n], np.repeat(v[a + n - 1 : a + n], size - n, 0)])
                for v in (images, keys, *boxes)
            ]
            if on_call is not None:
                on_call(size)
            parts.append({k: np.asarray(v)[:n] for k, v in run(*args).items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    return call


def collect(paths):
    """The image files of the paths (folders recursively): (files, problems with the paths themselves)."""
    out, problems = [], []
    for p in paths:
        if os.path.isdir(p):
            if not os.access(p, os.R_OK | os.X_OK):
                problems.append(f"{p}: the folder cannot be read (permission denied)")
                continue
            found = []
            for d, _, files in os.walk(p, onerror=lambda e: problems.append(f"{e.filename}: {e.strerror}")):
                found += sorted(os.path.join(d, f) for f in files if f.lower().endswith(EXTENSIONS))
            if not found:
                problems.append(f"{p}: no images ({', '.join(EXTENSIONS)}) in it")
            out += found
        else:
            out.append(p)
    return out, problems


def regions_over(amap, threshold):
    """The 8-connected regions of the map at or above the threshold (NaN, where a geometry did not
    look, never is), highest peak first: [{"box": [x0, y0, x1, y1] (pixels, x1 and y1 exclusive),
    "area": pixels, "peak": the map's maximum in it}]. Rows are cut into runs joined by union-find."""
    amap = np.asarray(amap, np.float64)
    over = amap >= threshold
    parent, runs = [], []  # runs: (y, x0, x1) with x1 exclusive, in row order

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev = []
    for y in range(over.shape[0]):
        d = np.diff(np.concatenate(([0], over[y].astype(np.int8), [0])))
        cur = []
        for x0, x1 in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)):
            i = len(runs)
            runs.append((y, int(x0), int(x1)))
            parent.append(i)
            for j in prev:  # touching, diagonals included: [x0 - 1, x1] meets [px0, px1)
                if runs[j][1] <= x1 and runs[j][2] >= x0:
                    a, b = root(i), root(j)
                    parent[max(a, b)] = min(a, b)
            cur.append(i)
        prev = cur
    found = {}
    for i, (y, x0, x1) in enumerate(runs):
        r = found.setdefault(root(i), {"box": [x0, y, x1, y + 1], "area": 0, "peak": -np.inf})
        b = r["box"]
        b[0], b[1], b[2], b[3] = min(b[0], x0), min(b[1], y), max(b[2], x1), max(b[3], y + 1)
        r["area"] += x1 - x0
        r["peak"] = max(r["peak"], float(amap[y, x0:x1].max()))
    return sorted(found.values(), key=lambda r: -r["peak"])


def decided_regions(amap, map_threshold, anomalous):
    """(regions, level): the regions an image is reported with and the map level that outlines them,
    one rule with its decision (docs/metrics.md, "Decision and regions"). A normal image has none
    (level None); its map is still returned. An anomalous image has the areas of its map at or above
    the map's threshold; when its map stays under that threshold (the score's other term decided),
    the area around the map's peak at half its height above the map's median, each such region
    marked "by": "peak" (else "by": "threshold")."""
    if not anomalous:
        return [], None
    found = regions_over(amap, map_threshold)
    if found:
        return [dict(r, by="threshold") for r in found], float(map_threshold)
    seen = np.asarray(amap, np.float64)[np.isfinite(amap)]
    if seen.size == 0:
        return [], None
    peak, median = float(seen.max()), float(np.median(seen))
    level = median + 0.5 * (peak - median) if peak > median else peak
    return [dict(r, by="peak") for r in regions_over(amap, level)[:1]], float(level)


# A perceptually ordered blue -> cyan -> yellow -> red ramp (5 anchor colours, linear between).
_ANCHORS = np.array([[0, 0, 130], [0, 120, 255], [0, 230, 200], [255, 230, 0], [220, 0, 0]], np.float64)


def colormap(values01):
    """(H, W) in [0, 1] -> (H, W, 3) uint8."""
    v = np.clip(values01, 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    t = (v - lo)[..., None]
    return (_ANCHORS[lo] * (1 - t) + _ANCHORS[lo + 1] * t).astype(np.uint8)


def overlay(image01, amap, lo, hi, threshold=None, alpha=0.45):
    """image (H, W, 3) in [0, 1], map (H, W) scaled to [lo, hi] -> (H, W, 3) uint8, the region at or
    above the threshold outlined in white (its pixels with a 4-neighbour outside it); where the map
    is NaN (not inspected) the image is shown darkened, without heat."""
    seen = np.isfinite(amap)
    heat = colormap((np.where(seen, amap, lo) - lo) / max(hi - lo, 1e-12)).astype(np.float64)
    out = np.where(seen[..., None], (1 - alpha) * image01 * 255 + alpha * heat, 0.5 * image01 * 255)
    if threshold is not None:
        region = seen & (np.where(seen, amap, -np.inf) >= threshold)
        r = np.pad(region, 1)
        inner = r[1:-1, 1:-1] & r[:-2, 1:-1] & r[2:, 1:-1] & r[1:-1, :-2] & r[1:-1, 2:]
        out[region & ~inner] = 255
    return np.clip(out, 0, 255).astype(np.uint8)


def escape(text):
    """A file name fit for one tab-separated field: backslash, tab, newline and return escaped."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def flat_name(path, taken):
    """A file name made of the path's letters, digits, '-', '_' and '.', unique within `taken` (added)."""
    base = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in path.strip("/")) or "image"
    base = base.lstrip(".")[-120:] or "image"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}-{k}"
    taken.add(name)
    return name


def stablehlo_scorer(folder):
    """f(images uint8 (B, S, S, 3), keys int32 (B,)) -> dict of numpy arrays, from scorer.stablehlo."""
    import jax
    from jax import export

    with open(os.path.join(folder, "scorer.stablehlo"), "rb") as f:
        exported = export.deserialize(bytearray(f.read()))
    names = ("anomalous", "class_index", "map", "score", "threshold")  # the output dict's keys, sorted

    def run(images, keys, *boxes):
        out = exported.call(images, keys, *boxes)
        out = out if isinstance(out, dict) else dict(zip(names, jax.tree_util.tree_leaves(out)))
        return {k: np.asarray(v) for k, v in out.items()}

    return run


def onnx_scorer(folder, batch):
    """The same function from scorer.onnx through onnxruntime (fixed batch: a short batch is padded)."""
    import onnxruntime as ort

    session = ort.InferenceSession(os.path.join(folder, "scorer.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(images, keys, *boxes):
        n = len(images)
        pad = (-n) % batch
        feeds = {"images": images, "keys": keys, **({"boxes": boxes[0]} if boxes else {})}
        feeds = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) if pad else v for k, v in feeds.items()}
        parts = []
        for i in range(0, n + pad, batch):
            out = session.run(None, {k: v[i : i + batch] for k, v in feeds.items()})
            parts.append(dict(zip(names, out)))
        return {k: np.concatenate([p[k] for p in parts])[:n] for k in names}

    return run


def choose_runtime(folder, manifest, runtime):
    """The scorer for --runtime (auto: jax if it imports, else onnxruntime)."""
    has_onnx = bool((manifest.get("onnx") or {}).get("file"))
    if runtime == "auto":
        try:
            import jax  # noqa: F401

            runtime = "stablehlo"
        except ImportError:
            runtime = "onnx"
    if runtime == "onnx":
        if not has_onnx:
            raise ArtifactError(f"{folder} has no scorer.onnx ({(manifest.get('onnx') or {}).get('why')}); use jax")
        return onnx_scorer(folder, int(manifest["onnx"]["batch"]))
    return stablehlo_scorer(folder)


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def load_images(paths, size, geometry="crop", tiles=None):
    """(preprocess's (inputs, size) of the paths that can be read, those paths); the others reported
    on stderr."""
    images, ok = [], []
    for p in paths:
        try:
            images.append(preprocess(p, size, geometry, tiles))
            ok.append(p)
        except (OSError, ValueError, SyntaxError, ArtifactError, Image.DecompressionBombError) as e:
            print(f"skipped {escape(p)}: {e}", file=sys.stderr)
    return images, ok


def score_loaded(run, manifest, loaded):
    """Score preprocessed images (load_images/preprocess output; their tiles together): per image a
    (row, map at its original size). With tiles an image's score is its tiles' maximum, its map
    theirs stitched (the maximum where they overlap), its class the one most of its tiles chose."""
    flat = [t for inputs, _ in loaded for t in inputs]
    images = np.stack([t[0] for t in flat])
    extra = (np.asarray([t[1][0] for t in flat], np.int32),) if "boxes" in manifest["input"] else ()
    out = run(images, np.asarray([image_key(im) for im in images], np.int32), *extra)
    results, start = [], 0
    for inputs, size in loaded:
        sel = slice(start, start + len(inputs))
        start = sel.stop
        k = int(np.bincount(np.asarray(out["class_index"][sel], np.int64)).argmax())
        cls = manifest["classes"][k]
        score, thr = float(np.max(out["score"][sel])), float(manifest["thresholds"][cls])
        maps = [to_original(m, box, region, tsize) for m, (_, (box, region), tsize, _) in zip(out["map"][sel], inputs)]
        full = maps[0] if inputs[0][3] is None else stitch_tiles(maps, [t[3] for t in inputs], size)
        median = manifest.get("normal_medians", {}).get(cls)
        row = {
            "class": cls,
            "score": score,
            "normalised_score": (score - median) / (thr - median) if median is not None and thr > median else None,
            "threshold": thr,
            "anomalous": bool(score >= thr),
            "threshold_images": (manifest.get("threshold_images") or {}).get(cls),
        }
        map_thr = manifest.get("map_thresholds", {}).get(cls, thr)
        row["regions"], row["region_level"] = decided_regions(full, map_thr, row["anomalous"])
        results.append((row, full))
    return results


def score_chunk(run, manifest, loaded, chunk, out_dir, common, taken):
    """Score one batch: a line per image on stdout, its map at the original size in out_dir; rows."""
    rows = []
    for path, (row, full) in zip(chunk, score_loaded(run, manifest, loaded)):
        norm = row["normalised_score"]
        print(
            f"{escape(path)}\t{row['class']}\t{row['score']:.6g}\t{row['threshold']:.6g}\t"
            f"{'anomalous' if row['anomalous'] else 'normal'}\t{'' if norm is None else f'{norm:.4g}'}\t"
            f"{len(row['regions'])}"
        )
        row = {"file": path, **row}
        if out_dir:
            row["map"] = flat_name(os.path.relpath(os.path.abspath(path), common), taken) + ".npy"
            np.save(os.path.join(out_dir, row["map"]), full)
        rows.append(row)
    return rows


def http_arguments(ap):
    """serve.py's options for the HTTP service (serve_http.py)."""
    ap.add_argument("--http", type=int, default=None, metavar="PORT", help="serve HTTP on PORT instead (serve_http.py)")
    ap.add_argument("--host", default="127.0.0.1", help="the address to bind (default: this machine only)")
    ap.add_argument("--max-batch", type=positive, default=16, help="model inputs per call of the program")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    ap.add_argument("--max-bytes", type=positive, default=20_000_000, help="the largest image accepted, in bytes")
    ap.add_argument("--max-images", type=positive, default=32, help="the most images in one request")
    ap.add_argument("--max-pixels", type=positive, default=40_000_000, help="the largest image, width x height")
    ap.add_argument(
        "--max-request-pixels", type=positive, default=100_000_000, help="the most pixels in one request's images"
    )
    ap.add_argument(
        "--max-inflight-pixels", type=positive, default=200_000_000,
        help="the most pixels being worked on at once, all requests together (then 503 with Retry-After)",
    )  # fmt: skip
    ap.add_argument("--max-request-bytes", type=positive, default=100_000_000, help="the largest request body")
    ap.add_argument("--max-queue", type=positive, default=256, help="the most requests waiting to be scored")
    ap.add_argument("--display-size", type=positive, default=1024, help="?maps=1: the images' longest side, at most")
    ap.add_argument("--token-file", default=None, help="a file holding the bearer token requests must carry")


def serve_http_main(folder, args):
    """--http: the HTTP service over this export (serve_http.py beside this file); status 2 on a
    damaged artifact or a missing extra."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import serve_http

        manifest = load_manifest(folder)
        run = choose_runtime(folder, manifest, args.runtime)
        return serve_http.serve(sys.modules[__name__], manifest, run, args, folder)
    except (ArtifactError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="*", help="images or folders (the first may be the export folder with -m)")
    ap.add_argument("--export", default=None, help="the export folder (default: this file's folder)")
    ap.add_argument("--batch", type=positive, default=8)
    ap.add_argument("--runtime", choices=("auto", "stablehlo", "onnx"), default="auto")
    ap.add_argument("--out", default=None, help="a new or empty folder: each map saved as OUT/<name>.npy")
    http_arguments(ap)
    args = ap.parse_args(argv)
    folder = args.export
    if folder is None:
        first = args.inputs[0] if args.inputs else ""
        folder = args.inputs.pop(0) if os.path.isfile(os.path.join(first, "manifest.json")) else here
    if args.http is not None:
        return serve_http_main(folder, args)
    if not args.inputs:
        ap.error("give images or folders to score, or --http PORT")
    try:
        if args.out and os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
            raise ArtifactError(f"--out {args.out} exists and is not an empty folder: choose a new one")
        manifest = load_manifest(folder)
        files, problems = collect(args.inputs)
        if not files:
            raise ArtifactError("nothing to score: " + "; ".join(problems or ["no inputs"]))
        run = choose_runtime(folder, manifest, args.runtime)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"skipped {escape(problem)}", file=sys.stderr)
    size, taken, scored = manifest["input"]["shape"][1], set(), 0
    common = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])  # maps named relative to it
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    geometry = manifest.get("preprocess", {}).get("geometry", "crop")
    tiles = manifest.get("preprocess", {}).get("tiles")
    rows = []
    for start in range(0, len(files), args.batch):
        loaded, chunk = load_images(files[start : start + args.batch], size, geometry, tiles)
        if not loaded:
            continue
        rows += score_chunk(run, manifest, loaded, chunk, args.out, common, taken)
        scored += len(chunk)
    if args.out:
        with open(os.path.join(args.out, "scores.json"), "w") as f:
            json.dump(rows, f, indent=2)
    skipped = len(files) - scored
    print(f"scored {scored} of {len(files)} images; {skipped} skipped", file=sys.stderr)
    return 0 if scored else 2


if __name__ == "__main__":
    sys.exit(main())

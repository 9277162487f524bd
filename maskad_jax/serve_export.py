"""Score images with an exported maskad-jax model, without maskad-jax (copied as <export>/serve.py).

    python <workdir>/export/serve.py IMAGE_OR_FOLDER [...]          # StableHLO through jax
    python <workdir>/export/serve.py --runtime onnx IMAGE_OR_FOLDER  # scorer.onnx through onnxruntime
    python -m maskad_jax.serve_export <workdir>/export IMAGE_OR_FOLDER [...]

Needs numpy and pillow, and jax with flatbuffers (scorer.stablehlo) or onnxruntime (scorer.onnx);
imports nothing of maskad_jax. --runtime auto takes jax when it can be imported, else onnxruntime. The
export folder is the one this file sits in unless --export names another. Every file's SHA-256 is checked
against manifest.json first: a changed or truncated artifact is refused. Prints one line per image:
file, class, score, threshold, anomalous; --out DIR also saves each map as DIR/<n>.npy.
"""

import argparse
import hashlib
import json
import os
import sys
import zlib

import numpy as np
from PIL import Image

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ArtifactError(Exception):
    pass


def load_manifest(folder):
    """manifest.json of an export folder, after checking every file it lists against its digest."""
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        raise ArtifactError(f"{path}: not found; is {folder} an export folder (run.py --mode=export)?")
    with open(path) as f:
        manifest = json.load(f)
    for name, digest in manifest["files"].items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise ArtifactError(f"{file}: listed in manifest.json but missing")
        h = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != digest:
            raise ArtifactError(f"{file}: its SHA-256 differs from manifest.json (changed or truncated); re-export it")
    return manifest


def to_rgb(img):
    """8-bit RGB as maskad_jax.preprocess.to_rgb: grey -> 3 copies, alpha dropped, 16/32-bit rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess(path, size):
    """uint8 (size, size, 3): RGB, shorter side to size with Lanczos, centre crop (manifest 'preprocess')."""
    img = Image.open(path)
    img.load()
    img = to_rgb(img)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        new_long = int(size * long / short)
        img = img.resize((size, new_long) if w <= h else (new_long, size), Image.LANCZOS)
    w, h = img.size
    if w < size or h < size:
        raise ArtifactError(f"{path}: {w}x{h} is smaller than the {size}x{size} crop")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


def image_key(image_u8):
    """The int32 key that seeds the image's test masks (manifest 'input.key.rule')."""
    return np.int32(zlib.crc32(np.ascontiguousarray(image_u8.astype(np.float32) / 255.0).tobytes()) & 0x7FFFFFFF)


def collect(paths):
    out = []
    for p in paths:
        if os.path.isdir(p):
            for d, _, files in os.walk(p):
                out += sorted(os.path.join(d, f) for f in files if f.lower().endswith(EXTENSIONS))
        else:
            out.append(p)
    return out


def stablehlo_scorer(folder):
    """f(images uint8 (B, S, S, 3), keys int32 (B,)) -> dict of numpy arrays, from scorer.stablehlo."""
    import jax
    from jax import export

    with open(os.path.join(folder, "scorer.stablehlo"), "rb") as f:
        exported = export.deserialize(bytearray(f.read()))
    names = ("anomalous", "class_index", "map", "score", "threshold")  # the output dict's keys, sorted

    def run(images, keys):
        out = exported.call(images, keys)
        out = out if isinstance(out, dict) else dict(zip(names, jax.tree_util.tree_leaves(out)))
        return {k: np.asarray(v) for k, v in out.items()}

    return run


def onnx_scorer(folder, batch):
    """The same function from scorer.onnx through onnxruntime (fixed batch: a short batch is padded)."""
    import onnxruntime as ort

    session = ort.InferenceSession(os.path.join(folder, "scorer.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(images, keys):
        n = len(images)
        pad = (-n) % batch
        images = np.concatenate([images, np.repeat(images[-1:], pad, 0)]) if pad else images
        keys = np.concatenate([keys, np.repeat(keys[-1:], pad, 0)]) if pad else keys
        parts = []
        for i in range(0, len(images), batch):
            out = session.run(None, {"images": images[i : i + batch], "keys": keys[i : i + batch]})
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


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+", help="images or folders (the first may be the export folder with -m)")
    ap.add_argument("--export", default=None, help="the export folder (default: this file's folder)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runtime", choices=("auto", "stablehlo", "onnx"), default="auto")
    ap.add_argument("--out", default=None, help="save each map as OUT/<index>.npy")
    args = ap.parse_args(argv)
    folder = args.export
    if folder is None:
        folder = args.inputs.pop(0) if os.path.isfile(os.path.join(args.inputs[0], "manifest.json")) else here
    try:
        manifest = load_manifest(folder)
        run = choose_runtime(folder, manifest, args.runtime)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = manifest["input"]["shape"][1]
    files = collect(args.inputs)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    for start in range(0, len(files), args.batch):
        chunk = files[start : start + args.batch]
        images = np.stack([preprocess(p, size) for p in chunk])
        out = run(images, np.asarray([image_key(im) for im in images], np.int32))
        for i, path in enumerate(chunk):
            cls = manifest["classes"][int(out["class_index"][i])]
            print(
                f"{path}\t{cls}\t{float(out['score'][i]):.6g}\t{float(out['threshold'][i]):.6g}\t"
                f"{'anomalous' if out['anomalous'][i] else 'normal'}"
            )
            if args.out:
                np.save(os.path.join(args.out, f"{start + i}.npy"), out["map"][i])
    return 0


if __name__ == "__main__":
    sys.exit(main())

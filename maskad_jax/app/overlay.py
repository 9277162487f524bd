"""Heatmap images and file names: a colour map of an anomaly map, blended over the image, with the outline of the
region at or above a threshold (drawn by serve_export.overlay, which the exported loader shares)."""

from __future__ import annotations

import zlib

from maskad_jax.runtime import serve_export

colormap = serve_export.colormap  # the export's loader holds the arithmetic, so both draw alike
overlay = serve_export.overlay


def safe_name(relative_path: str, suffix: str) -> str:
    """A flat file name from a relative path: letters, digits, '-', '_' only, so it cannot leave its folder."""
    stem = relative_path.rsplit(".", 1)[0] if "." in relative_path.rsplit("/", 1)[-1] else relative_path
    flat = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_") else "_" for ch in stem).strip("_") or "image"
    return flat[:180] + suffix


def unique_names(relative_paths, suffix: str) -> list[str]:
    """safe_name of each path, made unique: paths that flatten to one name (`a b.png` and `a_b.png`)
    get a short hash of their original path appended, so each keeps its own file whatever the order;
    a path listed again gets a counter."""
    flat = [safe_name(p, "") for p in relative_paths]
    owners: dict[str, set] = {}
    for p, f in zip(relative_paths, flat):
        owners.setdefault(f, set()).add(p)
    out, used = [], {}
    for p, f in zip(relative_paths, flat):
        name = f if len(owners[f]) == 1 else f"{f[:170]}_{zlib.crc32(p.encode()) & 0xFFFFFFFF:08x}"
        used[name] = used.get(name, 0) + 1
        out.append((name if used[name] == 1 else f"{name}_{used[name]}") + suffix)
    return out

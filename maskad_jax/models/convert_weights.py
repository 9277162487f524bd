"""Convert EfficientNet weights (lukemelas .pth or timm .safetensors) into an orbax checkpoint.

    python -m maskad_jax.models.convert_weights efficientnet-b4-6ed6700e.pth weights/efficientnet-b4 \
        --arch efficientnet-b4

The file is read without torch (restricted unpickler). The report lists missing and unexpected
keys; shape mismatches and files of another architecture are refused with a message naming them.
The destination is never overwritten unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from maskad_jax.common.digests import sha256_file
from maskad_jax.models import efficientnet_arch as ea


def _guess_arch_from_name(path: str) -> str | None:
    m = re.search(r"efficientnet[-_](b[0-7]|lite[0-4])", os.path.basename(path))
    return f"efficientnet-{m.group(1)}" if m else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m maskad_jax.models.convert_weights",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="a lukemelas .pth (zip or legacy format) or a timm .safetensors file")
    p.add_argument("dst", help="output directory (orbax checkpoint)")
    p.add_argument("--arch", choices=ea.ARCH_NAMES, help="architecture; by default guessed from the file name")
    p.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    args = p.parse_args(argv)

    from maskad_jax.models import weights as W  # noqa: PLC0415  (imports jax and flax: --help and arg errors stay instant)

    arch = args.arch or _guess_arch_from_name(args.src)
    if arch is None:
        p.error(f"cannot tell the architecture from {os.path.basename(args.src)!r}; pass --arch")
    if os.path.exists(args.dst) and not args.overwrite:
        print(f"error: {args.dst} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        state = W.read_state_dict(args.src)
        variables, report = W.convert_state_dict(state, arch, source=args.src)
    except (W.WeightsError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(int(v.size) for v in __import__("jax").tree_util.tree_leaves(variables))
    meta = {
        "arch": arch,
        "source": os.path.basename(args.src),
        "sha256": sha256_file(args.src),
        "naming": W.detect_naming(state),
        "num_values": n,
    }
    W.save_orbax(variables, args.dst, meta, overwrite=args.overwrite)
    print(
        f"converted {args.src} -> {args.dst}: {arch}, {n:,} values; "
        f"missing keys: {report['missing'] or 'none'}; unexpected keys: {report['unexpected'] or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

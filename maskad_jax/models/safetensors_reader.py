"""Read `.safetensors` files (timm's weight format) into numpy, with bounds checks and no torch.

Layout: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
{dtype, shape, data_offsets: [begin, end]} (offsets relative to the end of the header), then the data.

Every header is validated before any tensor is read: a JSON object; per tensor a known dtype, a
shape of non-negative integers and two integer offsets with 0 <= begin <= end <= the data size;
end - begin equal to the shape's byte count, computed with Python integers (no int64 overflow);
no two tensors' byte ranges overlapping. Every error names the file and the tensor.
"""

from __future__ import annotations

import collections
import json
import os
import struct

import numpy as np

from maskad_jax.common.errors import MissingInputError
from maskad_jax.models.torch_pickle import CheckpointFormatError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "BF16": np.uint16,
}
_MAX_HEADER = 100 * 2**20  # the format's own limit (100 MB)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entries(path: str, header, data_size: int) -> list:
    """[(name, dtype, shape, begin, end)] sorted by begin, after validating every field."""
    if not isinstance(header, dict):
        raise CheckpointFormatError(
            f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object of tensors"
        )
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointFormatError(f"{where}: its header entry is not an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise CheckpointFormatError(f"{where}: its header entry lacks {', '.join(missing)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise CheckpointFormatError(f"{where}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise CheckpointFormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise CheckpointFormatError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise CheckpointFormatError(
                f"{where}: data_offsets [{begin}, {end}] outside the data section of {data_size} bytes (truncated?)"
            )
        count = 1
        for s in shape:  # Python integers: no overflow whatever the shape
            count *= s
        nbytes = count * np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != nbytes:
            raise CheckpointFormatError(
                f"{where}: {dtype}{shape} needs {nbytes} bytes but data_offsets [{begin}, {end}] hold {end - begin}"
            )
        out.append((name, dtype, tuple(shape), begin, end))
    out.sort(key=lambda e: (e[3], e[4]))
    for prev, cur in zip(out, out[1:]):
        if cur[3] < prev[4]:
            raise CheckpointFormatError(
                f"{path}: tensors {prev[0]!r} [{prev[3]}, {prev[4]}] and {cur[0]!r} [{cur[3]}, {cur[4]}] overlap"
            )
    return out


def load_safetensors(path: str | os.PathLike) -> "collections.OrderedDict[str, np.ndarray]":
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInputError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise CheckpointFormatError(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _MAX_HEADER):
        raise CheckpointFormatError(f"{path}: header of {n} bytes runs past the end of the file (truncated?)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{path}: unreadable safetensors header ({e})") from e
    body = memoryview(data)[8 + n :]
    out = collections.OrderedDict()
    for name, dtype, shape, begin, end in _entries(path, header, len(body)):
        arr = np.frombuffer(body[begin:end], dtype=_DTYPES[dtype]).reshape(shape).copy()
        if dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr
    return out

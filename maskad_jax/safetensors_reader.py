"""Read `.safetensors` files (timm's weight format) into numpy, with bounds checks and no torch.

Layout: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
{dtype, shape, data_offsets: [begin, end]} (offsets relative to the end of the header), then the data.
"""
from __future__ import annotations

import collections
import json
import os
import struct

import numpy as np

from maskad_jax.torch_pickle import CheckpointFormatError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def load_safetensors(path: str | os.PathLike) -> "collections.OrderedDict[str, np.ndarray]":
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise CheckpointFormatError(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointFormatError(f"{path}: header of {n} bytes runs past the end of the file (truncated?)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{path}: unreadable safetensors header ({e})") from e
    body = memoryview(data)[8 + n:]
    out = collections.OrderedDict()
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else -1):
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype == "BF16":
            np_dtype = np.uint16
        elif dtype in _DTYPES:
            np_dtype = _DTYPES[dtype]
        else:
            raise CheckpointFormatError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        count = int(np.prod(shape, dtype=np.int64))
        if end > len(body) or end - begin != count * np.dtype(np_dtype).itemsize or begin < 0:
            raise CheckpointFormatError(f"{path}: tensor {name} ({dtype}{list(shape)}) has bad offsets [{begin}, {end}] "
                                        f"for a data section of {len(body)} bytes (truncated?)")
        arr = np.frombuffer(body[begin:end], dtype=np_dtype).reshape(shape).copy()
        if dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr
    return out

"""Read PyTorch `.pth` state dicts into numpy without importing torch.

Both of torch.save's formats are supported:
- the zip format (torch >= 1.6 default): `<root>/data.pkl` plus one raw file per storage;
- the legacy format: magic number, protocol version, system info, the pickled object, the list of
  storage keys, then each storage's bytes (an int64 element count followed by the raw data).

Safety: the unpickler is restricted. It resolves only the handful of globals a tensor state dict
needs (OrderedDict, torch's tensor-rebuild helpers and storage type names), each mapped to our
own numpy-only replacement; any other global (os.system, builtins.eval, ...) raises
`UnsafePickleError` before anything is called. torch itself is never imported.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

from maskad_jax.common.errors import MissingInputError, UserError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_BFLOAT16 = "BFloat16Storage"


class UnsafePickleError(UserError, ValueError):
    """The file's pickle asks for a global that a tensor state dict never needs."""


class CheckpointFormatError(UserError, ValueError):
    """The file is not a readable torch checkpoint (truncated, corrupt, or another format)."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Storage:
    """A flat numpy buffer standing in for a torch storage. The buffer is allocated only once the
    file is known to hold its bytes (`allocate`), so a forged element count cannot exhaust memory."""

    def __init__(self, type_name: str, numel):
        if not (isinstance(numel, int) and not isinstance(numel, bool) and numel >= 0):
            raise CheckpointFormatError(f"storage element count {numel!r} is not a non-negative integer")
        self.bfloat16 = type_name == _BFLOAT16
        self.dtype = np.dtype(np.uint16 if self.bfloat16 else _STORAGE_DTYPES[type_name])  # bf16: converted in _finish
        self.numel = numel
        self.array = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def allocate(self, raw: bytes) -> None:
        """Take the storage's bytes (exactly nbytes of them; the caller checks the count)."""
        self.array = np.frombuffer(raw, dtype=self.dtype, count=self.numel).copy()


def _check_ints(name, values):
    if not isinstance(values, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointFormatError(f"tensor {name} {values!r} is not a sequence of integers")


class _TensorView:
    """A strided view of a storage, materialised once every storage holds its bytes."""

    def __init__(self, storage: _Storage, offset, size, stride):
        _check_ints("size", size)
        _check_ints("stride", stride)
        _check_ints("offset", (offset,))
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialise(self) -> np.ndarray:
        """The tensor's elements, after proving every index it reaches lies inside its storage:
        non-negative offset, sizes and strides (no view may reach before its buffer), the largest
        reachable index below the storage's element count, and no more elements than the storage
        holds (a view is never larger than the bytes present in the file)."""
        size, stride, offset, numel = self.size, self.stride, self.offset, self.storage.numel
        if len(size) != len(stride):
            raise CheckpointFormatError(f"a tensor has {len(size)} sizes but {len(stride)} strides")
        if offset < 0 or any(v < 0 for v in size) or any(v < 0 for v in stride):
            raise CheckpointFormatError(
                f"a tensor has a negative offset, size or stride (offset {offset}, size {size}, stride {stride})"
            )
        count = 1
        for v in size:
            count *= v
        if count == 0:
            return np.zeros(size, np.float32 if self.storage.bfloat16 else self.storage.dtype)
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= numel or count > numel:
            raise CheckpointFormatError(
                f"a tensor of shape {size} (stride {stride}, offset {offset}) reads outside "
                f"its storage of {numel} elements"
            )
        base = self.storage.array
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[offset:], shape=size, strides=tuple(st * item for st in stride), writeable=False
        )
        out = np.array(view, copy=True)
        if self.storage.bfloat16:
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError("tensor rebuild without a storage")
    return _TensorView(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and (name in _STORAGE_DTYPES or name == _BFLOAT16):
            return _StorageType(name)
        raise UnsafePickleError(
            f"refusing to load global {module}.{name}: a weights file holds only tensors, so this file is "
            f"either not a plain state dict or not safe to unpickle"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise CheckpointFormatError(f"unexpected persistent id {pid!r}")
        return self._load_storage(pid[1:])


def _finish(obj):
    """Replace every _TensorView in a nest of dicts/lists/tuples by a numpy array."""
    if isinstance(obj, _TensorView):
        if obj.storage.array is None:
            raise CheckpointFormatError("a tensor's storage has no data in the file")
        return obj.materialise()
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _finish(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_finish(v) for v in obj)
    return obj


def _storage_type_name(storage_type) -> str:
    if not isinstance(storage_type, _StorageType):
        raise CheckpointFormatError(f"unexpected storage type {storage_type!r}")
    return storage_type.name


def _load_zip(path: str):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointFormatError(f"{path}: zip file without exactly one data.pkl (found {pkl})")
        root = pkl[0][: -len("data.pkl")]
        storages = {}

        def load_storage(pid):
            type_name, key, numel = _storage_type_name(pid[0]), str(pid[1]), pid[3]
            if key not in storages:
                st = _Storage(type_name, numel)
                entry = f"{root}data/{key}"
                try:
                    size = zf.getinfo(entry).file_size
                except KeyError:
                    raise CheckpointFormatError(f"{path}: storage {entry} is missing") from None
                if size < st.nbytes:  # checked before anything is allocated
                    raise CheckpointFormatError(f"{path}: storage {entry} holds {size} bytes, expected {st.nbytes}")
                with zf.open(entry) as raw:
                    st.allocate(raw.read(st.nbytes))
                storages[key] = st
            return storages[key]

        with zf.open(pkl[0]) as f:
            obj = _RestrictedUnpickler(io.BytesIO(f.read()), load_storage).load()
    return _finish(obj)


def _load_legacy(path: str):
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:

        def safe_load():
            return _RestrictedUnpickler(f, _no_storage).load()

        magic = safe_load()
        if magic != LEGACY_MAGIC:
            raise CheckpointFormatError(f"{path}: not a torch checkpoint (bad magic number)")
        protocol = safe_load()
        if protocol != LEGACY_PROTOCOL:
            raise CheckpointFormatError(f"{path}: unsupported legacy protocol version {protocol}")
        safe_load()  # sys info: endianness and type sizes
        storages = {}

        def load_storage(pid):
            type_name, key, numel = _storage_type_name(pid[0]), str(pid[1]), pid[3]
            if key not in storages:
                storages[key] = _Storage(type_name, numel)
            return storages[key]

        obj = _RestrictedUnpickler(f, load_storage).load()
        keys = safe_load()
        for key in keys:
            st = storages.get(str(key))
            if st is None or st.array is not None:
                raise CheckpointFormatError(f"{path}: storage {key} listed but never referenced")
            header = f.read(8)
            if len(header) != 8:
                raise CheckpointFormatError(f"{path}: truncated before the data of storage {key}")
            (numel,) = struct.unpack("<q", header)
            if numel != st.numel:
                raise CheckpointFormatError(f"{path}: storage {key} has {numel} elements, expected {st.numel}")
            if st.nbytes > file_size - f.tell():  # checked before anything is allocated
                raise CheckpointFormatError(
                    f"{path}: truncated inside the data of storage {key} (it needs "
                    f"{st.nbytes} bytes, {file_size - f.tell()} remain)"
                )
            st.allocate(f.read(st.nbytes))
    return _finish(obj)


def _no_storage(pid):
    raise CheckpointFormatError("storage reference outside the main pickle")


def load_pth(path: str | os.PathLike):
    """Load a torch checkpoint (zip or legacy) as nested dicts of numpy arrays. Never imports torch."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInputError(f"weights file not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise CheckpointFormatError(
                    f"{path}: a zip-format torch checkpoint without its central directory "
                    f"(truncated or partly downloaded?)"
                )
        return _load_legacy(path)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except CheckpointFormatError as e:
        if path in str(e):
            raise
        raise CheckpointFormatError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, ValueError, KeyError, TypeError) as e:
        raise CheckpointFormatError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e

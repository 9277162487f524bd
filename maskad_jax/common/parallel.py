"""Placement and several processes: meshes, shardings, and the host-side helpers of multi-host runs.

One code path for one CPU, one accelerator, many devices and many hosts (big_vision keeps its
sharding helpers apart from training in the same way):
- training: `training_mesh()` over every device of every process, the batch split along 'data'
  (on a CPU one device per process: `train.devices`);
- feature extraction and scoring: this process's devices only (`local_batch_sharding`,
  `scoring_sharding`, `place_for_scoring`); with several processes each works on its own
  contiguous share of the images (`process_share`) and the rows are gathered on the host
  (`gather_rows`), so every process ends with the same arrays;
- files: process 0 alone writes the workdir's shared files (`is_writer`), the others wait at a
  `barrier` before reading them.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maskad_jax.common.errors import ConfigError
from maskad_jax.common.specs import DEVICES


def data_mesh() -> Mesh:
    """A 1-D 'data' mesh over every device of every process (training)."""
    return Mesh(np.asarray(jax.devices()), ("data",))  # Auto axis: XLA propagates shardings


def on_one_device(choice: str, field: str) -> bool:
    """train.devices / scoring.devices (field): one, or auto on a CPU. Training: the forced host devices
    (run.py) are threads of one process, and XLA's in-process all-reduce between them has aborted long
    runs (a rendezvous timeout when many steps are in flight: benchmarks/RESULTS.md). Scoring: one
    device using every core is faster there. all: every device."""
    if choice not in DEVICES:
        raise ConfigError(f"{field} must be {' | '.join(DEVICES)}, got {choice!r}")
    return choice == "one" or (choice == "auto" and jax.default_backend() == "cpu")


def training_mesh(choice: str = "all") -> Mesh:
    """The training mesh: data_mesh(), or one device of each process (train.devices = one, or auto on
    a CPU): then a single process trains without any collective, and several all-reduce across
    processes only."""
    if not on_one_device(choice, "train.devices"):
        return data_mesh()
    firsts = {}
    for d in jax.devices():
        if d.process_index not in firsts or d.id < firsts[d.process_index].id:
            firsts[d.process_index] = d
    return Mesh(np.asarray([firsts[p] for p in sorted(firsts)]), ("data",))


def local_mesh() -> Mesh:
    """A 1-D 'data' mesh over this process's devices (all devices when there is one process)."""
    return Mesh(np.asarray(jax.local_devices()), ("data",))


def local_batch_sharding(batch_size: int):
    """An eval batch split over this process's devices (data.eval_batch_size must divide evenly)."""
    mesh = local_mesh()
    if batch_size % mesh.devices.size:
        raise ConfigError(
            f"data.eval_batch_size = {batch_size} must be a multiple of the {mesh.devices.size} local devices"
        )
    return NamedSharding(mesh, P("data"))


def scoring_sharding(devices: str, batch_size: int):
    """Where a scoring batch goes: this process's devices, or the first of them (scoring.devices).

    Scoring never spans processes: with several (jax.distributed), each scores its own share of the
    images on its own devices (evaluate.py) and the results are gathered on the host."""
    if on_one_device(devices, "scoring.devices"):
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return local_batch_sharding(batch_size)


def to_local(tree):
    """A pytree with every array that spans processes (e.g. trained, replicated parameters) replaced by
    this process's copy, so it can meet host-local arrays in one jitted call. Identity with one process."""

    def local(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return a.addressable_data(0)
        return a

    return jax.tree_util.tree_map(local, tree)


def place_for_scoring(devices: str, tree):
    """A pytree (parameters, pools) replicated on the devices that scoring.devices selects."""
    tree = to_local(tree)
    if on_one_device(devices, "scoring.devices"):
        return jax.device_put(tree, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return jax.device_put(tree, NamedSharding(local_mesh(), P()))


def process_share(n: int) -> np.ndarray:
    """This process's contiguous share of the positions 0..n-1 (all of them with one process; a share
    may be empty when n is smaller than the number of processes)."""
    return np.array_split(np.arange(n), jax.process_count())[jax.process_index()]


def gather_rows(n: int, positions: np.ndarray, *arrays):
    """Every process's rows at `positions` of per-row arrays -> full (n, ...) arrays on every process.

    With one process the arrays are placed at their positions (no copy when they are in order).
    None stays None."""
    positions = np.asarray(positions, np.int64)
    if jax.process_count() == 1:
        if np.array_equal(positions, np.arange(n)):
            return arrays
        return tuple(None if a is None else _place(n, positions, a) for a in arrays)
    from jax.experimental import multihost_utils  # noqa: PLC0415  (only multi-process runs need it)

    rows = -(-n // jax.process_count())  # the largest share np.array_split makes
    pad = lambda a, v: np.concatenate([a, np.full((rows - len(a),) + a.shape[1:], v, a.dtype)])  # noqa: E731
    present = [a for a in arrays if a is not None]
    got = multihost_utils.process_allgather(
        (pad(positions, -1),) + tuple(pad(np.asarray(a), 0) for a in present), tiled=False
    )
    pos = np.asarray(got[0]).reshape(-1)
    keep = pos >= 0
    full = iter([_place(n, pos[keep], np.asarray(g).reshape((-1,) + g.shape[2:])[keep]) for g in got[1:]])
    return tuple(None if a is None else next(full) for a in arrays)


def _place(n, positions, a):
    out = np.zeros((n,) + a.shape[1:], a.dtype)
    out[positions] = a
    return out


def gather_max(values: np.ndarray) -> np.ndarray:
    """The elementwise max of a per-process array over all processes (identity with one)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(values, tiled=False)).max(axis=0)


def is_writer() -> bool:
    """Whether this process writes the workdir's shared files (process 0; the workdir must be
    storage that every process sees, as orbax's checkpoints already require)."""
    return jax.process_index() == 0


def barrier(name: str):
    """Wait for every process (files written by process 0 are then visible to all). No-op alone."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)

"""One host loop for every batched call of a jitted function: pad, place, run, gather, unpad.

    out = run_batched(fn, row_batches((h, keys), 16), place=jnp.asarray)

A batch source yields (inputs, valid, host): the inputs of one call (a tuple of arrays with a leading
batch axis; None passes through as None), a bool mask (B,) of the rows that are real (padding rows
are dropped from the results), and host arrays of the batch to keep beside the results (e.g. the
ground-truth masks of data/splits.eval_batches). row_batches cuts arrays already in memory;
split_batches adapts data/splits.eval_batches. The results of every call (a dict or tuple of arrays
with a leading batch axis) come back to the host, their valid rows kept in order; with `total` the
outputs are written into arrays of that many rows allocated once (memory for one copy of the maps).
Gathering the shares of several processes stays with the caller (common/parallel.gather_rows).
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np


def row_batches(arrays: tuple, size: int, rows=None, pad: bool = False):
    """(inputs, valid, {}) for every `size` rows of `arrays` (None entries stay None), at `rows` (the
    positions to take, in order; default all). pad: the last batch is filled to `size` by repeating
    its last row (one compiled shape), the repeats marked invalid."""
    n = next(len(a) for a in arrays if a is not None) if rows is None else len(rows)
    for s in range(0, n, size):
        take = np.arange(s, min(s + size, n)) if rows is None else np.asarray(rows[s : s + size])
        valid = np.ones(len(take), bool)
        if pad and len(take) < size:
            valid = np.concatenate([valid, np.zeros(size - len(take), bool)])
            take = np.concatenate([take, np.full(size - len(take), take[-1])])
        yield tuple(None if a is None else a[take] for a in arrays), valid, {}


def split_batches(batches: Iterable[dict], inputs_of: Callable, host_keys=()):
    """A batch source over data/splits.eval_batches (or any dicts with a "valid" field): inputs_of(batch)
    -> the inputs of one call; host_keys: fields of the batch to keep beside the results."""
    for batch in batches:
        yield inputs_of(batch), batch["valid"] == 1, {k: batch[k] for k in host_keys}


def iter_batched(fn, source, *, place=jnp.asarray, unpad: bool = True):
    """fn(*placed inputs) over every batch of `source`, streamed: yields (results, host, valid) per batch,
    the results on the host (numpy) with the padding rows dropped (unpad=False: as fn returned them,
    e.g. a batch's sum), the host arrays likewise (other host values as they were given). fn None:
    no call (the host arrays alone)."""
    for inputs, valid, host in source:
        out = {} if fn is None else fn(*(None if a is None else place(a) for a in inputs))
        pick = (lambda a: np.asarray(a)[valid]) if unpad else np.asarray
        got = jax.tree_util.tree_map(pick, out)
        kept = {k: (np.asarray(v)[valid] if isinstance(v, np.ndarray) else v) for k, v in host.items()}
        yield got, kept, valid


def run_batched(fn, source, *, place=jnp.asarray, total: int | None = None, bar=None, per_batch: bool = False):
    """iter_batched, collected: (results, host arrays), each a dict (or tuple) of numpy arrays of the
    valid rows in order; (None, {}) for an empty source. place(array) puts an input where fn runs
    (jnp.asarray, or jax.device_put with a sharding). total: the rows to expect, written into arrays
    allocated once. bar: a progress.bar, advanced by each batch's valid rows. per_batch: fn returns one
    value per batch (a sum, a count): the list of them, in order, instead of rows."""
    results, host, row = None, None, 0
    for got, kept, valid in iter_batched(fn, source, place=place, unpad=not per_batch):
        if total is None:
            results = [got] if results is None else results + [got]
            host = [kept] if host is None else host + [kept]
        else:
            if results is None:
                results, host = _allocate(got, total), _allocate(kept, total)
            _write(results, got, row)
            _write(host, kept, row)
        row += int(valid.sum())
        if bar is not None:
            bar.update(int(valid.sum()))
    if per_batch or results is None or total is not None:
        return results, (host or {})
    results = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *results)
    return results, {k: np.concatenate([h[k] for h in host]) for k in host[0]}


def _allocate(tree, total: int):
    return jax.tree_util.tree_map(lambda a: np.zeros((total,) + a.shape[1:], a.dtype), tree)


def _write(into, tree, row: int):
    def put(dst, src):
        dst[row : row + len(src)] = src

    jax.tree_util.tree_map(put, into, tree)

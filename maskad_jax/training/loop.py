"""The data-parallel training loop shared by the reconstructor and the flow: batches, the mesh, the
divergence guard, logs and checkpoints around step.train_step."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maskad_jax.common.errors import ConfigError
from maskad_jax.common.parallel import training_mesh
from maskad_jax.common.progress import TrainingRecord
from maskad_jax.training.checkpoints import (
    TrainingDivergedError,
    checkpoint_dir,
    checkpoint_manager,
    restore_checkpoint,
    save_checkpoint,
)
from maskad_jax.training.step import train_step


@dataclasses.dataclass
class TrainResult:
    params: Any
    losses: list  # (step, loss) of every step run in this call
    steps: int


def _batch_indices(n: int, batch: int, seed: int, step: int) -> np.ndarray:
    spe = n // batch
    epoch, j = divmod(step, spe)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[j * batch : (j + 1) * batch]


class _LossGuard:
    """Holds the steps' losses (device scalars, read in bulk) and stops a run whose loss is not finite."""

    def __init__(self, name: str, section: str, ckpt, workdir):
        self.name, self.section, self.ckpt, self.workdir = name, section, ckpt, workdir
        self.losses, self.checked = [], 0

    def add(self, step: int, loss):
        self.losses.append((step, loss))

    def check(self) -> float:
        """Raise TrainingDivergedError if a loss since the last check is not finite; the newest loss."""
        new = self.losses[self.checked :]
        values = np.asarray(jax.device_get([loss for _, loss in new]), np.float64)
        self.checked = len(self.losses)
        bad = np.nonzero(~np.isfinite(values))[0]
        if len(bad):
            step = new[bad[0]][0] + 1
            kept = self.ckpt.latest_step() if self.ckpt is not None else None
            where = (
                f"the last good checkpoint (step {kept}) is kept in {self.workdir}"
                if kept is not None
                else "no checkpoint was written"
            )
            raise TrainingDivergedError(
                f"{self.name} diverged: the loss became {values[bad[0]]} at step {step}; {where}. Lower "
                f"{self.section}.lr (or check the features for NaNs) and rerun; a run on the same workdir resumes "
                f"from that checkpoint"
            )
        return float(values[-1]) if len(values) else float("nan")

    def values(self) -> list:
        self.check()
        return [(s, float(v)) for (s, _), v in zip(self.losses, jax.device_get([x for _, x in self.losses]))]


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a training loop trains: init_params(key) -> params; loss_fn(params, batch_arrays, indices,
    step) -> scalar; make_tx(total_steps, steps_per_epoch) -> (optax transform, schedule); and the
    fingerprint a checkpoint must agree with to be resumed (checkpoints.py)."""

    init_params: Callable
    loss_fn: Callable
    make_tx: Callable
    fingerprint: dict


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """How a training loop runs. name: "train" (checkpoints in <workdir>/checkpoints) or another
    (<workdir>/<name>_checkpoints, its config section in messages); log: the console; max_steps:
    stop early (tests simulate an interruption; the schedule still spans every epoch); periodic(params)
    -> ({name: value}, summary line) every `periodic_every` epochs and after the last step
    (learning_curves.py); devices: the mesh (parallel.training_mesh: all | one | auto = one on a CPU)."""

    name: str = "train"
    log: Callable = print
    max_steps: int | None = None
    periodic: Callable | None = None
    periodic_every: int = 0
    devices: str = "auto"


def training_loop(tc, seed: int, arrays: tuple, objective: Objective, workdir: str | None, opts: LoopOptions):
    """The data-parallel loop shared by the reconstructor and the flow.

    tc: a config section with batch_size, epochs, log_every, checkpoint_every, max_to_keep and
    device_cache_gb. arrays: per-example arrays (N, ...) or None, gathered by batch indices for
    objective.loss_fn. Checkpoints go to <workdir>/checkpoints (name "train") or
    <workdir>/<name>_checkpoints; the record (progress.TrainingRecord) to the console,
    <workdir>/<name>_log.jsonl and TensorBoard. A loss that is not finite stops the run with
    TrainingDivergedError before any later checkpoint.
    """
    name, log, periodic, periodic_every = opts.name, opts.log, opts.periodic, opts.periodic_every
    section, mesh = "train" if name == "train" else name, training_mesh(opts.devices)
    batch, spe, total = _steps(tc, len(arrays[0]), section, mesh)
    tx, sched = objective.make_tx(total, spe)
    ckpt = checkpoint_manager(workdir, tc, checkpoint_dir(name)) if workdir else None
    state = _initial_state(objective, tx, seed, mesh, ckpt, log)
    start = int(state["step"])
    if start:
        log(f"resumed {'' if name == 'train' else name + ' '}from step {start} in {workdir}")
    run_step = _step_runner(objective.loss_fn, tx, arrays, tc, mesh, seed)
    end = total if opts.max_steps is None else min(total, opts.max_steps)
    record = TrainingRecord(name, workdir, start, total, batch, log)
    guard = _LossGuard(name, section, ckpt, workdir)
    try:
        for step in range(start, end):
            state, loss = run_step(state, step)
            guard.add(step, loss)
            record.tick()
            done = step + 1
            if done % tc.log_every == 0 or done == end:
                record.step(done, guard.check(), float(sched(step)))
            if periodic is not None and periodic_every > 0 and (done % (periodic_every * spe) == 0 or done == total):
                guard.check()
                record.evaluation(*periodic(state["params"]), done, spe)
            if ckpt is not None and (done % tc.checkpoint_every == 0 or done == end):
                guard.check()
                save_checkpoint(ckpt, done, state, objective.fingerprint)
        losses = guard.values()
    finally:
        if ckpt is not None:
            ckpt.wait_until_finished()
        record.close()
    return TrainResult(state["params"], losses, end)


def _steps(tc, n: int, section: str, mesh) -> tuple[int, int, int]:
    """(batch size, steps per epoch, total steps), after checking the batch fits the devices and data."""
    batch = int(tc.batch_size)
    if batch % mesh.devices.size:
        raise ConfigError(f"{section}.batch_size {batch} must be divisible by the {mesh.devices.size} devices")
    if n < batch:
        raise ConfigError(f"{section}.batch_size {batch} exceeds the {n} training images; lower it")
    spe = n // batch  # drop_last: every step a full batch (the released code's schedule bug avoided)
    return batch, spe, int(tc.epochs) * spe


def _initial_state(objective: Objective, tx, seed, mesh, ckpt, log):
    """Fresh parameters and optimiser state (replicated over the mesh), or the latest checkpoint's."""
    repl = NamedSharding(mesh, P())

    def init_fn(key):
        params = objective.init_params(key)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}

    state = jax.jit(init_fn, out_shardings=repl)(jax.random.fold_in(jax.random.key(seed), 0))
    if ckpt is not None and ckpt.latest_step() is not None:
        state = restore_checkpoint(ckpt, state, objective.fingerprint, repl, fall_back=True, log=log)
    return state


def _step_runner(loss_fn, tx, arrays, tc, mesh, seed):
    """f(state, step) -> (state, loss): one jitted, donated update on the step's batch (waited for
    when the mesh has several CPU devices).

    With one process and a cache of at most tc.device_cache_gb GiB the arrays live on every device
    and a step receives only the batch's indices (no per-step host-to-device copy: what keeps a GPU
    busy); otherwise each step gathers its batch on the host."""
    repl, data_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    n, batch = len(arrays[0]), int(tc.batch_size)
    pi, pc = jax.process_index(), jax.process_count()
    local = batch // pc

    step_fn = functools.partial(train_step, loss_fn=loss_fn, tx=tx)

    if pc == 1 and sum(a.nbytes for a in arrays if a is not None) <= float(tc.device_cache_gb) * 2**30:

        def cached_step(state, caches, idx):
            picked = tuple(None if a is None else jax.lax.with_sharding_constraint(a[idx], data_sh) for a in caches)
            return step_fn(state, picked, idx)

        fn = jax.jit(cached_step, in_shardings=(repl, repl, data_sh), out_shardings=(repl, repl), donate_argnums=(0,))
        caches = tuple(None if a is None else jax.device_put(a, repl) for a in arrays)

        def batch_of(idx):
            return caches
    else:
        fn = jax.jit(step_fn, in_shardings=(repl, data_sh, data_sh), out_shardings=(repl, repl), donate_argnums=(0,))

        def batch_of(idx):
            return tuple(None if a is None else jax.make_array_from_process_local_data(data_sh, a[idx]) for a in arrays)

    # Several CPU devices (train.devices = all on a CPU): one step in flight at a time. With steps
    # queued ahead, XLA's in-process all-reduce between them aborted runs (benchmarks/RESULTS.md).
    one_in_flight = mesh.devices.size > 1 and jax.default_backend() == "cpu"

    def run(state, step):
        idx = _batch_indices(n, batch, seed, step)[pi * local : (pi + 1) * local]
        out = fn(state, batch_of(idx), jax.make_array_from_process_local_data(data_sh, idx.astype(np.int32)))
        return jax.block_until_ready(out) if one_in_flight else out

    return run

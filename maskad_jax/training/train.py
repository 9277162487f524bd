"""Training the masked reconstructor on cached backbone features, data-parallel with jit + sharding.

One code path for 1 CPU, 8 TPU cores or many hosts: a 1-D `Mesh` over a 'data' axis, the batch
sharded along it (NamedSharding), the state replicated, the step jitted with donated state. The
frozen backbone runs once per training image (features.py), so training costs only the
reconstructor. Progress goes to the console (loss, lr, steps/s, images/s, ETA), to
<workdir>/train_log.jsonl and to TensorBoard event files in <workdir>/tensorboard. Batches follow
a per-epoch permutation of numpy's Generator([seed, epoch]) and masks come from PRNG keys folded from
(seed, step, image index): a resumed run continues with
exactly the batches and masks an uninterrupted run would have used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maskad_jax.common.errors import ConfigError, MissingInputError, UserError
from maskad_jax.common.parallel import data_mesh, to_local, training_mesh
from maskad_jax.common.progress import TrainingRecord
from maskad_jax.common.specs import ModelSpec, TrainSpec, with_role
from maskad_jax.engine import masks as masks_lib
from maskad_jax.models.reconstructor import build_reconstructor
from maskad_jax.training.optim import make_optimizer


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint written by a run with another model configuration."""


def model_fingerprint(ms: ModelSpec, image_size: int, target: str, in_channels: int) -> dict:
    """What a checkpoint must agree with to be reused: the fields of role "model" (common/specs.py) of
    the backbone and the reconstructor, data.image_size and train.target, and the input channels."""
    return {
        "backbone": with_role(ms.backbone, "model"),
        "reconstructor": with_role(ms.reconstructor, "model"),
        "in_channels": int(in_channels),
        "image_size": int(image_size),
        "target": target,
    }


def sample_train_mask(key, h, tc: TrainSpec, fg_weights=None) -> jax.Array:
    """One training mask for one (gh, gw, C) feature map: strategy drawn with tc.mask_probs.

    fg_weights: the map's masks.foreground_weights (gh*gw,), if already computed (training computes
    them once per cached image); None computes them here.
    """
    gh, gw = h.shape[:2]
    n = gh * gw
    k_choice, k_r, k_b, k_f = jax.random.split(key, 4)
    probs = jnp.asarray(tc.mask_probs, jnp.float32)
    choice = jax.random.choice(k_choice, 3, p=probs / probs.sum())
    options = []
    for i, make in enumerate(
        (
            lambda: masks_lib.random_mask(k_r, n, int(round(tc.random_ratio * n))),
            lambda: masks_lib.block_mask(k_b, (gh, gw), int(round(tc.block_ratio * n))),
            lambda: masks_lib.foreground_mask(
                k_f,
                masks_lib.foreground_weights(h) if fg_weights is None else fg_weights,
                int(round(tc.foreground_ratio * n)),
            ),
        )
    ):
        options.append(make() if tc.mask_probs[i] > 0 else jnp.zeros((n,), bool))
    return jnp.stack(options)[choice]


def foreground_weights_of_cache(h: np.ndarray, chunk: int = 256) -> np.ndarray:
    """masks.foreground_weights of every cached map (N, gh, gw, C) -> (N, gh*gw) float32, with numpy."""
    return np.concatenate(
        [masks_lib.foreground_weights(np.asarray(h[i : i + chunk], np.float32), xp=np) for i in range(0, len(h), chunk)]
    ).astype(np.float32)


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


def train(
    tc: TrainSpec,
    ms: ModelSpec,
    image_size: int,
    h_in: np.ndarray,
    h_tgt: np.ndarray | None,
    workdir: str | None,
    *,
    log=print,
    max_steps: int | None = None,
    periodic=None,
) -> TrainResult:
    """Train (or resume) the reconstructor on cached features h_in (N, gh, gw, C).

    h_tgt: regression targets (the unnormalised view's features) or None to regress h_in itself.
    max_steps stops early (to simulate an interruption in tests); the schedule still spans all epochs.
    periodic: f(params) -> ({name: value}, summary line), run every train.eval_every epochs (learning_curves.py).
    """
    n, gh, gw, c = h_in.shape
    attention = ms.reconstructor.attention
    if attention == "jax_cudnn":  # cuDNN's fused backward needs other sequence lengths than 1 + 196
        log("model.reconstructor.attention = jax_cudnn is for scoring only; training uses einsum (same parameters)")
        attention = "einsum"
    model = build_reconstructor(ms, c, (gh, gw), attention)
    base_key = jax.random.key(tc.seed)

    def init_params(key):
        return model.init(key, jnp.zeros((1, gh, gw, c)), jnp.zeros((1, gh * gw), bool))["params"]

    # The foreground mask's weights depend only on the (fixed) cached features: computed once here.
    fg = foreground_weights_of_cache(h_in) if tc.mask_probs[2] > 0 else None

    def loss_fn(params, arrays, idx, step):
        x, y, w = arrays
        y = x if y is None else y
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base_key, step + 1), i))(idx)
        mask_keys, drop_keys = jax.vmap(lambda k: jax.random.split(k))(keys).transpose(1, 0)
        mask = jax.vmap(lambda k, h, w: sample_train_mask(k, h, tc, w))(mask_keys, x, w)  # w may be None
        pred = model.apply(
            {"params": params}, x, mask, deterministic=False, rngs={"dropout": jax.random.fold_in(drop_keys[0], 7)}
        )
        return jnp.mean(jnp.square(pred - y))

    return training_loop(
        tc,
        tc.seed,
        (h_in, h_tgt, fg),
        init_params,
        loss_fn,
        lambda total, spe: make_optimizer(tc, total, spe),
        model_fingerprint(ms, image_size, tc.target, c),
        workdir,
        log=log,
        max_steps=max_steps,
        periodic=periodic,
        periodic_every=int(tc.eval_every),
        devices=tc.devices,
    )


class TrainingDivergedError(UserError, FloatingPointError):
    """The training loss became NaN or infinite; no checkpoint after it was written."""


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


def training_loop(
    tc,
    seed: int,
    arrays: tuple,
    init_params,
    loss_fn,
    make_tx,
    fingerprint: dict,
    workdir: str | None,
    *,
    name: str = "train",
    log=print,
    max_steps: int | None = None,
    periodic=None,
    periodic_every: int = 0,
    devices: str = "all",
) -> TrainResult:
    """The data-parallel loop shared by the reconstructor and the flow.

    tc: a config section with batch_size, epochs, log_every, checkpoint_every, max_to_keep and
    device_cache_gb. arrays: per-example arrays (N, ...) or None, gathered by batch indices;
    loss_fn(params, batch_arrays, indices, step) -> scalar. make_tx(total_steps, steps_per_epoch)
    -> (optax transform, schedule). Checkpoints go to <workdir>/checkpoints (name "train") or
    <workdir>/<name>_checkpoints; the record (progress.TrainingRecord) to the console,
    <workdir>/<name>_log.jsonl and TensorBoard. periodic(params) -> ({name: value}, summary line)
    runs after every `periodic_every` epochs and after the last step (learning_curves.py). A loss
    that is not finite stops the run with TrainingDivergedError before any later checkpoint.
    devices: the mesh (parallel.training_mesh: all | one | auto = one on a CPU; train.devices).
    """
    section, mesh = "train" if name == "train" else name, training_mesh(devices)
    batch, spe, total = _steps(tc, len(arrays[0]), section, mesh)
    tx, sched = make_tx(total, spe)
    ckpt = _checkpoint_manager(workdir, tc, _ckpt_dir(name)) if workdir else None
    state = _initial_state(init_params, tx, seed, mesh, ckpt, fingerprint, log, name, workdir)
    run_step = _step_runner(loss_fn, tx, arrays, tc, mesh, seed)
    start = int(state["step"])
    end = total if max_steps is None else min(total, max_steps)
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
                _save(ckpt, done, state, fingerprint)
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


def _initial_state(init_params, tx, seed, mesh, ckpt, fingerprint, log, name, workdir):
    """Fresh parameters and optimiser state (replicated over the mesh), or the latest checkpoint's."""
    repl = NamedSharding(mesh, P())

    def init_fn(key):
        params = init_params(key)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}

    state = jax.jit(init_fn, out_shardings=repl)(jax.random.fold_in(jax.random.key(seed), 0))
    if ckpt is not None and ckpt.latest_step() is not None:
        state = _restore(ckpt, state, fingerprint, repl, fall_back=True, log=log)
        log(f"resumed {'' if name == 'train' else name + ' '}from step {int(state['step'])} in {workdir}")
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

    def train_step(state, batch_arrays, idx):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch_arrays, idx, state["step"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

    if pc == 1 and sum(a.nbytes for a in arrays if a is not None) <= float(tc.device_cache_gb) * 2**30:

        def cached_step(state, caches, idx):
            picked = tuple(None if a is None else jax.lax.with_sharding_constraint(a[idx], data_sh) for a in caches)
            return train_step(state, picked, idx)

        fn = jax.jit(cached_step, in_shardings=(repl, repl, data_sh), out_shardings=(repl, repl), donate_argnums=(0,))
        caches = tuple(None if a is None else jax.device_put(a, repl) for a in arrays)

        def batch_of(idx):
            return caches
    else:
        fn = jax.jit(train_step, in_shardings=(repl, data_sh, data_sh), out_shardings=(repl, repl), donate_argnums=(0,))

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


# -------------------------------------------------------------------------------------------- orbax
def _ckpt_dir(name: str) -> str:
    return "checkpoints" if name == "train" else f"{name}_checkpoints"


def _checkpoint_manager(workdir, tc, subdir: str = "checkpoints"):
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(workdir), subdir)
    opts = ocp.CheckpointManagerOptions(max_to_keep=int(tc.max_to_keep), create=True)
    return ocp.CheckpointManager(path, options=opts, item_names=("state", "meta"))


class CheckpointCorruptError(UserError, ValueError):
    """A checkpoint whose files cannot be read or whose arrays differ from the digests saved with them."""


def state_digests(state, require_finite: bool = False) -> dict:
    """sha256 of every leaf of a (replicated) state pytree, keyed by its path: stored with each
    checkpoint and verified on restore (orbax's array files carry no checksums). require_finite:
    raise TrainingDivergedError if a floating-point leaf holds NaN or inf."""
    import hashlib

    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(to_local(state))):
        a = np.ascontiguousarray(np.asarray(leaf))
        name = jax.tree_util.keystr(path)
        if require_finite and np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise TrainingDivergedError(
                f"training diverged: {name} is not finite after step "
                f"{int(np.asarray(jax.device_get(to_local(state['step']))))}; no "
                f"checkpoint was written for it. Lower the learning rate and rerun"
            )
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out[name] = h.hexdigest()
    return out


def _save(ckpt, step, state, fingerprint):
    import orbax.checkpoint as ocp

    meta = {"fingerprint": fingerprint, "digests": state_digests(state, require_finite=True)}
    ckpt.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
    )


def _restore(ckpt, template, fingerprint, sharding, fall_back: bool = False, log=print):
    """The latest checkpoint's state, verified against its digests. A checkpoint written with another
    model config is refused (CheckpointMismatchError). A corrupt one (unreadable, truncated, or an
    array that differs from its digest) raises CheckpointCorruptError naming it, or, with fall_back
    (resuming training), is reported and the previous checkpoint is tried."""
    steps = sorted(ckpt.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        try:
            return _restore_step(ckpt, step, template, fingerprint, sharding)
        except CheckpointCorruptError as e:
            if not fall_back or i == len(steps) - 1:
                raise
            aside = _move_aside(ckpt, step)
            log(f"{e}; moved it to {aside} and falling back to the checkpoint at step {steps[i + 1]}")
    raise MissingInputError(f"no checkpoint in {ckpt.directory}")


def _move_aside(ckpt, step) -> str:
    """Move a corrupt step's directory out of the checkpoints folder (kept for inspection, never
    deleted), so training can write that step again."""
    import shutil

    src = os.path.join(str(ckpt.directory), str(step))
    dst = os.path.join(
        os.path.dirname(str(ckpt.directory).rstrip("/")),
        "corrupt_checkpoints",
        f"{os.path.basename(str(ckpt.directory).rstrip('/'))}_{step}_{time.strftime('%Y%m%d-%H%M%S')}",
    )
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.move(src, dst)
    ckpt.reload()
    return dst


def _restore_step(ckpt, step, template, fingerprint, sharding):
    import orbax.checkpoint as ocp

    where = os.path.join(str(ckpt.directory), str(step))
    try:
        meta = ckpt.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax/TensorStore raise many types for a damaged directory
        raise CheckpointCorruptError(
            f"checkpoint {where} is unreadable: its meta file could not be read "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if meta.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        raise CheckpointMismatchError(
            f"checkpoint at step {step} in {ckpt.directory} was written with another model config:\n"
            f"  checkpoint: {json.dumps(meta.get('fingerprint'), sort_keys=True)}\n"
            f"  this run:   {json.dumps(fingerprint, sort_keys=True)}\n"
            f"use another --workdir, or the config that wrote it"
        )
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template)
    try:
        state = ckpt.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:
        raise CheckpointCorruptError(
            f"checkpoint {where} is unreadable: its arrays could not be read, a file "
            f"is missing or truncated ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]})"
        ) from None
    expected = meta.get("digests")
    if expected is not None:  # checkpoints written before digests existed are not verified
        got = state_digests(state)
        bad = [k for k in expected if got.get(k) != expected[k]] + [k for k in got if k not in expected]
        if bad:
            raise CheckpointCorruptError(
                f"checkpoint {where} is corrupt: {len(bad)} array(s) differ from the "
                f"digests saved with them (first: {bad[0]})"
            )
    return state


def restore_trained(workdir: str, tc, name: str, init_params, make_tx, fingerprint: dict):
    """(params, step) of the latest checkpoint of a training_loop run called `name` in workdir."""
    ckpt = _checkpoint_manager(workdir, tc, _ckpt_dir(name))
    if ckpt.latest_step() is None:
        raise MissingInputError(
            f"no checkpoint in {os.path.join(workdir, _ckpt_dir(name))}: train first (--mode=train or train_and_eval)"
        )
    tx, _ = make_tx(10, 1)

    def init_fn():
        params = init_params(jax.random.key(0))
        return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}

    state = _restore(ckpt, jax.eval_shape(init_fn), fingerprint, NamedSharding(data_mesh(), P()))
    return state["params"], int(state["step"])


def restore_params(workdir: str, tc: TrainSpec, ms: ModelSpec, image_size: int, in_channels: int, grid):
    """The latest trained reconstructor parameters in workdir (for eval/predict), checked against the
    model spec (model_fingerprint)."""
    model = build_reconstructor(ms, in_channels, grid)
    gh, gw = grid
    return restore_trained(
        workdir,
        tc,
        "train",
        lambda key: model.init(key, jnp.zeros((1, gh, gw, in_channels)), jnp.zeros((1, gh * gw), bool))["params"],
        lambda total, spe: make_optimizer(tc, total, spe),
        model_fingerprint(ms, image_size, tc.target, in_channels),
    )

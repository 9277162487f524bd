"""Checkpoints (orbax) of a training run: saved with the model's fingerprint and the state's digests,
restored only into a run of the same model (CheckpointMismatchError), a corrupt one set aside with a
fall-back to the one before (CheckpointCorruptError)."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maskad_jax.common.errors import MissingInputError, UserError
from maskad_jax.common.parallel import data_mesh, to_local


class TrainingDivergedError(UserError, FloatingPointError):
    """The training loss became NaN or infinite; no checkpoint after it was written."""


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint written by a run with another model configuration."""


# -------------------------------------------------------------------------------------------- orbax
def checkpoint_dir(name: str) -> str:
    return "checkpoints" if name == "train" else f"{name}_checkpoints"


def checkpoint_manager(workdir, tc, subdir: str = "checkpoints"):
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


def save_checkpoint(ckpt, step, state, fingerprint):
    import orbax.checkpoint as ocp

    meta = {"fingerprint": fingerprint, "digests": state_digests(state, require_finite=True)}
    ckpt.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
    )


def restore_checkpoint(ckpt, template, fingerprint, sharding, fall_back: bool = False, log=print):
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
    ckpt = checkpoint_manager(workdir, tc, checkpoint_dir(name))
    if ckpt.latest_step() is None:
        raise MissingInputError(
            f"no checkpoint in {os.path.join(workdir, checkpoint_dir(name))}: "
            "train first (--mode=train or train_and_eval)"
        )
    tx, _ = make_tx(10, 1)

    def init_fn():
        params = init_params(jax.random.key(0))
        return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}

    state = restore_checkpoint(ckpt, jax.eval_shape(init_fn), fingerprint, NamedSharding(data_mesh(), P()))
    return state["params"], int(state["step"])

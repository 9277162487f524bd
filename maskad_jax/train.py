"""Training the masked reconstructor on cached backbone features, data-parallel with jit + sharding.

One code path for 1 CPU, 8 TPU cores or many hosts: a 1-D `Mesh` over a 'data' axis, the batch
sharded along it (NamedSharding), the state replicated, the step jitted with donated state. The
frozen backbone runs once per training image (features.py), so training costs only the
reconstructor. Progress goes to the console (loss, lr, steps/s, images/s, ETA), to
<workdir>/train_log.jsonl and to TensorBoard event files in <workdir>/tensorboard. Batches follow
a per-epoch permutation of numpy's Generator([seed, epoch]) and masks come from PRNG keys folded from (seed, step, image index): a resumed run continues with
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maskad_jax import masks as masks_lib
from maskad_jax.optim import make_optimizer
from maskad_jax.reconstructor import MaskedReconstructor


class CheckpointMismatchError(ValueError):
    """A checkpoint written by a run with another model configuration."""


def data_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))  # Auto axis: XLA propagates shardings


def local_mesh() -> Mesh:
    """A 1-D 'data' mesh over this process's devices (all devices when there is one process)."""
    return Mesh(np.asarray(jax.local_devices()), ("data",))


def local_batch_sharding(config):
    """An eval batch split over this process's devices (data.eval_batch_size must divide evenly)."""
    mesh = local_mesh()
    if config.data.eval_batch_size % mesh.devices.size:
        raise ValueError(f"data.eval_batch_size {config.data.eval_batch_size} must be a multiple of the "
                         f"{mesh.devices.size} local devices")
    return NamedSharding(mesh, P("data"))


def _score_on_one_device(config) -> bool:
    choice = config.scoring.get("devices", "auto")
    if choice not in ("auto", "all", "one"):
        raise ValueError(f"scoring.devices must be auto | all | one, got {choice!r}")
    return choice == "one" or (choice == "auto" and jax.default_backend() == "cpu")


def scoring_sharding(config):
    """Where a scoring batch goes: this process's devices, or the first of them (scoring.devices).

    Scoring never spans processes: with several (jax.distributed), each scores its own share of the
    images on its own devices (pipeline.evaluate) and the results are gathered on the host."""
    if _score_on_one_device(config):
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return local_batch_sharding(config)


def to_local(tree):
    """A pytree with every array that spans processes (e.g. trained, replicated parameters) replaced by
    this process's copy, so it can meet host-local arrays in one jitted call. Identity with one process."""
    def local(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return a.addressable_data(0)
        return a
    return jax.tree_util.tree_map(local, tree)


def place_for_scoring(config, tree):
    """A pytree (parameters, pools) replicated on the devices that scoring.devices selects."""
    tree = to_local(tree)
    if _score_on_one_device(config):
        return jax.device_put(tree, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return jax.device_put(tree, NamedSharding(local_mesh(), P()))


def build_reconstructor(config, in_channels: int, grid, attention: str | None = None) -> MaskedReconstructor:
    """The configured reconstructor; `attention` overrides model.reconstructor.attention."""
    r = config.model.reconstructor
    return MaskedReconstructor(in_channels=in_channels, grid=tuple(grid), embed_dim=r.embed_dim,
                               encoder_depth=r.encoder_depth, decoder_depth=r.decoder_depth, num_heads=r.num_heads,
                               mlp_ratio=r.mlp_ratio, drop_path=r.drop_path, layer_scale_init=r.layer_scale_init,
                               dtype=jnp.dtype(config.model.dtype), attention=attention or r.get("attention", "einsum"))


def model_fingerprint(config, in_channels: int) -> dict:
    """What a checkpoint must agree with to be reused."""
    return {"backbone": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.backbone.items()
                         if k not in ("weights", "depthwise")},
            "reconstructor": {k: v for k, v in config.model.reconstructor.items() if k != "attention"},
            "in_channels": int(in_channels),
            "image_size": int(config.data.image_size), "target": config.train.target}


def sample_train_mask(key, h, cfg, fg_weights=None) -> jax.Array:
    """One training mask for one (gh, gw, C) feature map: strategy drawn with cfg.mask_probs.

    fg_weights: the map's masks.foreground_weights (gh*gw,), if already computed (training computes
    them once per cached image); None computes them here.
    """
    gh, gw = h.shape[:2]
    n = gh * gw
    k_choice, k_r, k_b, k_f = jax.random.split(key, 4)
    probs = jnp.asarray(cfg.mask_probs, jnp.float32)
    choice = jax.random.choice(k_choice, 3, p=probs / probs.sum())
    options = []
    for i, make in enumerate((
            lambda: masks_lib.random_mask(k_r, n, int(round(cfg.random_ratio * n))),
            lambda: masks_lib.block_mask(k_b, (gh, gw), int(round(cfg.block_ratio * n))),
            lambda: masks_lib.foreground_mask(k_f, masks_lib.foreground_weights(h) if fg_weights is None
                                              else fg_weights, int(round(cfg.foreground_ratio * n))))):
        options.append(make() if cfg.mask_probs[i] > 0 else jnp.zeros((n,), bool))
    return jnp.stack(options)[choice]


def foreground_weights_of_cache(h: np.ndarray, chunk: int = 256) -> np.ndarray:
    """masks.foreground_weights of every cached map (N, gh, gw, C) -> (N, gh*gw) float32, with numpy."""
    return np.concatenate([masks_lib.foreground_weights(np.asarray(h[i:i + chunk], np.float32), xp=np)
                           for i in range(0, len(h), chunk)]).astype(np.float32)


@dataclasses.dataclass
class TrainResult:
    params: Any
    losses: list  # (step, loss) of every step run in this call
    steps: int


def _batch_indices(n: int, batch: int, seed: int, step: int) -> np.ndarray:
    spe = n // batch
    epoch, j = divmod(step, spe)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[j * batch:(j + 1) * batch]


def train(config, h_in: np.ndarray, h_tgt: np.ndarray | None, workdir: str | None, *, log=print,
          max_steps: int | None = None) -> TrainResult:
    """Train (or resume) the reconstructor on cached features h_in (N, gh, gw, C).

    h_tgt: regression targets (the unnormalised view's features) or None to regress h_in itself.
    max_steps stops early (to simulate an interruption in tests); the schedule still spans all epochs.
    """
    tc = config.train
    n, gh, gw, c = h_in.shape
    attention = config.model.reconstructor.get("attention", "einsum")
    if attention == "jax_cudnn":  # cuDNN's fused backward needs other sequence lengths than 1 + 196
        log("model.reconstructor.attention = jax_cudnn is for scoring only; training uses einsum "
            "(the same parameters; evaluation still uses cuDNN)")
        attention = "einsum"
    model = build_reconstructor(config, c, (gh, gw), attention)
    base_key = jax.random.key(config.seed)

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
        pred = model.apply({"params": params}, x, mask, deterministic=False,
                           rngs={"dropout": jax.random.fold_in(drop_keys[0], 7)})
        return jnp.mean(jnp.square(pred - y))

    return training_loop(tc, config.seed, (h_in, h_tgt, fg), init_params, loss_fn,
                         lambda total, spe: make_optimizer(tc, total, spe), model_fingerprint(config, c),
                         workdir, log=log, max_steps=max_steps)


def training_loop(tc, seed: int, arrays: tuple, init_params, loss_fn, make_tx, fingerprint: dict,
                  workdir: str | None, *, name: str = "train", log=print, max_steps: int | None = None) -> TrainResult:
    """The data-parallel loop shared by the reconstructor and the flow.

    tc: a config section with batch_size, epochs, log_every, checkpoint_every, max_to_keep and
    device_cache_gb. arrays: per-example arrays (N, ...) or None, gathered by batch indices;
    loss_fn(params, batch_arrays, indices, step) -> scalar. make_tx(total_steps, steps_per_epoch)
    -> (optax transform, schedule). Checkpoints go to <workdir>/checkpoints (name "train") or
    <workdir>/<name>_checkpoints; logs to <workdir>/<name>_log.jsonl and TensorBoard tags <name>/*.
    """
    n = len(arrays[0])
    mesh = data_mesh()
    ndev = mesh.devices.size
    batch = int(tc.batch_size)
    section = "train" if name == "train" else name
    if batch % ndev:
        raise ValueError(f"{section}.batch_size {batch} must be divisible by the {ndev} devices")
    if n < batch:
        raise ValueError(f"{section}.batch_size {batch} exceeds the {n} training images; lower it")
    spe = n // batch  # drop_last: every step a full batch (the released code's schedule bug avoided)
    total = int(tc.epochs) * spe
    tx, sched = make_tx(total, spe)
    repl = NamedSharding(mesh, P())
    data_sh = NamedSharding(mesh, P("data"))

    def init_fn(key):
        params = init_params(key)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}

    state = jax.jit(init_fn, out_shardings=repl)(jax.random.fold_in(jax.random.key(seed), 0))
    ckpt = _checkpoint_manager(workdir, tc, _ckpt_dir(name)) if workdir else None
    if ckpt is not None and ckpt.latest_step() is not None:
        state = _restore(ckpt, state, fingerprint, repl)
        log(f"resumed {'' if name == 'train' else name + ' '}from step {int(state['step'])} in {workdir}")

    def train_step(state, batch_arrays, idx):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch_arrays, idx, state["step"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

    pi, pc = jax.process_index(), jax.process_count()
    cache_bytes = sum(a.nbytes for a in arrays if a is not None)
    on_device = pc == 1 and cache_bytes <= float(tc.device_cache_gb) * 2 ** 30
    if on_device:  # the cache lives on every device; a step receives only the batch's indices
        def cached_step(state, caches, idx):
            picked = tuple(None if a is None else jax.lax.with_sharding_constraint(a[idx], data_sh) for a in caches)
            return train_step(state, picked, idx)

        step_fn = jax.jit(cached_step, in_shardings=(repl, repl, data_sh), out_shardings=(repl, repl),
                          donate_argnums=(0,))
        caches = tuple(None if a is None else jax.device_put(a, repl) for a in arrays)
    else:  # batches are gathered on the host and copied in each step (multi-process, or a large cache)
        step_fn = jax.jit(train_step, in_shardings=(repl, data_sh, data_sh), out_shardings=(repl, repl),
                          donate_argnums=(0,))
    local = batch // pc
    start = int(state["step"])
    end = total if max_steps is None else min(total, max_steps)
    losses = []
    t0, last_log = time.time(), start
    log_path = os.path.join(workdir, f"{name}_log.jsonl") if workdir else None
    tb = _summary_writer(workdir) if workdir and pi == 0 else None
    for step in range(start, end):
        idx = _batch_indices(n, batch, seed, step)[pi * local:(pi + 1) * local]
        ids = jax.make_array_from_process_local_data(data_sh, idx.astype(np.int32))
        if on_device:
            state, loss = step_fn(state, caches, ids)
        else:
            picked = tuple(None if a is None else jax.make_array_from_process_local_data(data_sh, a[idx])
                           for a in arrays)
            state, loss = step_fn(state, picked, ids)
        losses.append((step, loss))
        done = step + 1
        if done % tc.log_every == 0 or done == end:
            lv = float(loss)
            rate = (done - last_log) / max(time.time() - t0, 1e-9)
            eta = (end - done) / max(rate, 1e-9)
            prefix = "" if name == "train" else f"{name} "
            log(f"{prefix}step {done}/{total} loss {lv:.5f} lr {float(sched(step)):.2e} {rate:.2f} steps/s "
                f"{rate * batch:.1f} img/s eta {eta:.0f}s")
            if tb is not None:
                tb.add_scalar(f"{name}/loss", lv, done)
                tb.add_scalar(f"{name}/lr", float(sched(step)), done)
                tb.add_scalar(f"{name}/images_per_second", rate * batch, done)
                tb.flush()
            if log_path and pi == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": done, "loss": lv, "lr": float(sched(step)),
                                        "steps_per_s": rate, "time": time.time()}) + "\n")
            t0, last_log = time.time(), done
        if ckpt is not None and (done % tc.checkpoint_every == 0 or done == end):
            _save(ckpt, done, state, fingerprint)
    if ckpt is not None:
        ckpt.wait_until_finished()
    if tb is not None:
        tb.close()
    return TrainResult(state["params"], [(s, float(l)) for s, l in losses], end)


def _summary_writer(workdir):
    """TensorBoard event files in <workdir>/tensorboard (tensorboardX: no TensorFlow needed)."""
    from tensorboardX import SummaryWriter
    return SummaryWriter(os.path.join(workdir, "tensorboard"))


# -------------------------------------------------------------------------------------------- orbax
def _ckpt_dir(name: str) -> str:
    return "checkpoints" if name == "train" else f"{name}_checkpoints"


def _checkpoint_manager(workdir, tc, subdir: str = "checkpoints"):
    import orbax.checkpoint as ocp
    path = os.path.join(os.path.abspath(workdir), subdir)
    opts = ocp.CheckpointManagerOptions(max_to_keep=int(tc.max_to_keep), create=True)
    return ocp.CheckpointManager(path, options=opts, item_names=("state", "meta"))


def _save(ckpt, step, state, fingerprint):
    import orbax.checkpoint as ocp
    ckpt.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave({"fingerprint": fingerprint})), force=True)


def _restore(ckpt, template, fingerprint, sharding):
    import orbax.checkpoint as ocp
    step = ckpt.latest_step()
    meta = ckpt.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        raise CheckpointMismatchError(
            f"checkpoint at step {step} in {ckpt.directory} was written with another model config:\n"
            f"  checkpoint: {json.dumps(meta.get('fingerprint'), sort_keys=True)}\n"
            f"  this run:   {json.dumps(fingerprint, sort_keys=True)}\n"
            f"use another --workdir, or the config that wrote it")
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template)
    return ckpt.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]


def restore_trained(workdir: str, tc, name: str, init_params, make_tx, fingerprint: dict):
    """(params, step) of the latest checkpoint of a training_loop run called `name` in workdir."""
    ckpt = _checkpoint_manager(workdir, tc, _ckpt_dir(name))
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, _ckpt_dir(name))}: train first "
                                f"(--mode=train or train_and_eval)")
    tx, _ = make_tx(10, 1)

    def init_fn():
        params = init_params(jax.random.key(0))
        return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}

    state = _restore(ckpt, jax.eval_shape(init_fn), fingerprint, NamedSharding(data_mesh(), P()))
    return state["params"], int(state["step"])


def restore_params(workdir: str, config, in_channels: int, grid):
    """The latest trained reconstructor parameters in workdir (for eval/predict), checked against config."""
    model = build_reconstructor(config, in_channels, grid)
    gh, gw = grid
    return restore_trained(
        workdir, config.train, "train",
        lambda key: model.init(key, jnp.zeros((1, gh, gw, in_channels)), jnp.zeros((1, gh * gw), bool))["params"],
        lambda total, spe: make_optimizer(config.train, total, spe), model_fingerprint(config, in_channels))

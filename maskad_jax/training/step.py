"""One training step of the reconstructor: the training masks, the loss beside it and the update.

reconstruction_loss(model, tc, key) is the masked feature regression of one batch (a loss(params, arrays, idx, step));
train_step(state, batch_arrays, idx, loss_fn, tx) applies any such loss's gradient with optax (the
flow's training uses it too); the loop (loop.py) jits it over the data-parallel mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maskad_jax.common.specs import TrainSpec
from maskad_jax.engine import masks as masks_lib


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


def reconstruction_loss(model, tc: TrainSpec, base_key):
    """loss(params, arrays, idx, step) -> the reconstructor's loss on one batch: arrays = (h (B, gh,
    gw, C), the target or None for h itself, the foreground weights or None); idx: the examples'
    indices, step: the step number. Each example's mask (random, block or foreground, tc.mask_probs)
    and the dropout key derive from (base_key, step, index), so a resumed run draws the same masks.
    The mean squared error of the reconstruction over every position and channel (the paper's L2
    objective)."""

    def loss(params, arrays, idx, step):
        x, y, w = arrays
        y = x if y is None else y
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base_key, step + 1), i))(idx)
        mask_keys, drop_keys = jax.vmap(lambda k: jax.random.split(k))(keys).transpose(1, 0)
        mask = jax.vmap(lambda k, h, w: sample_train_mask(k, h, tc, w))(mask_keys, x, w)  # w may be None
        pred = model.apply(
            {"params": params}, x, mask, deterministic=False, rngs={"dropout": jax.random.fold_in(drop_keys[0], 7)}
        )
        return jnp.mean(jnp.square(pred - y))

    return loss


def train_step(state, batch_arrays, idx, *, loss_fn, tx):
    """One update: state = {"params", "opt_state", "step"}; loss_fn(params, batch_arrays, idx, step)
    -> scalar (reconstruction_loss, or the flow's); tx: the optax transform. Returns (new state, loss).
    Pure: loop.py jits it with the state donated and the batch sharded over the data axis."""
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch_arrays, idx, state["step"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

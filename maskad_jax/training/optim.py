"""Optimiser: global-norm clipping then AdamW, with per-step linear warm-up and cosine decay."""

from __future__ import annotations

import jax
import optax
from flax import traverse_util


def decay_mask(params):
    """True where weight decay applies: matrices, the relative-position table and the mask token;
    never biases, norms, layer scales, q/v biases or the cls token (the released code's groups)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: (v.ndim >= 2 or k[-1] == "mask_token") and k[-1] != "cls_token" for k, v in flat.items()}
    )


def schedule(lr: float, min_lr: float, warmup_steps: int, total_steps: int):
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, max(warmup_steps, 0), max(total_steps, warmup_steps + 1), end_value=min_lr
    )


def make_optimizer(train_cfg, total_steps: int, steps_per_epoch: int):
    sched = schedule(train_cfg.lr, train_cfg.min_lr, int(train_cfg.warmup_epochs * steps_per_epoch), total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(train_cfg.clip_norm),
        optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=train_cfg.weight_decay, mask=decay_mask),
    )
    return tx, sched


def global_norm(tree):
    return optax.global_norm(jax.tree_util.tree_leaves(tree))

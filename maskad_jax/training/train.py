"""Training the masked reconstructor on cached backbone features, data-parallel with jit + sharding:
`train` builds the model and hands step.reconstruction_loss to the loop (loop.py, around
step.train_step); checkpoints are in checkpoints.py.

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

import jax
import jax.numpy as jnp
import numpy as np

from maskad_jax.common.specs import ModelSpec, TrainSpec, with_role
from maskad_jax.models.reconstructor import build_reconstructor
from maskad_jax.training.checkpoints import restore_trained
from maskad_jax.training.loop import LoopOptions, Objective, TrainResult, training_loop
from maskad_jax.training.optim import make_optimizer
from maskad_jax.training.step import foreground_weights_of_cache, reconstruction_loss


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

    objective = Objective(
        init_params,
        reconstruction_loss(model, tc, base_key),
        lambda total, spe: make_optimizer(tc, total, spe),
        model_fingerprint(ms, image_size, tc.target, c),
    )
    opts = LoopOptions("train", log, max_steps, periodic, int(tc.eval_every), tc.devices)
    return training_loop(tc, tc.seed, (h_in, h_tgt, fg), objective, workdir, opts)


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

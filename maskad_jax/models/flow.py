"""A conditional normalizing flow over prototype residuals: the flow-based M_po (docs/method.md §6.1).

The released code ranks positions with PMAD's ProtoFlow: for each position, the residual between its
feature and the nearest nominal pool token goes through a stack of FrEIA `AllInOneBlock`s
conditioned on a 2-D sin/cos positional encoding; the per-position log-likelihood ranks abnormality.
Written here as pure Flax modules:

    flow = ConditionalFlow(channels=272)                      # 8 blocks, subnet 264 -> 528 -> 272
    z, logdet = flow.apply(v, x, cond)                        # x (B, C) residuals, cond (B, 128)
    x_back = flow.apply(v, z, cond, method=flow.inverse)
    logp = log_likelihood(z, logdet)                          # per dimension, as get_logp / C

One block (FrEIA AllInOneBlock with affine_clamping, global_affine_type SOFTPLUS, permute_soft):
  x1, x2 = x[:C - C//2], x[C - C//2:];  a = 0.1 * subnet([x1, cond])
  s = clamp * tanh(a[:C//2] / clamp)   ("current" FrEIA; "legacy": clamp * tanh(a[:C//2]))
  x2 <- x2 * exp(s) + a[C//2:];  y = ([x1, x2] * g + b) W^T
with g = 0.2 softplus(0.5 gamma) (a learned global scale, 1 at init), b a learned offset and W a
fixed random orthogonal matrix. log|det J| = sum(s) + sum(log g) (|det W| = 1). The orthogonal
matrices are constants drawn from numpy's Generator([seed, block]) at build time, not parameters:
they never see the optimiser and a checkpoint needs only the learned variables and the config.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

GCONST = 0.5 * math.log(2 * math.pi)  # the released code's _GCONST_ (with the sign folded in below)


def positional_encoding_2d(dim: int, height: int, width: int) -> np.ndarray:
    """(height*width, dim) row-major: channels [0, dim/2) encode x (sin even, cos odd), the rest y."""
    if dim % 4:
        raise ValueError(f"flow.cond_dim must be a multiple of 4, got {dim}")
    half = dim // 2
    div = np.exp(np.arange(0, half, 2) * -(math.log(1e4) / half))  # (half/2,)
    pe = np.zeros((dim, height, width), np.float64)
    px = np.arange(width)[:, None] * div[None]  # (W, half/2)
    py = np.arange(height)[:, None] * div[None]  # (H, half/2)
    pe[0:half:2] = np.sin(px).T[:, None, :]
    pe[1:half:2] = np.cos(px).T[:, None, :]
    pe[half::2] = np.sin(py).T[:, :, None]
    pe[half + 1 :: 2] = np.cos(py).T[:, :, None]
    return pe.reshape(dim, height * width).T.astype(np.float32)


def random_orthogonal(dim: int, seed: int, block: int) -> np.ndarray:
    """A fixed random orthogonal matrix (Haar: QR of a Gaussian with the signs of R's diagonal)."""
    g = np.random.default_rng([seed, block]).normal(size=(dim, dim))
    q, r = np.linalg.qr(g)
    return (q * np.sign(np.diag(r))[None]).astype(np.float32)


def _torch_linear_init(fan_in: int):
    """PyTorch's default nn.Linear initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class CouplingBlock(nn.Module):
    channels: int
    cond_dim: int
    hidden: int
    clamp: float = 1.9
    clamp_form: str = "current"  # current: clamp*tanh(a/clamp) (FrEIA >= 0.2); legacy: clamp*tanh(a)
    seed: int = 0
    index: int = 0

    def setup(self):
        c1, c2 = self.channels - self.channels // 2, self.channels // 2
        fan1, fan2 = c1 + self.cond_dim, self.hidden
        self.fc1 = nn.Dense(self.hidden, kernel_init=_torch_linear_init(fan1), bias_init=_torch_linear_init(fan1))
        self.fc2 = nn.Dense(2 * c2, kernel_init=_torch_linear_init(fan2), bias_init=_torch_linear_init(fan2))
        # SOFTPLUS global affine: 0.1 * softplus_beta=0.5(gamma), gamma initialised so the scale starts at 1.
        self.global_scale = self.param(
            "global_scale", nn.initializers.constant(2.0 * math.log(math.exp(5.0) - 1.0)), (self.channels,)
        )
        self.global_offset = self.param("global_offset", nn.initializers.zeros, (self.channels,))
        self.w_perm = random_orthogonal(self.channels, self.seed, self.index)

    def _coupling(self, x1, cond):
        c2 = self.channels // 2
        a = 0.1 * self.fc2(nn.relu(self.fc1(jnp.concatenate([x1, cond], axis=-1))))
        if self.clamp_form == "current":
            s = self.clamp * jnp.tanh(a[:, :c2] / self.clamp)
        elif self.clamp_form == "legacy":
            s = self.clamp * jnp.tanh(a[:, :c2])
        else:
            raise ValueError(f"flow.clamp_form must be current | legacy, got {self.clamp_form!r}")
        return s, a[:, c2:]

    def _scale(self):
        return 0.2 * jax.nn.softplus(0.5 * self.global_scale)

    def __call__(self, x, cond):
        c1 = self.channels - self.channels // 2
        x1, x2 = x[:, :c1], x[:, c1:]
        s, t = self._coupling(x1, cond)
        y = jnp.concatenate([x1, x2 * jnp.exp(s) + t], axis=-1)
        g = self._scale()
        y = (y * g + self.global_offset) @ jnp.asarray(self.w_perm).T
        return y, jnp.sum(s, axis=-1) + jnp.sum(jnp.log(g))

    def inverse(self, y, cond):
        c1 = self.channels - self.channels // 2
        g = self._scale()
        x = (y @ jnp.asarray(self.w_perm) - self.global_offset) / g
        x1, x2 = x[:, :c1], x[:, c1:]
        s, t = self._coupling(x1, cond)
        return jnp.concatenate([x1, (x2 - t) * jnp.exp(-s)], axis=-1)


class ConditionalFlow(nn.Module):
    """x (B, C) and cond (B, cond_dim) -> z (B, C) and log|det dz/dx| (B,)."""

    channels: int
    cond_dim: int = 128
    blocks: int = 8
    hidden_ratio: float = 2.0  # subnet hidden width = ratio x (C - C//2 + cond_dim): the code's 528
    clamp: float = 1.9
    clamp_form: str = "current"
    seed: int = 0

    def setup(self):
        hidden = int(round(self.hidden_ratio * (self.channels - self.channels // 2 + self.cond_dim)))
        self.layers = [
            CouplingBlock(self.channels, self.cond_dim, hidden, self.clamp, self.clamp_form, self.seed, i)
            for i in range(self.blocks)
        ]

    def __call__(self, x, cond):
        logdet = jnp.zeros(x.shape[:1], x.dtype)
        for layer in self.layers:
            x, j = layer(x, cond)
            logdet = logdet + j
        return x, logdet

    def inverse(self, z, cond):
        for layer in reversed(self.layers):
            z = layer.inverse(z, cond)
        return z


def log_likelihood(z, logdet):
    """Per-dimension log-likelihood under a standard normal base (get_logp / C of the released code)."""
    c = z.shape[-1]
    return (-0.5 * jnp.sum(jnp.square(z), axis=-1) + logdet - c * GCONST) / c


def flow_loss(z, logdet):
    """The released code's objective: mean(-log sigmoid(log p))."""
    return jnp.mean(-jax.nn.log_sigmoid(log_likelihood(z, logdet)))


def build_flow(f, channels: int) -> ConditionalFlow:
    """The flow of a flow spec (common/specs.FlowSpec)."""
    return ConditionalFlow(
        channels=channels,
        cond_dim=f.cond_dim,
        blocks=f.blocks,
        hidden_ratio=f.hidden_ratio,
        clamp=f.clamp,
        clamp_form=f.clamp_form,
        seed=f.seed,
    )


def residual_logp(flow, params, residuals, grid, cond_dim: int):
    """Per-position log-likelihood (B, n) of residuals (B, n, C) on a (gh, gw) grid. Jittable."""
    b, n, c = residuals.shape
    pe = jnp.asarray(positional_encoding_2d(cond_dim, *grid))
    z, logdet = flow.apply({"params": params}, residuals.reshape(b * n, c), jnp.tile(pe, (b, 1)))
    return log_likelihood(z, logdet).reshape(b, n)

"""The masked reconstructor: a BEiT-style ViT that rebuilds the feature map h from a masked copy.

    model = MaskedReconstructor(in_channels=272, grid=(14, 14))       # paper / released-code sizes
    h_hat = model.apply(variables, h, mask, deterministic=True)        # h: (B, 14, 14, C), mask: (B, 196) bool

Structure (docs/method.md §4): input projection C -> D; the learned mask token replaces the
masked positions *after* the projection; a cls token is prepended; one relative position bias table
is shared by all blocks; pre-norm blocks with q/v biases, layer scale (init 0.1), stochastic depth
rising linearly to `drop_path`, exact GELU, LayerNorm eps 1e-6; no final norm; output projection
D -> C; the cls token is dropped. The first `encoder_depth` blocks are named encoder_*, the next
`decoder_depth` decoder_* (the paper's 5 + 5; the released code's single 10-block stack is the
same computation).

Initialisation: every Dense kernel and both tokens ~ N(0, 0.02) truncated at +-1 std; biases 0;
the output projections of attention and MLP in block l (1-based) divided by sqrt(2 l).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_STD = 0.02


def trunc_init(scale: float = 1.0):
    base = jax.nn.initializers.truncated_normal(_STD, lower=-1.0, upper=1.0)

    def init(key, shape, dtype=jnp.float32):
        return base(key, shape, dtype) * scale

    return init


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
    """(1+N, 1+N) indices into the shared table of (2h-1)(2w-1)+3 rows (BEiT's layout)."""
    gh, gw = grid
    coords = np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]
    idx = (rel[0] + gh - 1) * (2 * gw - 1) + (rel[1] + gw - 1)
    n_dist = (2 * gh - 1) * (2 * gw - 1) + 3
    out = np.zeros((gh * gw + 1,) * 2, np.int32)
    out[1:, 1:] = idx
    out[0, :] = n_dist - 3  # cls as query
    out[:, 0] = n_dist - 2  # cls as key
    out[0, 0] = n_dist - 1  # cls to cls
    return out


class RelativePositionBias(nn.Module):
    grid: tuple[int, int]
    num_heads: int

    @nn.compact
    def __call__(self):
        gh, gw = self.grid
        table = self.param("table", nn.initializers.zeros, ((2 * gh - 1) * (2 * gw - 1) + 3, self.num_heads))
        idx = relative_position_index(self.grid)
        return jnp.transpose(table[idx], (2, 0, 1))  # (heads, 1+N, 1+N)


ATTENTION_IMPLEMENTATIONS = ("einsum", "jax_xla", "jax_cudnn")


class Attention(nn.Module):
    num_heads: int
    out_init_scale: float = 1.0
    dtype: Any = jnp.float32
    implementation: str = "einsum"  # see MaskedReconstructor.attention

    @nn.compact
    def __call__(self, x, rel_bias):
        b, n, d = x.shape
        hd = d // self.num_heads
        qkv = nn.Dense(3 * d, use_bias=False, kernel_init=trunc_init(), dtype=self.dtype, name="qkv")(x)
        q_bias = self.param("q_bias", nn.initializers.zeros, (d,))
        v_bias = self.param("v_bias", nn.initializers.zeros, (d,))
        qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
        q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, hd), 3, axis=2)
        if self.implementation == "einsum":
            q, k, v = (t[:, :, 0].transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, heads, N, hd)
            logits = jnp.einsum("bhqd,bhkd->bhqk", q * (hd**-0.5), k) + rel_bias.astype(q.dtype)
            attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
            out = jnp.einsum("bhqk,bhkd->bqhd", attn, v).reshape(b, n, d)
        elif self.implementation in ("jax_xla", "jax_cudnn"):  # the same formula, one library call
            out = jax.nn.dot_product_attention(
                q[:, :, 0],
                k[:, :, 0],
                v[:, :, 0],
                bias=rel_bias[None].astype(q.dtype),
                scale=hd**-0.5,
                implementation=self.implementation[4:],
            ).reshape(b, n, d)
        else:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.implementation!r}")
        return nn.Dense(d, kernel_init=trunc_init(self.out_init_scale), dtype=self.dtype, name="proj")(out)


class Block(nn.Module):
    num_heads: int
    mlp_ratio: float
    drop_path: float
    layer_scale_init: float
    layer_id: int  # 1-based, for the output-projection rescaling
    dtype: Any = jnp.float32
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, rel_bias, deterministic: bool):
        d = x.shape[-1]
        scale = 1.0 / math.sqrt(2.0 * self.layer_id)
        gamma1 = self.param("gamma_1", nn.initializers.constant(self.layer_scale_init), (d,))
        gamma2 = self.param("gamma_2", nn.initializers.constant(self.layer_scale_init), (d,))
        # Stochastic depth: drop a whole residual branch per sample, scaled by 1/keep (timm DropPath).
        drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2))
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
        y = Attention(self.num_heads, scale, self.dtype, self.attention, name="attn")(y, rel_bias)
        x = x + drop(gamma1 * y, deterministic=deterministic)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
        y = nn.Dense(int(d * self.mlp_ratio), kernel_init=trunc_init(), dtype=self.dtype, name="fc1")(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(d, kernel_init=trunc_init(scale), dtype=self.dtype, name="fc2")(y)
        return x + drop(gamma2 * y, deterministic=deterministic)


class MaskedReconstructor(nn.Module):
    in_channels: int
    grid: tuple[int, int] = (14, 14)
    embed_dim: int = 768
    encoder_depth: int = 5
    decoder_depth: int = 5
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    layer_scale_init: float = 0.1
    dtype: Any = jnp.float32
    # einsum: explicit logits + float32 softmax (the reference); jax_xla: jax.nn.dot_product_attention
    # lowered by XLA; jax_cudnn: its cuDNN fused kernel (NVIDIA GPUs, bfloat16/float16 only). Same
    # parameters and formula: a run can switch without retraining.
    attention: str = "einsum"

    @nn.compact
    def __call__(self, h, mask, deterministic: bool = True):
        """h: (B, gh, gw, C); mask: (B, gh*gw) bool/0-1 (1 = masked). Returns (B, gh, gw, C) float32."""
        b, gh, gw, c = h.shape
        if (gh, gw) != tuple(self.grid) or c != self.in_channels:
            raise ValueError(f"reconstructor built for {tuple(self.grid)}x{self.in_channels}, got {(gh, gw, c)}")
        depth = self.encoder_depth + self.decoder_depth
        x = nn.Dense(self.embed_dim, kernel_init=trunc_init(), dtype=self.dtype, name="input_proj")(
            h.reshape(b, gh * gw, c)
        )
        mask_token = self.param("mask_token", trunc_init(), (self.embed_dim,))
        w = mask.astype(x.dtype)[..., None]
        x = x * (1 - w) + mask_token.astype(x.dtype) * w
        cls = self.param("cls_token", trunc_init(), (self.embed_dim,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.embed_dim)), x], axis=1)
        rel_bias = RelativePositionBias(tuple(self.grid), self.num_heads, name="rel_pos_bias")()
        rates = np.linspace(0.0, self.drop_path, depth) if depth > 1 else [0.0]
        for i in range(depth):
            name = f"encoder_{i}" if i < self.encoder_depth else f"decoder_{i - self.encoder_depth}"
            x = Block(
                self.num_heads,
                self.mlp_ratio,
                float(rates[i]),
                self.layer_scale_init,
                i + 1,
                self.dtype,
                self.attention,
                name=name,
            )(x, rel_bias, deterministic)
        x = nn.Dense(c, kernel_init=trunc_init(), dtype=self.dtype, name="output_proj")(x[:, 1:])
        return x.astype(jnp.float32).reshape(b, gh, gw, c)


def patch_errors(h_hat, target, squared: bool = False):
    """Per-patch L2 norm over channels of the reconstruction error: (..., gh, gw, C) -> (..., gh*gw)."""
    sq = jnp.sum(jnp.square(h_hat - target), axis=-1)
    sq = sq.reshape(sq.shape[:-2] + (-1,))
    return sq if squared else jnp.sqrt(sq)


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def build_reconstructor(ms, in_channels: int, grid, attention: str | None = None) -> MaskedReconstructor:
    """The reconstructor of a model spec (common/specs.ModelSpec); `attention` overrides
    model.reconstructor.attention."""
    r = ms.reconstructor
    return MaskedReconstructor(
        in_channels=in_channels,
        grid=tuple(grid),
        embed_dim=r.embed_dim,
        encoder_depth=r.encoder_depth,
        decoder_depth=r.decoder_depth,
        num_heads=r.num_heads,
        mlp_ratio=r.mlp_ratio,
        drop_path=r.drop_path,
        layer_scale_init=r.layer_scale_init,
        dtype=jnp.dtype(ms.dtype),
        attention=attention or r.attention,
    )

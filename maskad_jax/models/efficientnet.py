"""EfficientNet B0-B7 / Lite0-Lite4 as a Flax linen module (NHWC, inference-mode batch norm).

The module is the frozen feature extractor of MaskAD: it returns the outputs of the requested
blocks and, only when asked, the classifier logits. Blocks after the last requested one are
never built, so a feature extractor holds (and runs) only what it needs.

Parameter names follow lukemelas/EfficientNet-PyTorch (`stem_conv`, `blocks_5/depthwise_conv`,
...), which keeps the weight converter a plain renaming (see weights.py).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskad_jax.models import efficientnet_arch as ea


def _activation(name: str):
    if name == "swish":
        return jax.nn.swish
    if name == "relu6":
        return jax.nn.relu6
    raise ValueError(f"unknown activation {name!r}")


def _bn(name: str, dtype) -> nn.BatchNorm:
    # Frozen backbone: always the running statistics (eval mode), epsilon of the TF weights.
    return nn.BatchNorm(use_running_average=True, epsilon=ea.BN_EPSILON, momentum=0.99, dtype=dtype, name=name)


def use_shifted_depthwise(impl: str) -> bool:
    """Whether depthwise convolutions run as shifted multiply-adds (see DepthwiseConv)."""
    if impl not in ("auto", "conv", "shifts"):
        raise ValueError(f"depthwise implementation must be auto | conv | shifts, got {impl!r}")
    return impl == "shifts" or (impl == "auto" and jax.default_backend() == "cpu")


class DepthwiseConv(nn.Module):
    """A k x k depthwise convolution (no bias) as k*k shifted, strided slices times per-channel weights.

    The same parameter ("kernel", shape (k, k, 1, C)) and the same result as
    nn.Conv(C, (k, k), feature_group_count=C); the sum runs over the k*k taps in row-major order.
    Why: XLA's CPU backend runs grouped convolutions through a generic loop, 20-50x slower than
    this form, which it fuses into one vectorised elementwise kernel (benchmarks/RESULTS.md). GPUs
    and TPUs have fast depthwise kernels, so `depthwise="auto"` uses this only on a CPU.
    """

    kernel_size: int
    strides: int
    padding: tuple
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, s = self.kernel_size, self.strides
        c = x.shape[-1]
        w = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c), jnp.float32).astype(self.dtype)
        (top, bottom), (left, right) = self.padding
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (top, bottom), (left, right), (0, 0)))
        b, hp, wp, _ = x.shape
        oh, ow = (hp - k) // s + 1, (wp - k) // s + 1
        out = None
        for i in range(k):
            for j in range(k):
                tap = jax.lax.slice(x, (0, i, j, 0), (b, i + (oh - 1) * s + 1, j + (ow - 1) * s + 1, c), (1, s, s, 1))
                out = tap * w[i, j, 0] if out is None else out + tap * w[i, j, 0]
        return out


class MBConvBlock(nn.Module):
    """Inverted residual block: [expand 1x1] -> depthwise kxk -> [squeeze-excite] -> project 1x1."""

    spec: ea.BlockSpec
    activation: str
    padding_rule: str
    native_size: int
    dtype: Any = jnp.float32
    depthwise: str = "auto"

    @nn.compact
    def __call__(self, x):
        s, act = self.spec, _activation(self.activation)
        inputs = x
        if s.expand_ratio != 1:
            x = nn.Conv(s.hidden_channels, (1, 1), use_bias=False, dtype=self.dtype, name="expand_conv")(x)
            x = act(_bn("bn0", self.dtype)(x))
        pad = ea.conv_padding(self.padding_rule, x.shape[1:3], (self.native_size,) * 2, s.kernel, s.stride)
        if use_shifted_depthwise(self.depthwise):
            x = DepthwiseConv(s.kernel, s.stride, pad, self.dtype, name="depthwise_conv")(x)
        else:
            x = nn.Conv(
                s.hidden_channels,
                (s.kernel, s.kernel),
                strides=(s.stride, s.stride),
                padding=pad,
                feature_group_count=s.hidden_channels,
                use_bias=False,
                dtype=self.dtype,
                name="depthwise_conv",
            )(x)
        x = act(_bn("bn1", self.dtype)(x))
        if s.se_channels:
            squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
            squeezed = act(nn.Conv(s.se_channels, (1, 1), dtype=self.dtype, name="se_reduce")(squeezed))
            squeezed = nn.Conv(s.hidden_channels, (1, 1), dtype=self.dtype, name="se_expand")(squeezed)
            x = jax.nn.sigmoid(squeezed) * x
        x = nn.Conv(s.out_channels, (1, 1), use_bias=False, dtype=self.dtype, name="project_conv")(x)
        x = _bn("bn2", self.dtype)(x)
        if s.has_skip:  # drop-connect is a training-time regulariser: off for a frozen backbone
            x = x + inputs
        return x


class EfficientNet(nn.Module):
    """EfficientNet up to the last of `taps` (block indices), or to the logits with `include_head`.

    Input: (B, H, W, 3) already normalised with the architecture's statistics.
    Output: a tuple with the output of each tapped block, and the logits as last element when
    `include_head` is set.
    """

    arch_name: str
    padding_rule: str = "tf-same"
    taps: Sequence[int] = ()
    include_head: bool = False
    num_classes: int = 1000
    dtype: Any = jnp.float32
    depthwise: str = "auto"  # auto (shifted multiply-adds on a CPU, the conv op elsewhere) | conv | shifts

    @nn.compact
    def __call__(self, x):
        arch = ea.get_arch(self.arch_name)
        act = _activation(arch.activation)
        native = ea.native_sizes(arch)
        taps = tuple(self.taps)
        if any(t < 0 or t >= len(arch.blocks) for t in taps):
            raise ValueError(f"taps {taps} out of range for {arch.name} with {len(arch.blocks)} blocks")
        last = len(arch.blocks) - 1 if self.include_head else max(taps, default=-1)
        if last < 0:
            raise ValueError("EfficientNet needs taps or include_head=True")

        x = x.astype(self.dtype)
        stem_pad = ea.conv_padding(self.padding_rule, x.shape[1:3], (arch.native_resolution,) * 2, 3, 2)
        x = nn.Conv(
            arch.stem_channels,
            (3, 3),
            strides=(2, 2),
            padding=stem_pad,
            use_bias=False,
            dtype=self.dtype,
            name="stem_conv",
        )(x)
        x = act(_bn("stem_bn", self.dtype)(x))
        outputs = []
        for i in range(last + 1):
            x = MBConvBlock(
                arch.blocks[i],
                arch.activation,
                self.padding_rule,
                native[i],
                self.dtype,
                self.depthwise,
                name=f"blocks_{i}",
            )(x)
            if i in taps:
                outputs.append(x)
        if self.include_head:
            x = nn.Conv(arch.head_channels, (1, 1), use_bias=False, dtype=self.dtype, name="head_conv")(x)
            x = act(_bn("head_bn", self.dtype)(x))
            x = jnp.mean(x, axis=(1, 2))
            outputs.append(nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x))
        return tuple(outputs)

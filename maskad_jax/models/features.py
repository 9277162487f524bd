"""The frozen feature extractor h: EfficientNet taps -> align-corners resize -> concatenation.

    extractor = FeatureExtractor.create("efficientnet-lite0", weights="packaged")
    h = extractor(images)              # images: (B, 224, 224, 3) float in [0, 1] -> (B, 14, 14, 192)
    h_raw = extractor(images, normalize=False)   # the released code's regression target (docs/method.md §5.2)

The taps are the outputs of the last block at each of `strides` (default 2, 4, 8, 16: B4 -> blocks
1, 5, 9, 21 with 24+32+56+160 = 272 channels; Lite0 -> blocks 0, 2, 4, 10 with 192 channels). Each
is resized to the resolution of the coarsest tap with bilinear align_corners=True (UniAD's MFCN
neck), then concatenated in stride order. Only the blocks up to the last tap are built and run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from maskad_jax.common.specs import FINE_JOINS, FineEmbedding
from maskad_jax.models import efficientnet_arch as ea
from maskad_jax.models import weights as weights_lib
from maskad_jax.models.efficientnet import EfficientNet
from maskad_jax.models.resize import resize_align_corners, resize_half_pixel


def neck(taps) -> jax.Array:
    """UniAD's MFCN neck: every tap resized to the coarsest one's grid (align corners), concatenated."""
    size = taps[-1].shape[1:3]
    return jnp.concatenate([resize_align_corners(t, size).astype(jnp.float32) for t in taps], axis=-1)


def avg_pool3(x: jax.Array) -> jax.Array:
    """3 x 3 average pool of (B, H, W, C), stride 1, zero padding counted in the mean (PyTorch's
    AvgPool2d(3, 1, 1) default), as nine shifted slices: plain ops that every export format takes."""
    h, w = x.shape[1:3]
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(p[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def pooled_embedding(taps, join: str = "repeat") -> jax.Array:
    """The M_po embedding of the fine kNN: each tap 3 x 3 average pooled, the coarser taps brought onto
    the finest tap's grid, concatenated: (B, H/s0, W/s0, sum C). join: repeat (the released code's
    PMAD/ProtoFlow embedding, PaDiM's embedding_concat: each coarse vector copied onto every fine
    position it covers) | bilinear (PatchCore's: interpolated with half-pixel centres, PyTorch's
    align_corners=False, so neighbouring fine positions get different coarse context)."""
    if join not in FINE_JOINS:
        raise ValueError(f"fine join {join!r}: one of {', '.join(FINE_JOINS)}")
    pooled = [avg_pool3(t.astype(jnp.float32)) for t in taps]
    gh, gw = pooled[0].shape[1:3]
    out = []
    for t in pooled:
        if join == "bilinear":
            out.append(resize_half_pixel(t, (gh, gw)))
            continue
        fy, fx = gh // t.shape[1], gw // t.shape[2]
        if fy * t.shape[1] != gh or fx * t.shape[2] != gw:
            raise ValueError(f"taps of {t.shape[1:3]} do not tile the finest map {(gh, gw)}")
        out.append(jnp.repeat(jnp.repeat(t, fy, axis=1), fx, axis=2))
    return jnp.concatenate(out, axis=-1)


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """A frozen backbone and its variables; calling it maps [0,1] images to the feature map h."""

    arch: ea.ArchSpec
    module: EfficientNet
    variables: Any
    strides: tuple[int, ...]
    _jitted: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_jitted", jax.jit(self.apply, static_argnames=("normalize",)))

    @classmethod
    def create(
        cls,
        arch_name: str,
        weights: str = "packaged",
        padding: str = "static",
        strides=(2, 4, 8, 16),
        dtype=jnp.float32,
        seed: int = 0,
        depthwise: str = "auto",
    ) -> "FeatureExtractor":
        """depthwise: how depthwise convolutions run (efficientnet.DepthwiseConv): auto | conv | shifts."""
        arch = ea.get_arch(arch_name)
        module = EfficientNet(
            arch_name, padding, taps=arch.tap_blocks(tuple(strides)), dtype=dtype, depthwise=depthwise
        )
        full = weights_lib.load_backbone_variables(arch_name, weights, seed=seed)
        variables = weights_lib.subset_for(full, module)
        return cls(arch, module, variables, tuple(strides))

    @property
    def channels(self) -> int:
        return sum(self.arch.tap_channels(self.strides))

    def feature_shape(self, image_size: int) -> tuple[int, int, int]:
        """(gh, gw, C) of h for square images of this size, from tracing the backbone (no compute):
        the padding rule decides how sizes that are not multiples of the strides round."""
        x = jax.ShapeDtypeStruct((1, int(image_size), int(image_size), 3), jnp.float32)
        return tuple(jax.eval_shape(self.apply, self.variables, x).shape[1:])

    def normalize(self, images01: jax.Array) -> jax.Array:
        mean = jnp.asarray(self.arch.mean, images01.dtype)
        std = jnp.asarray(self.arch.std, images01.dtype)
        return (images01 - mean) / std

    def apply(self, variables, images01: jax.Array, normalize: bool = True) -> jax.Array:
        """Pure function of (variables, images): use inside jit with the variables as an argument."""
        return neck(self.module.apply(variables, self.normalize(images01) if normalize else images01))

    def apply_with_fine(self, variables, images01: jax.Array, fine: FineEmbedding) -> tuple[jax.Array, jax.Array]:
        """(h, the fine embedding of the normalised images: pooled_embedding of the taps at fine.strides,
        joined by fine.join) from one backbone pass (the fine kNN M_po, scoring.knn_fine)."""
        taps = self.module.apply(variables, self.normalize(images01))
        missing = [s for s in fine.strides if s not in self.strides]
        if missing:
            raise ValueError(f"fine strides {missing} are not among the backbone's taps {self.strides}")
        return neck(taps), pooled_embedding([taps[self.strides.index(s)] for s in fine.strides], fine.join)

    def __call__(self, images01: jax.Array, normalize: bool = True) -> jax.Array:
        """Jitted convenience call with the extractor's own variables."""
        return self._jitted(self.variables, images01, normalize=normalize)

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

from maskad_jax import efficientnet_arch as ea
from maskad_jax import weights as weights_lib
from maskad_jax.efficientnet import EfficientNet
from maskad_jax.resize import resize_align_corners


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
        x = self.normalize(images01) if normalize else images01
        taps = self.module.apply(variables, x)
        size = taps[-1].shape[1:3]
        return jnp.concatenate([resize_align_corners(t, size).astype(jnp.float32) for t in taps], axis=-1)

    def __call__(self, images01: jax.Array, normalize: bool = True) -> jax.Array:
        """Jitted convenience call with the extractor's own variables."""
        return self._jitted(self.variables, images01, normalize=normalize)

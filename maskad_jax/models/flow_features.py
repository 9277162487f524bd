"""The flow's own features (flow.features = 'backbone'): the released code's ProtoFlow embedding.

The released code feeds its flow from a second backbone (timm tf_efficientnet_b6, taps at strides 8
and 16): each tapped map is smoothed by a 3 x 3 average pool (stride 1, zero padding counted, as
PyTorch's default), then the coarser map's vector is appended to every position of the finer map
that it covers (PaDiM's embedding_concat, i.e. a nearest-neighbour upsampling), giving
(H/8, W/8, C8 + C16): 28 x 28 x 272 at 224 px for B6. Any backbone of efficientnet_arch and any
strides work here; the weights are loaded like the main backbone's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from maskad_jax.models.features import FeatureExtractor, pooled_embedding


@dataclasses.dataclass(frozen=True)
class FlowEmbedder:
    extractor: FeatureExtractor

    @classmethod
    def create(cls, flow_config, dtype=jnp.float32, seed: int = 0, depthwise: str = "auto") -> "FlowEmbedder":
        b = flow_config.backbone
        return cls(
            FeatureExtractor.create(
                b.arch,
                weights=b.weights,
                padding=b.padding,
                strides=tuple(b.strides),
                dtype=dtype,
                seed=seed,
                depthwise=depthwise,
            )
        )

    @property
    def variables(self):
        return self.extractor.variables

    @property
    def channels(self) -> int:
        return self.extractor.channels

    def feature_shape(self, image_size: int) -> tuple[int, int, int]:
        """(fh, fw, C) for square images of this size, from tracing (as FeatureExtractor.feature_shape)."""
        x = jax.ShapeDtypeStruct((1, int(image_size), int(image_size), 3), jnp.float32)
        return tuple(jax.eval_shape(self.apply, self.variables, x).shape[1:])

    def apply(self, variables, images01: jax.Array, normalize: bool = True) -> jax.Array:
        """(B, H, W, 3) in [0, 1] -> (B, H/s0, W/s0, C): pooled taps, coarser ones repeated onto the finest."""
        x = self.extractor.normalize(images01) if normalize else images01
        return pooled_embedding(self.extractor.module.apply(variables, x))

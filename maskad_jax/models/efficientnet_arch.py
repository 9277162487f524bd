"""EfficientNet architecture tables: block specs, width/depth rounding, taps and padding.

Pure Python (no JAX): everything here is decided from the architecture's name. The numbers follow
the EfficientNet papers and the reference implementations (TF `efficientnet_builder` /
`efficientnet_lite_builder`, lukemelas/EfficientNet-PyTorch): base stages of EfficientNet-B0,
scaled by a width and a depth coefficient.

Lite variants differ from B variants in four ways: ReLU6 instead of swish, no squeeze-excite,
a stem of 32 and a head of 1280 channels whatever the width, and the first and last stages keep
their repeat counts when the depth coefficient grows.
"""

from __future__ import annotations

import dataclasses
import math

from maskad_jax.common.errors import ConfigError

# (repeats, kernel, stride, expand ratio, in channels, out channels) of EfficientNet-B0's stages.
_B0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# name: (width coefficient, depth coefficient, native resolution)
_COEFFICIENTS = {
    "efficientnet-b0": (1.0, 1.0, 224),
    "efficientnet-b1": (1.0, 1.1, 240),
    "efficientnet-b2": (1.1, 1.2, 260),
    "efficientnet-b3": (1.2, 1.4, 300),
    "efficientnet-b4": (1.4, 1.8, 380),
    "efficientnet-b5": (1.6, 2.2, 456),
    "efficientnet-b6": (1.8, 2.6, 528),
    "efficientnet-b7": (2.0, 3.1, 600),
    "efficientnet-lite0": (1.0, 1.0, 224),
    "efficientnet-lite1": (1.0, 1.1, 240),
    "efficientnet-lite2": (1.1, 1.2, 260),
    "efficientnet-lite3": (1.2, 1.4, 280),
    "efficientnet-lite4": (1.4, 1.8, 300),
}

ARCH_NAMES = tuple(_COEFFICIENTS)

# Input normalisation in [0, 1] units, per family.
# lukemelas B* weights: ImageNet mean/std. Lite weights were trained on (x - 127) / 128 in 0..255 units.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

BN_EPSILON = 1e-3
SE_RATIO = 0.25
DEPTH_DIVISOR = 8


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block after width/depth scaling."""

    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int
    se_channels: int  # 0: no squeeze-excite
    stage: int  # index of the stage (0..6) this block belongs to

    @property
    def hidden_channels(self) -> int:
        return self.in_channels * self.expand_ratio

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """A whole EfficientNet: stem, blocks, head, activation and input statistics."""

    name: str
    native_resolution: int
    stem_channels: int
    blocks: tuple[BlockSpec, ...]
    head_channels: int
    activation: str  # "swish" or "relu6"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def is_lite(self) -> bool:
        return self.activation == "relu6"

    def block_strides(self) -> tuple[int, ...]:
        """Total stride (relative to the input) of each block's output."""
        total, out = 2, []  # the stem has stride 2
        for b in self.blocks:
            total *= b.stride
            out.append(total)
        return tuple(out)

    def tap_blocks(self, strides=(2, 4, 8, 16)) -> tuple[int, ...]:
        """Index of the last block whose output has each given stride."""
        per_block = self.block_strides()
        taps = []
        for s in strides:
            idx = [i for i, bs in enumerate(per_block) if bs == s]
            if not idx:
                raise ConfigError(
                    f"{self.name} has no block with output stride {s}; strides are {sorted(set(per_block))}"
                )
            taps.append(idx[-1])
        return tuple(taps)

    def tap_channels(self, strides=(2, 4, 8, 16)) -> tuple[int, ...]:
        return tuple(self.blocks[i].out_channels for i in self.tap_blocks(strides))


def round_filters(channels: int, width: float) -> int:
    """Channel rounding of the reference implementations (multiple of 8, never 10% below)."""
    if width == 1.0:
        return channels
    scaled = channels * width
    new = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if new < 0.9 * scaled:
        new += DEPTH_DIVISOR
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def get_arch(name: str) -> ArchSpec:
    """Build the spec of a named architecture, e.g. 'efficientnet-b4' or 'efficientnet-lite0'."""
    if name not in _COEFFICIENTS:
        raise ConfigError(f"unknown EfficientNet architecture {name!r}; known: {', '.join(ARCH_NAMES)}")
    width, depth, resolution = _COEFFICIENTS[name]
    lite = "lite" in name
    stem = 32 if lite else round_filters(32, width)
    blocks = []
    for stage_idx, (repeats, k, s, e, cin, cout) in enumerate(_B0_STAGES):
        # The first block reads the stem, whose width Lite keeps at 32 (TF's fix_head_stem).
        cin = stem if stage_idx == 0 else round_filters(cin, width)
        cout = round_filters(cout, width)
        fixed = lite and stage_idx in (0, len(_B0_STAGES) - 1)
        n = repeats if fixed else round_repeats(repeats, depth)
        for i in range(n):
            block_in = cin if i == 0 else cout
            se = 0 if lite else max(1, int(block_in * SE_RATIO))
            blocks.append(BlockSpec(k, s if i == 0 else 1, e, block_in, cout, se, stage_idx))
    return ArchSpec(
        name=name,
        native_resolution=resolution,
        stem_channels=stem,
        blocks=tuple(blocks),
        head_channels=1280 if lite else round_filters(1280, width),
        activation="relu6" if lite else "swish",
        mean=LITE_MEAN if lite else IMAGENET_MEAN,
        std=LITE_STD if lite else IMAGENET_STD,
    )


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (low, high) of one spatial axis of the given size."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_padding(rule: str, actual: tuple[int, int], native: tuple[int, int], kernel: int, stride: int):
    """Explicit ((top, bottom), (left, right)) padding of a k x k / stride convolution.

    rule "tf-same": SAME padding for the actual input size (TF, timm `tf_*`, lukemelas with
    image_size=None). rule "static": SAME padding computed once for the architecture's native
    resolution (lukemelas' Conv2dStaticSamePadding, what UniAD/MaskAD's features are), whatever
    the actual input size.
    """
    if rule == "tf-same":
        sizes = actual
    elif rule == "static":
        sizes = native
    else:
        raise ConfigError(f"padding rule must be 'tf-same' or 'static', got {rule!r}")
    return tuple(same_padding(n, kernel, stride) for n in sizes)


def native_sizes(arch: ArchSpec) -> tuple[int, ...]:
    """Spatial size at the input of each block when the network sees its native resolution."""
    size = -(-arch.native_resolution // 2)  # after the stride-2 stem
    sizes = []
    for b in arch.blocks:
        sizes.append(size)
        size = -(-size // b.stride)
    return tuple(sizes)

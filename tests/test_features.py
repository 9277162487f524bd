"""Feature extractor: both bilinear resizes vs torch, taps and channels, real ImageNet weights."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from maskad_jax.data.preprocess import preprocess_image
from maskad_jax.models import efficientnet_arch as ea
from maskad_jax.models.features import FeatureExtractor
from maskad_jax.models.resize import resize_align_corners, resize_half_pixel, resize_map_align_corners

ALIGN_CORNERS = [
    ((112, 112), (14, 14)),
    ((56, 40), (14, 9)),
    ((14, 14), (224, 224)),
    ((7, 5), (1, 3)),
    ((1, 1), (4, 4)),
]
# half-pixel: PatchCore's alignment of the stride-16 tap onto the stride-8 grid (fit.fine_join = bilinear)
HALF_PIXEL = [((14, 14), (28, 28)), ((7, 10), (28, 40)), ((14, 9), (14, 9)), ((5, 3), (2, 7))]


@pytest.mark.parametrize(
    "align_corners,src,dst", [(True, *c) for c in ALIGN_CORNERS] + [(False, *c) for c in HALF_PIXEL]
)
def test_bilinear_resizes_match_torch(align_corners, src, dst):
    from helpers import torch_or_skip

    torch = torch_or_skip()
    x = np.random.default_rng(0).normal(size=(2,) + src + (3,)).astype(np.float32)
    ref = (
        torch.nn.functional.interpolate(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), size=dst, mode="bilinear", align_corners=align_corners
        )
        .numpy()
        .transpose(0, 2, 3, 1)
    )
    resize = resize_align_corners if align_corners else resize_half_pixel
    np.testing.assert_allclose(np.asarray(resize(jnp.asarray(x), dst)), ref, atol=5e-5)


def test_half_pixel_hand_worked_case():
    # 2 -> 4 samples at -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    out = resize_half_pixel(jnp.asarray([[0.0, 4.0]])[..., None], (1, 4))[..., 0]
    np.testing.assert_allclose(np.asarray(out), [[0.0, 1.0, 3.0, 4.0]])


def test_align_corners_hand_worked_case():
    # 3 -> 5 samples at 0, 0.5, 1, 1.5, 2: exact midpoints, no smoothing of the endpoints.
    out = resize_map_align_corners(jnp.asarray([[0.0, 2.0, 10.0]]), (1, 5))
    np.testing.assert_allclose(np.asarray(out), [[0.0, 1.0, 2.0, 6.0, 10.0]])
    # 5 -> 3 keeps samples 0, 2, 4: no anti-aliasing when shrinking.
    out = resize_map_align_corners(jnp.asarray([[1.0, 100.0, 3.0, -100.0, 5.0]]), (1, 3))
    np.testing.assert_allclose(np.asarray(out), [[1.0, 3.0, 5.0]])


def test_feature_map_shape_and_channels_come_from_the_architecture():
    ex = FeatureExtractor.create("efficientnet-lite0", weights="random")
    assert ex.channels == 16 + 24 + 40 + 112 == 192
    assert ex.arch.tap_blocks() == (0, 2, 4, 10)
    assert ea.get_arch("efficientnet-b4").tap_channels() == (24, 32, 56, 160)
    h = ex(jnp.zeros((2, 224, 224, 3)))
    assert h.shape == (2, 14, 14, 192) == (2,) + ex.feature_shape(224)
    # Only the blocks up to the last tap are built.
    assert {k for k in ex.variables["params"] if k.startswith("blocks_")} == {f"blocks_{i}" for i in range(11)}


def test_feature_map_equals_manual_composition():
    """h = concat(resize(tap_i)) of the normalised image, tap by tap."""
    ex = FeatureExtractor.create("efficientnet-lite0", weights="random", seed=3)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 224, 224, 3)).astype(np.float32))
    import jax

    taps = jax.jit(ex.module.apply)(ex.variables, (x - jnp.asarray(ex.arch.mean)) / jnp.asarray(ex.arch.std))
    manual = jnp.concatenate([resize_align_corners(t, (14, 14)) for t in taps], -1)
    # the same computation to float rounding (XLA fuses the two programs differently: up to 7e-5 on values
    # near 12 with jaxlib 0.8.1, 1e-6 with 0.10.2)
    np.testing.assert_allclose(np.asarray(ex(x)), np.asarray(manual), rtol=1e-5, atol=1e-4)
    raw = ex(x, normalize=False)
    assert float(jnp.abs(raw - manual).max()) > 1e-3  # the unnormalised view is a different input


def _top5(ex, image):
    from maskad_jax.models import weights as W
    from maskad_jax.models.efficientnet import EfficientNet

    full = W.load_backbone_variables("efficientnet-lite0", "packaged")
    model = EfficientNet("efficientnet-lite0", "static", include_head=True)
    x = ex.normalize(jnp.asarray(preprocess_image(image))[None])
    import jax

    (logits,) = jax.jit(model.apply)(full, x)
    return list(np.argsort(-np.asarray(logits[0]))[:5])


def test_packaged_lite0_weights_recognise_real_photos():
    skimage_data = pytest.importorskip("skimage.data")
    ex = FeatureExtractor.create("efficientnet-lite0", weights="packaged")
    cats = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert cats & set(_top5(ex, Image.fromarray(skimage_data.chelsea())))
    cups = {967, 968, 504}  # espresso, cup, coffee mug
    assert cups & set(_top5(ex, Image.fromarray(skimage_data.coffee())))

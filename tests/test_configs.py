"""Every config and variant builds; variants change what they say."""

import pytest

from configs import default, demo, folder, mvtec, realiad, variants, visa


@pytest.mark.parametrize("module", [demo, folder, mvtec, visa, realiad])
@pytest.mark.parametrize("variant", ["", "smoke", "code", "smoke,ablation=rec_only", "code,ablation=no_rec"])
def test_configs_build(module, variant):
    c = module.get_config(variant)
    assert c.data.name in ("synthetic", "folder", "mvtec_ad", "visa", "real_iad")
    assert set(c.scoring.keys()) == set(default.get_config().scoring.keys())


def test_code_variant_and_ablations():
    c = mvtec.get_config("code")
    assert c.train.target == "unnormalized" and c.scoring.ot == "code" and not c.scoring.zero_mask
    assert c.model.reconstructor.encoder_depth + c.model.reconstructor.decoder_depth == 10
    p = mvtec.get_config("")
    assert p.model.backbone.arch == "efficientnet-b4" and p.scoring.zero_mask and p.train.weight_decay == 0.04
    r = mvtec.get_config("ablation=parallel_mpo")
    assert not r.scoring.use_reference and r.scoring.use_mpo
    with pytest.raises(ValueError, match="unknown ablation row"):
        mvtec.get_config("ablation=everything")
    with pytest.raises(ValueError, match="unknown config variant"):
        mvtec.get_config("fast")
    assert set(variants.ABLATIONS) >= {"rec_only", "parallel", "parallel_ref", "parallel_mpo", "full"}

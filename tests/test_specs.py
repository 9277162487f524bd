"""The typed specs the config is resolved into (maskad_jax/common/specs.py): they cover every config
field, carry the checks config_check runs, and give the same fingerprints and calibration signature
as the config itself did (checkpoints and fits written before the specs stay usable)."""

import dataclasses
import json
import re

import pytest

from configs import default, demo, folder
from maskad_jax.app import config_check
from maskad_jax.common import specs
from maskad_jax.common.errors import ConfigError
from maskad_jax.training.flow_fit import flow_fingerprint
from maskad_jax.training.train import model_fingerprint


def _leaves(d, prefix=""):
    out = set()
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
    return out


def _spec_leaves(cls, prefix):
    out = set()
    for f in specs.config_fields(cls):
        nested = specs.nested_spec(f)
        out |= _spec_leaves(nested, f"{prefix}{f.name}.") if nested else {prefix + f.name}
    return out


@pytest.mark.parametrize("config", [default.get_config(), demo.get_config("smoke"), folder.get_config("paper")])
def test_the_specs_cover_every_config_field_and_no_other(config):
    fields = {"seed", "name"} | set().union(*(_spec_leaves(c, f"{s}.") for s, c in specs.SECTIONS.items()))
    assert _leaves(config) | {"name"} == fields


def test_resolve_gives_the_config_values_and_the_resolved_facts():
    c = demo.get_config("smoke")
    c.train.target, c.data.geometry, c.eval.frame = "unnormalized", "pad", "auto"
    s = specs.resolve(c)
    assert s.data.image_size == c.data.image_size and s.model.reconstructor.embed_dim == 32
    assert s.model.backbone.strides == tuple(c.model.backbone.strides)
    assert s.train.regress_raw and s.scoring.regress_raw and s.scoring.seed == c.seed == s.fit.seed
    assert s.eval.resolved_frame == "image"  # auto: image for every geometry but crop
    assert dataclasses.replace(s.eval, geometry="crop").resolved_frame == "input"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.scoring.mpo = "flow"


def test_the_calibration_signature_is_the_scoring_section_without_its_placement_fields():
    c = demo.get_config("smoke")
    by_hand = json.loads(c.scoring.to_json(sort_keys=True))
    for placement in ("branches_per_step", "devices", "ot_sequential"):
        by_hand.pop(placement)
    assert specs.scoring_signature(specs.resolve(c).scoring) == by_hand
    assert set(specs.after_terms_fields()) == {"sigma", "pixel_map"}


def test_the_fingerprints_are_the_fields_that_define_a_trained_model():
    c = demo.get_config("smoke")
    s = specs.resolve(c)
    r = c.model.reconstructor
    assert model_fingerprint(s.model, s.data.image_size, s.train.target, 320) == {
        "backbone": {"arch": "efficientnet-lite0", "padding": "static", "strides": [2, 4, 8, 16]},
        "reconstructor": {
            k: r[k]
            for k in ("embed_dim", "encoder_depth", "decoder_depth", "num_heads", "mlp_ratio", "drop_path")
            + ("layer_scale_init",)
        },
        "in_channels": 320,
        "image_size": 64,
        "target": "same",
    }
    c.flow.features = "backbone"
    f = specs.resolve(c).flow
    assert flow_fingerprint(f, 8) == {
        "channels": 8,
        "features": "backbone",
        "blocks": 2,
        "cond_dim": 16,
        "hidden_ratio": 2.0,
        "clamp": 1.9,
        "clamp_form": "current",
        "seed": 0,
        "backbone": {"arch": "efficientnet-b6", "padding": "tf-same", "strides": [8, 16], "pool_ratio": 0.01},
    }


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("data.geometry", "stretch", "data.geometry = 'stretch': must be one of crop | resize | pad"),
        ("data.eval_batch_size", 0, "data.eval_batch_size = 0: must be an integer in [1, 1024]"),
        ("scoring.epsilon", 0.0, "scoring.epsilon = 0.0: must be a finite number > 0"),
        ("model.reconstructor.attention", "flash", "model.reconstructor.attention = 'flash': must be one of"),
        ("train.devices", "some", "train.devices = 'some': must be one of auto | all | one"),
    ],
)
def test_config_check_takes_its_per_field_checks_from_the_specs(field, value, message):
    c = demo.get_config("smoke")
    section, name = field.rsplit(".", 1)
    node = c
    for part in section.split("."):
        node = node[part]
    node[name] = value
    with pytest.raises(ConfigError, match="invalid config: " + re.escape(message)):
        config_check.validate(c)


def test_the_serve_and_flow_fields_are_checked_only_where_used():
    c = demo.get_config("smoke")
    c.serve.port, c.flow.blocks = 0, 0
    config_check.validate(c)  # neither a server nor a flow in this run
    with pytest.raises(ConfigError, match="serve.port = 0"):
        config_check.validate(c, "serve")
    c.scoring.mpo = "flow"
    with pytest.raises(ConfigError, match="flow.blocks = 0"):
        config_check.validate(c)

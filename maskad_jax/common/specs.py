"""The config, resolved once into small typed specs (frozen dataclasses), one per section.

run.py and notebooks hand an ml_collections config to app/pipeline.train_and_evaluate, which checks it
(app/config_check.py, from the metadata here) and resolves it with `resolve`; below pipeline every
function takes a spec or plain arguments. What each field means and its default are in
maskad_jax/configs/default.py; here each field carries:
  - its allowed values (`choices`, or `kind` int | number with `low` / `high`): config_check derives
    its per-field checks from them;
  - its role: "model" (defines a trained reconstructor: in train.model_fingerprint), "flow_model"
    (defines a trained flow: flow_fit.flow_fingerprint), "placement" (how the work is laid out, not
    the scores: left out of the calibration's signature), "after_terms" (acts after the two scoring
    terms: changes scores, not the terms' statistics).
"Auto" choices and facts several modules need are resolved once, as properties of the specs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def field(*, choices=None, kind=None, low=None, high=None, low_open=False, role=None):
    meta = dict(choices=choices, kind=kind, low=low, high=high, low_open=low_open, role=role)
    return dataclasses.field(metadata=meta)


def _int(low=None, high=None, role=None):
    return field(kind="int", low=low, high=high, role=role)


def _num(low=None, high=None, low_open=False, role=None):
    return field(kind="number", low=low, high=high, low_open=low_open, role=role)


def _one_of(*choices, role=None):
    return field(choices=choices, role=role)


def _any(role=None):
    return field(role=role)


BOOL = (False, True)
DEVICES = ("auto", "all", "one")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    name: str = _one_of("synthetic", "mvtec_ad", "visa", "real_iad", "folder")
    config: str = _any()
    manual_dir: str = _any()
    tfds_dir: str = _any()
    classes: tuple = _any()
    image_size: int = _int(32, 4096, role="model")
    geometry: str = _one_of("crop", "resize", "pad")
    validation: str = _any()
    ignore_masks: str = _any()
    tiles: tuple = _any()  # () or (rows, cols): checked in config_check
    tile_overlap: float = _num(0, 0.75)
    num_workers: int = _int(0)
    # images per scoring batch; above 1024 one batch of 224 px images alone needs over 600 MB of input
    # and far more in the program (a million would ask for tens of GB before the first image)
    eval_batch_size: int = _int(1, 1024)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A backbone: flow.backbone (the flow's own), and model.backbone with its depthwise choice."""

    arch: str = _any(role="model")
    weights: str = _any()
    padding: str = _one_of("static", "tf-same", role="model")
    strides: tuple = _any(role="model")


@dataclasses.dataclass(frozen=True)
class ModelBackboneSpec(BackboneSpec):
    """model.backbone; its depthwise choice also runs the flow's backbone (same results either way)."""

    depthwise: str = _one_of("auto", "conv", "shifts")


@dataclasses.dataclass(frozen=True)
class ReconstructorSpec:
    embed_dim: int = _int(1, role="model")
    encoder_depth: int = _int(0, role="model")
    decoder_depth: int = _int(0, role="model")
    num_heads: int = _int(1, role="model")
    mlp_ratio: float = _num(0, low_open=True, role="model")
    drop_path: float = _num(0, 1, role="model")
    layer_scale_init: float = _any(role="model")
    attention: str = _one_of("einsum", "jax_xla", "jax_cudnn")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    dtype: str = _one_of("float32", "bfloat16")
    backbone: ModelBackboneSpec = _any()
    reconstructor: ReconstructorSpec = _any()


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    epochs: int = _int(1)
    batch_size: int = _int(1)
    lr: float = _num(0, low_open=True)
    min_lr: float = _num(0)
    warmup_epochs: float = _num(0)
    weight_decay: float = _num(0)
    clip_norm: float = _num(0, low_open=True)
    target: str = _one_of("same", "unnormalized", role="model")
    mask_probs: tuple = _any()  # three non-negative numbers: checked in config_check
    random_ratio: float = _num(0, 1, low_open=True)
    block_ratio: float = _num(0, 1, low_open=True)
    foreground_ratio: float = _num(0, 1, low_open=True)
    device_cache_gb: float = _num(0)
    devices: str = _one_of(*DEVICES)
    log_every: int = _int(1)
    eval_every: int = _int(0)
    eval_rows: tuple = _any()  # rows of engine/ablations.py: checked in config_check
    eval_images: int = _int(2)
    checkpoint_every: int = _int(1)
    max_to_keep: int = _int(1)
    seed: int = _any()  # config.seed

    @property
    def regress_raw(self) -> bool:
        """The released code's target: features of the unnormalised image (train.target = unnormalized)."""
        return self.target == "unnormalized"


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    """Checked only when scoring.mpo = flow."""

    features: str = _one_of("reconstructor", "backbone", role="flow_model")
    backbone: BackboneSpec = _any()
    pool_ratio: float = _num(0, 1, low_open=True)
    blocks: int = _int(1, role="flow_model")
    cond_dim: int = _any(role="flow_model")  # a positive multiple of 4: checked in config_check
    hidden_ratio: float = _any(role="flow_model")
    clamp: float = _any(role="flow_model")
    clamp_form: str = _one_of("current", "legacy", role="flow_model")
    epochs: int = _int(1)
    batch_size: int = _int(1)
    lr: float = _num(0, low_open=True)
    warmup_epochs: float = _any()
    log_every: int = _int(1)
    checkpoint_every: int = _int(1)
    max_to_keep: int = _int(1)
    device_cache_gb: float = _any()
    seed: int = _any(role="flow_model")  # config.seed


FINE_JOINS = ("repeat", "bilinear")


@dataclasses.dataclass(frozen=True)
class FineEmbedding:
    """Which taps make the fine embedding (their strides, finest first) and how the coarser ones join
    the finest grid (fit.fine_join): repeat | bilinear (pooled_embedding)."""

    strides: tuple
    join: str = "repeat"


@dataclasses.dataclass(frozen=True)
class FitSpec:
    pool_ratio: float = _num(0, 1, low_open=True)
    projection_dim: int = _int(0)
    per_class: bool = _any()
    calibration_fraction: float = _num(0, 0.9)
    calibration_folds: int = _int(0)
    max_pool_tokens: int = _int(1)
    fine_strides: tuple = _any()  # some of model.backbone.strides: checked in config_check
    fine_pool_ratio: float = _num(0, 1, low_open=True)
    fine_join: str = _one_of(*FINE_JOINS)
    seed: int = _any()  # config.seed


@dataclasses.dataclass(frozen=True)
class ScoringSpec:
    """The scoring.* fields, then (role "context", not config fields of this section) what the test-time
    program takes from elsewhere: the seed of its random masks, the fine strides of scoring.knn_fine,
    and whether the target is the unnormalised image's features."""

    mpo: str = _one_of("knn", "flow", "none")
    mpo_normalisation: str = _one_of("calibration", "test_max")
    knn_fine: bool = _one_of(*BOOL)
    prototype_ratios: tuple = _any()  # each in (0, 1]: checked in config_check
    num_random: int = _int(0)
    random_ratio: float = _num(0, 1, low_open=True)
    num_block: int = _int(0)
    block_ratio: float = _num(0, 1, low_open=True)
    zero_mask: bool = _any()
    squared_error: bool = _any()
    error_units: str = _one_of("reference", "absolute")
    use_reference: bool = _any()
    use_assdis: bool = _any()
    use_rec: bool = _any()
    use_mpo: bool = _any()
    ot: str = _one_of("paper", "exact", "code")
    epsilon: float = _num(0, low_open=True)
    sinkhorn_iterations: int = _int(1)
    ot_sequential: bool = _one_of(*BOOL, role="placement")
    combine: str = _one_of("paper", "code")
    ot_weight: float = _any()
    ot_scale: float = _any()
    mpo_fusion: str = _one_of("product", "sum")
    pixel_map: str = _one_of("score", "mpo", role="after_terms")
    sigma: float = _num(0, role="after_terms")
    test_drop_path: bool = _any()
    branches_per_step: int = _int(0, role="placement")
    devices: str = _one_of(*DEVICES, role="placement")
    seed: int = _any(role="context")
    fine_strides: tuple = _any(role="context")
    fine_join: str = _any(role="context")
    regress_raw: bool = _any(role="context")

    @property
    def fine(self) -> bool:
        """M_po on two grids (scoring.knn_fine with the kNN M_po)."""
        return bool(self.knn_fine) and self.mpo == "knn"


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    protocol: str = _one_of("exact", "binned", "ader")
    bins: int = _int(2)
    frame: str = _one_of("auto", "input", "image")
    geometry: str = _any(role="context")  # data.geometry

    @property
    def resolved_frame(self) -> str:
        """input | image: auto is input for crop (the paper's protocol), image otherwise."""
        if self.frame != "auto":
            return self.frame
        return "input" if self.geometry == "crop" else "image"


@dataclasses.dataclass(frozen=True)
class PredictSpec:
    input: str = _any()
    class_name: str = _any()
    threshold: Any = _any()  # a number, a mapping or "a=1,b=2": checked in config_check
    threshold_quantile: float = _num(0, 1, low_open=True)
    threshold_rule: str = _one_of("quantile", "f1", "auto")


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    platforms: tuple = _any()  # a subset of cpu | cuda | rocm | tpu: checked in config_check
    onnx: str = _one_of("auto", "yes", "no")
    onnx_batch: int = _int(1)
    config_sha256: str = _any(role="context")  # of the config as given (sorted JSON): the manifest's fingerprint


@dataclasses.dataclass(frozen=True)
class ServeSpec:
    """Checked only with --mode=serve."""

    port: int = _int(1, 65535)
    host: str = _any()
    max_batch: int = _int(1, 4096)
    max_wait_ms: float = _num(0, 10000)
    max_bytes: int = _int(1)
    max_images: int = _int(1, 4096)
    max_pixels: int = _int(1)
    max_request_pixels: int = _int(1)
    max_inflight_pixels: int = _int(1)
    max_request_bytes: int = _int(1)
    max_queue: int = _int(1)
    display_size: int = _int(16, 8192)
    token_file: str = _any()
    runtime: str = _one_of("auto", "stablehlo", "onnx")


@dataclasses.dataclass(frozen=True)
class NewImagesSpec:
    input: str = _any()
    class_name: str = _any()


@dataclasses.dataclass(frozen=True)
class Specs:
    """Every section, resolved: what pipeline hands down, one spec at a time."""

    name: str
    data: DataSpec
    model: ModelSpec
    train: TrainSpec
    flow: FlowSpec
    fit: FitSpec
    scoring: ScoringSpec
    eval: EvalSpec
    predict: PredictSpec
    export: ExportSpec
    serve: ServeSpec
    new_images: NewImagesSpec
    config_json: str  # the config as given, for config.json and the report


# the sections in the order config_check reports their problems, with their spec classes
SECTIONS = {
    "data": DataSpec,
    "model": ModelSpec,
    "train": TrainSpec,
    "fit": FitSpec,
    "scoring": ScoringSpec,
    "flow": FlowSpec,
    "eval": EvalSpec,
    "predict": PredictSpec,
    "export": ExportSpec,
    "serve": ServeSpec,
    "new_images": NewImagesSpec,
}


_SPEC_CLASSES = {c.__name__: c for c in (BackboneSpec, ModelBackboneSpec, ReconstructorSpec)}


def nested_spec(f):
    """The spec class of a nested section's field (model.backbone, flow.backbone, ...), else None."""
    return _SPEC_CLASSES.get(f.type)


def config_fields(cls) -> list:
    """The dataclass fields of cls that are config fields (not resolved context)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("role") != "context" and f.name != "seed"]


def _plain(value):
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def build(cls, section, **context):
    """cls from a config section (ml_collections.ConfigDict or dict): nested specs built in turn."""
    values = {}
    for f in config_fields(cls):
        v = section[f.name]
        nested = _SPEC_CLASSES.get(f.type)
        values[f.name] = build(nested, v) if nested is not None else _plain(v)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**values, **{k: v for k, v in context.items() if k in names})


def resolve(config) -> Specs:
    """The config's sections as specs (the config is checked first: app/config_check.validate)."""
    seed = int(config.seed)
    d = build(DataSpec, config.data)
    train = build(TrainSpec, config.train, seed=seed)
    scoring = build(
        ScoringSpec,
        config.scoring,
        seed=seed,
        fine_strides=tuple(config.fit.fine_strides),
        fine_join=str(config.fit.fine_join),
        regress_raw=train.regress_raw,
    )
    return Specs(
        name=str(config.get("name", "run")),
        data=d,
        model=build(ModelSpec, config.model),
        train=train,
        flow=build(FlowSpec, config.flow, seed=seed),
        fit=build(FitSpec, config.fit, seed=seed),
        scoring=scoring,
        eval=build(EvalSpec, config.eval, geometry=d.geometry),
        predict=build(PredictSpec, config.predict),
        export=build(ExportSpec, config.export, config_sha256=_sha256(config.to_json(sort_keys=True))),
        serve=build(ServeSpec, config.serve),
        new_images=build(NewImagesSpec, config.new_images),
        config_json=config.to_json_best_effort(indent=2),
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def with_role(spec, role: str) -> dict:
    """{field: JSON value} of spec's fields of this role (nested specs as dicts of theirs)."""
    return {f.name: _json(getattr(spec, f.name)) for f in dataclasses.fields(spec) if f.metadata.get("role") == role}


def _json(value):
    return json.loads(json.dumps(value))


def scoring_signature(sc: ScoringSpec) -> dict:
    """The scoring settings held-out scores are computed under (every scoring.* field but the
    placement ones): a threshold calibrated from them is a threshold for these settings only."""
    return {
        f.name: _json(getattr(sc, f.name))
        for f in sorted(config_fields(ScoringSpec), key=lambda f: f.name)
        if f.metadata.get("role") != "placement"
    }


def after_terms_fields() -> tuple:
    return tuple(f.name for f in dataclasses.fields(ScoringSpec) if f.metadata.get("role") == "after_terms")

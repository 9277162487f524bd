"""The frozen backbones built from a config, and the feature cache of a split.

The backbone runs once per image: `extract_features` computes h (and the unnormalised view's
features when training regresses them) for a whole split, in order. With several processes
(jax.distributed) each extracts a contiguous share on its own devices and the shares are gathered,
so every process holds the whole cache after 1/P of the work.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from maskad_jax.common import progress
from maskad_jax.common.batching import run_batched, split_batches
from maskad_jax.common.parallel import gather_rows, local_batch_sharding, process_share
from maskad_jax.common.specs import DataSpec, FineEmbedding, FlowSpec, ModelSpec
from maskad_jax.data.splits import SplitData, eval_batches
from maskad_jax.models.features import FeatureExtractor
from maskad_jax.models.flow_features import FlowEmbedder


def make_extractor(ms: ModelSpec, seed: int) -> FeatureExtractor:
    """model.backbone as a FeatureExtractor (weights loaded)."""
    b = ms.backbone
    return FeatureExtractor.create(
        b.arch,
        weights=b.weights,
        padding=b.padding,
        strides=tuple(b.strides),
        dtype=jnp.dtype(ms.dtype),
        seed=seed,
        depthwise=b.depthwise,
    )


def make_flow_embedder(fs: FlowSpec, ms: ModelSpec) -> FlowEmbedder:
    """The flow's own backbone (flow.features = 'backbone'), built like make_extractor's."""
    return FlowEmbedder.create(fs, dtype=jnp.dtype(ms.dtype), seed=fs.seed, depthwise=ms.backbone.depthwise)


def feature_fn(extractor, with_target: bool, fine=None):
    """f(variables, images) -> (h_in, h_tgt or None, the fine embedding `fine` (FineEmbedding) or None):
    the features training, the fit and --mode=update compute from one backbone pass."""

    def features(v, x):
        h, f = extractor.apply_with_fine(v, x, fine) if fine else (extractor.apply(v, x, normalize=True), None)
        return h, (extractor.apply(v, x, normalize=False) if with_target else None), f

    return features


@dataclasses.dataclass(frozen=True)
class FeatureRequest:
    """Which features a backbone pass computes: with_target (the unnormalised view's features too,
    train.regress_raw), fine (the fine embedding, or None: fine_embedding), desc (the
    progress bar's and log line's name)."""

    with_target: bool
    fine: FineEmbedding | None = None
    desc: str = "features"


@dataclasses.dataclass(frozen=True)
class Features:
    """A split's backbone features, one row per image (or tile) in order: h_in (N, gh, gw, C); h_tgt
    (the unnormalised view's, or None); keys (N,) the image keys; fine (the fine embedding, or None);
    boxes (N, 4) each image's content box in the input frame."""

    h_in: np.ndarray
    h_tgt: np.ndarray | None
    keys: np.ndarray
    fine: np.ndarray | None
    boxes: np.ndarray

    @property
    def target(self) -> np.ndarray:
        """The reconstruction's target: h_tgt, or h_in where training regresses h_in itself."""
        return self.h_in if self.h_tgt is None else self.h_tgt

    def rows(self, at) -> "Features":
        """The rows at `at` (an index array), every field alike."""
        values = (getattr(self, f.name) for f in dataclasses.fields(self))  # astuple would deep-copy
        return Features(*(None if a is None else a[at] for a in values))


def extract_features(extractor, data: SplitData, d: DataSpec, want: FeatureRequest) -> Features:
    """Backbone features of a whole split, in order."""
    return extract_at(extractor, data, d, want, np.arange(len(data)))


def extract_at(extractor, data: SplitData, d: DataSpec, want: FeatureRequest, positions) -> Features:
    """extract_features for the images at `positions` only (rows in that order); with several
    processes each extracts a share and every process gets all rows."""
    positions = np.asarray(positions, np.int64)
    share = process_share(len(positions))
    fields = ("box", "fine") if want.fine else ("box",)
    h_in, h_tgt, keys, extra = extract_positions(extractor, data, d, want, positions[share], fields)
    return Features(*gather_rows(len(positions), share, h_in, h_tgt, keys, extra.get("fine"), extra["box"]))


def extract_positions(extractor, data: SplitData, d: DataSpec, want: FeatureRequest, positions, fields=()):
    """Features of the split's images at `positions` (this process's devices): (h_in, h_tgt or None,
    image keys, {field: the batches' values of each of `fields`, e.g. "mask", "label"}). The field
    "fine" is the fine embedding want.fine (FeatureExtractor.apply_with_fine), from the
    same backbone pass as h_in."""
    with_target, desc, fine = want.with_target, want.desc, want.fine
    shard = local_batch_sharding(d.eval_batch_size)
    features = feature_fn(extractor, with_target, fine)
    fn = jax.jit(features)
    t0 = time.time()
    batches = eval_batches(
        data,
        d.eval_batch_size,
        image_size=d.image_size,
        num_workers=d.num_workers,
        positions=positions,
        geometry=d.geometry,
    )
    host = ("image_key",) + tuple(f for f in fields if f != "fine")
    with progress.bar(len(positions), desc) as pbar:
        res, kept = run_batched(
            lambda x: dict(zip(("h_in", "h_tgt", "fine"), fn(extractor.variables, x))),
            split_batches(batches, lambda b: (b["image"],), host),
            place=lambda a: jax.device_put(a, shard),
            bar=pbar,
        )
    n_done = 0 if res is None else len(res["h_in"])
    progress.log(
        f"{desc} of {n_done} images{' (both views)' if with_target else ''}: "
        f"{n_done / max(time.time() - t0, 1e-9):.1f} img/s"
    )
    if not n_done:  # an empty share (fewer images than processes)
        empty = np.zeros((0,) + tuple(extractor.feature_shape(d.image_size)), np.float32)
        x = jax.ShapeDtypeStruct((1, d.image_size, d.image_size, 3), jnp.float32)
        none = {f: None for f in fields}
        if "box" in fields:
            none["box"] = np.zeros((0, 4), np.int32)
        if fine:  # the fine embedding's shape, so the processes' shares still gather
            none["fine"] = np.zeros((0,) + jax.eval_shape(features, extractor.variables, x)[2].shape[1:], np.float32)
        return empty, (empty if with_target else None), np.zeros((0,), np.int32), none
    extra = {f: (res["fine"] if f == "fine" else kept[f]) for f in fields}
    return res["h_in"], (res["h_tgt"] if with_target else None), kept["image_key"], extra

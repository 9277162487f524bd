"""The released code's transductive M_po normalisation (scoring.mpo_normalisation = test_max, eval only):
the M_po scale of each class taken from the class's whole test set before it is scored."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maskad_jax.common import progress
from maskad_jax.common.batching import run_batched, split_batches
from maskad_jax.common.parallel import (
    gather_max,
    process_share,
    scoring_sharding,
)
from maskad_jax.common.specs import DataSpec, ScoringSpec
from maskad_jax.data.splits import eval_batches
from maskad_jax.engine.coreset import nearest_in_pools
from maskad_jax.engine.mpo import flow_logp_fn
from maskad_jax.engine.trained_model import TrainedModel


# ------------------------------------------------------------- the released code's test-set normalisation
def normalise_on_the_test_set(sc: ScoringSpec, d: DataSpec, tm: TrainedModel, dev_pools: dict, data):
    """scoring.mpo_normalisation = test_max: M_po's scale from the class's whole test set (in place in
    dev_pools, the trained model's pools placed for scoring): the flow's L_ref, or the
    nearest-neighbour distances' scale."""
    if tm.mpo.kind == "flow":
        dev_pools["flow"]["logp_ref"] = jnp.asarray(_test_max_flow_ref(sc, d, tm, dev_pools, data))
    else:
        dev_pools["cal_scale"] = jnp.asarray(_test_max_scale(sc, d, tm.extractor, tm.pools, dev_pools, data))
    progress.log("M_po normalised by the max over each class's test set (transductive, as the released code)")


def _per_pool_test_max(sc: ScoringSpec, d: DataSpec, extractor, pools, data, image_max) -> np.ndarray:
    """Per pool: the max over its class's test images of image_max(backbone_vars, images, pool_idx) -> (B,).
    -inf for a pool without test images."""
    out = np.full(len(pools.class_names), -np.inf, np.float32)
    shard = scoring_sharding(sc.devices, d.eval_batch_size)
    fn = jax.jit(image_max)
    batches = eval_batches(
        data,
        d.eval_batch_size,
        image_size=d.image_size,
        num_workers=d.num_workers,
        positions=process_share(len(data)),
        geometry=d.geometry,
    )
    res, _ = run_batched(
        lambda x, pidx: {"max": fn(extractor.variables, x, pidx), "pool": pidx},
        split_batches(batches, lambda b: (b["image"], pools.pool_index([data.class_names[c] for c in b["class_id"]]))),
        place=lambda a: jax.device_put(a, shard),
    )
    if res is not None:
        np.maximum.at(out, res["pool"], res["max"])
    return gather_max(out)  # each process saw its share of the test images


def _test_max_scale(sc: ScoringSpec, d: DataSpec, extractor, pools, dev_pools, data) -> np.ndarray:
    """Per pool: the largest nearest-pool distance over all test tokens of its images (code variant)."""

    def max_dist(v, x, pidx):
        h = extractor.apply(v, x)
        b, gh, gw, c = h.shape
        dist, _ = nearest_in_pools(h.reshape(b, gh * gw, c), dev_pools["pool_in"], dev_pools["valid"], pidx)
        return jnp.sqrt(dist).max(axis=1)

    scale = _per_pool_test_max(sc, d, extractor, pools, data, max_dist)
    return np.where(scale > 0, scale, np.asarray(pools.cal_scale))


def _test_max_flow_ref(sc: ScoringSpec, d: DataSpec, tm: TrainedModel, dev_pools, data) -> np.ndarray:
    """Per pool: the largest flow log-likelihood over all test positions of its images (code variant)."""
    extractor, pools, flow = tm.extractor, tm.pools, tm.mpo
    fs = dev_pools["flow"]
    own = flow.embedder is not None  # the flow backbone's features and pool, else h and the fit's pools

    def max_logp(v, x, pidx):
        h = flow.embedder.apply(fs["backbone_vars"], x) if own else extractor.apply(v, x)
        b, gh, gw, c = h.shape
        pool, valid = (fs["pool"], fs["valid"]) if own else (dev_pools["pool_in"], dev_pools["valid"])
        lp = flow_logp_fn(flow.module, (gh, gw))(
            flow.params, h.reshape(b, gh * gw, c), pool, valid, pidx, flow.cond_dim
        )
        return lp.max(axis=1)

    ref = _per_pool_test_max(sc, d, extractor, pools, data, max_logp)
    return np.where(np.isfinite(ref), ref, np.asarray(flow.logp_ref))

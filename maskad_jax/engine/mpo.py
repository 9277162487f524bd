"""M_po, the prior-guided term (docs/method.md §6): one interface, two implementations, chosen once
from scoring.mpo (training/mpo.py builds, calibrates, saves and restores the one in use):

  NearestNeighbourMpo (knn, and none: the prototype masks still rank by it): each token's distance to
    the nearest token of its class's nominal pool over the pool's held-out scale (training/fit.py);
    with scoring.knn_fine also on the finer grid, the two maps averaged. Nothing of its own beyond
    the pools.
  FlowMpo (flow): 1 - exp(min(L - L_ref, 0)) from a conditional flow's log-likelihood L of each token's
    residual to its nearest pool token (models/flow.py, training/flow_fit.py), on the reconstructor's
    features or on a second backbone's.

Inside the scoring program both answer the same three questions: device_state() (what joins the
device pools), embed(dev_pools, images) (features of their own, or None) and map(...) (M_po on the
token grid, which the prototype masks rank, and M_po's map on its own grid).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from maskad_jax.engine.coreset import nearest_in_pools
from maskad_jax.models.flow import residual_logp
from maskad_jax.models.resize import resize_map_align_corners


def gather_pool(pool, pool_idx, idx):
    """The pool rows idx (B, n) of each image's pool: (B, n, C)."""
    return jnp.take_along_axis(pool[pool_idx], idx[..., None], axis=1)


def fine_knn(pools, fine, pool_idx):
    """fine (B, fh, fw, Cf) -> (B, fh, fw): each position's L2 distance to the nearest token of the
    image's fine pool over that pool's calibration scale (fit.py, the fine pool)."""
    b, fh, fw, c = fine.shape
    d, _ = nearest_in_pools(fine.reshape(b, fh * fw, c), pools["fine_in"], pools["fine_valid"], pool_idx)
    return (jnp.sqrt(d) / pools["fine_cal_scale"][pool_idx][:, None]).reshape(b, fh, fw)


def multiscale_mpo(mpo_tokens, mpo_fine):
    """The mean of the token-grid (B, gh, gw) and fine (B, fh, fw) kNN maps, both in units of their
    held-out normal distances, on the fine grid."""
    return 0.5 * (resize_map_align_corners(mpo_tokens, mpo_fine.shape[1:]) + mpo_fine)


def flow_logp_fn(flow, grid):
    """f(params, tokens (B, n, C), pools (K, P, C), valid (K, P), pool_idx (B,), cond_dim) ->
    log-likelihood (B, n), each image against its pool pools[pool_idx]."""

    def logp(params, tokens, pools, valid, pool_idx, cond_dim):
        _, idx = nearest_in_pools(tokens, pools, valid, pool_idx)
        r = tokens - jnp.take_along_axis(pools[pool_idx], idx[..., None], axis=1)
        return residual_logp(flow, params, r, grid, cond_dim)

    return logp


def flow_mpo(flow, flow_pools, tokens, residuals, pool_idx, grid, cond_dim, f_flow=None):
    """The flow's M_po map 1 - exp(min(L - L_ref, 0)): (B, gh, gw), or (B, fh, fw) on the flow
    backbone's own grid when f_flow (B, fh, fw, Cf) is given (flow.features = 'backbone')."""
    b = tokens.shape[0]
    if f_flow is None:  # the reconstructor's own features: the residuals to r are at hand
        fgrid = grid
        logp = residual_logp(flow, flow_pools["params"], residuals, fgrid, cond_dim)
    else:  # the flow backbone's features against its own pool
        fgrid = f_flow.shape[1:3]
        logp = flow_logp_fn(flow, fgrid)(
            flow_pools["params"],
            f_flow.reshape(b, fgrid[0] * fgrid[1], -1),
            flow_pools["pool"],
            flow_pools["valid"],
            pool_idx,
            cond_dim,
        )
    return (1.0 - jnp.exp(jnp.minimum(logp - flow_pools["logp_ref"][pool_idx][:, None], 0.0))).reshape((b,) + fgrid)


@dataclasses.dataclass(frozen=True)
class NearestNeighbourMpo:
    """The kNN M_po; fine: scoring.knn_fine (the fine grid's map averaged in)."""

    fine: bool = False
    kind: ClassVar[str] = "knn"
    own_features: ClassVar[bool] = False

    def device_state(self) -> dict:
        return {}

    def embed(self, dev_pools, images):
        return None

    def map(self, pools, tokens, idx, knn, pool_idx, grid, f_own=None, f_fine=None):
        b = tokens.shape[0]
        mpo_map = knn.reshape((b,) + grid)
        if self.fine:
            if f_fine is None:
                raise ValueError("scoring.knn_fine needs the fine embedding f_fine (FeatureExtractor.apply_with_fine)")
            mpo_map = multiscale_mpo(mpo_map, fine_knn(pools, f_fine, pool_idx))
        return knn, mpo_map


@dataclasses.dataclass
class FlowMpo:
    """A trained flow: its module and parameters, L_ref per pool, the positional encoding's size, and
    with flow.features = backbone its own backbone (embedder: models/flow_features.FlowEmbedder) and
    pool (engine/fit_state.Fit of that backbone's features)."""

    module: Any
    params: Any
    logp_ref: np.ndarray  # (K,) per pool
    cond_dim: int
    embedder: Any = None
    pools: Any = None
    kind: ClassVar[str] = "flow"

    @property
    def own_features(self) -> bool:
        return self.embedder is not None

    def device_state(self) -> dict:
        out = {"params": self.params, "logp_ref": jnp.asarray(self.logp_ref)}
        if self.embedder is not None:
            out.update(
                pool=jnp.asarray(self.pools.pool_in),
                valid=jnp.asarray(self.pools.valid),
                backbone_vars=self.embedder.variables,
            )
        return {"flow": out}

    def embed(self, dev_pools, images):
        return None if self.embedder is None else self.embedder.apply(dev_pools["flow"]["backbone_vars"], images)

    def map(self, pools, tokens, idx, knn, pool_idx, grid, f_own=None, f_fine=None):
        b, n = tokens.shape[:2]
        r_in = gather_pool(pools["pool_in"], pool_idx, idx)
        mpo_map = flow_mpo(self.module, pools["flow"], tokens, tokens - r_in, pool_idx, grid, self.cond_dim, f_own)
        mpo = mpo_map if mpo_map.shape[1:] == grid else resize_map_align_corners(mpo_map, grid)
        return mpo.reshape(b, n), mpo_map

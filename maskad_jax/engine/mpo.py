"""M_po's scoring side that is not a plain kNN distance: the flow's per-position log-likelihood of each
token's residual to its nearest nominal pool token (docs/method.md §6.1)."""

import jax.numpy as jnp

from maskad_jax.engine.coreset import nearest_in_pools
from maskad_jax.models.flow import residual_logp


def flow_logp_fn(flow, grid):
    """f(params, tokens (B, n, C), pools (K, P, C), valid (K, P), pool_idx (B,), cond_dim) ->
    log-likelihood (B, n), each image against its pool pools[pool_idx]."""

    def logp(params, tokens, pools, valid, pool_idx, cond_dim):
        _, idx = nearest_in_pools(tokens, pools, valid, pool_idx)
        r = tokens - jnp.take_along_axis(pools[pool_idx], idx[..., None], axis=1)
        return residual_logp(flow, params, r, grid, cond_dim)

    return logp

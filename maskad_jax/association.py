"""Association discrepancy: optimal transport between the error samples of h and of r.

paper_assdis: for each patch, the N errors of h and the N errors of r as two uniform 1-D
  distributions, cost |e_h_i - e_r_j|, entropic OT solved by ott-jax's Sinkhorn; AssDis = <P*, C>
  (or the regularised cost <P*, C> - eps H(P*) with `with_entropy`).
exact_assdis: the epsilon -> 0 limit in closed form: for equal-size uniform samples the optimal
  plan pairs sorted samples, so W1 = mean |sort(e_h) - sort(e_r)|.
code_assdis: the released code's OT (M:models/Sinkhorn_distance.py): per image one OT between the
  test patches and the reference patches, each described by its N-vector of errors, cost
  1 - cos, log-domain updates from zero potentials, stop when sum |u - u_old| < 0.1 (max 1000
  iterations); AssDis_i = sum_j P_ij C_ij.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn


def paper_assdis(e_h: jax.Array, e_r: jax.Array, epsilon: float, iterations: int = 200,
                 with_entropy: bool = False) -> jax.Array:
    """e_h, e_r: (..., N) error samples per patch -> (...) AssDis per patch."""
    batch = e_h.shape[:-1]
    n = e_h.shape[-1]
    eh, er = e_h.reshape(-1, n), e_r.reshape(-1, n)
    # (min_iterations is left at 0: with min_iterations == inner_iterations ott-jax 0.6 can stop after one
    # block of updates and report convergence.)
    solver = sinkhorn.Sinkhorn(threshold=1e-6, max_iterations=iterations)

    def one(a, b):
        cost = jnp.abs(a[:, None] - b[None, :])
        out = solver(linear_problem.LinearProblem(geometry.Geometry(cost, epsilon=epsilon)))
        transport = jnp.sum(out.matrix * cost)
        return out.reg_ot_cost if with_entropy else transport

    return jax.vmap(one)(eh, er).reshape(batch)


def exact_assdis(e_h: jax.Array, e_r: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(jnp.sort(e_h, axis=-1) - jnp.sort(e_r, axis=-1)), axis=-1)


def code_assdis(e_h: jax.Array, e_r: jax.Array, epsilon: float = 0.1, tol: float = 0.1, max_iter: int = 1000):
    """e_h, e_r: (P, N) per image (vmap over images) -> (P,) AssDis of each test patch."""
    a = e_h / jnp.maximum(jnp.linalg.norm(e_h, axis=-1, keepdims=True), 1e-8)
    b = e_r / jnp.maximum(jnp.linalg.norm(e_r, axis=-1, keepdims=True), 1e-8)
    cost = 1.0 - a @ b.T
    p, q = cost.shape
    log_mu = jnp.log(jnp.full((p,), 1.0 / p) + 1e-8)
    log_nu = jnp.log(jnp.full((q,), 1.0 / q) + 1e-8)

    def m(u, v):
        return (-cost + u[:, None] + v[None, :]) / epsilon

    def body(state):
        u, v, _, it = state
        u_new = epsilon * (log_mu - jax.nn.logsumexp(m(u, v), axis=1)) + u
        v_new = epsilon * (log_nu - jax.nn.logsumexp(m(u_new, v).T, axis=1)) + v
        return u_new, v_new, jnp.sum(jnp.abs(u_new - u)), it + 1

    def cond(state):
        return (state[2] >= tol) & (state[3] < max_iter)

    u, v, _, _ = jax.lax.while_loop(cond, body, (jnp.zeros(p), jnp.zeros(q), jnp.inf, 0))
    plan = jnp.exp(m(u, v))
    return jnp.sum(plan * cost, axis=1)

"""Association discrepancy: optimal transport between the error samples of h and of r.

paper_ot / paper_assdis: for each patch, the N errors of h and the N errors of r as two uniform
  1-D distributions, cost |e_h_i - e_r_j|, entropic OT solved by ott-jax's Sinkhorn (the paper's
  AssDis = <M*, C>). Made to converge on the error scales a trained model produces:
  - epsilon is relative: a fraction of the mean of each patch's cost matrix, so the same setting
    suits errors of 2 +- 0.5 and of 60 +- 20 (an absolute epsilon of 0.1 is too small for the
    200 iterations on the second, where the plan had not converged and its cost fell 20% below
    the exact optimum);
  - the solver starts from the exact 1-D problem's Kantorovich potentials (`w1_potentials`), with
    ott-jax's over-relaxation (momentum), and stops on its marginal-error threshold;
  - the plan it returns is rounded onto the marginals (Altschuler, Weed and Rigollet 2017, Alg. 2),
    so AssDis is the cost of a feasible transport plan and can never fall below the optimum;
  - convergence is checked by a duality gap: the c-transform of Sinkhorn's potential gives a
    lower bound on the optimum, so gap = cost - bound bounds the error. A patch whose gap exceeds
    `rtol` x max(cost, mean error) is "uncertified"; its AssDis is replaced by the exact optimum
    and the count is reported (OTResult.certified), never silently wrong.
exact_assdis: the epsilon -> 0 limit in closed form: for equal-size uniform samples the optimal
  plan pairs sorted samples, so W1 = mean |sort(e_h) - sort(e_r)|.
code_assdis: the released code's OT (its models/Sinkhorn_distance.py, docs/method.md §6.6): per image
  one OT between the test patches and the reference patches, each described by its N-vector of
  errors, cost 1 - cos, log-domain updates from zero potentials, stop when sum |u - u_old| < 0.1
  (max 1000 iterations); AssDis_i = sum_j P_ij C_ij.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class OTResult(NamedTuple):
    cost: jax.Array  # (...) AssDis per patch: the rounded plan's cost, or the exact optimum where uncertified
    certified: jax.Array  # (...) bool: the Sinkhorn plan's duality gap is within the tolerance
    gap: jax.Array  # (...) cost of the rounded plan minus the dual lower bound (>= the plan's excess over the optimum)


def exact_assdis(e_h: jax.Array, e_r: jax.Array) -> jax.Array:
    """The exact 1-D optimum (W1 between the uniform samples): (..., N), (..., N) -> (...)."""
    return jnp.mean(jnp.abs(jnp.sort(e_h, axis=-1) - jnp.sort(e_r, axis=-1)), axis=-1)


def w1_potentials(x: jax.Array, y: jax.Array):
    """Kantorovich potentials (f, g) of the exact W1 problem between uniform samples x, y (N,).

    For the cost |x - y| the optimal dual is g = -f with f 1-Lipschitz and f' = -sign(F_x - F_y)
    (F the empirical CDFs): integrating along the sorted union of the samples gives f at every
    sample. f_i + g_j <= |x_i - y_j| holds for all pairs and mean(f) + mean(g) = W1."""
    n = x.shape[0]
    z = jnp.concatenate([x, y])
    order = jnp.argsort(z)
    zs = z[order]
    cdf_diff = jnp.cumsum(jnp.concatenate([jnp.ones(n), -jnp.ones(n)])[order]) / n
    f_sorted = jnp.concatenate([jnp.zeros(1), jnp.cumsum(-jnp.sign(cdf_diff[:-1]) * jnp.diff(zs))])
    f_all = f_sorted[jnp.argsort(order)]  # back to the input order (a gather: jax2onnx has no rule for this scatter)
    return f_all[:n], -f_all[n:]


def round_to_marginals(plan: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """The nearby feasible plan of Altschuler et al. (2017), Algorithm 2: rows and columns scaled
    down to at most their marginals, then the missing mass added as a rank-one correction."""
    x = plan * jnp.minimum(a / jnp.maximum(plan.sum(1), 1e-30), 1.0)[:, None]
    y = x * jnp.minimum(b / jnp.maximum(x.sum(0), 1e-30), 1.0)[None, :]
    err_a, err_b = jnp.maximum(a - y.sum(1), 0.0), jnp.maximum(b - y.sum(0), 0.0)  # >= 0 up to rounding
    missing = jnp.sum(err_a)
    return y + jnp.where(missing > 1e-12, jnp.outer(err_a, err_b) / jnp.maximum(missing, 1e-12), 0.0)


def paper_ot(
    e_h: jax.Array,
    e_r: jax.Array,
    epsilon: float = 0.02,
    iterations: int = 200,
    threshold: float = 1e-3,
    rtol: float = 0.01,
    momentum: float = 1.5,
    sequential: bool = False,
) -> OTResult:
    """e_h, e_r: (..., N) error samples per patch -> OTResult of (...) arrays.

    epsilon: entropic regularisation as a fraction of each patch's mean cost; iterations: the most
    Sinkhorn iterations; threshold: ott-jax's stop on the L1 marginal error; rtol: the duality gap
    allowed, relative to max(cost, mean error of the two samples). sequential: solve the patches one
    after another (lax.map) instead of together (vmap): the same solutions (to float rounding), and
    the form the ONNX export converts (vmapped, ott's per-iteration error record becomes a batched
    scatter that jax2onnx 0.17.1 has no rule for)."""
    # ott-jax (with jaxopt, lineax, equinox: about 1.7 s to import) only when the paper's OT is scored
    from ott.geometry import epsilon_scheduler, geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import acceleration, sinkhorn

    batch = e_h.shape[:-1]
    n = e_h.shape[-1]
    eh, er = e_h.reshape(-1, n).astype(jnp.float32), e_r.reshape(-1, n).astype(jnp.float32)
    solver = sinkhorn.Sinkhorn(
        threshold=threshold,
        max_iterations=iterations,
        inner_iterations=10,
        momentum=acceleration.Momentum(value=momentum),
    )
    w = jnp.full((n,), 1.0 / n, jnp.float32)

    def one(x, y):
        cost = jnp.abs(x[:, None] - y[None, :])
        # a floor keeps epsilon positive when the two samples coincide (cost 0 everywhere)
        eps = epsilon * jnp.maximum(jnp.mean(cost), 1e-6 * (jnp.mean(jnp.abs(x)) + 1e-12))
        geom = geometry.Geometry(cost, epsilon=epsilon_scheduler.Epsilon(eps))
        out = solver(linear_problem.LinearProblem(geom), init=w1_potentials(x, y))
        plan = round_to_marginals(out.matrix, w, w)
        value = jnp.sum(plan * cost)
        f = jnp.where(jnp.isfinite(out.f), out.f, 0.0)
        g = jnp.min(cost - f[:, None], axis=0)  # c-transforms: a feasible dual pair
        f = jnp.min(cost - g[None, :], axis=1)
        gap = value - (jnp.mean(f) + jnp.mean(g))  # >= 0 for a feasible plan, up to float rounding
        tol = rtol * jnp.maximum(value, 0.5 * (jnp.mean(x) + jnp.mean(y)))
        return value, jnp.isfinite(value) & (jnp.abs(gap) <= tol), gap

    if sequential:
        value, ok, gap = jax.lax.map(lambda xy: one(*xy), (eh, er))
    else:
        value, ok, gap = jax.vmap(one)(eh, er)
    value = jnp.where(ok, value, exact_assdis(eh, er))
    return OTResult(value.reshape(batch), ok.reshape(batch), gap.reshape(batch))


def paper_assdis(
    e_h: jax.Array, e_r: jax.Array, epsilon: float = 0.02, iterations: int = 200, threshold: float = 1e-3
) -> jax.Array:
    """paper_ot's AssDis values only: (..., N), (..., N) -> (...)."""
    return paper_ot(e_h, e_r, epsilon, iterations, threshold).cost


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

"""Test-time scoring throughput: the fused one-program step against a Python loop over the masks.

    python benchmarks/scoring.py --model small        # dim 256, 4 blocks (the CPU-sized config)
    python benchmarks/scoring.py --model paper        # dim 768, 10 blocks (slow on a CPU)
    python benchmarks/scoring.py --model paper --channels 272 --dtype bfloat16 --batch 32 --backbone   # GPU

--backbone also times the whole step from 224 x 224 images (random-weight B4 at 272 channels,
Lite0 otherwise), as `scoring.make_score_fn` runs it in evaluation.

--scoring: paper (the default config's scoring: 13 masks, AssDis, the product), cpu (the CPU-sized
configs' scoring: 7 masks, Rec in reference units, the two-grid kNN M_po, z-sum, M_po's pixel map)
or cpu-before (the same as it was before issue #23: token-grid kNN only, the product). The fine
pool (cpu) is fitted on random 28 x 28 embeddings of --pool-images images, as the token pool is;
--pool-images 600 gives pools of a real class's size (magnetic tiles: 610 images in the pools).

Both paths compute the same thing from the same features: reference maps and M_po from a pool,
N masks per image, 2N reconstructions, errors, OT, combination, upsampling and smoothing. The
fused path is `scoring.make_score_features_fn` under one jit; the loop path calls a jitted
reconstruction once per mask (2N calls per batch) and a jitted tail. Random weights, Lite0-sized
features (192 channels, 14 x 14), 13 masks (the paper's N). Reports images/s, the ratio, the
reconstructor stage's GFLOP/s, peak RSS and, on a GPU/TPU, the device memory peak.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from benchmarks.memory_report import memory_report  # noqa: E402
from configs import default, variants  # noqa: E402
from maskad_jax.common.parallel import data_mesh  # noqa: E402
from maskad_jax.common.specs import resolve
from maskad_jax.engine import association  # noqa: E402
from maskad_jax.engine.coreset import nearest  # noqa: E402
from maskad_jax.engine.scoring import (  # noqa: E402
    device_pools,
    make_masks,
    make_score_features_fn,
    make_score_fn,  # noqa: E402
    num_masks,
)
from maskad_jax.engine.smoothing import gaussian_smooth  # noqa: E402
from maskad_jax.models.features import FeatureExtractor  # noqa: E402
from maskad_jax.models.reconstructor import (
    build_reconstructor,  # noqa: E402
    patch_errors,  # noqa: E402
)
from maskad_jax.models.resize import resize_map_align_corners  # noqa: E402
from maskad_jax.training.fit import fit_pools  # noqa: E402


def reconstructor_gflop_per_pass(d, depth, c, tokens=197, mlp=4.0):
    per_block = 2 * tokens * d * (3 * d + d + 2 * mlp * d) + 2 * 2 * tokens * tokens * d
    return (depth * per_block + 2 * 2 * (tokens - 1) * c * d) / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["small", "paper"], default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--channels", type=int, default=192, help="192 = Lite0's taps, 272 = B4's")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attention", choices=["einsum", "jax_xla", "jax_cudnn"], default="einsum")
    p.add_argument("--backbone", action="store_true", help="also time images -> maps with the backbone")
    p.add_argument("--no-loop", action="store_true", help="skip the per-mask loop")
    p.add_argument("--whole-only", action="store_true", help="with --backbone: time only the whole step")
    p.add_argument("--shard", action="store_true", help="shard the whole step's batch over the local devices")
    p.add_argument("--branches-per-step", type=int, default=0, help="scoring.branches_per_step (4 suits a CPU)")
    p.add_argument("--scoring", choices=["paper", "cpu", "cpu-before"], default="paper")
    p.add_argument("--pool-images", type=int, default=40, help="random training images the pools are fitted on")
    a = p.parse_args()
    c = default.get_config()
    if a.scoring != "paper":
        scoring_only = default.get_config()
        variants.cpu(scoring_only)
        c.scoring = scoring_only.scoring
        if a.scoring == "cpu-before":
            c.scoring.knn_fine, c.scoring.mpo_fusion, c.scoring.pixel_map = False, "product", "score"
    r = c.model.reconstructor
    if a.model == "small":
        r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 256, 2, 2, 8
    c.model.dtype = a.dtype
    c.model.reconstructor.attention = a.attention
    c.scoring.branches_per_step = a.branches_per_step
    ch, grid, size = a.channels, (14, 14), 224
    s = resolve(c)
    model = build_reconstructor(s.model, ch, grid)
    params = model.init(jax.random.key(0), jnp.zeros((1, 14, 14, ch)), jnp.zeros((1, 196), bool))["params"]
    rng = np.random.default_rng(0)
    n_pool = a.pool_images
    train_h = rng.normal(size=(n_pool, 14, 14, ch)).astype(np.float32)
    fine_ch = 152 if ch == 192 else 216  # Lite0's or B4's stride-8 + stride-16 taps
    fine_on = c.scoring.knn_fine
    train_f = rng.normal(size=(n_pool, 28, 28, fine_ch)).astype(np.float32) if fine_on else None
    pools = device_pools(fit_pools(train_h, None, ["a"] * n_pool, c.fit, 0, fine=train_f))
    h = jnp.asarray(rng.normal(size=(a.batch, 14, 14, ch)).astype(np.float32))
    f = jnp.asarray(rng.normal(size=(a.batch, 28, 28, fine_ch)).astype(np.float32)) if fine_on else None
    pidx, keys = jnp.zeros(a.batch, jnp.int32), jnp.arange(a.batch, dtype=jnp.int32)
    sc = c.scoring
    n_masks = num_masks(sc)

    fused = jax.jit(make_score_features_fn(s.scoring, model), static_argnums=(6,))

    @jax.jit
    def head(h):
        b = h.shape[0]
        tok = h.reshape(b, 196, ch)
        d, idx = jax.vmap(nearest)(tok, pools["pool_in"][pidx], pools["valid"][pidx])
        mpo = jnp.sqrt(d) / pools["cal_scale"][pidx][:, None]
        ref = jnp.take_along_axis(pools["pool_in"][pidx], idx[..., None], axis=1).reshape(h.shape)
        ks = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(keys)
        m = jax.vmap(lambda k, s: make_masks(k, s, grid, sc))(ks, mpo)
        return mpo, ref, m

    recon = jax.jit(lambda p, x, m, t: patch_errors(model.apply({"params": p}, x, m, deterministic=True), t))

    @jax.jit
    def tail(e_h, e_r, mpo):
        b = e_h.shape[0]
        rec = e_h.mean(-1)
        ass = association.paper_assdis(e_h, e_r, sc.epsilon, sc.sinkhorn_iterations)
        up = resize_map_align_corners((rec + ass).reshape(b, 14, 14), (size, size))
        up = up * resize_map_align_corners(mpo.reshape(b, 14, 14), (size, size))
        return gaussian_smooth(up, sc.sigma)

    def loop(h):
        mpo, ref, m = head(h)
        e_h = jnp.stack([recon(params, h, m[:, k], h) for k in range(n_masks)], -1)
        e_r = jnp.stack([recon(params, ref, m[:, k], ref) for k in range(n_masks)], -1)
        return tail(e_h, e_r, mpo)

    def timed(fn):
        jax.block_until_ready(fn())
        t = time.perf_counter()
        for _ in range(a.repeats):
            jax.block_until_ready(fn())
        return (time.perf_counter() - t) / a.repeats

    print(
        f"model={a.model} dtype={a.dtype} attention={a.attention} channels={ch} batch={a.batch} "
        f"masks={n_masks} (x2 for h and r) branches_per_step={a.branches_per_step} scoring={a.scoring} "
        f"pools: {pools['valid'].sum()} tokens" + (f", fine {pools['fine_valid'].sum()}" if fine_on else "")
    )
    if not (a.whole_only and a.backbone):
        t_fused = timed(lambda: fused(params, pools, h, h, pidx, keys, size, None, f))
        t_loop = None if a.no_loop or a.scoring != "paper" else timed(lambda: loop(h))
        x = jnp.concatenate([h] * (2 * n_masks))[: a.batch * 2 * n_masks]
        mm = jnp.zeros((x.shape[0], 196), bool)
        t_rec = timed(lambda: recon(params, x, mm, x))
        gflop = reconstructor_gflop_per_pass(r.embed_dim, r.encoder_depth + r.decoder_depth, ch) * x.shape[0]
        print(f"fused one-program step (from features): {a.batch / t_fused:.2f} images/s")
        if t_loop is not None:
            print(f"python loop over masks: {a.batch / t_loop:.2f} images/s")
            print(f"fused / loop speed ratio: {t_loop / t_fused:.2f}")
        print(f"reconstructor stage alone: {gflop / t_rec:.1f} GFLOP/s ({gflop / a.batch:.1f} GFLOP per image)")
    if a.backbone:
        arch = "efficientnet-b4" if ch == 272 else "efficientnet-lite0"
        ext = FeatureExtractor.create(arch, "random", dtype=jnp.dtype(a.dtype))
        if ext.channels != ch:
            raise SystemExit(f"--channels {ch} does not match {arch}'s {ext.channels}")
        full = make_score_fn(s.scoring, ext, model)
        # --shard: the batch sharded over all local devices, as evaluation does. On this 2-core CPU with
        # two forced host devices that is slower for the whole step (RESULTS.md), so it is an option.
        shard = NamedSharding(data_mesh(), P("data")) if a.shard else jax.devices()[0]
        imgs = jax.device_put(rng.uniform(size=(a.batch, size, size, 3)).astype(np.float32), shard)
        pi, ki = jax.device_put(pidx, shard), jax.device_put(keys, shard)
        t_full = timed(lambda: full(params, ext.variables, pools, imgs, pi, ki))
        print(
            f"whole step from {size} px images ({arch}, random weights, batch sharded over "
            f"{jax.local_device_count() if a.shard else 1} device(s)): {a.batch / t_full:.2f} images/s"
        )
    print(memory_report())


if __name__ == "__main__":
    main()

"""Feature-extractor throughput on CPU: JAX (1 and 2 forced host devices) beside PyTorch eager.

    python benchmarks/feature_extractor.py                 # Lite0 and B4, batch 8 and 32
    python benchmarks/feature_extractor.py --archs efficientnet-lite0 --batches 8 --repeats 3

Each JAX configuration runs in its own process (XLA_FLAGS must be set before JAX starts); the
batch is sharded over the forced host devices. Reported: images/s to the last tap (the 14x14 map,
align-corners resizes and concatenation included), and the process's peak RSS. Random weights:
speed does not depend on the values.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jax_worker(arch, batch, repeats, depthwise="auto"):
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from maskad_jax.models.features import FeatureExtractor

    ex = FeatureExtractor.create(arch, weights="random", depthwise=depthwise)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sh = NamedSharding(mesh, P("data"))
    fn = jax.jit(ex.apply, in_shardings=(NamedSharding(mesh, P()), sh), out_shardings=sh)
    x = jax.device_put(jnp.asarray(np.random.default_rng(0).uniform(size=(batch, 224, 224, 3)).astype(np.float32)), sh)
    t = time.perf_counter()
    fn(ex.variables, x).block_until_ready()
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(repeats):
        fn(ex.variables, x).block_until_ready()
    dt = (time.perf_counter() - t) / repeats
    return {
        "images_per_s": batch / dt,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_call_s": first,
    }


def torch_worker(arch, batch, repeats):
    import torch
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.utils import BlockDecoder, GlobalParams

    sys.path.insert(0, ROOT)
    from maskad_jax.models import efficientnet_arch as ea

    torch.set_num_threads(2)
    if arch == "efficientnet-lite0":
        blocks = BlockDecoder.decode(
            [
                "r1_k3_s11_e1_i32_o16",
                "r2_k3_s22_e6_i16_o24",
                "r2_k5_s22_e6_i24_o40",
                "r3_k3_s22_e6_i40_o80",
                "r3_k5_s11_e6_i80_o112",
                "r4_k5_s22_e6_i112_o192",
                "r1_k3_s11_e6_i192_o320",
            ]
        )
        gp = GlobalParams(
            width_coefficient=1.0,
            depth_coefficient=1.0,
            image_size=224,
            dropout_rate=0.2,
            num_classes=1000,
            batch_norm_momentum=0.99,
            batch_norm_epsilon=1e-3,
            drop_connect_rate=0.2,
            depth_divisor=8,
            min_depth=None,
            include_top=True,
        )
        model = EfficientNet(blocks, gp)
        for m in list(model.modules()):
            if hasattr(m, "_swish"):
                m._swish = torch.nn.ReLU6()
    else:
        model = EfficientNet.from_name(arch)
    model.eval()
    last = ea.get_arch(arch).tap_blocks()[-1]
    x = torch.rand(batch, 3, 224, 224)

    def run():
        with torch.no_grad():
            y = model._swish(model._bn0(model._conv_stem(x)))
            for i in range(last + 1):
                y = model._blocks[i](y)
        return y

    run()
    t = time.perf_counter()
    for _ in range(repeats):
        run()
    dt = (time.perf_counter() - t) / repeats
    return {"images_per_s": batch / dt, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--archs", nargs="+", default=["efficientnet-lite0", "efficientnet-b4"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    p.add_argument("--devices", nargs="+", type=int, default=[1, 2])
    p.add_argument(
        "--depthwise",
        nargs="+",
        default=["auto"],
        choices=["auto", "conv", "shifts"],
        help="JAX depthwise convolution: auto (= shifts on a CPU) | conv (XLA's grouped convolution) | shifts",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker", choices=["jax", "torch"])
    p.add_argument("--arch")
    p.add_argument("--batch", type=int)
    a = p.parse_args()
    if a.worker:
        r = (
            jax_worker(a.arch, a.batch, a.repeats, a.depthwise[0])
            if a.worker == "jax"
            else torch_worker(a.arch, a.batch, a.repeats)
        )
        print(json.dumps(r))
        return
    print(f"{'arch':20s} {'batch':>5s} {'runtime':>22s} {'img/s':>8s} {'peak RSS MiB':>13s} {'first call s':>13s}")
    for arch in a.archs:
        for batch in a.batches:
            rows = []
            for dw in a.depthwise:
                for dev in a.devices:
                    env = dict(
                        os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={dev}", JAX_PLATFORMS="cpu"
                    )
                    rows.append((f"jax {dw} {dev} dev", env, "jax", dw))
            rows.append(("torch 2 threads", dict(os.environ), "torch", "auto"))
            for name, env, worker, dw in rows:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    worker,
                    "--arch",
                    arch,
                    "--batch",
                    str(batch),
                    "--repeats",
                    str(a.repeats),
                    "--depthwise",
                    dw,
                ]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode:
                    print(f"{arch:20s} {batch:5d} {name:>22s}  failed: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                first = f"{r['first_call_s']:13.1f}" if "first_call_s" in r else ""
                print(
                    f"{arch:20s} {batch:5d} {name:>22s} {r['images_per_s']:8.1f} {r['peak_rss_mib']:13.0f} {first}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

"""Do the attention implementations agree? The paper-sized reconstructor's output under each.

    python benchmarks/attention_check.py --dtype bfloat16      # on a GPU: einsum, jax_xla, jax_cudnn

Same random parameters and inputs (8 maps, 14 x 14 x 272, 40% masked); prints each implementation's
largest difference from einsum relative to the output's scale, or why it could not run.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from maskad_jax.models.reconstructor import ATTENTION_IMPLEMENTATIONS, MaskedReconstructor  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(8, 14, 14, 272)).astype(np.float32))
    mask = jnp.asarray(rng.uniform(size=(8, 196)) < 0.4)
    outs = {}
    for impl in ATTENTION_IMPLEMENTATIONS:
        model = MaskedReconstructor(in_channels=272, dtype=jnp.dtype(a.dtype), attention=impl)
        params = MaskedReconstructor(in_channels=272).init(jax.random.key(0), h, mask)["params"]
        # A non-zero relative position bias, so that the bias path is compared too.
        params["rel_pos_bias"]["table"] = 0.5 * jax.random.normal(
            jax.random.key(1), params["rel_pos_bias"]["table"].shape
        )
        try:
            outs[impl] = np.asarray(jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))(params, h, mask))
        except Exception as e:  # noqa: BLE001 - report and go on (cuDNN needs an NVIDIA GPU)
            print(f"{impl}: not available here ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    ref = outs["einsum"]
    scale = np.abs(ref).max()
    for impl, o in outs.items():
        print(
            f"{impl} on {jax.devices()[0].platform}, {a.dtype}: max |out - einsum| / max |einsum| = "
            f"{np.abs(o - ref).max() / scale:.2e}"
        )


if __name__ == "__main__":
    main()

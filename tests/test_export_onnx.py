"""maskad_jax.app.export_onnx: pieces of the exported program through jax2onnx and onnxruntime, against JAX.

The whole smoke scorer is converted and compared with --mode=predict in tests/test_run_e2e.py; here
the parts one variant or another adds, converted alone (seconds, not minutes)."""

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from configs import demo
from maskad_jax.app import export_onnx
from maskad_jax.common.specs import resolve
from maskad_jax.engine import association, scoring


def _session(blob):
    return ort.InferenceSession(blob, providers=["CPUExecutionProvider"])


def test_bool_where_is_rewritten_so_onnxruntime_runs_it():
    """A hand-built graph: Where(c, x, y) on bool tensors, which onnxruntime 1.32 has no kernel for."""
    graph = helper.make_graph(
        [helper.make_node("Where", ["c", "x", "y"], ["o"], name="w")],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.BOOL, [4]) for n in ("c", "x", "y")],
        [helper.make_tensor_value_info("o", TensorProto.BOOL, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", export_onnx.OPSET)])
    with pytest.raises(Exception, match="Where"):
        _session(model.SerializeToString())
    model, count = export_onnx.legalize(model)
    assert count == 1
    onnx.checker.check_model(model)
    c, x, y = np.array([1, 0, 1, 0], bool), np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool)
    (out,) = _session(model.SerializeToString()).run(None, {"c": c, "x": x, "y": y})
    np.testing.assert_array_equal(out, [True, True, False, False])


def test_test_masks_convert_and_are_drawn_exactly_as_in_jax():
    """The random and block masks (threefry) and the prototype masks: the same bits in onnxruntime."""
    sc = demo.get_config("smoke").scoring
    grid, b = (8, 8), 3
    mpo = np.random.default_rng(0).random((b, 64)).astype(np.float32)
    ids = np.array([5, 123456, -7], np.int32)

    def masks(ids, mpo):
        m, keys = scoring.test_masks(7, ids, mpo, grid, sc)
        return (m.astype(jnp.int32), keys)

    args = (jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, 64), jnp.float32))
    blob = export_onnx.convert(masks, args, ["ids", "mpo"], ["masks", "keys"])
    got = _session(blob).run(None, {"ids": ids, "mpo": mpo})
    want = jax.jit(masks)(ids, mpo)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0].sum() > 0


def test_the_code_variants_assdis_converts():
    """The released code's OT (its own Sinkhorn while loop) converts; within 1e-4 relative of JAX."""
    rng = np.random.default_rng(1)
    e_h, e_r = (rng.gamma(2.0, 1.0, (2, 16, 7)).astype(np.float32) for _ in range(2))

    def code(e_h, e_r):
        return (jax.vmap(lambda a, r: association.code_assdis(a, r, 0.1))(e_h, e_r),)

    args = (jax.ShapeDtypeStruct(e_h.shape, jnp.float32),) * 2
    (got,) = _session(export_onnx.convert(code, args, ["e_h", "e_r"], ["assdis"])).run(None, {"e_h": e_h, "e_r": e_r})
    want = np.asarray(jax.jit(code)(e_h, e_r)[0])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_the_paper_ot_converts_when_solved_patch_after_patch():
    """ott-jax's Sinkhorn (AssDis of the paper configs): the sequential form the export uses agrees,
    through onnxruntime, with the vmapped form eval uses."""
    rng = np.random.default_rng(2)
    e_h, e_r = (rng.gamma(2.0, 1.0, (2, 6, 7)).astype(np.float32) for _ in range(2))

    def sequential(e_h, e_r):
        return (association.paper_ot(e_h, e_r, 0.02, 200, sequential=True).cost,)

    args = (jax.ShapeDtypeStruct(e_h.shape, jnp.float32),) * 2
    blob = export_onnx.convert(sequential, args, ["e_h", "e_r"], ["assdis"])
    (got,) = _session(blob).run(None, {"e_h": e_h, "e_r": e_r})
    want = np.asarray(jax.jit(lambda a, b: association.paper_ot(a, b, 0.02, 200).cost)(e_h, e_r))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_onnx_config_and_skip_reasons():
    c = demo.get_config("smoke")
    c.scoring.use_assdis, c.scoring.ot = True, "paper"
    assert export_onnx.onnx_scoring(resolve(c).scoring).ot_sequential and not resolve(c).scoring.ot_sequential
    assert export_onnx.skip_reason(resolve(c).export) is None  # jax2onnx is installed for the tests
    c.export.onnx = "no"
    assert export_onnx.skip_reason(resolve(c).export) == "export.onnx = 'no'"

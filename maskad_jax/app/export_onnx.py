"""The exported scoring program as ONNX (scorer.onnx), through jax2onnx, for onnxruntime.

The same function as scorer.stablehlo (export.scorer_function), converted whole: backbone, nearest
pool, the test masks, the 2N reconstructions, combination, upsampling, smoothing, threshold.
Four things make that possible (each found by converting the smoke model; docs/deploy.md):

1. The test masks are drawn with maskad_jax.engine.threefry (jax.random's bits written in plain uint32
   arithmetic): jax2onnx has no rule for random_split and turns random_bits into ONNX RandomUniform,
   which ignores the key, so an image would get other masks than in eval.
2. The function is first traced to a jaxpr by JAX itself, and jax2onnx converts the evaluation of that
   jaxpr. Traced directly, jax2onnx replaces jnp functions and Flax layers with its own primitives,
   whose batching rules fail inside the nested vmaps of the nearest-pool search ("add: arrays must
   have the same number of dimensions").
3. onnxruntime (1.32) has no Where kernel for bool tensors, which vmapped while loops produce:
   `legalize` rewrites each such Where as Cast to uint8, Where, Cast back (exact).
4. The paper's OT (ott-jax's Sinkhorn) is solved patch after patch (`onnx_scoring`): vmapped, one of
   its ops becomes a batched scatter jax2onnx cannot convert.

The batch size is fixed at export (export.onnx_batch): with a symbolic batch, jax2onnx 0.17.1 fails on
the padding of the nearest-pool search. jax2onnx is optional: pip install 'maskad-jax[onnx]' (it declares
orbax-checkpoint < 0.11.37, inside this project's range: pip picks 0.11.36 with the extra).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp

from maskad_jax.common.errors import ConfigError
from maskad_jax.common.specs import DataSpec, ExportSpec, ScoringSpec

INSTALL = "pip install 'maskad-jax[onnx]' (in a clone: pip install -c constraints.txt -e '.[onnx]')"
OPSET = 23
OUTPUTS = ("anomalous", "class_index", "map", "score", "threshold")  # the scorer's dict keys, sorted


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("jax2onnx", "onnx"))


def skip_reason(xs: ExportSpec) -> str | None:
    """None when scorer.onnx is to be written; else why not (export.onnx = 'yes' raises instead)."""
    choice = xs.onnx
    if choice == "no":
        return "export.onnx = 'no'"
    if available():
        return None
    why = f"jax2onnx is not installed ({INSTALL})"
    if choice == "yes":
        raise ConfigError(f"export.onnx = 'yes', but {why}")
    return why


def onnx_scoring(sc: ScoringSpec) -> ScoringSpec:
    """The scoring the ONNX scorer is built with: the paper OT solved patch after patch (lax.map).

    Vmapped, ott-jax's Sinkhorn records each iteration's error with
    errors.at[iteration // inner_iterations, :].set(err) (Sinkhorn.one_iteration) as a batched
    scatter, which jax2onnx 0.17.1 rejects ('scatter pattern not supported in plugins'); one problem
    at a time it is a plain scatter, which converts. Same values to float rounding (the calibrated
    thresholds stay valid: ot_sequential is not part of the calibration's scoring signature)."""
    return dataclasses.replace(sc, ot_sequential=True)


def legalize(model):
    """Rewrite Where on bool tensors (no onnxruntime kernel) as Where on uint8 between two Casts."""
    import onnx
    from onnx import TensorProto, helper

    types = {}

    def record(graph):
        for v in list(graph.value_info) + list(graph.input) + list(graph.output):
            if v.type.tensor_type.elem_type:
                types[v.name] = v.type.tensor_type.elem_type
        for t in graph.initializer:
            types[t.name] = t.data_type
        for node in graph.node:
            for g in _subgraphs(node):
                record(g)

    def rewrite(graph):
        nodes, count = [], 0
        for node in graph.node:
            for g in _subgraphs(node):
                count += rewrite(g)
            if node.op_type == "Where" and node.input[1] not in types:
                raise ValueError(f"ONNX node {node.name}: the type of its input {node.input[1]} is not recorded")
            if node.op_type != "Where" or types[node.input[1]] != TensorProto.BOOL:
                nodes.append(node)
                continue
            a, b, out = (f"{node.name}__u8_{i}" for i in ("x", "y", "out"))
            nodes += [
                helper.make_node("Cast", [node.input[1]], [a], name=a, to=TensorProto.UINT8),
                helper.make_node("Cast", [node.input[2]], [b], name=b, to=TensorProto.UINT8),
                helper.make_node("Where", [node.input[0], a, b], [out], name=node.name),
                helper.make_node("Cast", [out], [node.output[0]], name=out, to=TensorProto.BOOL),
            ]
            count += 1
        del graph.node[:]
        graph.node.extend(nodes)
        return count

    def _subgraphs(node):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
            yield from attr.graphs

    record(model.graph)
    return model, rewrite(model.graph)


def convert(fn, args, input_names, output_names) -> bytes:
    """ONNX bytes of fn(*args) -> tuple of arrays: traced to a jaxpr by JAX, that jaxpr's evaluation
    converted by jax2onnx (see the module docstring), bool Where legalised."""
    from jax2onnx import to_onnx

    closed = jax.make_jaxpr(fn)(*args)

    def evaluate(*xs):
        return tuple(jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *xs))

    model = to_onnx(
        evaluate,
        inputs=list(args),
        model_name="maskad_scorer",
        opset=OPSET,
        input_names=list(input_names),
        output_names=list(output_names),
    )
    model, _ = legalize(model)
    return model.SerializeToString()


def export_onnx(sc: ScoringSpec, d: DataSpec, xs: ExportSpec, make_scorer) -> bytes:
    """scorer.onnx: make_scorer(onnx_scoring(sc)) for batches of export.onnx_batch images, serialised."""
    scorer = make_scorer(onnx_scoring(sc))
    s, b = d.image_size, xs.onnx_batch
    args = (jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8), jax.ShapeDtypeStruct((b,), jnp.int32))
    names = ["images", "keys"]
    if d.geometry == "pad":  # the images' content boxes: pad's padding is left out of the score
        args, names = args + (jax.ShapeDtypeStruct((b, 4), jnp.int32),), names + ["boxes"]

    def outputs(*inputs):
        out = scorer(*inputs)
        return tuple(out[k] for k in OUTPUTS)

    return convert(outputs, args, names, OUTPUTS)

"""The package's import structure (docs: the module map in the README): the test-time engine and
the models never import training, orchestration or file I/O; no import cycles; no function-local
import of the package; functions stay short."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "maskad_jax"

# pure computation: models, masks, pools, OT, scoring, metrics, resizing, smoothing, the flow
PURE = {
    "ablations",
    "association",
    "coreset",
    "efficientnet",
    "efficientnet_arch",
    "errors",
    "flow",
    "masks",
    "metrics",
    "reconstructor",
    "resize",
    "scoring",
    "smoothing",
    "threefry",
}
# training, orchestration and I/O: what PURE must never reach, even indirectly
UPPER = {
    "train",
    "flow_fit",
    "pipeline",
    "predict",
    "evaluate",
    "learning_curves",
    "feature_cache",
    "report",
    "progress",
    "workdir",
    "data",
    "fit",
    "weights",
    "torch_pickle",
    "safetensors_reader",
    "samples",
    "config_check",
    "convert_weights",
    "parallel",
    "features",
    "flow_features",
    "export",
    "export_onnx",
    "serve_export",
    "digests",
    "optim",
    "overlay",
    "preprocess",
    "geometry",
    "thresholds",
    "validation",
    "ignore_masks",
    "update",
    "tiling",
    "serve_http",
}


def _imports(path: pathlib.Path):
    """(package modules imported anywhere in the file, those imported inside a function)."""
    tree = ast.parse(path.read_text())
    found, local = set(), set()
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        for node in ast.walk(fn):
            local |= _names(node)
    for node in ast.walk(tree):
        found |= _names(node)
    return found, local


def _names(node) -> set:
    out = set()
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "maskad_jax":
            out |= {a.name for a in node.names}
        elif node.module.startswith("maskad_jax."):
            out.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
        out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("maskad_jax.")}
    return out


def _graph():
    return {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def _reach(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()][0]:
            if nxt not in seen and nxt in graph:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_layers_are_the_ones_documented():
    assert {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"} <= PURE | UPPER


def test_pure_modules_never_import_training_orchestration_or_io():
    graph = _graph()
    bad = {m: sorted(_reach(graph, m) & UPPER) for m in PURE if m in graph}
    assert all(not v for v in bad.values()), {m: v for m, v in bad.items() if v}


def test_no_import_cycles():
    graph = _graph()
    cycles = [m for m in graph if m in _reach(graph, m)]
    assert cycles == []


def test_no_function_local_imports_of_the_package():
    """Except convert_weights' deferred import of jax (so --help stays instant), which is commented."""
    graph = _graph()
    local = {m: sorted(v[1]) for m, v in graph.items() if v[1]}
    assert local == {"convert_weights": ["weights"]}
    assert "--help and arg errors stay instant" in (PACKAGE / "convert_weights.py").read_text()


def test_functions_are_short():
    long = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n >= 60:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert long == []


def test_the_export_loader_is_standalone():
    """serve_export.py and serve_http.py are copied next to exported artifacts and run where maskad_jax
    is not installed."""
    for name in ("serve_export.py", "serve_http.py"):
        found, _ = _imports(PACKAGE / name)
        assert found == set(), name
        text = (PACKAGE / name).read_text()
        assert "import maskad_jax" not in text and "from maskad_jax" not in text and "importlib" not in text

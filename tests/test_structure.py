"""The package's structure (docs: README "Reading the code"): layers as folders, imported only
downwards, across maskad_jax and tfds_builders; the test-time engine and the models never reach
training, orchestration or file I/O; no import cycles; no function-local import of the package;
functions stay short."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "maskad_jax"
PACKAGES = ("maskad_jax", "tfds_builders")

# The layers, bottom to top (the order data flows through them): a module imports only from its own
# layer and the ones before it. tfds_builders reads the datasets with data/'s decoding and feeds
# data/'s splits, so it sits between data and models.
LAYERS = ("common", "runtime", "data", "tfds_builders", "models", "engine", "configs", "training", "app")

# pure computation, importing nothing of training, orchestration or I/O: the models' definitions,
# masks, pools, M_po, OT, scoring, metrics, resizing, smoothing
PURE = {
    "common.errors",
    "common.specs",
    "engine.ablations",
    "engine.association",
    "engine.coreset",
    "engine.masks",
    "engine.metrics",
    "engine.mpo",
    "engine.scoring",
    "engine.smoothing",
    "engine.threefry",
    "models.efficientnet",
    "models.efficientnet_arch",
    "models.flow",
    "models.reconstructor",
    "models.resize",
}


def _modules():
    """{dotted name: path} of every module of both packages (a package's __init__ by its own name)."""
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _short(name: str) -> str:
    return name.split(".", 1)[1] if name.startswith("maskad_jax.") else name


def _layer(name: str) -> str:
    return "tfds_builders" if name.startswith("tfds_builders") else name.split(".")[1]


def _targets(node) -> set:
    """The package modules an import statement names (a `from pkg import x` names pkg.x when x is a module)."""
    out = set()
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
        for a in node.names:
            sub = f"{node.module}.{a.name}"
            out.add(sub if sub in MODULES else node.module)
    elif isinstance(node, ast.Import):
        out |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return {t for t in out if t in MODULES}


def _imports(path: pathlib.Path):
    """(package modules imported anywhere in the file, those imported inside a function)."""
    tree = ast.parse(path.read_text())
    found, local = set(), set()
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        for node in ast.walk(fn):
            local |= _targets(node)
    for node in ast.walk(tree):
        found |= _targets(node)
    return found, local


def _graph():
    return {name: _imports(path) for name, path in MODULES.items()}


def _reach(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()][0]:
            if nxt not in seen and nxt in graph:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_module_lives_in_a_layer_folder():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert loose == [], "modules directly in maskad_jax/"
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert sorted(folders) == sorted(x for x in LAYERS if x != "tfds_builders")
    assert {_short(m) for m in PURE} <= {_short(m) for m in MODULES}


def test_layers_import_only_downwards():
    graph = _graph()
    up = []
    for name, (found, _) in graph.items():
        if name == "maskad_jax":
            continue
        for target in found:
            if target != "maskad_jax" and LAYERS.index(_layer(target)) > LAYERS.index(_layer(name)):
                up.append(f"{name} -> {target}")
    assert sorted(up) == []


def test_pure_modules_never_import_training_orchestration_or_io():
    graph = _graph()
    pure = {f"maskad_jax.{m}" for m in PURE}
    bad = {m: sorted(_short(x) for x in _reach(graph, m) - pure) for m in pure}
    assert all(not v for v in bad.values()), {m: v for m, v in bad.items() if v}


def test_no_import_cycles():
    graph = _graph()
    cycles = [m for m in graph if m in _reach(graph, m)]
    assert cycles == []


def test_no_function_local_imports_of_the_package():
    """Except convert_weights' deferred import of jax (so --help stays instant), which is commented."""
    graph = _graph()
    local = {m: sorted(v[1]) for m, v in graph.items() if v[1] and m.startswith("maskad_jax")}
    assert local == {
        "maskad_jax.models.convert_weights": ["maskad_jax.models.weights"],
        # a detector from an export imports neither the restore code nor the pipeline (docs: the module's note)
        "maskad_jax.app.api": ["maskad_jax.app.pipeline", "maskad_jax.app.restore"],
    }
    assert "--help and arg errors stay instant" in (PACKAGE / "models" / "convert_weights.py").read_text()


def test_functions_are_short():
    """Except the config's definition (maskad_jax/configs/default.py): a flat list of every field with its
    explanation, read top to bottom, in ml_collections' get_config convention."""
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n >= 60 and f"{name}:{node.name}" != "maskad_jax.configs.default:get_config":
                    long.append(f"{name}:{node.name} ({n} lines)")
    assert long == []


# Where the whole config may go: pipeline resolves it (common/specs.resolve) after config_check has
# checked it; below them functions take a spec (common/specs.py) or plain arguments.
# the entries that take a whole config: pipeline (run.py's), the public API (api: load/train; detector: the
# workdir's config.json and a detector's overrides; restore: the trained model restored from it)
TAKES_THE_CONFIG = {
    "maskad_jax.app.pipeline",
    "maskad_jax.app.config_check",
    "maskad_jax.common.specs",
    "maskad_jax.app.api",
    "maskad_jax.app.detector",
    "maskad_jax.app.restore",
    "maskad_jax.app.cli",
}
TAKES_ALL_SPECS = {"maskad_jax.app.pipeline", "maskad_jax.app.restore"}


def test_no_function_below_pipeline_takes_the_whole_config():
    """By parameter name (config, cfg) or annotation (ConfigDict, Specs: every section at once)."""
    found = []
    for name, path in MODULES.items():
        if not name.startswith("maskad_jax"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                note = ast.unparse(a.annotation) if a.annotation is not None else ""
                whole = a.arg in ("config", "cfg") or "ConfigDict" in note
                all_specs = re.search(r"\bSpecs\b", note) is not None  # common/specs.Specs, not MpoSpecs
                if (whole and name not in TAKES_THE_CONFIG) or (all_specs and name not in TAKES_ALL_SPECS):
                    found.append(f"{name}:{node.name}({a.arg}{': ' + note if note else ''})")
    assert found == []


def test_host_loops_over_the_data_go_through_the_batching_helper():
    """No loop of the package iterates data/splits.eval_batches itself: common/batching.py's helper
    pads, places, runs, gathers and unpads for every batched call."""
    loops = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.iter, ast.Call):
                called = ast.unparse(node.iter.func)
                if called.endswith("eval_batches") and name != "maskad_jax.common.batching":
                    loops.append(f"{name}: for ... in {called}(...)")
    assert loops == []


def test_the_export_loader_is_standalone():
    """serve_export.py and serve_http.py are copied next to exported artifacts and run where maskad_jax
    is not installed."""
    for name in ("serve_export.py", "serve_http.py"):
        found, _ = _imports(PACKAGE / "runtime" / name)
        assert found == set(), name
        text = (PACKAGE / "runtime" / name).read_text()
        assert "import maskad_jax" not in text and "from maskad_jax" not in text and "importlib" not in text


MAX_LONG_SIGNATURES = 15  # issue #32: from 48 functions with more than 6 parameters


def _parameters(node) -> list:
    """A function's parameters, self/cls not counted, *args and **kwargs one each."""
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names = names[1:] if names and names[0] in ("self", "cls") else names
    return names + [x.arg for x in (a.vararg, a.kwarg) if x is not None]


def test_few_functions_take_more_than_six_parameters():
    """The trained model travels as one object (engine/trained_model.TrainedModel, app/trained.Trained),
    features as one record (feature_cache.Features), options as records (loop.LoopOptions): at most
    MAX_LONG_SIGNATURES functions take more than 6 parameters (the jitted kernels of engine/, whose
    arguments are the arrays they trace, and a few entry points with keyword options)."""
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(_parameters(node)) > 6:
                long.append(f"{name}:{node.name} ({len(_parameters(node))})")
    assert len(long) <= MAX_LONG_SIGNATURES, sorted(long)

"""The shape of helpers/: layered imports (none reaching up, none circular, inside functions
too), typed and documented public functions, few positional parameters, torch-free bottom."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import helpers
from conftest import ROOT

PACKAGE = ROOT / "helpers"
LAYER_NAMES = helpers.LAYERS
LAYERS = {name: rank for rank, name in enumerate(LAYER_NAMES)}


def _module_name(path: Path) -> str:
    """The layer of a file: its package under helpers/ (helpers/train/loop.py -> train), or
    the top-level module itself (config); __main__ is a command line, __init__ below all."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return {"__main__": "cli", "__init__": "core"}.get(parts[0], parts[0])


def test_the_folders_are_the_layers():
    """Every package and top-level module of helpers/ is a layer, and every layer is there."""
    found = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    found |= {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert found == set(LAYER_NAMES), found ^ set(LAYER_NAMES)
    loose = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if len(p.relative_to(PACKAGE).parts) > 2]
    assert not loose, f"a layer is one level of packages: {loose}"


def _imports(path: Path) -> set[str]:
    """The helpers modules a file imports, at the top or inside any function."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(PACKAGE).parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").startswith("helpers"):
                target = (node.module or "").split(".")[1:]
            elif node.level > 0:
                base = list(package[:-1])[: len(package) - node.level]
                target = base + (node.module.split(".") if node.module else [])
            else:
                continue
            if target:
                found.add(target[0])
            else:  # from . import a, b (modules; __version__ and such are not)
                found.update(alias.name for alias in node.names
                             if (PACKAGE / f"{alias.name}.py").exists()
                             or (PACKAGE / alias.name).is_dir())
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("helpers."):
                    found.add(alias.name.split(".")[1])
    return found - {"__init__"}


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        graph.setdefault(name, set()).update(_imports(path) - {name})
    return graph


def test_every_module_has_a_layer():
    assert set(_graph()) <= set(LAYERS), set(_graph()) - set(LAYERS)


def test_no_import_reaches_up_even_inside_a_function():
    upward = [(src, dst) for src, targets in _graph().items() for dst in targets
              if LAYERS[dst] > LAYERS[src]]
    assert not upward, upward


def _dotted(path: Path) -> str:
    """helpers/train/loop.py -> helpers.train.loop; a package's __init__ -> the package."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _module_graph() -> dict[str, set[str]]:
    """Module -> the helpers modules it imports (a name imported from a package counts as
    its module when it is one), at the top or inside any function."""
    modules = {_dotted(p) for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (
                    node.module or "").startswith("helpers"):
                for alias in node.names:
                    inner = f"{node.module}.{alias.name}"
                    found.add(inner if inner in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
        graph[_dotted(path)] = found - {_dotted(path), "helpers"}
    return graph


def test_no_circular_imports():
    """Between modules, not only between layers: no module needs itself."""
    graph = _module_graph()
    seen, on_path = set(), []

    def visit(node: str) -> None:
        if node in on_path:
            pytest.fail(f"circular import: {' -> '.join(on_path[on_path.index(node):] + [node])}")
        if node in seen:
            return
        on_path.append(node)
        for nxt in graph.get(node, ()):
            visit(nxt)
        on_path.pop()
        seen.add(node)

    for node in graph:
        visit(node)


def _public_functions():
    import importlib

    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.name == "__main__":
            continue
        name = ".".join(rel.parts).removesuffix(".__init__")
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isfunction(obj):
                yield f"{name}.{attr}", obj
            elif inspect.isclass(obj):
                for meth, fn in vars(obj).items():
                    # Overrides of a library's method keep the library's signature.
                    inherited = any(meth in vars(base) for base in obj.__mro__[1:]
                                    if not base.__module__.startswith("helpers"))
                    if inspect.isfunction(fn) and not meth.startswith("_") and not inherited:
                        yield f"{name}.{attr}.{meth}", fn


def test_public_functions_are_typed_documented_and_take_few_positional_parameters():
    """Every parameter and return typed, a docstring, at most four positional parameters."""
    problems = []
    for qualname, fn in _public_functions():
        sig = inspect.signature(fn)
        positional = [p for p in sig.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                      and p.name not in ("self", "cls")]
        if len(positional) > 4:
            problems.append(f"{qualname}: {len(positional)} positional parameters")
        if not (fn.__doc__ or "").strip():
            problems.append(f"{qualname}: no docstring")
        if sig.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__":
            problems.append(f"{qualname}: no return type")
        untyped = [p.name for p in sig.parameters.values() if p.name not in ("self", "cls")
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                   and p.annotation is inspect.Parameter.empty]
        if untyped:
            problems.append(f"{qualname}: untyped parameter(s) {', '.join(untyped)}")
    assert not problems, "\n".join(problems)


def test_the_command_line_and_the_engine_do_not_import_torch():
    code = ("import sys; import helpers.cli, helpers.cli.answer_commands, helpers.serve.engine, "
            "helpers.serve.answers, helpers.config, helpers.data.names, helpers.data.preprocess, "
            "helpers.core.errors, helpers.core.files; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert done.stdout.strip() == "False"


def test_every_module_stays_under_300_lines():
    """A module that grows past 300 lines is doing two things: split it."""
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 300}
    assert not long, long


def test_no_public_function_is_used_by_the_tests_alone():
    """Each public function is called by the package, the scripts, the benchmarks or the
    notebook, or is named in the README as an API for users; else it belongs in the tests."""
    import re

    files = [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
             *(ROOT / "examples").glob("*.py"), ROOT / "train.py", ROOT / "predict.py",
             ROOT / "Image_Classifier_Project.ipynb", ROOT / "README.md"]
    text = "\n".join(p.read_text() for p in files if p.is_file())
    unused = [q for q, _ in _public_functions()
              if len(re.findall(rf"\b{re.escape(q.rsplit('.', 1)[-1])}\b", text)) <= 1]
    assert not unused, unused


def test_one_place_turns_logits_into_calibrated_probabilities():
    """answers.answer divides logits by the temperature; no other code does (a softmax
    elsewhere is plain: validation while training, the doctor's own regression). The
    exported graph is answer's in ONNX, checked equal to predict by the export tests."""
    allowed = {"helpers/serve/answers.py", "helpers/serve/export.py"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                right = node.right
                name = right.id if isinstance(right, ast.Name) else getattr(right, "attr", "")
                if name == "temperature" and rel not in allowed:
                    found.append(f"{rel}:{node.lineno}")
    assert not found, found


def test_settle_runs_once_a_run(monkeypatch, tmp_path):
    """set_up settles the settings once, after the data is known; run never settles again."""
    from conftest import make_image_folder
    from helpers import config
    from helpers.train import run

    calls = []
    real = config.settle
    monkeypatch.setattr(run, "settle", lambda *a, **k: calls.append(k) or real(*a, **k))
    folder = make_image_folder(tmp_path / "d", ["a", "b"], 3)
    setup = run.set_up(folder, typed={"arch": "test_efficientnet", "epochs": 1}, device_type="cpu")
    assert len(calls) == 1 and calls[0]["images_per_class"] == 3
    assert setup.config.epochs == 1 and setup.config.recipe == "cached"

"""The shape of helpers/: layered imports (none reaching up, none circular, inside functions
too), typed and documented public functions, few positional parameters, torch-free bottom."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "helpers"
# Each module's layer: a module may import its own layer or below, never above.
LAYERS = {
    "runtime": 0, "storage": 0, "distributed": 0, "images": 0, "config": 0, "__init__": 0,
    "backbones": 0,
    "static_server": 0, "fixes": 0, "headers": 0,
    "names": 1, "engine": 1, "data": 1,
    "download": 2, "model": 2, "splits": 2, "likeness": 2, "onnx_io": 2, "trunk": 2, "batches": 2,
    "checkpoint": 3, "cache": 3, "loop": 3, "plan": 3,
    "export": 4, "inference": 4, "recipes": 4, "prediction": 4, "evaluate": 4, "calibration": 4,
    "gradcam": 4, "doctor": 4,
    "report": 5, "plots": 5, "report_plots": 5, "try_photo": 5, "webapp": 5, "run": 5,
    "review": 5,
    "cli": 6, "__main__": 6,
}


def _module_name(path: Path) -> str:
    """helpers/cli/train_commands.py -> cli; helpers/loop.py -> loop."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


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


def test_no_circular_imports():
    graph = _graph()
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
    code = ("import sys; import helpers.cli, helpers.cli.answer_commands, helpers.engine, "
            "helpers.config, helpers.names; print('torch' in sys.modules)")
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

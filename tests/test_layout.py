"""The shape of the package, checked from the source with `ast`, so it stays what the README's Architecture
section draws: short functions and modules, arrows only downward between the sub-packages, no import cycle,
training that does not pull in serving, the page or export, and the run folder named in one module."""

from __future__ import annotations

import ast
import dataclasses
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "gemmatune"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
MAX_SUBPACKAGE_LINES = 1650  # models/ (families and the model built from them) is the largest

# Bottom to top: a module may import its own layer and the layers below it, never one above. The top-level
# modules other than the package's own __init__ and __main__ are the foundation everything stands on.
LAYERS = ["(foundation)", "kernels", "runs", "models", "data", "infer", "stopping", "train", "plan", "export", "serve",
          "cli", "(top)"]
TOP = {"gemmatune", "gemmatune.__main__"}
NOT_IN_TRAINING = ("gemmatune.serve", "gemmatune.export", "gemmatune.cli")
RUN_FOLDER_MODULE = "gemmatune.runs.folder"
RUN_FOLDER_FILES = {"run.json", "metrics.jsonl", "eval.json", "eval.md", "config.yaml", "gemmatune.json",
                    "trainer_state.json"}
# run.json keys that are also ordinary words elsewhere (config keys, report fields, states of a run).
RECORD_KEYS_WITH_OTHER_MEANINGS = {"data", "source", "kind", "format", "template", "files", "train", "eval",
                                   "device", "precision", "threads", "class", "family", "quantization", "lora",
                                   "model_type", "training", "finished", "created", "dtype", "resolved",
                                   "processes", "versions", "base_model", "stop_token_ids"}


@cache
def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("gemmatune", *path.relative_to(PACKAGE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text(encoding="utf-8"))


def imports(name: str) -> set[str]:
    """Our modules that `name` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gemmatune"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules() else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gemmatune"))
    return {m for m in found if m in modules() and m != name}


def layer(name: str) -> int:
    if name in TOP:
        return len(LAYERS) - 1
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 or modules()[name].name == "__init__.py" else 0


def closure(name: str) -> set[str]:
    seen, todo = {name}, [name]
    while todo:
        for dep in imports(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def functions(node: ast.AST, prefix: str = ""):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{child.name}", child.end_lineno - child.lineno + 1
            yield from functions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from functions(child, f"{prefix}{child.name}.")


def test_every_subpackage_is_a_layer():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(LAYERS[1:-1]), packages


def test_no_function_over_60_lines():
    long = [f"{name}:{fn} {n}" for name in modules() for fn, n in functions(tree(name)) if n > MAX_FUNCTION_LINES]
    assert long == []


def test_no_module_over_400_lines():
    lines = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in lines.items() if n > MAX_MODULE_LINES} == {}


def test_no_subpackage_over_1650_lines():
    sizes: dict[str, int] = {}
    for name, path in modules().items():
        if name.count(".") >= 1 and path.parent != PACKAGE:
            package = path.relative_to(PACKAGE).parts[0]
            sizes[package] = sizes.get(package, 0) + len(path.read_text(encoding="utf-8").splitlines())
    assert {p: n for p, n in sizes.items() if n > MAX_SUBPACKAGE_LINES} == {}


def test_arrows_only_point_down():
    upward = [f"{name} -> {dep}" for name in modules() for dep in imports(name) if layer(dep) > layer(name)]
    assert upward == []


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(imports(name)):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in modules():
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_training_imports_no_serving_page_or_export():
    reached = closure("gemmatune.train.recipe")
    assert sorted(m for m in reached if m.startswith(NOT_IN_TRAINING)) == []


def _strings(name: str) -> set[str]:
    """The string constants of a module, its docstrings left out."""
    docstrings = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return {n.value for n in ast.walk(tree(name))
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}


def _record_keys() -> set[str]:
    from gemmatune.runs import folder

    keys = set()
    for cls in (folder.RunRecord, *folder._SECTIONS.values(), folder.MergedInfo):
        keys.update(f.metadata.get("key", f.name) for f in dataclasses.fields(cls))
    return keys - RECORD_KEYS_WITH_OTHER_MEANINGS


def test_run_folder_files_and_keys_are_named_in_one_module():
    keys = _record_keys()
    assert "global_steps" in keys and "merged_from" in keys  # the check sees run.json's and gemmatune.json's keys
    named = {name: sorted(_strings(name) & (RUN_FOLDER_FILES | keys)) for name in modules()
             if name != RUN_FOLDER_MODULE}
    assert {name: found for name, found in named.items() if found} == {}


@pytest.mark.parametrize("package", LAYERS[1:-1])
def test_subpackage_docstring_says_what_it_holds(package):
    assert ast.get_docstring(tree(f"gemmatune.{package}")), f"gemmatune/{package}/__init__.py has no docstring"

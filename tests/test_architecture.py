"""The package's import graph, read with ``ast`` (function-level imports included): no cycle, no
module importing one above it in DESIGN.md section 7, nothing importing the CLI, imports at the top
except for genuinely optional dependencies, and no module over 700 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "impure_hf"
# Optional dependencies that may be imported inside a function, with an install hint there.
OPTIONAL = {"gradio", "onnxruntime", "playwright", "pywt"}
# DESIGN.md section 7, bottom up: a module may import modules of its own floor or below.
FLOORS = {
    "_version": 0, "_utils": 0, "photos": 0, "configuration_impure": 0, "image_processing_impure": 0, "losses": 0,
    "layers_impure": 1, "modeling_impure": 1,
    "loading": 2, "precision": 2, "convert": 2, "classifiers": 2, "attacks": 2, "baselines": 2,
    "data": 3, "data_sources": 3, "defended": 3,
    "train": 4, "training_args": 4, "finetuning": 4,
    "evaluation": 5, "publishing": 5,
    "demo": 6, "bench": 6, "app": 6, "purify": 6, "export": 6, "hub": 6, "evaluate": 6, "__init__": 6,
    "cli": 7,
}


def _modules() -> dict[str, Path]:
    """Dotted name inside the package (``evaluation.harness``, ``__init__``) -> file."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, ast.stmt, bool]]:
    """(imported package module, node, at function level) for each import of a package module."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets = []
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)] if child.level > 1 else package
                    target = ".".join([*base, *(child.module.split(".") if child.module else [])])
                elif (child.module or "").split(".")[0] == "impure_hf":
                    target = child.module.partition(".")[2]
                else:
                    target = None
                if target is not None:
                    for alias in child.names:  # `from . import x` or `from .pkg import module`
                        sub = f"{target}.{alias.name}" if target else alias.name
                        targets.append(sub if sub in modules else (target or "__init__"))
            elif isinstance(child, ast.Import):
                targets = [a.name.partition(".")[2] or "__init__" for a in child.names if a.name.split(".")[0] == "impure_hf"]
            found.extend((t, child, in_function) for t in dict.fromkeys(targets) if t != name)
            visit(child, nested)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {t for t, _, _ in _imports(name, path, modules)} for name, path in modules.items()}


def _floor(module: str) -> int:
    top = module.split(".")[0]
    if top not in FLOORS:
        raise AssertionError(f"impure_hf/{top} has no floor in this test's FLOORS (DESIGN.md section 7): add it")
    return FLOORS[top]


def test_the_reader_sees_function_level_and_relative_imports():
    # the guard below is only as good as this reader: a nested relative import must show up
    modules = _modules()
    edges = {(t, lazy) for t, _, lazy in _imports("__init__", modules["__init__"], modules)}
    assert ("configuration_impure", False) in edges and any(lazy for _, lazy in edges)


def test_no_import_cycle(graph):
    # Tarjan's strongly connected components: any component of more than one module is a cycle
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    assert not cycles, f"import cycles (function-level imports counted): {cycles}"


def test_no_module_imports_one_above_it(graph):
    upward = [f"{m} (floor {_floor(m)}) imports {t} (floor {_floor(t)})"
              for m, targets in graph.items() for t in targets
              if _floor(t) > _floor(m) and t.split(".")[0] != m.split(".")[0]]
    assert not upward, "\n".join(upward)


def test_nothing_imports_the_cli(graph):
    assert not [m for m, targets in graph.items() if "cli" in targets and m != "cli"]


def test_imports_at_the_top_except_optional_dependencies():
    lazy = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            guarded = {id(n) for t in ast.walk(function) if isinstance(t, ast.Try) for n in ast.walk(t)}
            for node in ast.walk(function):
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in guarded:
                    continue  # imports inside try: version fallbacks and optional dependencies with a hint
                roots = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else [
                    "." if node.level else (node.module or "").split(".")[0]]
                if name == "__init__":  # the package's lazy attributes (PurifiedClassifier, finetune)
                    continue
                lazy += [f"{name}:{node.lineno} imports {r}" for r in roots if r not in OPTIONAL]
    assert not lazy, "function-level imports of required modules:\n" + "\n".join(lazy)



def test_old_import_paths_are_thin_re_exports():
    import impure_hf
    from impure_hf import defended, evaluate, finetuning, hub, loading, publishing

    assert hub.load_purifier is loading.load_purifier is impure_hf.load_purifier
    assert hub.build_model_card is publishing.build_model_card and hub.HUB_REPO_IDS is loading.HUB_REPO_IDS
    assert evaluate.PurifiedClassifier is defended.PurifiedClassifier is impure_hf.PurifiedClassifier
    assert finetuning.purified_pipeline is defended.purified_pipeline
    assert finetuning.finetune is impure_hf.finetune
    assert impure_hf.DEFAULT_MODEL == loading.DEFAULT_MODEL


def test_no_module_over_700_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 700}
    assert not long, f"modules over 700 lines: {long}"


def test_package_data_globs_match_files_and_ship_the_card_template():
    import configparser

    from impure_hf.publishing import MODEL_CARD_TEMPLATE

    config = configparser.ConfigParser()
    config.read(PACKAGE.parent / "setup.cfg")
    globs = [g.strip() for g in config["options.package_data"]["impure_hf"].split(",")]
    matched = {g: sorted(PACKAGE.glob(g)) for g in globs}
    assert all(matched.values()), f"package_data globs that match nothing: {[g for g, m in matched.items() if not m]}"
    # `impure card` works from an installed wheel: its template is one of the shipped files
    assert MODEL_CARD_TEMPLATE in {path for paths in matched.values() for path in paths}

"""The layout: sub-packages by role in a fixed order (each imports only its own and those below it, imports
inside functions included), no import cycle, one name per module, the entry shims at the documented
``python -m`` paths, and the search's pipeline running one way."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The sub-packages, lowest first: each may import only from its own and the ones before it (docs/layout.md).
LAYERS = (
    "search_lib.core",      # errors, utils, command-line plumbing, threads, memory, distributed, run folders, figures
    "search_lib.data",      # dataset names and files, transforms, episodes, synthetic data
    "search_lib.models",    # operations, search space, genotypes, supernet
    "search_lib.search",    # kernels, linear regions, ranking, scoring, pruning, the search's config, run and picture
    "eval_lib.rfs_models",  # the trained network (AugmentCNN) and its size
    "eval_lib.fewshot",     # the few-shot test, its classifiers and inference
    "eval_lib.train",       # the training: config, epochs, checkpoints, metrics, the run, its picture, the hand-off
    "eval_lib.study",       # the proxy study: proxies, zero-cost computations, statistics, picture
    "eval_lib.commands",    # the command lines, the launcher, the original's flags, the presets, the sweep
)
# Modules kept at the ``python -m`` paths the documentation shows; each only forwards to the command it names.
ENTRY_SHIMS = {
    "search_lib.sweep": "eval_lib.commands.sweep",
    "search_lib.synthetic": "search_lib.data.synthetic",
    "eval_lib.proxy_study": "eval_lib.commands.study_command",
    "eval_lib.report": "eval_lib.commands.draw_pictures",
}
# The search's pipeline inside search_lib.search: each module imports only those before it, so the run folder
# and the command above never get called back from the rounds below.
SEARCH_PIPELINE = ("kernels", "linear_regions", "ranking", "zc_gradients", "zc_activations", "zero_cost", "objectives",
                   "search_config", "scoring", "pruning", "search_plot", "search_run")


def _module_names(root: Path = None) -> dict[str, Path]:
    """Dotted name -> file of every module of the two packages (a package is its __init__.py)."""
    root = root or ROOT
    names = {}
    for pkg in ("search_lib", "eval_lib"):
        for path in (root / pkg).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph(root: Path = None) -> dict[str, set[str]]:
    """module -> the project modules it imports, function-level imports included. ``from pkg import x`` is an
    import of module ``pkg.x`` when that is a module, else of ``pkg``; relative imports are resolved."""
    names = _module_names(root)
    graph = {}
    for name, path in names.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names)
        targets = set()
        for target in found:
            while target and target not in names:  # search_lib.data.files.load_split -> search_lib.data.files
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def layer_of(module: str) -> int | None:
    """The index of the module's sub-package in `LAYERS`; None for the package roots and the entry shims."""
    return next((i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")), None)


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, target) for every import of a higher sub-package, and of a package root or an entry shim."""
    bad = []
    for module, targets in graph.items():
        if module in ENTRY_SHIMS or module in ("search_lib", "eval_lib"):
            continue
        for target in targets:
            if layer_of(target) is None or layer_of(target) > layer_of(module):
                bad.append((module, target))
    return sorted(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_every_module_lives_in_a_sub_package():
    loose = [m for m in _module_names() if layer_of(m) is None and m not in ENTRY_SHIMS
             and m not in ("search_lib", "eval_lib")]
    assert not loose, f"modules outside the sub-packages of LAYERS: {loose}"


def test_sub_packages_import_only_their_own_and_lower_ones():
    graph = import_graph()
    assert "eval_lib.train.training_run" in graph["eval_lib.commands.eval_command"]  # the graph sees the imports
    assert upward_imports(graph) == []


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_search_pipeline_runs_one_way():
    graph = import_graph()
    order = {f"search_lib.search.{m}": i for i, m in enumerate(SEARCH_PIPELINE)}
    assert set(order) == {m for m in graph if m.startswith("search_lib.search.")}, "SEARCH_PIPELINE lists every module"
    back = sorted((m, t) for m, ts in graph.items() if m in order for t in ts if t in order and order[t] > order[m])
    assert back == [], f"a search module imports one after it in SEARCH_PIPELINE: {back}"


def test_no_two_modules_share_a_name():
    seen: dict[str, str] = {}
    for module, path in sorted(_module_names().items()):
        leaf = module.rpartition(".")[2]
        if module in ENTRY_SHIMS or path.name == "__init__.py":
            continue
        assert leaf not in seen, f"{module} and {seen[leaf]} share the name {leaf!r}"
        seen[leaf] = module


def test_entry_shims_only_forward_to_their_command():
    import importlib
    for shim, target in ENTRY_SHIMS.items():
        tree = ast.parse(_module_names()[shim].read_text())
        imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert [ast.unparse(n) for n in imports] == ["import sys", f"from {target} import main"], shim
        assert len(tree.body) == 4, f"{shim}: a docstring, two imports and the __main__ guard only"
        assert importlib.import_module(shim).main is importlib.import_module(target).main


def test_the_checks_find_an_upward_import_and_a_function_level_cycle(tmp_path, monkeypatch):
    """The checker itself, on made-up packages: a cycle through an import inside a function, a core module
    importing the search, and a loose module."""
    for pkg in ("search_lib", "search_lib/core", "search_lib/search", "eval_lib"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "search_lib" / "core" / "a.py").write_text("from . import b\n")
    (tmp_path / "search_lib" / "core" / "b.py").write_text("def f():\n    from .a import g\n")
    (tmp_path / "search_lib" / "core" / "c.py").write_text("import os\nfrom search_lib.search.x import y\n")
    (tmp_path / "search_lib" / "search" / "x.py").write_text("from ..core.a import f\ny = 1\n")
    graph = import_graph(tmp_path)
    assert graph["search_lib.core.a"] == {"search_lib.core.b"} and graph["search_lib.core.b"] == {"search_lib.core.a"}
    assert find_cycle(graph) == ["search_lib.core.a", "search_lib.core.b", "search_lib.core.a"]
    assert upward_imports(graph) == [("search_lib.core.c", "search_lib.search.x")]
    assert graph["search_lib.search.x"] == {"search_lib.core.a"}


if __name__ == "__main__":  # print the sub-packages with their modules and lines (the closing note's table)
    sizes: dict[str, list[int]] = {}
    for module, path in _module_names().items():
        key = LAYERS[layer_of(module)] if layer_of(module) is not None else "(roots, shims)"
        sizes.setdefault(key, []).append(len(path.read_text().splitlines()))
    for key, lines in sorted(sizes.items(), key=lambda kv: (LAYERS + ("(roots, shims)",)).index(kv[0])):
        print(f"{key:24s} {len(lines):3d} modules {sum(lines):6d} lines", file=sys.stdout)

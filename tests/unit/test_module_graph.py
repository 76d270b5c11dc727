"""The package's import graph: no cycle between files, and layers point one way.

Every ``import`` counts, function-level ones included (a lazy import hides a cycle, it does not
remove it). ``launch/`` is the top layer: ``kernels/``, ``data_pipeline/`` and ``pretrain/`` never
import it.
"""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pretrain", "kernels", "data_pipeline", "launch", "configs")
LOWER_LAYERS = ("kernels", "data_pipeline", "pretrain")
# Edges that point back by design, each only inside a function: TerraByte inherits hub I/O
# (hub.HubMixin) whose code reads checkpoints, and the checkpoint code builds TerraByte, so the
# mixin's methods import checkpoint/pretrained.py when they are called.
LATE_BOUND = {("terrabyte.pretrain.model.hub", "terrabyte.pretrain.checkpoint.pretrained")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["terrabyte", *parts])


def _files() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def imported_names(path: Path) -> set[str]:
    """Every module name an ``import`` statement in the file names (absolute ones as written)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def import_graph(module_level: bool = False) -> dict[str, set[str]]:
    """{module: modules of this package it imports}, e.g. terrabyte.pretrain.train.trainer -> {...};
    ``module_level``: only the imports run when the module is imported (not inside a function)."""
    files = _files()
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        tree = ast.parse(path.read_text(), str(path))
        for node in (_outside_functions(tree) if module_level else ast.walk(tree)):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from . import engine` names a module; `from .model import X` names names in one
                candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                              for alias in node.names]
            else:
                continue
            for candidate in candidates:
                if candidate in files and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def _outside_functions(node):
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield child
            yield from _outside_functions(child)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; returns the components with more than one module (the cycles)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_known_edges():
    graph = import_graph()
    assert "terrabyte.pretrain.model.terrabyte" in graph["terrabyte.pretrain.train.trainer"]
    # `from ..engine import engine as eng`: a module of a sibling package
    assert "terrabyte.pretrain.engine.engine" in graph["terrabyte.pretrain.train.trainer"]
    assert "terrabyte.data_pipeline.basics.errors" in graph["terrabyte.launch.cli"]


def test_cycle_finder_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_files():
    graph = {module: {t for t in targets if (module, t) not in LATE_BOUND} for module, targets in import_graph().items()}
    assert strongly_connected(graph) == []


def test_late_bound_edges_exist_only_inside_functions():
    everywhere, at_import = import_graph(), import_graph(module_level=True)
    for module, target in LATE_BOUND:
        assert target in everywhere[module], (module, target)  # a rule for an edge that is gone goes too
        assert target not in at_import[module], (module, target)
    # the scan sees module-level imports
    assert "terrabyte.pretrain.model.hub" in at_import["terrabyte.pretrain.model.terrabyte"]


def test_lower_layers_never_import_launch():
    bad = sorted((module, target) for module, targets in import_graph().items()
                 for target in targets
                 if module.split(".")[1] in LOWER_LAYERS and target.startswith("terrabyte.launch"))
    assert bad == []


def test_model_never_imports_deepspeed():
    for module in ("layers", "stage", "terrabyte"):
        assert "torch" in imported_names(REPO / "pretrain" / "model" / f"{module}.py")  # the scanner sees its imports
    for module in ("cache", "generate", "plans", "sample"):
        assert "torch" in imported_names(REPO / "pretrain" / "decode" / f"{module}.py")
    for path in sorted([*(REPO / "pretrain" / "model").glob("*.py"), *(REPO / "pretrain" / "decode").glob("*.py")]):
        names = imported_names(path)
        assert not [n for n in names if n.split(".")[0] == "deepspeed"], path


def test_data_sides_meet_only_in_format_and_basics():
    """data_pipeline/basics/ imports nothing else of the project (the model imports it without the
    data package), and the write and read sides never import each other: what one writes and the
    other reads is named in format.py."""
    graph, dp = import_graph(), "terrabyte.data_pipeline."
    assert dp + "basics.errors" in graph[dp + "write.builder"] and dp + "format" in graph[dp + "read.manifest"]
    bad = sorted((module, target) for module, targets in graph.items() for target in targets
                 if (module.startswith(dp + "basics.") and not target.startswith(dp + "basics."))
                 or (module.startswith(dp + "write.") and target.startswith(dp + "read."))
                 or (module.startswith(dp + "read.") and target.startswith(dp + "write.")))
    assert bad == []


def _module_map_rows() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    table = text.split("Module map, one line each", 1)[1].split("\n\n", 2)[1]
    rows = [line.split(" | ", 1) for line in table.splitlines() if line.startswith("| `")]
    return [(left.strip("| "), right) for left, right in rows]


def test_readme_module_map_matches_the_tree():
    """Every path the README's module map names exists, and every folder of the packages has a row:
    a newcomer reading the map finds each part where it says."""
    rows = _module_map_rows()
    named = []
    for left, right in rows:
        heads = [h.strip("`") for h in left.split(", ")]
        folder = heads[0] if heads[0].endswith("/") else heads[0].rsplit("/", 1)[0] + "/"
        named += [h if "/" in h else folder + h for h in heads]
        # files a folder's row names by their bare names: `store.py`, ...
        if heads[0].endswith("/"):
            named += [heads[0] + n for n in re.findall(r"`([a-z_]+\.py)`", right)]
    missing = [n for n in named if not (REPO / n).exists()]
    assert not missing, f"README module map names missing paths: {missing}"
    folders = {p.parent.relative_to(REPO).as_posix() + "/" for top in ("pretrain", "kernels", "data_pipeline")
               for p in (REPO / top).rglob("*.py") if p.parent != REPO / top}
    covered = {n if n.endswith("/") else n.rsplit("/", 1)[0] + "/" for n in named}
    assert folders <= covered, f"folders without a row in README's module map: {sorted(folders - covered)}"

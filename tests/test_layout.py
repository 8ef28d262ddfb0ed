"""The package map holds: no two top-level parts import each other (through any chain), and the
engine (the loop) names no method and no perturbation; the perturbation kinds the config accepts
are the registered ones."""

import ast
import re
import typing
from pathlib import Path

import ensemble_kd
from ensemble_kd.config import PerturbConfig
from ensemble_kd.methods import METHODS
from ensemble_kd.perturbations import PERTURBATIONS

PACKAGE = Path(ensemble_kd.__file__).parent


def _part(module: str) -> str:
    """ensemble_kd.engine.trainer -> engine; ensemble_kd.config -> config."""
    return module.split(".")[1]


def _imported(path: Path) -> set[str]:
    """Every ensemble_kd module `path` imports, lazily (inside functions) or not."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out |= {base} if node.module else {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("ensemble_kd.")}


def part_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel == Path("__init__.py"):
            continue
        src = rel.parts[0].removesuffix(".py")
        graph.setdefault(src, set()).update(_part(m) for m in _imported(path) if _part(m) != src)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of nodes, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None
    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# The README's layout, bottom to top: each part may import only the parts before it.
LAYERS = ["progress", "config", "plugins", "distributed", "precision", "data", "models", "metrics", "solvers", "methods", "engine",
          "ensemble", "perturbations", "evaluation", "report", "pipeline", "export", "sweep", "reproduce", "cli"]


def test_no_top_level_part_imports_one_that_imports_it_back():
    graph = part_graph()
    assert _cycle(graph) is None, f"import cycle between parts: {' -> '.join(_cycle(graph))}"
    assert set(graph) == set(LAYERS), "a new top-level part: place it in LAYERS and the README's layout"
    for part, imports in graph.items():
        above = imports - set(LAYERS[:LAYERS.index(part)])
        assert not above, f"{part} imports {sorted(above)}, listed above it"


def test_the_engine_names_no_method_and_no_perturbation():
    names = (set(METHODS) | set(PERTURBATIONS) | {"ae-kd", "batchensemble"}) - {"ce"}
    for path in (PACKAGE / "engine").rglob("*.py"):
        text = re.sub(r"ensemble[-_]kd", "", path.read_text().lower())
        words = set(re.findall(r"[a-z_][a-z0-9_-]*", text))
        assert not words & names, f"{path.name} names {sorted(words & names)}"


def test_the_config_accepts_exactly_the_registered_perturbations():
    kinds = typing.get_args(PerturbConfig.model_fields["kind"].annotation)
    assert set(kinds) == {"none", *PERTURBATIONS}

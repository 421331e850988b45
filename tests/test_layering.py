"""The import graph of ldm/ (every import, also those inside functions): no cycle between files or between
packages, and imports point down the layer list of DESIGN.md only."""

import ast
from pathlib import Path

import pytest

LDM = Path(__file__).resolve().parents[1] / "ldm"
# DESIGN.md's layers, lowest first: a unit may import its own layer and the layers before it.
LAYERS = ["diffusion", "models", "formats", "data", "pipelines", "evaluation", "training", "tasks", "cli"]
# Top-level modules that are not packages, and the layer they belong to.
MODULE_LAYERS = {"guidance_scorers": "tasks", "evaluate": "cli"}
# What a layer must not import even though it is lower (DESIGN.md: the data library builds no networks and reads
# no weights; the cache CLI lives in ldm/cli/) ...
FORBIDDEN = {"data": {"models", "formats"}}
# ... except the checker of plain stored values: a latent-cache manifest is a file too.
ALLOWED = {"data": {"ldm.formats.safe_build", "ldm.formats.safe_load", "ldm.formats.dtypes"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(LDM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """The ldm modules ``path`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in found if m == "ldm" or m.startswith("ldm.")}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in LDM.rglob("*.py")}
    return {name: {m for m in imports_of(path, name) if m in files and m != name} for name, path in files.items()}


def unit(module: str) -> str:
    """The top-level package (or module) of ldm a module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ldm"


def layer(module: str) -> str:
    u = unit(module)
    return MODULE_LAYERS.get(u, u)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle_between_files():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_no_import_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    for a, targets in graph().items():
        for b in targets:
            if unit(a) != unit(b) and unit(b) != "ldm":
                edges.setdefault(unit(a), set()).add(unit(b))
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_imports_point_down_the_layers():
    wrong = []
    for a, targets in graph().items():
        for b in targets:
            la, lb = layer(a), layer(b)
            if lb == "ldm" or la == "ldm":
                continue
            assert la in LAYERS and lb in LAYERS, f"{a} or {b} is in no layer: add it to LAYERS / MODULE_LAYERS"
            forbidden = lb in FORBIDDEN.get(la, ()) and b not in ALLOWED.get(la, ())
            if LAYERS.index(lb) > LAYERS.index(la) or forbidden:
                wrong.append(f"{a} imports {b} ({la} -> {lb})")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


@pytest.mark.parametrize("bad", [{"a": {"b"}, "b": {"c"}, "c": {"a"}}, {"x": {"x"}}])
def test_the_cycle_finder_finds_cycles(bad):
    assert find_cycle(bad) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None

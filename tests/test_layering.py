"""The import graph of ldm/ (every import, also those inside functions, and every string that names an ldm module:
lazy import tables, ``import_module("ldm.x")``): no cycle between files or between packages, imports point down the
layer list of DESIGN.md only, the library below ``ldm.tasks`` never imports a task, and one task never imports
another."""

import ast
from pathlib import Path

import pytest

LDM = Path(__file__).resolve().parents[1] / "ldm"
# DESIGN.md's layers, lowest first: a unit may import its own layer and the layers before it.
LAYERS = ["diffusion", "models", "formats", "data", "pipelines", "evaluation", "training", "tasks", "cli"]
# Top-level modules that are not packages, and the layer they belong to.
MODULE_LAYERS = {"evaluate": "cli", "export": "cli", "lora": "cli",
                 "file_modes": "diffusion"}  # a leaf helper (no ldm imports): every layer may use it
# What a layer must not import even though it is lower (DESIGN.md: the data library builds no networks and reads
# no weights; the cache CLI lives in ldm/cli/) ...
FORBIDDEN = {"data": {"models", "formats"}}
# ... except the checker of plain stored values: a latent-cache manifest is a file too.
ALLOWED = {"data": {"ldm.formats.safe_build", "ldm.formats.safe_load", "ldm.formats.dtypes", "ldm.formats.safe_paths",
                    "ldm.formats.safetensors_bytes"}}
# The library: what the tasks build on and must never depend on them (a task's checker or scorer reaches it as an
# object: the dataset's checker(), a Hydra _target_ into ldm.tasks; DESIGN.md "a self-contained task folder").
LIBRARY = LAYERS[: LAYERS.index("tasks")]


def module_name(path: Path) -> str:
    parts = path.relative_to(LDM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """The ldm modules ``path`` imports, anywhere in the file, or names in a string (a lazy import)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    logger_names = {id(a) for node in ast.walk(tree) if isinstance(node, ast.Call)
                    and getattr(node.func, "attr", getattr(node.func, "id", None)) == "getLogger" for a in node.args}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in logger_names:
            found.add(node.value)  # kept only where it is exactly the name of an ldm module
        elif isinstance(node, ast.Import):
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


def wrong_way(edges: dict[str, set[str]]) -> list[str]:
    """The imports of ``edges`` (module -> modules it imports) that point up the layers or into a forbidden one."""
    wrong = []
    for a, targets in edges.items():
        for b in targets:
            la, lb = layer(a), layer(b)
            if lb == "ldm" or la == "ldm":
                continue
            assert la in LAYERS and lb in LAYERS, f"{a} or {b} is in no layer: add it to LAYERS / MODULE_LAYERS"
            forbidden = lb in FORBIDDEN.get(la, ()) and b not in ALLOWED.get(la, ())
            if LAYERS.index(lb) > LAYERS.index(la) or forbidden:
                wrong.append(f"{a} imports {b} ({la} -> {lb})")
    return sorted(wrong)


def task_of(module: str) -> str | None:
    """``ldm.tasks.<task>.x`` -> ``<task>``; None outside a task folder (ldm.tasks itself included)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "tasks" else None


def task_imports(edges: dict[str, set[str]]) -> list[str]:
    """Imports of a task from the library below it, or of one task from another (each task folder stands alone)."""
    wrong = []
    for a, targets in edges.items():
        for b in (t for t in targets if layer(t) == "tasks" and t != "ldm.tasks"):
            if layer(a) in LIBRARY:
                wrong.append(f"{a} imports the task module {b}: pass the task's object in instead (a dataset "
                             "method, a Hydra _target_ into ldm.tasks)")
            elif layer(a) == "tasks" and task_of(a) != task_of(b):
                wrong.append(f"{a} imports {b}: one task may not depend on another")
    return sorted(wrong)


def test_imports_point_down_the_layers():
    wrong = wrong_way(graph())
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_library_never_imports_a_task_and_tasks_stand_alone():
    wrong = task_imports(graph())
    assert not wrong, "\n".join(wrong)
    assert {task_of(m) for m in graph()} >= {"shapes", "glyphs"}  # the task folders exist and are scanned


@pytest.mark.parametrize("importer", [f"ldm.{u}.x" for u in LIBRARY])
def test_the_rules_catch_an_import_of_a_task(importer):
    edges = {importer: {"ldm.tasks.shapes.checker"}}
    assert wrong_way(edges) and task_imports(edges)
    assert task_imports({"ldm.tasks.glyphs.dataset": {"ldm.tasks.shapes.palette"}})
    assert not task_imports({"ldm.tasks.shapes.dataset": {"ldm.tasks.shapes.palette", "ldm.data.auto_cache"},
                             "ldm.cli.evaluate": {"ldm.tasks.shapes.dataset"}})


def test_a_string_naming_a_module_is_an_import(tmp_path):
    lazy = tmp_path / "lazy.py"
    lazy.write_text('import logging\nlogging.getLogger("ldm.training")\n'
                    'TABLE = {"ShapesDataset": "ldm.tasks.shapes.dataset"}\n')
    found = imports_of(lazy, "ldm.data")  # a logger's name is not an import
    assert "ldm.tasks.shapes.dataset" in found and "ldm.training" not in found


@pytest.mark.parametrize("bad", [{"a": {"b"}, "b": {"c"}, "c": {"a"}}, {"x": {"x"}}])
def test_the_cycle_finder_finds_cycles(bad):
    assert find_cycle(bad) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_bench_scripts_import_modules_that_exist():
    """bench/ is run by hand, not collected: a module that moved (ldm.data.shapes -> ldm.tasks.shapes.dataset) must
    not leave a bench script importing the old path."""
    modules = set(graph())
    stale = []
    for path in sorted((LDM.parent / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
            stale += [f"bench/{path.name} imports {n}" for n in names if n.startswith("ldm.") and n not in modules]
    assert not stale, "\n".join(stale)


# ldm/training/ in wings (docs/architecture.md): what runs each step (module/: the LightningModules and what they
# hold) and the factories (build/) stand alone, callbacks may use them, and run/ (train(cfg) as named stages) sits
# on top of all three. No file lives directly in ldm/training/ besides __init__.py.
TRAINING_WINGS = {"module": set(), "build": {"module"}, "callbacks": {"module", "build"},
                  "run": {"module", "build", "callbacks"}}


def wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "training" else None


def test_training_wings():
    wrong = [f"{a} imports {b}" for a, targets in graph().items() if wing(a) for b in targets
             if wing(b) and wing(b) != wing(a) and wing(b) not in TRAINING_WINGS[wing(a)]]
    assert not wrong, "imports between ldm/training/ wings against their order:\n" + "\n".join(sorted(wrong))
    loose = sorted(p.name for p in (LDM / "training").glob("*.py") if p.name != "__init__.py")
    assert not loose and {p.name for p in (LDM / "training").iterdir() if p.is_dir() and p.name != "__pycache__"} \
        == set(TRAINING_WINGS), f"files outside the wings: {loose}"


def test_training_wings_stay_small():
    """A wing is a room one can take in: about a dozen files at most."""
    for folder in (LDM / "training").rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__":
            files = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
            assert len(files) <= 12, f"{folder} holds {len(files)} files"

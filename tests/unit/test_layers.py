"""Layers go one way, and no module imports itself back through others (imports inside
functions included): core → task → data, inference → distill, train, evaluation → release →
steps → components → pipelines → cli; serving depends only on core, task and inference."""

import ast
from pathlib import Path

from helpers.paths import ROOT

RANK = {"core": 0, "task": 1, "data": 2, "inference": 2, "distill": 3, "train": 3, "evaluation": 3,
        "release": 4, "annotate": 4, "steps": 5, "components": 6, "pipelines": 7, "cli": 8}
SERVING_MAY_USE = {"core", "task", "inference", "serving"}


def modules() -> dict[str, Path]:
    out = {}
    for top, prefix in (("src/cellpuzzles", "cellpuzzles"), ("serving", "cellpuzzles.serving"),
                        ("components", "cellpuzzles.components"), ("pipelines", "cellpuzzles.pipelines")):
        for f in (ROOT / top).rglob("*.py"):
            parts = list(f.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = f
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every cellpuzzles module ``name`` imports, at module level or inside functions."""
    found = set()
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("cellpuzzles.")}


MODS = modules()
GRAPH = {m: {i for i in imports(m, p) if i in MODS and i != m} for m, p in MODS.items()}


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def test_every_module_lives_in_a_room():
    loose = sorted(m for m in MODS if m.count(".") == 1 and m.split(".")[1] not in RANK | {"serving": 0}
                   and MODS[m].name != "__init__.py")
    assert loose == [], f"modules outside the stage packages: {loose}"


def test_layers_go_one_way():
    bad = []
    for m, deps in GRAPH.items():
        src = room(m)
        for d in deps:
            dst = room(d)
            if src is None or dst is None or src == dst:
                continue
            if src == "serving":
                ok = dst in SERVING_MAY_USE
            elif dst == "serving":
                ok = src == "cli"
            else:
                ok = RANK[dst] < RANK[src]
            if not ok:
                bad.append(f"{m} -> {d}")
    assert bad == [], "imports against the layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_the_check_sees_function_level_and_relative_imports(tmp_path):
    """The graph includes imports inside functions (where cycles used to hide) and relative ones."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from cellpuzzles.release.gate import gate\n    from ..train import sft\n")
    found = imports("cellpuzzles.task.probe", probe)
    assert {"cellpuzzles.release.gate", "cellpuzzles.train.sft"} <= found

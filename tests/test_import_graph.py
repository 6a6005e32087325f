"""The core's packages form no import cycle (../shared/DESIGN.md, "Boundaries that must hold").

Every .py under appliance/ and bundles/ is read with `ast`; every import counts, at module level or inside a
function (a lazy import hides a cycle, it does not break one). Modules are grouped into packages: each
subpackage of appliance (vault, train, eval, quantize, jobs, tasks, tui, ...), bundles, and each top-level
module of appliance on its own. The package graph must be acyclic, and so must the module graph. A cycle is
broken by moving the piece both sides need down, never by hiding the import in a function. Imports by name
at run time (`python -m appliance.jobs.runner`, importlib) are not edges.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("appliance", "bundles")

# Module cycles inside one package that are known; each must go, none may be added.
KNOWN_MODULE_CYCLES: list[list[str]] = []


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the appliance and bundles packages, by dotted name."""
    return {module_name(p): p for top in SOURCES for p in sorted((ROOT / top).rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules a module imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:  # `import a.b.c` of a function or class: its module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for base, names in import_statements(path, package):
        for n in names:  # `from pkg import mod` imports a module, `from mod import f` its module
            add(f"{base}.{n}" if base and f"{base}.{n}" in known else (base or n))
    return found


def import_statements(path: Path, package: str) -> list[tuple[str, list[str]]]:
    """Each import in a file as (module, names): `import a.b` is ("", ["a.b"]); `from .x import f` is
    ("PACKAGE.x", ["f"]), relative imports resolved against `package`."""
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.append(("", [a.name for a in node.names]))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
    return out


def package_of(module: str) -> str:
    """appliance.eval.run -> appliance.eval; appliance.home -> appliance.home; bundles.keys -> bundles."""
    parts = module.split(".")
    if parts[0] == "bundles":
        return "bundles"
    return ".".join(parts[:2]) if len(parts) > 1 else module


def module_edges() -> dict[str, set[str]]:
    """Module -> the modules it imports."""
    mods = modules()
    known = set(mods)
    return {name: imported(name, path, known) for name, path in mods.items()}


def package_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for name, targets in module_edges().items():
        edges[package_of(name)] |= {package_of(t) for t in targets} - {package_of(name)}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def explain(comp: list[str], edges: dict[str, set[str]]) -> str:
    inside = set(comp)
    arrows = [f"{a} -> {b}" for a in comp for b in sorted(edges.get(a, ())) if b in inside]
    return "{" + ", ".join(comp) + "}: " + "; ".join(arrows)


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from p.a import f\n")
    (pkg / "a.py").write_text("import os\n\n\ndef f():\n    from p import b\n    from .c import g\n    import p.d.e\n")
    known = {"p", "p.a", "p.b", "p.c", "p.d"}
    assert imported("p.a", pkg / "a.py", known) == {"p.b", "p.c", "p.d"}
    assert imported("p", pkg / "__init__.py", known) == {"p.a"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert package_of("appliance.eval.run") == "appliance.eval" and package_of("appliance.home") == "appliance.home"
    assert package_of("bundles.keys") == "bundles" and package_of("appliance") == "appliance"


def test_every_module_is_seen():
    mods = modules()
    assert {"appliance.home", "appliance.vault.vault", "appliance.eval.run", "appliance.tasks.episode",
            "appliance.train.grpo", "bundles", "bundles.keys"} <= set(mods)
    edges = module_edges()
    assert "appliance.tasks" in edges["appliance.train.grpo"]  # a function-level import counts


def test_no_package_level_cycle():
    edges = package_edges()
    found = cycles(edges)
    assert not found, "import cycles between packages (move the shared piece down):\n" + "\n".join(
        explain(c, edges) for c in found)


def test_no_module_level_cycle():
    """No two modules import each other, directly or around a ring, even through a function-level import."""
    edges = module_edges()
    found = [c for c in cycles(edges) if c not in KNOWN_MODULE_CYCLES]
    assert not found, "import cycles between modules (move the shared piece down):\n" + "\n".join(
        explain(c, edges) for c in found)


def test_the_task_format_sits_below_train_and_eval():
    """Training (GRPO on a task) and evaluation (completion rate) share appliance.tasks; it needs neither."""
    edges = package_edges()
    assert "appliance.tasks" in edges["appliance.train"] and "appliance.tasks" in edges["appliance.eval"]
    assert not edges["appliance.tasks"] & {"appliance.train", "appliance.eval", "appliance.jobs"}
    assert "appliance.eval" not in edges["appliance.train"]


# --- one door: the skins import the core API, the error module and their UI library, nothing else ---------
# Each skin is a package or module; what it may import besides itself. The command line also starts the other
# two skins (`appliance tui`, `appliance mcp`): it imports their entry points, never their insides. The same
# holds for the showcase (`appliance demo`): it drives the API, the console and the MCP server, so it sits above
# them all (appliance.api cannot import it without a cycle) and the command line starts it by its entry points.
CORE = ("appliance.api", "appliance.errors")
SKINS = {
    "appliance.cli": {"libs": {"click", "rich"}, "launches": {"appliance.tui.app.ApplianceApp",
                                                              "appliance.mcp_server.serve",
                                                              "appliance.demo.demo_home", "appliance.demo.run_demo"}},
    "appliance.tui": {"libs": {"textual", "rich"}, "launches": set()},
    "appliance.mcp_server": {"libs": {"mcp", "pydantic", "anyio"}, "launches": set()},
}


def _inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def all_imports(path: Path, name: str) -> set[str]:
    """Every module name a file imports (ours resolved to dotted names, others by their top-level name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for base, names in import_statements(path, package):
        ours = base.split(".")[0] in ("appliance", "bundles")
        found |= {f"{base}.{n}" if ours else (base or n) for n in names}
    return found


def skin_violations() -> dict[str, set[str]]:
    import sys

    mods = modules()
    bad: dict[str, set[str]] = {}
    for skin, allowed in SKINS.items():
        for name, path in mods.items():
            if not _inside(name, skin):
                continue
            for target in all_imports(path, name):
                top = target.split(".")[0]
                if top in sys.stdlib_module_names or top == "__future__" or top in allowed["libs"]:
                    continue
                if _inside(target, skin) or target in allowed["launches"]:
                    continue
                if any(_inside(target, c) for c in CORE):
                    continue
                bad.setdefault(name, set()).add(target)
    return bad


def test_skins_go_through_the_core_api():
    """The CLI, the console and the MCP server are thin skins over appliance.api (../shared/DESIGN.md)."""
    bad = skin_violations()
    assert not bad, "skins importing past the core API (add or use an appliance.api function):\n" + "\n".join(
        f"{m}: {', '.join(sorted(t))}" for m, t in sorted(bad.items()))


def test_the_skin_check_catches_a_skin_that_reaches_past_the_core(tmp_path, monkeypatch):
    skin = tmp_path / "appliance" / "tui"
    skin.mkdir(parents=True)
    (skin / "__init__.py").write_text("")
    (skin / "screen.py").write_text("import json\nfrom textual.app import App\nfrom appliance import api\n\n\n"
                                    "def f():\n    from appliance.vault import versions\n")
    (tmp_path / "bundles").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert skin_violations() == {"appliance.tui.screen": {"appliance.vault.versions"}}
    (skin / "screen.py").write_text("from appliance.api import data\nfrom appliance.errors import UsageError\n")
    assert skin_violations() == {}

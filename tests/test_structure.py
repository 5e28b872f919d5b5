"""The package's shape: parts by folder, no import loops, lower parts never import higher ones,
no private name crosses a module, and the stable top-level API.

Every import is counted, also those inside functions, from the source (``ast``), so a lazy
import cannot hide a loop.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "gem_backend"

# Rank of each part: a module may import modules of its own part or of a lower rank only.
# settings/options sit above the algorithm and Label Studio parts (they read their defaults)
# and below everything that is configured by them; the CLI is the top.
RANKS = {
    "gem_backend.version": 0,
    "gem_backend.redaction": 0,
    "gem_backend.algorithm": 1,
    "gem_backend.labelstudio": 2,
    "gem_backend.settings": 3,
    "gem_backend.options": 3,
    "gem_backend.serving": 4,
    "gem_backend.jobs": 5,
    "gem_backend.evaluation": 5,
    "gem_backend.cli": 6,
}
# Parts of equal rank that are still independent of each other.
SEPARATE = {("gem_backend.jobs", "gem_backend.evaluation"), ("gem_backend.evaluation", "gem_backend.jobs")}
# Private attributes of objects that belong to other libraries (not our modules).
FOREIGN_PRIVATE = {"_C", "_asdict", "_replace", "_fields", "_make", "_value_", "_name_", "_thread", "_exit"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, tuple[str, ...]]]]:
    """module -> {(imported module, names imported from it)}, our modules only."""
    out: dict[str, set] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("gem_backend"):
                        found.add((alias.name, ()))
            elif isinstance(node, ast.ImportFrom):
                target = resolve(mod, path.name == "__init__.py", node)
                if not target.startswith("gem_backend"):
                    continue
                names = tuple(a.name for a in node.names)
                # `from pkg import module` imports that module
                subs = [n for n in names if f"{target}.{n}" in mods]
                for n in subs:
                    found.add((f"{target}.{n}", ()))
                rest = tuple(n for n in names if n not in subs)
                if rest or not subs:
                    found.add((target, rest))
        out[mod] = found
    return out


def part_of(mod: str) -> str:
    for part in sorted(RANKS, key=len, reverse=True):
        if mod == part or mod.startswith(part + "."):
            return part
    raise AssertionError(f"{mod} belongs to no part: add it to a subpackage or to RANKS")


def test_every_module_is_in_a_part():
    for mod in modules():
        if mod != "gem_backend":
            part_of(mod)


def test_parts_are_folders_with_documented_inits():
    for part in RANKS:
        path = PKG / part.split(".", 1)[1]
        if path.is_dir():
            doc = ast.get_docstring(ast.parse((path / "__init__.py").read_text()))
            assert doc and len(doc) > 80, f"{part}/__init__.py needs a docstring saying what the part is"


def test_no_import_loops():
    mods = modules()
    graph = {m: {t for t, _ in deps if t in mods and t != m} for m, deps in imports(mods).items()}
    # the package root only re-exports lazily; a submodule importing it would be a loop
    index, low, stack, on, loops = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                loops.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not loops, f"import loops: {loops}"
    for m, deps in graph.items():
        if m != "gem_backend":
            assert "gem_backend" not in deps, f"{m} imports the package root (import from the module instead)"


def test_lower_parts_never_import_higher_ones():
    mods = modules()
    bad = []
    for mod, deps in imports(mods).items():
        if mod == "gem_backend":
            continue
        here = part_of(mod)
        for target, _ in deps:
            if target == "gem_backend" or target not in mods:
                continue
            there = part_of(target)
            if RANKS[there] > RANKS[here] or (here, there) in SEPARATE:
                bad.append(f"{mod} -> {target}")
    assert not bad, "imports against the layering: " + ", ".join(bad)


def test_algorithm_has_no_http_label_studio_or_redis():
    banned = ("flask", "requests", "redis", "rq", "label_studio_sdk", "urllib3", "werkzeug", "gunicorn")
    for mod, path in modules().items():
        if not mod.startswith("gem_backend.algorithm"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for n in names:
                assert n.split(".")[0] not in banned, f"{mod} imports {n}"


def test_no_private_name_crosses_a_module():
    mods = modules()
    bad = []
    for mod, deps in imports(mods).items():
        for target, names in deps:
            if target == mod:
                continue
            bad += [f"{mod} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    # private attributes of objects other than self/cls (another module's internals)
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                    continue  # an override calling its base class
                if node.attr in FOREIGN_PRIVATE:
                    continue
                bad.append(f"{mod}:{node.lineno} reads .{node.attr} of {ast.unparse(owner)}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                    and str(node.args[1].value).startswith("_") and not str(node.args[1].value).startswith("__")):
                bad.append(f"{mod}:{node.lineno} getattr(..., {node.args[1].value!r})")
    assert not bad, "private names across modules:\n" + "\n".join(bad)


def test_top_level_api_is_lazy_and_complete():
    code = ("import sys, gem_backend; "
            "assert 'torch' not in sys.modules, 'import gem_backend loaded torch'; "
            "from gem_backend import (GEM, GEMPredictor, SegmentationSettings, load_gem_model, mask2rle, rle2mask, "
            "create_method, pamr, method_names); "
            "import gem_backend.algorithm.gem as g; assert GEM is g.GEM; "
            "print(sorted(gem_backend.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for name in ("GEM", "GEMPredictor", "SegmentationSettings", "load_gem_model", "mask2rle", "rle2mask",
                 "create_method", "pamr", "method_names"):
        assert name in out.stdout


def test_unknown_top_level_name_is_an_attribute_error():
    import gem_backend

    with pytest.raises(AttributeError, match="no_such_name"):
        getattr(gem_backend, "no_such_name")

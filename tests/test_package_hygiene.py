"""The package's own rules, checked on its source (AST scans, nothing imported):

(a) no module of ``genevolve_jax`` imports or reads a private (``_``-prefixed, not dunder) name
    it does not define itself: ``from m import _y``, ``m._y``, ``obj._y`` (obj not self/cls),
    ``getattr(obj, "_y")``;
(b) no test reads or writes a private attribute of a package or library object (``x._y`` with
    ``x`` not ``self``/``cls``, ``getattr(x, "_y")``, ``monkeypatch.setattr(x, "_y", …)``,
    ``from m import _y``), unless ``_y`` is defined by the tests themselves: in the same file, in a
    tests module it imports, or in a conftest.py above it;
(c) no module of ``genevolve_jax`` sets attributes on its own functions (``f.attr = …`` or
    ``setattr(f, …)`` where ``f`` is a ``def`` of the same scope): interfaces are explicit;
(d) the third-party loggers the package drives do not print DEBUG/INFO records.

Each scanner is first shown a snippet that breaks its rule, so a scan that finds nothing means the
package is clean, not that the scanner is blind.
"""
from __future__ import annotations

import ast
import asyncio
import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "genevolve_jax"
TESTS = ROOT / "tests"
# Underscored names that are public API: namedtuple's methods and fields.
PUBLIC_UNDERSCORED = frozenset({"_replace", "_asdict", "_fields", "_make", "_field_defaults"})


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) \
        and name not in PUBLIC_UNDERSCORED


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


# -- (a), (b) private names read from elsewhere ----------------------------------------------------
def _defined_names(tree: ast.AST) -> set[str]:
    """Names a file defines: defs, classes, assignments, ``self.x = …``, keyword arguments."""
    names: set[str] = set()

    def targets(t):
        if isinstance(t, ast.Name):
            names.add(t.id)
        elif isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                targets(e)
        elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in ("self", "cls"):
            names.add(t.attr)

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                targets(t)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets(node.target)
        elif isinstance(node, ast.keyword) and node.arg:   # SimpleNamespace(_x=…), set_defaults(_x=…)
            names.add(node.arg)
    return names


class _TestsIndex:
    """What tests/ defines, per file, for deciding whose a private name is."""

    def __init__(self, root: Path):
        self.root = root
        self.trees = {p: ast.parse(p.read_text()) for p in _files(root)}
        self.defined = {p: _defined_names(t) for p, t in self.trees.items()}
        self.stems = {p.stem for p in self.trees}   # tests' own module names (e.g. _reference)

    def _file_of(self, dotted: str) -> Path | None:
        rel = Path(*dotted.split("."))
        for cand in ((ROOT / rel).with_suffix(".py"), ROOT / rel / "__init__.py"):
            if cand in self.defined:
                return cand
        return None

    def allowed(self, path: Path) -> set[str]:
        """Private names this file may use: its own, its tests imports', its conftests'."""
        ok = set(self.defined[path]) | self.stems
        for parent in path.parents:
            conftest = parent / "conftest.py"
            if conftest in self.defined:
                ok |= self.defined[conftest]
            if parent == self.root:
                break
        module = _module_name(path)
        for node in ast.walk(self.trees[path]):
            sources = []
            if isinstance(node, ast.ImportFrom):
                src = _resolve(node, module, path.name == "__init__.py")
                sources = [src] + [f"{src}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                sources = [a.name for a in node.names]
            for src in sources:
                f = self._file_of(src)
                if f is not None:
                    ok |= self.defined[f]
        return ok


_ATTR_CALLS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


def private_reads(tree: ast.AST, module: str, is_package: bool, allowed: set[str]) -> list[str]:
    """Private names ``tree`` takes from elsewhere: ``x._y`` (x not self/cls), ``getattr(x, "_y")``
    and kin, ``monkeypatch.setattr("m._y", …)``, ``from m import _y``; names in ``allowed`` (what
    the code itself defines) are its own."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in allowed:
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(node, module, is_package)
            if src.split(".")[0] == "tests":
                continue
            for alias in node.names:
                if _private(alias.name) and alias.name not in allowed:
                    found.append(f"{node.lineno}: from {src} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "genevolve_jax" and any(map(_private, alias.name.split("."))):
                    found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name not in _ATTR_CALLS or not node.args:
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):   # setattr("pkg.mod._x", v)
                key = first.value.rsplit(".", 1)[-1]
            elif isinstance(first, ast.Name) and first.id in ("self", "cls") or len(node.args) < 2:
                continue
            else:
                key = node.args[1].value if isinstance(node.args[1], ast.Constant) else None
            if isinstance(key, str) and _private(key) and key not in allowed:
                found.append(f"{node.lineno}: {ast.unparse(node)[:120]}")
    return sorted(set(found), key=lambda f: (int(f.split(":")[0]), f))


def test_private_read_scanner_sees_a_breach():
    bad = ast.parse("import genevolve_jax.train._impl\nfrom genevolve_jax.train import multihost\n"
                    "from genevolve_jax.train.step import _forward\n"
                    "def test_x(engine, monkeypatch):\n"
                    "    assert engine._params is not None\n"
                    "    multihost._collect(engine)\n"
                    "    getattr(engine, '_stale')\n"
                    "    monkeypatch.setattr(engine, '_stale', True)\n"
                    "    monkeypatch.setattr('genevolve_jax.train.step._forward', None)\n"
                    "    self._mine, engine.__class__, t._replace(a=1), engine._ok\n")
    found = private_reads(bad, "tests.test_x", False, allowed={"_ok"})
    assert [f.split(":")[0] for f in found] == ["1", "3", "5", "6", "7", "8", "9"], found


def test_no_module_reads_another_modules_private_names():
    """(a): a module's own private names are those it defines; every other ``_x`` is someone else's."""
    found = []
    for path in _files(PACKAGE):
        tree = ast.parse(path.read_text())
        hits = private_reads(tree, _module_name(path), path.name == "__init__.py", _defined_names(tree))
        found += [f"{path.relative_to(ROOT)}:{hit}" for hit in hits]
    assert not found, "private names read across modules (make them public, or move the code):\n" + "\n".join(found)


def test_no_test_reads_a_private_attribute():
    index = _TestsIndex(TESTS)
    found = []
    for path, tree in index.trees.items():
        for hit in private_reads(tree, _module_name(path), path.name == "__init__.py", index.allowed(path)):
            found.append(f"{path.relative_to(ROOT)}:{hit}")
    assert not found, "tests reading private attributes (expose a public property or method):\n" + "\n".join(found)


# -- (c) attributes set on functions --------------------------------------------------------------
_SCOPES = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef)


def _scope_nodes(scope: ast.AST):
    """The nodes of one scope, not descending into nested functions, lambdas or classes."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def function_attributes(source: str) -> list[str]:
    found = []
    for scope in ast.walk(ast.parse(source)):
        if not isinstance(scope, _SCOPES):
            continue
        nodes = list(_scope_nodes(scope))
        defs = {n.name for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for node in nodes:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in defs:
                    found.append(f"{node.lineno}: {ast.unparse(t)} = …")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args \
                    and isinstance(node.args[0], ast.Name) and node.args[0].id in defs:
                found.append(f"{node.lineno}: {ast.unparse(node)[:120]}")
    return sorted(found, key=lambda f: int(f.split(":")[0]))


def test_function_attribute_scanner_sees_a_breach():
    bad = ("def make():\n"
           "    def loss_fn(x):\n"
           "        return x\n"
           "    loss_fn.metrics_are_means = True\n"
           "    return loss_fn\n"
           "def step(): pass\n"
           "setattr(step, 'tag', 1)\n"
           "class A:\n"
           "    def f(self):\n"
           "        self.f.x = 1\n"
           "        obj = object(); obj.y = 2\n")
    assert [f.split(":")[0] for f in function_attributes(bad)] == ["4", "7"]


def test_no_module_sets_attributes_on_its_functions():
    found = []
    for path in _files(PACKAGE):
        found += [f"{path.relative_to(ROOT)}:{hit}" for hit in function_attributes(path.read_text())]
    assert not found, "attributes set on functions (use an explicit interface):\n" + "\n".join(found)


# -- (d) third-party loggers ----------------------------------------------------------------------
def test_building_a_bm25_index_logs_nothing_below_warning(caplog):
    from genevolve_jax.agent.tools.backends.offline import OfflineCorpus, default_corpus_dir

    caplog.set_level(logging.DEBUG)   # as a user's DEBUG root logger would be
    corpus = OfflineCorpus(default_corpus_dir())
    assert asyncio.run(corpus.search("eiffel tower", 2))
    noisy = [r for r in caplog.records if r.name.split(".")[0] == "bm25s" and r.levelno < logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]
    assert logging.getLogger("bm25s").getEffectiveLevel() == logging.WARNING

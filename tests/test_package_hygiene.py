"""The package's own rules, checked on its source (AST scans, nothing imported; the scanner is
tests/private_names.py):

(a) no module of ``genevolve_jax`` takes a private (``_``-prefixed, not dunder) name it does not
    define itself, by any route: ``from m import _y``, ``import m._y``, ``m._y``, ``obj._y`` (obj not
    self/cls), ``getattr(obj, "_y")`` and its kin, ``importlib.import_module("m._y")``;
(b) no test does either, nor patches one (``mock.patch("m._y")``, ``mock.patch.object(m, "_y")``,
    ``monkeypatch.setattr(m, "_y", …)`` or ``("m._y", …)``), nor hands the package a fake private
    (``SimpleNamespace(_y=…)``): a private name is a test's only where the tests define it (in the
    file, a tests module it imports, or a conftest.py above it) and the package does not;
(c) the same holds for the scripts around the package: bench/, configs/, setup.py, and the Python
    that launch/*.sh runs (``python -c "…"``, ``python -m …``);
(d) no module of ``genevolve_jax`` sets attributes on its own functions (``f.attr = …`` or
    ``setattr(f, …)`` where ``f`` is a ``def`` of the same scope): interfaces are explicit;
(e) the third-party loggers the package drives do not print DEBUG/INFO records.

Private modules of third parties (``torch._C``, ``jax._src``) count as private too. Each scanner is
first shown code that breaks its rule, every known evasion included, so a scan that finds nothing
means the tree is clean, not that the scanner is blind.
"""
from __future__ import annotations

import ast
import asyncio
import functools
import logging
from pathlib import Path

import pytest

from tests.private_names import module_name, owned_names, private_reads, python_files, resolve, shell_python

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "genevolve_jax"
TESTS = ROOT / "tests"
SCRIPTS = [ROOT / "setup.py", *python_files(ROOT / "bench"), *python_files(ROOT / "configs"),
           *python_files(ROOT / "launch")]
SHELL_SCRIPTS = [*sorted((ROOT / "launch").glob("*.sh")), ROOT / ".ci" / "run", ROOT / ".ci" / "transformers_range"]


@functools.cache
def _package_private_names() -> frozenset[str]:
    return frozenset().union(*(owned_names(ast.parse(p.read_text())) for p in python_files(PACKAGE)))


def _scan(source: str, module: str = "tests.test_x", own: set[str] = frozenset(),
          foreign: frozenset[str] = frozenset({"_x"})) -> list[str]:
    """Hits in ``source`` seen as ``module``, owning ``own`` plus what it defines itself."""
    tree = ast.parse(source)
    return private_reads(tree, module, False, owned_names(tree) | set(own), foreign)


# -- (a), (b), (c) private names taken from elsewhere ----------------------------------------------
# Each evasion, as the code that must be caught; ``_x`` stands for a private name of the package.
EVASIONS = {
    "attribute": "def test_x(engine):\n    assert engine._params is not None\n",
    "module attribute": "from genevolve_jax.sharding import multihost\nmultihost._collect(1)\n",
    "getattr": "getattr(engine, '_stale')\n",
    "setattr": "setattr(engine, '_stale', True)\n",
    "hasattr": "hasattr(engine, '_stale')\n",
    "dunder dict": "engine.__dict__['_stale']\n",
    "vars": "vars(engine).get('_stale')\n",
    "private import": "from genevolve_jax.train.runtime.step import _forward\n",
    "private module import": "import genevolve_jax.train._impl\n",
    "third-party private name": "from numpy import _globals\n",
    "third-party private module": "import torch.utils._triton\n",
    "third-party private from-module": "from jax._src import core\n",
    "relative private module": "from ._impl import thing\n",
    "import_module": "import importlib\nimportlib.import_module('torch._dynamo')\n",
    "mock.patch": "from unittest import mock\nwith mock.patch('genevolve_jax.cli._x'):\n    pass\n",
    "patch decorator": "from unittest.mock import patch\n@patch('genevolve_jax.cli._x', new=1)\ndef test_a(): pass\n",
    "patch target keyword": "mock.patch(target='genevolve_jax.cli._x')\n",
    "patch private module": "mock.patch('torch._dynamo.config')\n",
    "patch.object": "from unittest import mock\nfrom genevolve_jax import cli\nmock.patch.object(cli, '_x')\n",
    "patch.object keyword": "mock.patch.object(cli, attribute='_x')\n",
    "patch.multiple": "mock.patch.multiple(cli, _x=1)\n",
    "patch.dict": "mock.patch.dict('genevolve_jax.cli._REGISTRY', {})\n",
    "monkeypatch object": "def test_a(monkeypatch):\n    monkeypatch.setattr(cli, '_x', None)\n",
    "monkeypatch path": "def test_a(monkeypatch):\n    monkeypatch.setattr('genevolve_jax.cli._x', None)\n",
    "monkeypatch delattr": "def test_a(monkeypatch):\n    monkeypatch.delattr('genevolve_jax.cli._x')\n",
    "attrgetter": "import operator\noperator.attrgetter('config._x')(engine)\n",
    "super": "class Fake(Engine):\n    def step(self):\n        return super()._x()\n",
    "fake private": "from types import SimpleNamespace\nengine = SimpleNamespace(_x=1)\n",
    # Naming a package private as one's own does not make it one's own: not as a keyword argument,
    "keyword namesake": "helper(_x=1)\ndef test_a(engine):\n    engine._x\n",
    # nor as a local, a parameter or a def: the package defines _x, so engine._x is the package's.
    "local namesake": "def test_a(engine):\n    _x = 1\n    return engine._x\n",
    "parameter namesake": "def test_a(engine, _y=1):\n    return engine._y\n",
    "def namesake": "def _x(): pass\ndef test_a(engine):\n    getattr(engine, '_x')\n",
    "def namesake patched": "def _x(): pass\ndef test_a(monkeypatch):\n    monkeypatch.setattr(cli, '_x', _x)\n",
    "f-string patch target": "MOD = 'genevolve_jax.cli'\nmock.patch(f'{MOD}._x')\n",
    "setitem on a namespace": "def test_a(monkeypatch):\n    monkeypatch.setitem(cli.__dict__, '_x', 1)\n",
    "sys.modules": "import sys\nsys.modules['genevolve_jax._impl']\n",
    "python -m": "subprocess.run([sys.executable, '-m', 'genevolve_jax._worker'])\n",
    "python -c": "subprocess.run([sys.executable, '-c', 'import torch._C'])\n",
    "python -c variable": "PROGRAM = '''\n    from genevolve_jax import cli\n    cli._x()\n'''\n"
                          "subprocess.run([sys.executable, '-c', textwrap.dedent(PROGRAM), 'arg'])\n",
    "program in a string": "run_elsewhere('''\n    import jax._src.core\n''')\n",
}


@pytest.mark.parametrize("source", EVASIONS.values(), ids=EVASIONS.keys())
def test_private_read_scanner_sees_each_evasion(source):
    assert _scan(source, module="genevolve_jax.x.y"), source


def test_private_read_scanner_reports_every_breach_of_a_file():
    source = ("import genevolve_jax.train._impl\nfrom genevolve_jax.sharding import multihost\n"
              "def test_x(engine, monkeypatch):\n"
              "    assert engine._params is not None\n"
              "    multihost._collect(engine)\n"
              "    self._mine, engine.__class__, t._replace(a=1), engine._ok\n"
              "    monkeypatch.setattr('genevolve_jax.train.runtime.step._forward', None)\n"
              "    mock.patch.object(multihost, '_x')\n")
    assert [f.split(":")[0] for f in _scan(source, own={"_ok"})] == ["1", "4", "5", "7", "8"]


OWN = {
    "self and cls": "class A:\n    def f(self):\n        return self._a, cls._b, getattr(self, '_c')\n",
    "dunders": "x.__class__, x.__version__, getattr(x, '__name__')\nfrom m import __version__\n",
    "namedtuple": "p._replace(a=1), p._asdict(), P._fields\n",
    "own attribute": "class A:\n    def __init__(self):\n        self._a = 1\n    def __eq__(self, o):\n"
                     "        return self._a == o._a\n",
    "own class variable": "class A:\n    _count = 0\nA._count += 1\n",
    "own module variable": "_CACHE = {}\nimport sys\nsys.modules[__name__]._CACHE\n",
    "own method": "class A:\n    def _helper(self): pass\ndef f(a):\n    return a._helper()\n",
    "own module patched": "mock.patch('genevolve_jax.x.y._CACHE', {})\n_CACHE = {}\n",
    "tests paths": "from tests.train.losses import _reference\nmock.patch('tests.fixtures.x._y')\n"
                   "import tests._z\n",
    "dict keys": "d = {'_a': 1}\nd.get('_a'), d['_b'], os.environ.get('_C')\n",
    "prose": "'''Import ``m._x`` and ``from m import _y`` are what this module forbids.'''\n",
    "own program": "subprocess.run([sys.executable, '-c', 'import json; _n = 1', '-m', 'tests.fixtures.x'])\n",
}


@pytest.mark.parametrize("source", OWN.values(), ids=OWN.keys())
def test_private_read_scanner_lets_code_use_its_own_names(source):
    assert _scan(source, module="genevolve_jax.x.y", foreign=frozenset()) == []


def test_shell_python_is_read_from_launch_scripts():
    script = ("N=$(python3 -c \"import torch; print(torch._C.x, range(${N}))\")\n"
              "exec python -u -m genevolve_jax._private.cli \"$@\"\n"
              "python3 -c 'import sys; sys.exit(0)'\n")
    programs = shell_python(script)
    assert [line for line, _ in programs] == [1, 2, 3]
    hits = [hit for _, code in programs for hit in _scan(code, module="launch")]
    assert [h.split(": ", 1)[1] for h in hits] == ["torch._C", "import genevolve_jax._private.cli"]


def test_no_module_reads_another_modules_private_names():
    """(a): a module's own private names are those it defines; every other ``_x`` is someone else's."""
    found = []
    for path in python_files(PACKAGE):
        tree = ast.parse(path.read_text())
        hits = private_reads(tree, module_name(path, ROOT), path.name == "__init__.py", owned_names(tree))
        found += [f"{path.relative_to(ROOT)}:{hit}" for hit in hits]
    assert not found, "private names read across modules (make them public, or move the code):\n" + "\n".join(found)


class _TestsIndex:
    """What tests/ defines, per file, for deciding whose a private name is."""

    def __init__(self, root: Path):
        self.root = root
        self.trees = {p: ast.parse(p.read_text()) for p in python_files(root)}
        self.owned = {p: owned_names(t) for p, t in self.trees.items()}

    def _file_of(self, dotted: str) -> Path | None:
        rel = Path(*dotted.split("."))
        for candidate in ((ROOT / rel).with_suffix(".py"), ROOT / rel / "__init__.py"):
            if candidate in self.owned:
                return candidate
        return None

    def allowed(self, path: Path) -> set[str]:
        """Private names this file may use: its own, its tests imports', its conftests'."""
        ok = set(self.owned[path])
        for parent in path.parents:
            ok |= self.owned.get(parent / "conftest.py", set())
            if parent == self.root:
                break
        module = module_name(path, ROOT)
        for node in ast.walk(self.trees[path]):
            sources = []
            if isinstance(node, ast.ImportFrom):
                source = resolve(node, module, path.name == "__init__.py")
                sources = [source] + [f"{source}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                sources = [alias.name for alias in node.names]
            for source in sources:
                imported = self._file_of(source)
                if imported is not None:
                    ok |= self.owned[imported]
        return ok


def test_no_test_reads_a_private_attribute():
    """(b): the package's private names are off limits to tests even where a test defines a namesake."""
    index, package_private = _TestsIndex(TESTS), _package_private_names()
    found = []
    for path, tree in index.trees.items():
        # This file's strings are the evasions it shows the scanner; its code is scanned all the same.
        hits = private_reads(tree, module_name(path, ROOT), path.name == "__init__.py", index.allowed(path),
                             package_private, strings=path != Path(__file__).resolve())
        found += [f"{path.relative_to(ROOT)}:{hit}" for hit in hits]
    assert not found, "tests reading private attributes (expose a public property or method):\n" + "\n".join(found)


def test_no_script_reads_a_private_name():
    """(c): bench/, configs/, launch/, setup.py and the Python in launch/*.sh."""
    assert SHELL_SCRIPTS and any(p.parent.name == "bench" for p in SCRIPTS)   # the scan sees them
    package_private = _package_private_names()
    found = []
    for path in SCRIPTS:
        tree = ast.parse(path.read_text())
        hits = private_reads(tree, module_name(path, ROOT), path.name == "__init__.py", owned_names(tree),
                             package_private)
        found += [f"{path.relative_to(ROOT)}:{hit}" for hit in hits]
    for path in SHELL_SCRIPTS:
        for line, code in shell_python(path.read_text()):
            tree = ast.parse(code)   # a program this cannot parse fails the test rather than go unread
            hits = private_reads(tree, "__main__", False, owned_names(tree), package_private)
            found += [f"{path.relative_to(ROOT)}:{line}: {hit.split(': ', 1)[1]}" for hit in hits]
    assert not found, "scripts reading private names (use the package's public API):\n" + "\n".join(found)


# -- (d) attributes set on functions --------------------------------------------------------------
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
    for path in python_files(PACKAGE):
        found += [f"{path.relative_to(ROOT)}:{hit}" for hit in function_attributes(path.read_text())]
    assert not found, "attributes set on functions (use an explicit interface):\n" + "\n".join(found)


# -- (e) third-party loggers ----------------------------------------------------------------------
def test_building_a_bm25_index_logs_nothing_below_warning(caplog):
    from genevolve_jax.agent.tools.backends.offline import OfflineCorpus, default_corpus_dir

    caplog.set_level(logging.DEBUG)   # as a user's DEBUG root logger would be
    corpus = OfflineCorpus(default_corpus_dir())
    assert asyncio.run(corpus.search("eiffel tower", 2))
    noisy = [r for r in caplog.records if r.name.split(".")[0] == "bm25s" and r.levelno < logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]
    assert logging.getLogger("bm25s").getEffectiveLevel() == logging.WARNING

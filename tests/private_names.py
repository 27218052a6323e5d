"""The scanner behind tests/test_package_hygiene.py: which private names a piece of Python code
takes from somewhere else. Pure AST work; nothing it scans is imported.

A name is private when it starts with ``_`` and is not a dunder (``__init__``, ``__version__``) or one
of namedtuple's public underscored methods. A module path is private when any part of it is. Code
*owns* the names it defines itself (:func:`owned_names`); every other private name, and every
private module of any package (ours or a third party's), is someone else's.
"""
from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

# Underscored names that are public API: namedtuple's methods and fields.
PUBLIC_UNDERSCORED = frozenset({"_replace", "_asdict", "_fields", "_make", "_field_defaults"})
_RECEIVERS = ("self", "cls")
_ATTR_CALLS = frozenset({"getattr", "setattr", "hasattr", "delattr", "getattr_static"})
_IMPORT_CALLS = frozenset({"import_module", "__import__", "find_spec", "importorskip", "import_string"})
_DICT_READS = frozenset({"get", "pop", "setdefault"})
_ITEM_WRITES = frozenset({"setitem", "delitem"})   # monkeypatch.setitem(mod.__dict__, "_x", v)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) \
        and name not in PUBLIC_UNDERSCORED


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def owned_names(tree: ast.AST) -> set[str]:
    """Names the code defines as its own: every ``def`` and ``class``, variables assigned at module or
    class level, and attributes assigned on ``self``/``cls``. Keyword arguments, parameters and a
    function's locals are not definitions: ``SimpleNamespace(_x=1)`` or a local ``_x`` must not make
    ``engine._x`` look like the code's own attribute."""
    names: set[str] = set()

    def add(target: ast.AST, at_top: bool) -> None:
        if isinstance(target, ast.Name) and at_top:
            names.add(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                add(element, at_top)
        elif isinstance(target, ast.Starred):
            add(target.value, at_top)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                and target.value.id in _RECEIVERS:
            names.add(target.attr)

    def visit(node: ast.AST, at_top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(child.name)
                visit(child, isinstance(child, ast.ClassDef))
                continue
            if isinstance(child, ast.Assign):
                for target in child.targets:
                    add(target, at_top)
            elif isinstance(child, (ast.AnnAssign, ast.AugAssign)):
                add(child.target, at_top)
            visit(child, at_top)

    visit(tree, True)
    return {name for name in names if is_private(name)}


def _dotted(node: ast.AST) -> str:
    """``mock.patch.object`` for the callee of ``mock.patch.object(...)``; ``()`` marks a call."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else _dotted(node.func) + "()"
                 if isinstance(node, ast.Call) else "?")
    return ".".join(reversed(parts))


def _text(node: ast.AST | None) -> str | None:
    """A string literal's text; an f-string's with ``X`` for each value (``f"{mod}._x"`` -> ``X._x``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v) or "X" for v in node.values)
    return None


def _arg(call: ast.Call, index: int, keyword: str) -> ast.AST | None:
    if len(call.args) > index:
        return call.args[index]
    return next((k.value for k in call.keywords if k.arg == keyword), None)


class _Reads:
    """Collects one tree's foreign private names as ``"line: what"``."""

    def __init__(self, module: str, is_package: bool, allowed: set[str], foreign: set[str], strings: bool = True):
        self.module, self.is_package, self.read_strings = module, is_package, strings
        self.allowed, self.foreign = allowed - foreign, foreign
        self.found: list[str] = []
        self.bindings: dict[str, ast.AST] = {}   # name -> what it is bound to, for -c programs
        self.programs: set[int] = set()         # string nodes already read as programs

    def hit(self, node: ast.AST, what: str) -> None:
        self.found.append(f"{node.lineno}: {what[:120]}")

    def name(self, node: ast.AST, name: str | None, what: str) -> None:
        """``name`` read as an attribute of something: foreign unless the code owns it."""
        if name is not None and is_private(name) and name not in self.allowed:
            self.hit(node, what)

    def path(self, node: ast.AST, dotted: str | None, what: str) -> None:
        """A dotted module/attribute path (``pkg.mod._x``): each private part is foreign, unless the
        path is the tests' own or the part is an owned name of this very module."""
        if not dotted or dotted.split(".")[0] == "tests":
            return
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if is_private(part) and not (".".join(parts[:i]) == self.module and part in self.allowed):
                return self.hit(node, what)

    def visit(self, tree: ast.AST) -> list[str]:
        self.bindings = {t.id: n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                        for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                if not (isinstance(node.value, ast.Name) and node.value.id in _RECEIVERS):
                    self.name(node, node.attr, ast.unparse(node))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    self.path(node, alias.name, f"import {alias.name}")
            elif isinstance(node, ast.ImportFrom):
                self.import_from(node)
            elif isinstance(node, ast.Call):
                self.call(node)
            elif isinstance(node, ast.Subscript) and self.is_namespace(node.value):
                self.name(node, _text(node.slice), ast.unparse(node))
            elif isinstance(node, ast.Subscript) and _dotted(node.value) == "sys.modules":
                self.path(node, _text(node.slice), ast.unparse(node))
            elif isinstance(node, (ast.List, ast.Tuple)):
                self.argv(node)
            elif self.read_strings and isinstance(node, (ast.Constant, ast.JoinedStr)) \
                    and "import" in (_text(node) or ""):
                self.embedded(node, must_parse=False)
        return sorted(set(self.found), key=lambda f: (int(f.split(":")[0]), f))

    def import_from(self, node: ast.ImportFrom) -> None:
        source = resolve(node, self.module, self.is_package)
        if source.split(".")[0] == "tests":
            return
        self.path(node, source, f"from {source} import …")
        for alias in node.names:   # an imported private name is never the importer's own
            if is_private(alias.name):
                self.hit(node, f"from {source} import {alias.name}")

    @staticmethod
    def is_namespace(node: ast.AST) -> bool:
        """``x.__dict__`` or ``vars(x)``: indexing them by name reads an attribute."""
        return isinstance(node, ast.Attribute) and node.attr == "__dict__" or \
            isinstance(node, ast.Call) and _dotted(node.func) == "vars"

    def call(self, node: ast.Call) -> None:
        callee = _dotted(node.func).split(".")
        last, owner = callee[-1], callee[-2] if len(callee) > 1 else ""
        what = ast.unparse(node)
        if last == "patch" or owner == "patch" and last in ("dict", "multiple"):
            self.path(node, _text(_arg(node, 0, "in_dict" if last == "dict" else "target")), what)
            for keyword in node.keywords if last == "multiple" else ():
                self.name(node, keyword.arg, what)
        elif owner == "patch" and last == "object":
            self.name(node, _text(_arg(node, 1, "attribute")), what)
        elif last in _ATTR_CALLS:
            first = _arg(node, 0, "target")
            if "." in (_text(first) or ""):   # monkeypatch.setattr("pkg.mod._x", value)
                self.path(node, _text(first), what)
            elif not (isinstance(first, ast.Name) and first.id in _RECEIVERS):
                self.name(node, _text(_arg(node, 1, "name")), what)
        elif last in _IMPORT_CALLS:
            self.path(node, _text(_arg(node, 0, "name")), what)
        elif last == "attrgetter":
            for arg in node.args:
                for part in (_text(arg) or "").split("."):
                    self.name(node, part, what)
        elif last in _DICT_READS and isinstance(node.func, ast.Attribute) and self.is_namespace(node.func.value):
            self.name(node, _text(_arg(node, 0, "key")), what)
        elif last in _ITEM_WRITES and self.is_namespace(_arg(node, 0, "dic")):
            self.name(node, _text(_arg(node, 1, "name")), what)
        for keyword in node.keywords:   # SimpleNamespace(_params=…) hands the package a fake private
            if keyword.arg in self.foreign:
                self.hit(node, what)

    def argv(self, node: ast.List | ast.Tuple) -> None:
        """A command line ``[sys.executable, "-c", PROGRAM]`` or ``[…, "-m", "pkg._mod"]``: the
        program is read like any other code (a variable bound to a string literal is followed)."""
        for flag, value in zip(node.elts, node.elts[1:]):
            if _text(flag) == "-m":
                self.path(node, _text(value), f"-m {_text(value)}")
            elif _text(flag) == "-c" and (program := self.program(value)) is not None:
                self.embedded(program, must_parse=True)

    def program(self, node: ast.AST, depth: int = 0) -> ast.AST | None:
        if isinstance(node, ast.Call) and _dotted(node.func).split(".")[-1] == "dedent" and node.args:
            node = node.args[0]
        if isinstance(node, ast.Name) and node.id in self.bindings and depth < 3:
            return self.program(self.bindings[node.id], depth + 1)
        return node if _text(node) is not None else None

    def embedded(self, node: ast.AST, must_parse: bool) -> None:
        """A program in a string (``python -c``, a subprocess's source): read like a module of its own.
        Any other string with ``import`` in it is read too when it parses as code that imports."""
        if id(node) in self.programs:
            return
        self.programs.add(id(node))
        try:
            tree = ast.parse(textwrap.dedent(_text(node)))
        except SyntaxError:
            if must_parse:   # a program the scan cannot read would go unchecked
                self.hit(node, "a -c program this scan cannot parse")
            return
        if must_parse or any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree)):
            for hit in _Reads("__main__", False, owned_names(tree), self.foreign).visit(tree):
                self.hit(node, "program in a string, line " + hit)


def private_reads(tree: ast.AST, module: str, is_package: bool, allowed: set[str],
                  foreign: frozenset[str] = frozenset(), strings: bool = True) -> list[str]:
    """Private names ``tree`` (the code of ``module``, a package's ``__init__`` when ``is_package``)
    takes from elsewhere, as ``"line: code"``:

    - ``x._y`` (``x`` not ``self``/``cls``), ``getattr``/``setattr``/``hasattr``/``delattr(x, "_y")``,
      ``mock.patch.object(x, "_y")``, ``monkeypatch.setattr(x, "_y", …)``, ``x.__dict__["_y"]``,
      where ``_y`` is not in ``allowed``;
    - ``import a._b``, ``from a._b import c``, ``from a import _b``: a private module or name of any
      package, third parties included;
    - ``mock.patch("a.b._c")``, ``monkeypatch.setattr("a.b._c", …)``, ``importlib.import_module("a._b")``:
      a dotted path with a private part;
    - a keyword argument named by one of ``foreign`` (names that are someone else's even where the
      code defines a namesake: for tests, the package's private names);
    - the same in a program held in a string: ``[sys.executable, "-c", PROGRAM]`` (the literal, or a
      variable bound to one), ``"-m", "a._b"``, and, unless ``strings`` is false, any string literal
      that parses as code with an import in it.

    Paths under ``tests.`` are the tests' own.
    """
    return _Reads(module, is_package, set(allowed), set(foreign), strings).visit(tree)


_SHELL_PYTHON_C = re.compile(r"""\bpython[\d.]*\s+(?:-\w+\s+)*-c\s+(?:"((?:[^"\\]|\\.)*)"|'([^']*)')""")
_SHELL_PYTHON_M = re.compile(r"\bpython[\d.]*\s+(?:-\w+\s+)*-m\s+([\w.]+)")
_SHELL_VARIABLE = re.compile(r"\$\{\w+\}|\$\w+")


def shell_python(text: str) -> list[tuple[int, str]]:
    """The Python a shell script runs, as ``(line, source)``: each ``python -c "…"`` program (shell
    variables read as ``0``) and each ``python -m module`` as an ``import module``."""
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for match in _SHELL_PYTHON_C.finditer(line):
            found.append((lineno, _SHELL_VARIABLE.sub("0", match.group(1) or match.group(2))))
        for match in _SHELL_PYTHON_M.finditer(line):
            found.append((lineno, f"import {match.group(1)}"))
    return found

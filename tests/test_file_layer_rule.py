"""The file layer's rule (issue "Pods run from a bucket"): every path a user gives is checked, read, listed and
written by ``adaface_jax/io.py`` and nowhere else, so a dataset, a workdir or an output can be a ``gs://`` URL.

A static check (the ``ast`` of every module of ``adaface_jax/``, ``data_pipeline/`` and ``evaluation/``, io.py
excepted; no import, well under a second): no call may reach the file system around the layer --

* builtin ``open`` (also ``builtins.open``, the standard library's ``io.open``);
* ``glob.glob`` / ``glob.iglob``;
* ``os.replace/rename/renames/listdir/scandir/walk/makedirs/mkdir/rmdir/removedirs/remove/unlink``;
* ``os.path.exists/lexists/isdir/isfile/getsize/getmtime``;
* ``shutil.*`` (but ``copyfileobj``, ``get_terminal_size`` and ``which``: they take no path of the user's);
* on a ``pathlib`` path (``Path(x)``, ``Path(x) / "a"``, ``.parent``, a name bound to one):
  ``open/read_text/read_bytes/write_text/write_bytes/mkdir/touch/unlink/rmdir/rename/replace/iterdir/glob/
  rglob/exists/is_dir/is_file/stat``.

Names are resolved through the module's imports (``import os.path as osp``, ``from shutil import rmtree``,
``from pathlib import Path``); ``adaface_jax.io``'s own ``open``/``glob``/... are the layer, so never flagged.

Two kinds of call are not about a user's path and pass:

* **Local temporary folders.** A call whose every path argument is built from ``tempfile.mkdtemp()``,
  ``mkstemp()``, ``TemporaryDirectory()`` or ``NamedTemporaryFile()`` in the same function (a name bound to
  one, ``os.path.join`` of one, the folders ``os.walk`` of one yields, a ``self.x`` a method of the class binds
  to one): staging folders that are published into the user's path through the layer
  (``io.publish_dir``).
* **ALLOWED**: the short list below of (file, call) -> reason, for paths that are the package's own and local by
  nature. An entry that no longer matches anything fails ``test_every_allowed_entry_is_still_needed``.
"""
from __future__ import annotations

import ast
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("adaface_jax", "data_pipeline", "evaluation")
LAYER = "adaface_jax/io.py"

# (file relative to the repository, the call as the rule names it) -> why it is not a user's path.
ALLOWED = {
    ("adaface_jax/align/nets.py", "os.path.isfile"):
        "the MTCNN weight files shipped inside the installed mtcnn wheel (its site-packages folder; joblib reads "
        "them from a local file)",
}

FORBIDDEN = frozenset({
    "builtins.open", "io.open", "glob.glob", "glob.iglob",
    *(f"os.{f}" for f in ("replace", "rename", "renames", "listdir", "scandir", "walk", "makedirs", "mkdir", "rmdir",
                          "removedirs", "remove", "unlink")),
    *(f"os.path.{f}" for f in ("exists", "lexists", "isdir", "isfile", "getsize", "getmtime")),
})
SHUTIL_WITHOUT_PATHS = frozenset({"shutil.copyfileobj", "shutil.get_terminal_size", "shutil.which"})
# Calls with two paths (source, target): both must be temporary for the call to pass as "temporary".
TWO_PATHS = frozenset({"os.replace", "os.rename", "os.renames", "shutil.copy", "shutil.copy2", "shutil.copyfile",
                       "shutil.copytree", "shutil.move", "shutil.copymode", "shutil.copystat"})
PATH_METHODS = frozenset({"open", "read_text", "read_bytes", "write_text", "write_bytes", "mkdir", "touch", "unlink",
                          "rmdir", "rename", "replace", "iterdir", "glob", "rglob", "exists", "is_dir", "is_file",
                          "stat"})
PATH_TYPES = frozenset(f"pathlib.{t}" for t in ("Path", "PurePath", "PosixPath", "PurePosixPath", "WindowsPath"))
PATH_DERIVING = frozenset({"with_suffix", "with_name", "with_stem", "joinpath", "resolve", "absolute", "expanduser"})
TEMP_MAKERS = frozenset(f"tempfile.{f}" for f in ("mkdtemp", "mkstemp", "TemporaryDirectory", "NamedTemporaryFile"))
# Calls that keep a path temporary when built from a temporary one (the path is their first argument, or any).
TEMP_DERIVING = frozenset({"os.path.join", "os.path.dirname", "os.path.abspath", "os.path.normpath", "str",
                           "os.fspath", "os.walk", "os.scandir", "os.listdir", *PATH_TYPES})


def imports_of(tree: ast.AST) -> dict:
    """{local name: the qualified name it stands for} from every import in the module."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:  # `import os.path` binds `os`
                    top = a.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def defined_names(tree: ast.AST) -> set:
    """Names the module binds itself (a def or an assignment shadows a builtin such as ``open``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
    return out


class Checker:
    """The offending calls of one module: ``check(source, name)`` -> [(line, call, function)]."""

    def __init__(self, source: str, filename: str = "<module>"):
        self.tree = ast.parse(source, filename)
        self.imports = imports_of(self.tree)
        self.defined = defined_names(self.tree)
        self.found = []

    # -- names ------------------------------------------------------------------------------------
    def qualified(self, node) -> str | None:
        """``os.path.exists`` for ``osp.exists`` after ``import os.path as osp``; ``builtins.open`` for ``open``."""
        if isinstance(node, ast.Name):
            if node.id in self.imports:
                return self.imports[node.id]
            if node.id == "open" and node.id not in self.defined:
                return "builtins.open"
            return None
        if isinstance(node, ast.Attribute):
            base = self.qualified(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    # -- what an expression holds -------------------------------------------------------------------
    def is_temp(self, node, scope) -> bool:
        if isinstance(node, ast.Name):
            return node.id in scope["temp"]
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in scope["temp_attrs"]:
                return True
            return node.attr == "name" and self.is_temp(node.value, scope)  # NamedTemporaryFile().name
        if isinstance(node, ast.Call):
            q = self.qualified(node.func)
            if q in TEMP_MAKERS:
                return True
            if q in TEMP_DERIVING and node.args:
                return self.is_temp(node.args[0], scope)
            return False
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):  # Path(tmp) / "x"
            return self.is_temp(node.left, scope)
        if isinstance(node, ast.JoinedStr):  # f"{tmp}/x"
            first = node.values[0] if node.values else None
            return isinstance(first, ast.FormattedValue) and self.is_temp(first.value, scope)
        return False

    def is_pathlib(self, node, scope) -> bool:
        if isinstance(node, ast.Name):
            return node.id in scope["paths"]
        if isinstance(node, ast.Call):
            if self.qualified(node.func) in PATH_TYPES:
                return True
            f = node.func
            return isinstance(f, ast.Attribute) and f.attr in PATH_DERIVING and self.is_pathlib(f.value, scope)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return self.is_pathlib(node.left, scope)
        if isinstance(node, ast.Attribute) and node.attr == "parent":
            return self.is_pathlib(node.value, scope)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
            return self.is_pathlib(node.value.value, scope)
        return False

    # -- scopes ---------------------------------------------------------------------------------------
    @staticmethod
    def _bindings(body_nodes):
        """(target name, value expression, how) of the assignments, with-items and for-loops of a scope (nested
        functions and classes excluded: they are scopes of their own)."""
        out = []
        stack = list(body_nodes)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    out.append((t, node.value))
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value is not None:
                out.append((node.target, node.value))
            elif isinstance(node, ast.NamedExpr):
                out.append((node.target, node.value))
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if item.optional_vars is not None:
                        out.append((item.optional_vars, item.context_expr))
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                out.append((node.target, node.iter))
            stack.extend(ast.iter_child_nodes(node))
        return out

    @staticmethod
    def _names(target):
        if isinstance(target, ast.Name):
            return [target.id]
        if isinstance(target, (ast.Tuple, ast.List)):
            return [n for e in target.elts for n in Checker._names(e)]
        if isinstance(target, ast.Starred):
            return Checker._names(target.value)
        return []

    def _solve(self, bindings, test, known: set) -> set:
        """Names every binding of which satisfies ``test`` (a fixpoint: ``b = a`` after ``a = mkdtemp()``)."""
        by_name = {}
        for target, value in bindings:
            for name in self._names(target):
                by_name.setdefault(name, []).append(value)
        result = set(known)
        while True:
            new = {n for n, values in by_name.items() if n not in result and all(test(v, result) for v in values)}
            if not new:
                return result
            result |= new

    def scope_of(self, body_nodes, outer, temp_attrs):
        bindings = self._bindings(body_nodes)
        # names bound in this scope shadow the enclosing scope's
        local = {n for t, _ in bindings for n in self._names(t)}
        scope = {"temp": set(outer["temp"]) - local, "paths": set(outer["paths"]) - local, "temp_attrs": temp_attrs}
        scope["temp"] = self._solve(bindings, lambda v, known: self.is_temp(v, {**scope, "temp": known}),
                                    scope["temp"])
        scope["paths"] = self._solve(bindings, lambda v, known: self.is_pathlib(v, {**scope, "paths": known}),
                                     scope["paths"])
        return scope

    def class_temp_attrs(self, cls: ast.ClassDef) -> set:
        """``x`` for every ``self.x`` that each method of the class binds only to a temporary path."""
        values = {}
        for fn in cls.body:
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            scope = self.scope_of(fn.body, {"temp": set(), "paths": set()}, set())
            for target, value in self._bindings(fn.body):
                if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                        and target.value.id == "self"):
                    values.setdefault(target.attr, []).append(self.is_temp(value, scope))
        return {attr for attr, temps in values.items() if all(temps)}

    # -- the walk -------------------------------------------------------------------------------------------
    def check(self):
        self._visit(self.tree.body, {"temp": set(), "paths": set()}, set(), "<module>")
        return sorted(self.found)

    def _visit(self, body_nodes, outer, temp_attrs, where):
        scope = self.scope_of(body_nodes, outer, temp_attrs)
        stack = list(body_nodes)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._visit(node.body, scope, temp_attrs, node.name if where == "<module>" else f"{where}.{node.name}")
                for d in node.decorator_list + node.args.defaults + node.args.kw_defaults:
                    if d is not None:
                        stack.append(d)
                continue
            if isinstance(node, ast.Lambda):
                self._visit([node.body], scope, temp_attrs, where)
                continue
            if isinstance(node, ast.ClassDef):
                self._visit(node.body, scope, self.class_temp_attrs(node),
                            node.name if where == "<module>" else f"{where}.{node.name}")
                continue
            if isinstance(node, ast.Call):
                self._check_call(node, scope, where)
            stack.extend(ast.iter_child_nodes(node))

    def _check_call(self, node: ast.Call, scope, where):
        q = self.qualified(node.func)
        name = None
        if q in FORBIDDEN or (q and q.startswith("shutil.") and q not in SHUTIL_WITHOUT_PATHS):
            name = q
            paths = node.args[:2] if q in TWO_PATHS else node.args[:1]
            if not paths:
                paths = [kw.value for kw in node.keywords if kw.arg in ("path", "file", "src", "dst", "top", "name")]
            if paths and all(self.is_temp(p, scope) for p in paths):
                return
        elif (isinstance(node.func, ast.Attribute) and node.func.attr in PATH_METHODS
              and self.is_pathlib(node.func.value, scope)):
            if self.is_temp(node.func.value, scope):
                return
            name = f"pathlib.Path.{node.func.attr}"
        if name is not None:
            self.found.append((node.lineno, name, where))


def check_source(source: str, filename: str = "<module>"):
    """[(line, call, function)] of the calls in ``source`` that go around the file layer."""
    return Checker(source, filename).check()


def modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel != LAYER:
                yield rel, path


def offenders():
    """{(file, call): [(line, function)]} over every module, the allowed entries included."""
    out = {}
    for rel, path in modules():
        for line, call, where in check_source(path.read_text(encoding="utf-8"), rel):
            out.setdefault((rel, call), []).append((line, where))
    return out


def test_no_module_goes_around_the_file_layer():
    found = {key: hits for key, hits in offenders().items() if key not in ALLOWED}
    lines = sorted(f"{rel}:{line}: {call}(...) in {where}" for (rel, call), hits in found.items()
                   for line, where in hits)
    assert not lines, (f"{len(lines)} call(s) reach the file system around adaface_jax/io.py (use the layer: "
                       "io.open/read_bytes/write_*/exists/isdir/listdir/glob/walk/makedirs/remove/rmtree/copy; "
                       "or, for a path that is not a user's, add a reasoned entry to ALLOWED):\n" + "\n".join(lines))


def test_every_allowed_entry_is_still_needed():
    found = offenders()
    stale = [f"{rel}: {call}" for rel, call in ALLOWED if (rel, call) not in found]
    assert not stale, "ALLOWED entries that match no call any more (remove them):\n" + "\n".join(stale)
    assert all(reason.strip() for reason in ALLOWED.values())


# --- the checker itself -----------------------------------------------------------------------------------

@pytest.mark.parametrize("source,expected", [
    ("open('x')", ["builtins.open"]),
    ("import builtins\nbuiltins.open('x')", ["builtins.open"]),
    ("import io\nio.open('x')", ["io.open"]),
    ("import glob\nglob.glob('*')\nglob.iglob('*')", ["glob.glob", "glob.iglob"]),
    ("from glob import glob\nglob('*')", ["glob.glob"]),
    ("import os\nos.replace(a, b); os.listdir(a); os.makedirs(a); os.remove(a); os.walk(a); os.scandir(a)",
     ["os.listdir", "os.makedirs", "os.remove", "os.replace", "os.scandir", "os.walk"]),
    ("import os.path as osp\nosp.exists(a) or osp.isdir(a) or osp.getsize(a)",
     ["os.path.exists", "os.path.getsize", "os.path.isdir"]),
    ("from os import path\npath.isfile(a)", ["os.path.isfile"]),
    ("from os.path import exists as e\ne(a)", ["os.path.exists"]),
    ("import shutil\nshutil.rmtree(a); shutil.copy(a, b); shutil.copyfileobj(f, g)", ["shutil.copy", "shutil.rmtree"]),
    ("from shutil import move\nmove(a, b)", ["shutil.move"]),
    ("import pathlib\npathlib.Path(a).read_text()", ["pathlib.Path.read_text"]),
    ("from pathlib import Path\n(Path(a) / 'b').write_bytes(x)", ["pathlib.Path.write_bytes"]),
    ("from pathlib import Path\ndef f(a):\n    p = Path(a)\n    p.parent.mkdir()\n    p.with_suffix('.x').open()",
     ["pathlib.Path.mkdir", "pathlib.Path.open"]),
    # the layer's own functions are not the builtins
    ("from adaface_jax import io\nio.open(a); io.glob(a, '*'); io.makedirs(a); io.listdir(a)", []),
    ("from adaface_jax.io import open, glob\nopen(a); glob(a, '*')", []),
    ("def open(x): pass\nopen('x')", []),
    ("import os\nos.path.join(a, b); os.path.basename(a); os.getcwd()", []),
    # local temporary folders pass; the same call on anything else does not
    ("import os, shutil, tempfile\ndef f(a):\n    tmp = tempfile.mkdtemp()\n    os.makedirs(os.path.join(tmp, 'x'))\n"
     "    with open(os.path.join(tmp, 'y'), 'w'):\n        pass\n    for d, _, fs in os.walk(tmp):\n"
     "        os.remove(os.path.join(d, fs[0]))\n    shutil.rmtree(tmp)\n    shutil.rmtree(a)", ["shutil.rmtree"]),
    ("import os, tempfile\ndef f(a):\n    fd, tmp = tempfile.mkstemp()\n    os.replace(tmp, a)\n    os.remove(tmp)",
     ["os.replace"]),
    ("import shutil, tempfile\nclass S:\n    def __init__(self):\n        self.staging = tempfile.mkdtemp()\n"
     "    def done(self):\n        shutil.rmtree(self.staging)\n        shutil.rmtree(self.out)", ["shutil.rmtree"]),
    ("import os, tempfile\ndef f(a):\n    tmp = tempfile.mkdtemp()\n    tmp = a\n    os.makedirs(tmp)",
     ["os.makedirs"]),
    ("import os, tempfile\ndef f():\n    with tempfile.TemporaryDirectory() as d:\n        os.listdir(d)", []),
])
def test_the_checker_finds_each_kind_of_call(source, expected):
    assert sorted(call for _, call, _ in check_source(source)) == expected


def test_the_checker_names_file_line_and_function():
    hits = check_source("import os\n\ndef load(p):\n    return os.path.exists(p)\n")
    assert hits == [(4, "os.path.exists", "load")]


if __name__ == "__main__":  # python tests/test_file_layer_rule.py: the list, without pytest
    for (rel, call), hits in sorted(offenders().items()):
        for line, where in hits:
            print(f"{rel}:{line}: {call}(...) in {where}{'  [allowed]' if (rel, call) in ALLOWED else ''}")

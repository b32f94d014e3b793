# -*- test-case-name: tests.test_imports -*-
"""
The import structure of C{twisted_postcopy}, read from the source with
C{ast} (every import counts, including those inside functions and under
C{TYPE_CHECKING}): no module imports itself through others, C{source/} and
C{destination/} never import each other, and C{bench/} imports nothing
from C{tests/}.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "twisted_postcopy"


def moduleFiles(top: str, package: str) -> dict[str, str]:
    """
    @param top: the directory holding C{package}.
    @param package: a package name.
    @return: dotted module name -> file path, for every module under it.
    """
    modules = {}
    for directory, _, files in os.walk(os.path.join(top, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, top)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def imports(module: str, path: str, known: set[str] | dict[str, str]) -> set[str]:
    """
    @param module: the module's dotted name.
    @param path: its file.
    @param known: the modules of interest.
    @return: the known modules it imports (a name imported from a package
        counts as that submodule when it is one, else as the package).
    """
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known and name != module}


def importGraph(top: str = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """
    @return: module -> the package modules it imports.
    """
    modules = moduleFiles(top, package)
    return {module: imports(module, path, modules) for module, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """
    Tarjan's strongly connected components, iteratively.

    @param graph: module -> imported modules.
    @return: every component of more than one module (sorted names).
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    onStack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        onStack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    onStack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in onStack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    onStack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


class ImportStructureTests(SynchronousTestCase):
    """
    The rules of C{docs/design.md}'s module map.
    """

    def test_cyclesFound(self) -> None:
        """
        The cycle finder reports a cycle and ignores a chain.
        """
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
        self.assertEqual(cycles(graph), [["a", "b", "c"]])
        self.assertEqual(cycles({"a": {"b"}, "b": set()}), [])

    def test_relativeAndFunctionImports(self) -> None:
        """
        Relative imports, imports inside functions and under
        C{TYPE_CHECKING} all count.
        """
        directory = self.mktemp()
        os.makedirs(os.path.join(directory, "pkg", "sub"))
        files = {
            "pkg/__init__.py": "",
            "pkg/sub/__init__.py": "",
            "pkg/sub/a.py": "from . import b\n",
            "pkg/sub/b.py": "def f():\n    from pkg.sub.c import x\n",
            "pkg/sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..sub import a\n",
        }
        for name, text in files.items():
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)
        graph = importGraph(directory, "pkg")
        self.assertEqual(cycles(graph), [["pkg.sub.a", "pkg.sub.b", "pkg.sub.c"]])

    def test_noCycles(self) -> None:
        """
        No module of C{twisted_postcopy} imports itself through others.
        """
        self.assertEqual(cycles(importGraph()), [])

    def test_sourceAndDestinationApart(self) -> None:
        """
        C{source/} and C{destination/} never import each other (shared
        vocabulary lives in C{state.py}, C{wire/}, C{ram/}).
        """
        crossing = [
            (module, imported)
            for module, imported_ in sorted(importGraph().items())
            for imported in sorted(imported_)
            for side, other in (("source", "destination"), ("destination", "source"))
            if module.startswith(f"{PACKAGE}.{side}") and imported.startswith(f"{PACKAGE}.{other}")
        ]
        self.assertEqual(crossing, [])

    def test_benchImportsNoTests(self) -> None:
        """
        The benchmarks measure shipped code: nothing under C{bench/}
        imports C{tests}.
        """
        offenders = []
        for name in sorted(os.listdir(os.path.join(ROOT, "bench"))):
            if name.endswith(".py"):
                path = os.path.join(ROOT, "bench", name)
                found = imports(f"bench.{name[:-3]}", path, {"tests"} | {
                    f"tests.{test[:-3]}" for test in os.listdir(os.path.join(ROOT, "tests")) if test.endswith(".py")})
                offenders += [(name, module) for module in sorted(found)]
        self.assertEqual(offenders, [])

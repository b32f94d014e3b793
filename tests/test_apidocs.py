"""
The API reference builds: pydoctor (Twisted's own tool), configured in
C{setup.cfg}'s C{[tool:pydoctor]}, turns the epytext docstrings of
C{twisted_postcopy} into HTML without a docstring error or a broken
reference to our own code.
"""

from __future__ import annotations

import builtins
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.testing.real import missingReal

#: The checkout under test (pydoctor reads its setup.cfg from there).
CHECKOUT = Path(__file__).resolve().parent.parent

_UNRESOLVED = re.compile(r'Cannot find link target for "([^"]+)"')


def acceptable(target: str) -> bool:
    """
    Whether an unresolved link target is one pydoctor cannot resolve
    offline (no intersphinx inventories here) rather than a mistake.

    @param target: the target as pydoctor reports it.
    @return: true for Python builtins (C{None}, C{bytes}, C{OSError}) and
        names in other installed packages (C{twisted.internet...}); false
        for our own names and for unqualified names that are no builtin.
    """
    if hasattr(builtins, target):
        return True
    top = target.split(".")[0]
    return "." in target and top != "twisted_postcopy" and importlib.util.find_spec(top) is not None


def problems(output: str) -> list[str]:
    """
    The lines of pydoctor's output that are errors.

    @param output: its output (one warning per line).
    @return: every line that is not an acceptable unresolved link.
    """
    bad = []
    for line in output.splitlines():
        if not line.strip():
            continue
        match = _UNRESOLVED.search(line)
        if match is None or not acceptable(match.group(1)):
            bad.append(line)
    return bad


class ClassifyTests(SynchronousTestCase):
    """
    Tests for L{problems}.
    """

    def test_acceptable(self) -> None:
        """
        Builtins and external dotted names are accepted; our own names and
        unqualified names are not; other warnings are problems.
        """
        output = "\n".join([
            'a.py:1: Cannot find link target for "None"',
            'a.py:2: Cannot find link target for "twisted.python.failure.Failure"',
            'a.py:3: Cannot find link target for "twisted_postcopy.nowhere"',
            'a.py:4: Cannot find link target for "IReactorTime"',
            'a.py:5: bad docstring: unknown field "parma"',
        ])
        self.assertEqual([line[:6] for line in problems(output)], ["a.py:3", "a.py:4", "a.py:5"])


class BuildTests(SynchronousTestCase):
    """
    The reference builds cleanly.
    """

    def test_build(self) -> None:
        """
        pydoctor with the project's configuration writes the reference and
        reports nothing but links it cannot follow offline (to builtins and
        other packages).
        """
        if importlib.util.find_spec("pydoctor") is None:
            missingReal("pydoctor is missing (a test extra: pip install pydoctor)")
        output = Path(tempfile.mkdtemp(prefix="pc-apidocs-"))
        self.addCleanup(shutil.rmtree, output, True)
        result = subprocess.run(
            [sys.executable, "-m", "pydoctor", "--quiet", f"--html-output={output}"],
            cwd=CHECKOUT, capture_output=True, text=True, timeout=900)
        text = result.stdout + result.stderr
        self.assertEqual(problems(text), [])
        self.assertIn(result.returncode, (0,), text[-3000:])
        index = (output / "index.html").read_text()
        self.assertIn("twisted-postcopy", index)
        self.assertTrue((output / "twisted_postcopy.control.qmp.QMPProtocol.html").exists())

"""
Tests for L{twisted_postcopy.childprocess}: a child Python process imports
the parent's C{twisted_postcopy}, never one in its current directory.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy import childprocess


class ArgumentsTests(SynchronousTestCase):
    """
    Tests for L{childprocess.pythonArguments}.
    """

    def test_safePath(self) -> None:
        """
        The child runs this interpreter with C{-P}, before its arguments.
        """
        self.assertEqual(childprocess.pythonArguments("-m", "x", "--y"),
                         [sys.executable, "-P", "-m", "x", "--y"])


class EnvironmentTests(SynchronousTestCase):
    """
    Tests for L{childprocess.childEnvironment}.
    """

    def test_rootFirst(self) -> None:
        """
        The import root comes first on C{PYTHONPATH}, before what was
        there; the rest of the environment is kept.
        """
        env = childprocess.childEnvironment({"PYTHONPATH": "/elsewhere", "HOME": "/root"})
        self.assertEqual(env["PYTHONPATH"], f"{childprocess.IMPORT_ROOT}{os.pathsep}/elsewhere")
        self.assertEqual(env["HOME"], "/root")

    def test_notTwice(self) -> None:
        """
        A grandchild's environment, built from a child's, does not repeat
        the import root.
        """
        once = childprocess.childEnvironment({})
        self.assertEqual(childprocess.childEnvironment(once)["PYTHONPATH"],
                         str(childprocess.IMPORT_ROOT))

    def test_siteDirectory(self) -> None:
        """
        A package imported from a site directory is found there by the
        child too: C{PYTHONPATH} is left alone.
        """
        self.patch(childprocess, "IMPORT_ROOT", Path(site.getsitepackages()[0]).resolve())
        self.assertEqual(childprocess.childEnvironment({"PYTHONPATH": "/elsewhere"}),
                         {"PYTHONPATH": "/elsewhere"})


class ShadowTests(SynchronousTestCase):
    """
    A child started in a directory holding another C{twisted_postcopy}
    (a checkout without its built extension) imports the parent's.
    """

    def setUp(self) -> None:
        """
        Make a directory whose C{twisted_postcopy} cannot be imported.
        """
        self.directory = Path(tempfile.mkdtemp(prefix="pc-shadow-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        package = self.directory / "twisted_postcopy"
        package.mkdir()
        (package / "__init__.py").write_text("raise ImportError('the shadowing checkout')\n")
        (package / "probe.py").write_text("raise ImportError('the shadowing checkout')\n")

    def runChild(self, *arguments: str) -> str:
        """
        Run a child Python process in the shadowing directory.

        @param arguments: its arguments after the interpreter options.
        @return: its standard output.
        """
        env = childprocess.childEnvironment({k: v for k, v in os.environ.items()
                                             if k != "PYTHONPATH"})
        result = subprocess.run(childprocess.pythonArguments(*arguments), cwd=self.directory,
                                env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip()

    def test_command(self) -> None:
        """
        C{-c}, as the daemons are started, imports the parent's package.
        """
        imported = self.runChild("-c", "import twisted_postcopy; print(twisted_postcopy.__file__)")
        self.assertEqual(Path(imported).resolve().parent.parent, childprocess.IMPORT_ROOT)

    def test_module(self) -> None:
        """
        C{-m}, as guest workers are started, runs the parent's module.
        """
        self.assertIn("usage: postcopy", self.runChild("-m", "twisted_postcopy.cli", "--help"))

    def test_withoutSafePath(self) -> None:
        """
        The directory does shadow the package without C{-P}: the test
        above would catch a regression.
        """
        result = subprocess.run([sys.executable, "-c", "import twisted_postcopy"],
                                cwd=self.directory, capture_output=True, text=True, timeout=60,
                                env=childprocess.childEnvironment())
        self.assertIn("the shadowing checkout", result.stderr)

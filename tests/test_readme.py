"""
The README's commands work where a newcomer runs them: from inside a fresh
clone of the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.testing.real import missingReal

#: The checkout under test.
CHECKOUT = Path(__file__).resolve().parent.parent

#: What pip prints when it cannot reach a package index.
_NO_NETWORK = re.compile(r"NewConnectionError|Failed to establish a new connection|"
                         r"Temporary failure in name resolution|Network is unreachable")


def readmeCommands(readme: Path = CHECKOUT / "README.md") -> list[str]:
    """
    The shell commands of the README, in order: the contents of its
    C{```sh} blocks.

    @param readme: the README.
    @return: each block's text, stripped.
    """
    return [block.strip() for block in
            re.findall(r"^```sh\n(.*?)^```", readme.read_text(), re.MULTILINE | re.DOTALL)]


class CommandsTests(SynchronousTestCase):
    """
    The README's two commands are what the code expects.
    """

    def test_twoCommands(self) -> None:
        """
        The README shows two commands: install then demo, and the suite.
        """
        install, suite = readmeCommands()
        self.assertIn("pip install .", install)
        self.assertIn("postcopy demo", install)
        self.assertEqual(suite, "sh tools/run-tests")

    def test_ciRunsTheSecond(self) -> None:
        """
        CI runs exactly the README's test command.
        """
        self.assertIn(f"exec {readmeCommands()[1]}",
                      (CHECKOUT / ".ci" / "run").read_text().splitlines())


class FreshCloneTests(SynchronousTestCase):
    """
    The README's first command, verbatim, from inside a fresh clone of the
    committed HEAD, installing into a fresh virtual environment.
    """

    def setUp(self) -> None:
        """
        Clone the checkout and create an empty virtual environment.
        """
        if shutil.which("git") is None:
            missingReal("git is not installed")
        if subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"],
                          capture_output=True).returncode:
            missingReal(f"{CHECKOUT} is not a git checkout")
        self.directory = Path(tempfile.mkdtemp(prefix="pc-readme-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.clone = self.directory / "twisted-postcopy"
        subprocess.run(["git", "clone", "-q", str(CHECKOUT), str(self.clone)], check=True,
                       timeout=120)
        self.venv = self.directory / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True, timeout=300)

    def test_firstCommand(self) -> None:
        """
        C{python3 -m pip install . && postcopy demo} run in the clone, with
        the fresh environment's C{python3} first on C{PATH} and no
        C{PYTHONPATH}, installs the package and migrates the demo guest,
        whose memory checks out on the destination.
        """
        command = readmeCommands()[0]
        env = {name: value for name, value in os.environ.items()
               if name not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.venv)
        result = subprocess.run(["sh", "-c", command], cwd=self.clone, env=env,
                                capture_output=True, text=True, timeout=900)
        output = result.stdout + result.stderr
        if result.returncode and "postcopy demo:" not in output and _NO_NETWORK.search(output):
            missingReal(f"pip cannot reach a package index:\n{output[-2000:]}")
        self.assertEqual(result.returncode, 0, output[-4000:])
        self.assertIn("guest memory verified: yes", result.stdout)
        self.assertRegex(result.stdout, r"source\s+completed")
        self.assertRegex(result.stdout, r"destination\s+completed")
        installed = subprocess.run(
            [str(self.venv / "bin" / "python3"), "-c",
             "import twisted_postcopy.ram._uffd as m; print(m.__file__)"],
            cwd=self.directory, env=env, capture_output=True, text=True, timeout=60)
        self.assertIn(str(self.venv), installed.stdout, installed.stderr)

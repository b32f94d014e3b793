"""
Tests for L{twisted_postcopy.testing.cfaults}, the C fault handler that is
the baseline of C{bench/faults.py}.
"""

from __future__ import annotations

import shutil
import tempfile

from twisted.trial.unittest import TestCase

from twisted_postcopy.errors import UffdUnavailableError
from twisted_postcopy.ram.support import checkUserfaultfd
from twisted_postcopy.testing import cfaults
from twisted_postcopy.testing.real import missingReal


class CFaultHandlerTests(TestCase):
    """
    The C handler serves real userfaults of another process.
    """

    def setUp(self) -> None:
        """
        Build the handler in a temporary directory.
        """
        if shutil.which("gcc") is None and shutil.which("cc") is None:
            missingReal("no C compiler to build the C fault handler")
        try:
            checkUserfaultfd()
        except UffdUnavailableError as error:
            missingReal(str(error))
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)

    def test_faults(self) -> None:
        """
        Every page touched by every thread is faulted in and timed once.
        """
        binary = cfaults.build(self.directory)
        self.assertEqual(binary, cfaults.build(self.directory))
        latencies = cfaults.faultLatencies(binary, 64, 3)
        self.assertEqual(len(latencies), 64)
        self.assertTrue(all(latency > 0 for latency in latencies), latencies)

    def test_badArguments(self) -> None:
        """
        Nonsense arguments fail with the program's message.
        """
        binary = cfaults.build(self.directory)
        error = self.assertRaises(RuntimeError, cfaults.faultLatencies, binary, 0, 1)
        self.assertIn("bad arguments", str(error))

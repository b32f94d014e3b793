# -*- test-case-name: tests.test_testing_waiting -*-
"""
Tests for L{twisted_postcopy.testing.waiting}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.testing.waiting import waitUntil


class WaitUntilTests(SynchronousTestCase):
    """
    L{waitUntil} on a fake clock.
    """

    def test_firesWithTheFirstTrueResult(self) -> None:
        """
        The Deferred fires with the condition's first true result, checked
        every interval.
        """
        clock = Clock()
        results = iter([None, 0, "done"])
        waited = waitUntil(clock, lambda: next(results), timeout=5, interval=0.5)
        self.assertNoResult(waited)
        clock.advance(0.5)
        self.assertNoResult(waited)
        clock.advance(0.5)
        self.assertEqual(self.successResultOf(waited), "done")

    def test_timeout(self) -> None:
        """
        A condition never true fails with L{TimeoutError} once the timeout
        passed.
        """
        clock = Clock()
        waited = waitUntil(clock, lambda: False, timeout=1, interval=0.25)
        clock.pump([0.25] * 3)
        self.assertNoResult(waited)
        clock.advance(0.25)
        self.failureResultOf(waited, TimeoutError)

# -*- test-case-name: tests.test_testing_waiting -*-
"""
Waiting on a condition instead of sleeping for a guessed time.

A test that sleeps and then checks that something happened depends on the
machine being fast enough; L{waitUntil} checks the condition itself,
often, and gives up only after a generous bound, so a loaded machine makes
the test slower, never wrong.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater


@inlineCallbacks
def waitUntil(reactor: Any, condition: Callable[[], Any], timeout: float = 30.0,
              interval: float = 0.01) -> Any:
    """
    Wait, letting the reactor run, until C{condition()} is true.

    @param reactor: an C{IReactorTime}.
    @param condition: the check, called at once and every C{interval}.
    @param timeout: seconds (of C{reactor.seconds}) before giving up.
    @param interval: seconds between checks.
    @return: a L{Deferred<twisted.internet.defer.Deferred>} firing with the first true result.
    @raise TimeoutError: C{timeout} passed first (naming the condition).
    """
    deadline = reactor.seconds() + timeout
    while True:
        result = condition()
        if result:
            return result
        if reactor.seconds() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {condition!r}")
        yield deferLater(reactor, interval, lambda: None)

"""
Skips that strict mode turns into failures.

A test that needs a real component the machine may lack (QEMU 7.2,
userfaultfd, huge pages it could reserve, C{ip netns}, a test extra) calls
L{missingReal} with the reason instead of raising C{SkipTest} itself.  Run by
hand without the flag, the test is skipped with that reason; with
C{POSTCOPY_REQUIRE_REAL=1} in the environment (set by C{tools/run-tests}, and
so by CI) it fails with it, so a machine that should have everything cannot
hide a regression behind a skip.

Product errors are never routed through here: only the absence of a real
component is.
"""

from __future__ import annotations

import os
from typing import NoReturn

from twisted.trial.unittest import FailTest, SkipTest

#: The environment variable that turns missing real components into failures.
STRICT_ENVIRONMENT_VARIABLE = "POSTCOPY_REQUIRE_REAL"


def strict() -> bool:
    """
    @return: whether strict mode is on (C{POSTCOPY_REQUIRE_REAL} set to
        anything but empty or C{0}).
    """
    return os.environ.get(STRICT_ENVIRONMENT_VARIABLE, "") not in ("", "0")


def missingReal(reason: str) -> NoReturn:
    """
    Give up on a test because a real component is missing.

    @param reason: what is missing and, where known, how to get it.
    @raise SkipTest: outside strict mode.
    @raise FailTest: in strict mode, naming the variable and the reason.
    """
    if strict():
        raise FailTest(f"{STRICT_ENVIRONMENT_VARIABLE}=1 and a real component is missing: {reason}")
    raise SkipTest(reason)

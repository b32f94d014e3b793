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
from typing import Any, NoReturn

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


def unlessStrict(reason: str | None) -> str | None:
    """
    A class-level C{skip} attribute that only skips by hand.

    Trial honours a test case's C{skip} attribute before C{setUp} runs, so a
    C{skip} set from a missing component would hide it even in strict mode.
    Use C{skip = unlessStrict(reason)} and call L{requireReal} with the same
    reason where the component is first used: outside strict mode the class
    is skipped as before; in strict mode the tests run and fail there, with
    the reason.

    @param reason: why the component is missing, or L{None}.
    @return: C{reason} outside strict mode, L{None} in strict mode.
    """
    return None if strict() else reason


def requireReal(reason: str | None) -> None:
    """
    Call L{missingReal} when a real component is missing.

    @param reason: why it is missing, or L{None} when it is there.
    @raise SkipTest: C{reason} is set, outside strict mode.
    @raise FailTest: C{reason} is set, in strict mode.
    """
    if reason is not None:
        missingReal(reason)


def requireUserfaultfd(hugetlb: bool = False, hugePages: int = 1) -> int:
    """
    Give up on the test (L{missingReal}) unless postcopy's userfaultfd
    works here (L{twisted_postcopy.ram.support.checkUserfaultfd}).  Only its
    L{UffdUnavailableError} (kernel support, privilege, huge pages) counts
    as missing; any other error propagates and fails the test.

    @param hugetlb: hugetlbfs RAM will be used.
    @param hugePages: how many free 2 MiB pages it needs (reserve them
        first with L{reserveHugePages}).
    @return: the kernel's C{UFFD_FEATURE_*} bits.
    """
    from twisted_postcopy.errors import UffdUnavailableError
    from twisted_postcopy.ram.support import checkUserfaultfd

    try:
        return checkUserfaultfd(hugetlb, hugePages)
    except UffdUnavailableError as error:
        missingReal(str(error))


def requireWriteTracking() -> int:
    """
    Give up on the test (L{missingReal}) unless userfaultfd write tracking
    (C{WP_ASYNC}, Linux 6.7+) works here.

    @return: the kernel's C{UFFD_FEATURE_*} bits.
    """
    from twisted_postcopy.errors import DirtyTrackingUnavailableError
    from twisted_postcopy.ram.dirty import checkWriteTracking

    try:
        return checkWriteTracking()
    except DirtyTrackingUnavailableError as error:
        missingReal(str(error))


def reserveHugePages(case: Any, pages: int,
                     control: str | None = None, free: str | None = None) -> None:
    """
    Make C{pages} free 2 MiB huge pages available to a test: when fewer are
    free, grow the pool through C{/proc/sys/vm/nr_hugepages}
    (L{twisted_postcopy.ram.support.reserveHugePages}) and register a
    cleanup giving back what was added.  Give up (L{missingReal}) only when the
    pool cannot be grown (no permission, no huge page support) or the kernel
    could not find the memory.

    @param case: the test case (its C{addCleanup} is used).
    @param pages: how many free huge pages the test needs.
    @param control: the pool size file (default C{NR_HUGEPAGES}).
    @param free: the free-page count file (default C{FREE_HUGEPAGES}).
    """
    from twisted_postcopy.errors import UffdUnavailableError
    from twisted_postcopy.ram import support

    try:
        release = support.reserveHugePages(pages, control, free)
    except UffdUnavailableError as error:
        missingReal(str(error))
    case.addCleanup(release)

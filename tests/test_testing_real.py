# -*- test-case-name: tests.test_testing_real -*-
"""
Tests for L{twisted_postcopy.testing.real}: a missing real component skips a
test run by hand and fails it in strict mode.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import FailTest, SkipTest, SynchronousTestCase

from twisted_postcopy.errors import DirtyTrackingUnavailableError, UffdUnavailableError
from twisted_postcopy.ram import dirty, support
from twisted_postcopy.testing import real
from twisted_postcopy.testing.real import (
    STRICT_ENVIRONMENT_VARIABLE,
    missingReal,
    requireReal,
    requireUserfaultfd,
    requireWriteTracking,
    reserveHugePages,
    strict,
    unlessStrict,
)


class StrictModeTests(SynchronousTestCase):
    """
    L{missingReal} and the helpers built on it, with and without the flag.
    """

    def setEnvironment(self, value: str | None) -> None:
        """
        Run the test with C{POSTCOPY_REQUIRE_REAL} set to C{value} (unset
        for L{None}).
        """
        environment = {k: v for k, v in os.environ.items() if k != STRICT_ENVIRONMENT_VARIABLE}
        if value is not None:
            environment[STRICT_ENVIRONMENT_VARIABLE] = value
        self.patch(os, "environ", environment)

    def test_strictValues(self) -> None:
        """
        Unset, empty and C{0} are off; anything else is on.
        """
        for value, expected in [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)]:
            self.setEnvironment(value)
            self.assertEqual(strict(), expected, value)

    def test_skipByHand(self) -> None:
        """
        Without the flag, L{missingReal} skips with the reason and
        L{unlessStrict} passes the reason on as a C{skip} attribute.
        """
        self.setEnvironment(None)
        error = self.assertRaises(SkipTest, missingReal, "no frobnicator")
        self.assertEqual(str(error), "no frobnicator")
        self.assertEqual(unlessStrict("no frobnicator"), "no frobnicator")
        self.assertRaises(SkipTest, requireReal, "no frobnicator")
        self.assertIsNone(requireReal(None))

    def test_failStrict(self) -> None:
        """
        With the flag, L{missingReal} fails naming the variable and the
        reason; a class C{skip} attribute from L{unlessStrict} is L{None}.
        """
        self.setEnvironment("1")
        error = self.assertRaises(FailTest, missingReal, "no frobnicator")
        self.assertIn("no frobnicator", str(error))
        self.assertIn(STRICT_ENVIRONMENT_VARIABLE, str(error))
        self.assertIsNone(unlessStrict("no frobnicator"))
        self.assertRaises(FailTest, requireReal, "no frobnicator")
        self.assertIsNone(requireReal(None))

    def test_userfaultfdMissing(self) -> None:
        """
        L{requireUserfaultfd} turns the check's L{UffdUnavailableError}
        into L{missingReal}, keeping its message.
        """
        def unavailable(hugetlb: bool = False, hugePages: int = 1) -> int:
            raise UffdUnavailableError("no userfaultfd: upgrade the kernel")

        self.patch(support, "checkUserfaultfd", unavailable)
        self.setEnvironment("1")
        error = self.assertRaises(FailTest, requireUserfaultfd)
        self.assertIn("upgrade the kernel", str(error))
        self.setEnvironment(None)
        self.assertRaises(SkipTest, requireUserfaultfd)

    def test_productErrorNotSkipped(self) -> None:
        """
        Any other error from the check propagates: a product bug fails the
        test, also by hand.
        """
        def broken(hugetlb: bool = False, hugePages: int = 1) -> int:
            raise ZeroDivisionError("bug")

        self.patch(support, "checkUserfaultfd", broken)
        self.setEnvironment(None)
        self.assertRaises(ZeroDivisionError, requireUserfaultfd)

    def test_writeTrackingMissing(self) -> None:
        """
        L{requireWriteTracking} turns L{DirtyTrackingUnavailableError} into
        L{missingReal}.
        """
        def unavailable() -> int:
            raise DirtyTrackingUnavailableError("needs Linux 6.7")

        self.patch(dirty, "checkWriteTracking", unavailable)
        self.setEnvironment("1")
        self.assertIn("Linux 6.7", str(self.assertRaises(FailTest, requireWriteTracking)))


class ReserveHugePagesTests(SynchronousTestCase):
    """
    L{reserveHugePages} on stand-in pool files (the real pool is used by
    the hugetlbfs tests in C{tests/test_ram_faults.py}).
    """

    def pool(self, size: int, free: int) -> tuple[str, str]:
        """
        @return: (control, free) stand-in files holding C{size}, C{free}.
        """
        control, freeFile = self.mktemp(), self.mktemp()
        for path, value in ((control, size), (freeFile, free)):
            with open(path, "w") as f:
                f.write(f"{value}\n")
        return control, freeFile

    def read(self, path: str) -> int:
        """
        @return: the integer in C{path}.
        """
        with open(path) as f:
            return int(f.read())

    def test_enoughFree(self) -> None:
        """
        With enough free pages the pool is left alone.
        """
        control, free = self.pool(8, 4)
        reserveHugePages(self, 4, control, free)
        self.assertEqual(self.read(control), 8)

    def kernel(self, control: str, free: str, missing: int = 0) -> None:
        """
        Make the free count follow the pool size as the kernel would
        (C{missing} pages it cannot find), once the pool was written.

        @param control: the stand-in pool file.
        @param free: the stand-in free-count file.
        @param missing: pages the kernel cannot find.
        """
        base = self.read(control) - self.read(free)
        original = support._readInt

        def readInt(path: str) -> int:
            """
            The free count as the kernel would show it after the write.
            """
            if path == free:
                return max(0, self.read(control) - base - missing)
            return original(path)

        self.patch(support, "_readInt", readInt)

    def test_grownAndRestored(self) -> None:
        """
        With too few free pages the pool grows by the shortfall, and what
        was added is given back at cleanup.
        """
        control, free = self.pool(3, 1)
        self.kernel(control, free)
        reserveHugePages(self, 4, control, free)
        self.assertEqual(self.read(control), 6)
        self.doCleanups()
        self.assertEqual(self.read(control), 3)

    def test_concurrentReservations(self) -> None:
        """
        Another process growing the pool meanwhile keeps its pages: the
        release shrinks the pool by what this reservation added, not back
        to the size it found.
        """
        control, free = self.pool(2, 2)
        self.kernel(control, free)
        release = support.reserveHugePages(5, control, free)
        self.assertEqual(self.read(control), 5)
        with open(control, "w") as f:
            f.write("9\n")
        release()
        release()
        self.assertEqual(self.read(control), 6)

    def test_cannotGrow(self) -> None:
        """
        A pool that cannot be written is a missing real component: a failure
        in strict mode, naming the file.
        """
        self.patch(os, "environ", {**os.environ, STRICT_ENVIRONMENT_VARIABLE: "1"})
        missing = self.mktemp() + "/missing"
        error = self.assertRaises(FailTest, reserveHugePages, self, 4, missing, self.mktemp())
        self.assertIn(f"{missing} could not be raised by 4", str(error))

    def test_productError(self) -> None:
        """
        The daemon's own reservation fails with an error naming the pool
        file.
        """
        error = self.assertRaises(UffdUnavailableError, support.reserveHugePages, 4,
                                  "/proc/sys/vm/nr_hugepages-missing", self.mktemp())
        self.assertIn("/proc/sys/vm/nr_hugepages-missing", str(error))

    def test_kernelShort(self) -> None:
        """
        When the kernel reserves fewer pages than asked, the test gives up
        and the pool gets its old size back at once.
        """
        control, free = self.pool(0, 0)
        self.kernel(control, free, missing=1)
        self.patch(os, "environ", {**os.environ, STRICT_ENVIRONMENT_VARIABLE: ""})
        self.assertRaises(SkipTest, reserveHugePages, self, 4, control, free)
        self.assertEqual(self.read(control), 0)

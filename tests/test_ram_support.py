# -*- test-case-name: tests.test_ram_support -*-
"""
Tests for L{twisted_postcopy.ram.support}: the early check, as root and
as C{nobody} (in a forked child that drops its privileges).
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.errors import UffdUnavailableError
from twisted_postcopy.ram import support, uffd
from twisted_postcopy.testing.real import missingReal

#: The sysctl that lets unprivileged processes open a userfaultfd.
UNPRIVILEGED = "/proc/sys/vm/unprivileged_userfaultfd"


def withoutUnprivilegedUserfaultfd(case: SynchronousTestCase) -> None:
    """
    Run the test as root with C{vm.unprivileged_userfaultfd=0} (set for the
    test, the old value restored afterwards).

    @param case: the test case (its C{addCleanup} is used).
    """
    if os.geteuid() != 0:
        missingReal("needs root to drop to nobody")
    try:
        with open(UNPRIVILEGED) as f:
            saved = f.read().strip()
        if saved != "0":
            with open(UNPRIVILEGED, "w") as f:
                f.write("0")
    except OSError as error:
        missingReal(f"cannot set vm.unprivileged_userfaultfd=0 through {UNPRIVILEGED}: {error}")
    if saved != "0":

        def restore() -> None:
            """
            Put the sysctl back.
            """
            with open(UNPRIVILEGED, "w") as f:
                f.write(saved)

        case.addCleanup(restore)


def inChildAs(uid: int, f) -> str:
    """
    Run C{f} in a forked child after C{setuid(uid)}.

    @return: C{"ok"} or the child's exception as C{"Name: message"}.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        try:
            os.setgid(uid)
            os.setuid(uid)
            f()
            message = "ok"
        except BaseException as error:
            message = f"{type(error).__name__}: {error}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        return pipe.read().decode()


class CheckTests(SynchronousTestCase):
    """
    L{support.checkUserfaultfd}.
    """

    def test_root(self):
        """
        As root the check passes and returns the feature bits.
        """
        if os.geteuid() != 0:
            missingReal("needs root")
        features = support.checkUserfaultfd()
        self.assertTrue(features & uffd.UFFD_FEATURE_MISSING_SHMEM)
        self.assertIn("THREAD_ID", support.describeFeatures(features))

    def test_unprivileged(self):
        """
        As C{nobody} (with C{vm.unprivileged_userfaultfd=0}) the check names
        the fixes: root/CAP_SYS_PTRACE, the sysctl, /dev/userfaultfd.
        """
        withoutUnprivilegedUserfaultfd(self)
        message = inChildAs(65534, support.checkUserfaultfd)
        self.assertTrue(message.startswith("UffdUnavailableError: "), message)
        for fix in ("CAP_SYS_PTRACE", "sysctl vm.unprivileged_userfaultfd=1", "/dev/userfaultfd"):
            self.assertIn(fix, message)

    def test_hugePagesMissing(self):
        """
        Asking for more huge pages than are free names the C{nr_hugepages}
        command.
        """
        error = self.assertRaises(UffdUnavailableError, support.checkHugePages, 1 << 30)
        self.assertIn("/proc/sys/vm/nr_hugepages", str(error))

    def test_faultServiceUnprivileged(self):
        """
        A fault service created without privilege fails with the same
        message naming the fixes.
        """
        withoutUnprivilegedUserfaultfd(self)
        from twisted.internet.testing import MemoryReactor

        from twisted_postcopy.ram.faults import FaultService

        message = inChildAs(65534, lambda: FaultService(MemoryReactor(), None))
        self.assertTrue(message.startswith("UffdUnavailableError: "), message)
        self.assertIn("CAP_SYS_PTRACE", message)

    def test_messages(self):
        """
        ENOSYS names CONFIG_USERFAULTFD; EPERM names the privilege fixes.
        """
        from twisted_postcopy.errors import UffdError

        self.assertIn("CONFIG_USERFAULTFD", str(support.unavailableError(UffdError(38, "userfaultfd"))))
        self.assertIn("CAP_SYS_PTRACE", str(support.unavailableError(UffdError(1, "userfaultfd"))))


class _Cycle:
    """
    A node of a reference cycle (weakly referenceable).
    """

    other: object = None


class GarbageCollectorTests(SynchronousTestCase):
    """
    L{support.collectGarbage} collects; L{support.tuneGarbageCollector}
    (at the switchover) only freezes and raises the threshold.
    """

    def setUp(self) -> None:
        """
        Keep automatic collections out of the tests; restore the
        collector's thresholds and state and unfreeze afterwards.

        Earlier tests' garbage is collected first, and what it logs is
        dropped: a Deferred that failed with nobody listening (a guest
        worker killed before it was ready) reports itself when it is
        collected, and these tests' collections would otherwise report it
        as theirs.
        """
        import gc

        gc.collect()
        self.flushLoggedErrors()
        thresholds = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *thresholds)
        self.addCleanup(gc.unfreeze)
        if gc.isenabled():
            gc.disable()
            self.addCleanup(gc.enable)

    def garbageCycle(self) -> object:
        """
        @return: a weak reference to one node of an unreachable cycle.
        """
        import weakref

        first, second = _Cycle(), _Cycle()
        first.other, second.other = second, first
        return weakref.ref(first)

    def test_collectGarbage(self) -> None:
        """
        C{collectGarbage} frees unreachable cycles.
        """
        node = self.garbageCycle()
        support.collectGarbage()
        self.assertIsNone(node())

    def test_tuneDoesNotCollect(self) -> None:
        """
        C{tuneGarbageCollector} leaves a cycle alone (it is frozen, not
        collected) and sets the generation-0 threshold.
        """
        import gc

        node = self.garbageCycle()
        support.tuneGarbageCollector(12345)
        self.assertIsNotNone(node())
        self.assertEqual(gc.get_threshold()[0], 12345)
        gc.unfreeze()
        gc.collect()
        self.assertIsNone(node())

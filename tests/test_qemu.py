# -*- test-case-name: tests.test_qemu -*-
"""
Tests for L{twisted_postcopy.testing.qemu}, the QEMU process and QMP
harness (real QEMU 7.2 where installed).
"""

from __future__ import annotations

import os

from twisted.trial.unittest import FailTest, SkipTest, SynchronousTestCase

from twisted_postcopy.errors import QEMUError, QEMUTimeoutError
from twisted_postcopy.testing import qemu as qemumodule
from twisted_postcopy.testing.bootsector import writeBootImage
from twisted_postcopy.testing.real import STRICT_ENVIRONMENT_VARIABLE
from twisted_postcopy.testing.qemu import (
    MACHINE,
    QEMUInstance,
    machineArguments,
    qemuMissing,
    qemuSkipReason,
    requireQEMU,
    waitFor,
)


class ArgumentsTests(SynchronousTestCase):
    """
    Tests for the pure helpers.
    """

    def test_machineArguments(self) -> None:
        """
        Source and destination share one machine definition: the versioned
        i440fx machine, TCG, the RAM size and the boot disk.
        """
        arguments = machineArguments("/x/boot.img", 48)
        self.assertEqual(arguments[:6], ["-M", MACHINE, "-accel", "tcg", "-m", "48"])
        self.assertIn("-nodefaults", arguments)
        self.assertIn("file=/x/boot.img,format=raw,if=ide,snapshot=on", arguments)

    def test_skipReasonWithoutQEMU(self) -> None:
        """
        Without the QEMU binary the skip reason says how to install it.
        """
        self.patch(qemumodule.shutil, "which", lambda name: None)
        self.patch(os, "environ", {**os.environ, STRICT_ENVIRONMENT_VARIABLE: ""})
        self.assertIn("tools/install-deps", qemuMissing())
        self.assertEqual(qemuSkipReason(), qemuMissing())
        self.assertFalse(qemumodule.qemuAvailable())
        self.assertRaises(SkipTest, requireQEMU)

    def test_strictWithoutQEMU(self) -> None:
        """
        In strict mode a missing QEMU skips nothing: C{qemuSkipReason} (the
        class C{skip} attribute) is L{None}, and L{requireQEMU} fails the
        test with the reason.
        """
        self.patch(qemumodule.shutil, "which", lambda name: None)
        self.patch(os, "environ", {**os.environ, STRICT_ENVIRONMENT_VARIABLE: "1"})
        self.assertIsNone(qemuSkipReason())
        error = self.assertRaises(FailTest, requireQEMU)
        self.assertIn("tools/install-deps", str(error))
        self.assertIn(STRICT_ENVIRONMENT_VARIABLE, str(error))

    def test_waitForTimeout(self) -> None:
        """
        L{waitFor} returns the first non-L{None} result, or raises
        L{QEMUTimeoutError} naming what it waited for.
        """
        results = iter([None, None, 7])
        self.assertEqual(waitFor(lambda: next(results), 5, "seven"), 7)
        error = self.assertRaises(QEMUTimeoutError, waitFor, lambda: None, 0.05, "godot")
        self.assertIn("godot", str(error))


class InstanceTests(SynchronousTestCase):
    """
    Tests for L{QEMUInstance} against a real QEMU.
    """

    def setUp(self) -> None:
        """
        Give up without QEMU (L{requireQEMU}: a failure in strict mode).
        """
        requireQEMU()

    def directory(self) -> str:
        """
        @return: a fresh directory holding a boot image C{boot.img}.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        writeBootImage(os.path.join(directory, "boot.img"))
        return directory

    def start(self, *extra: str) -> QEMUInstance:
        """
        Start a paused QEMU, killed at cleanup.

        @param extra: extra QEMU arguments.
        @return: the instance.
        """
        directory = self.directory()
        image = os.path.join(directory, "boot.img")
        instance = QEMUInstance.start(
            directory, [*machineArguments(image, 16), "-S", *extra], "test"
        )
        self.addCleanup(instance.kill)
        return instance

    def test_badArguments(self) -> None:
        """
        QEMU refusing its arguments gives a L{QEMUError} with its stderr,
        and the process is reaped.
        """
        directory = self.directory()
        error = self.assertRaises(
            QEMUError, QEMUInstance.start, directory, ["-no-such-option"], "bad"
        )
        self.assertIn("no-such-option", str(error))
        self.assertIn("bad: QEMU exited", str(error))

    def test_missingDirectory(self) -> None:
        """
        A directory that does not exist gives a L{QEMUError} and leaves no
        process or socket directory behind.
        """
        error = self.assertRaises(
            QEMUError, QEMUInstance.start, self.mktemp(), ["-S"], "nowhere"
        )
        self.assertIn("nowhere: cannot run", str(error))

    def test_socketDirectoryRemoved(self) -> None:
        """
        The QMP socket lives in a short private directory, removed by
        L{QEMUInstance.kill}.
        """
        instance = self.start()
        self.assertTrue(os.path.exists(os.path.join(instance.socketDirectory, "qmp.sock")))
        instance.kill()
        self.assertFalse(os.path.exists(instance.socketDirectory))

    def test_qmpAndStatus(self) -> None:
        """
        QMP commands return their result; C{-S} leaves the guest in
        C{prelaunch} until C{cont}.
        """
        instance = self.start()
        self.assertEqual(instance.status(), "prelaunch")
        instance.qmp("cont")
        self.assertEqual(instance.waitStatus(["running"], 10), "running")
        self.assertEqual(instance.waitEvent("RESUME", 10)["event"], "RESUME")

    def test_qmpError(self) -> None:
        """
        A QMP error answer raises L{QEMUError} naming the command.
        """
        instance = self.start()
        error = self.assertRaises(QEMUError, instance.qmp, "no-such-command")
        self.assertIn("no-such-command", str(error))

    def test_capabilitiesAndParameters(self) -> None:
        """
        Capabilities and parameters take Python names and reach QEMU with
        its dashed names.
        """
        instance = self.start()
        instance.setCapabilities(postcopy_ram=True)
        instance.setParameters(max_bandwidth=1 << 20)
        capabilities = {
            c["capability"]: c["state"] for c in instance.qmp("query-migrate-capabilities")
        }
        self.assertIs(capabilities["postcopy-ram"], True)
        self.assertEqual(instance.qmp("query-migrate-parameters")["max-bandwidth"], 1 << 20)

    def test_waitMigrationTimeout(self) -> None:
        """
        Waiting for a migration that never starts times out.
        """
        instance = self.start()
        self.assertRaises(QEMUTimeoutError, instance.waitMigration, ["completed"], 0.1)

    def test_migrationFailure(self) -> None:
        """
        A failed migration raises L{QEMUError} with QEMU's reason.
        """
        instance = self.start()
        instance.migrate("exec:exit 1")
        error = self.assertRaises(QEMUError, instance.waitMigration, ["completed"], 20)
        self.assertIn("migration failed", str(error))

    def test_killTwice(self) -> None:
        """
        L{QEMUInstance.kill} reaps the process and may be called again.
        """
        instance = self.start()
        instance.kill()
        instance.kill()
        self.assertIsNotNone(instance.process.returncode)
        self.assertRaises(QEMUError, instance.checkAlive)

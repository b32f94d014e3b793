# -*- test-case-name: tests.test_tap -*-
"""
Tests for L{twisted_postcopy.tap} and the C{twistd postcopy} plugin.
"""

from __future__ import annotations

import ast
import subprocess
import sys

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy import tap
from twisted_postcopy.errors import MigrationError
from twisted_postcopy.manager import MigrationManager
from twisted_postcopy.service import MigrationService
from twisted_postcopy.control.daemon import CHECKOUT, TWISTD, pluginEnvironment

#: The plugin module of this checkout.
PLUGIN = CHECKOUT / "twisted" / "plugins" / "twisted_postcopy_plugin.py"


class ParseSizeTests(SynchronousTestCase):
    """
    Tests for L{tap.parseSize}.
    """

    def test_suffixes(self) -> None:
        """
        K, M, G, T (and KiB, MB spellings) multiply by powers of 1024.
        """
        self.assertEqual(tap.parseSize("64M"), 64 << 20)
        self.assertEqual(tap.parseSize("1G"), 1 << 30)
        self.assertEqual(tap.parseSize("4KiB"), 4096)
        self.assertEqual(tap.parseSize("2mb"), 2 << 20)
        self.assertEqual(tap.parseSize("1T"), 1 << 40)
        self.assertEqual(tap.parseSize("4096B"), 4096)

    def test_bareMiB(self) -> None:
        """
        A bare number is in MiB, as with QEMU's C{-m}.
        """
        self.assertEqual(tap.parseSize("256"), 256 << 20)

    def test_invalid(self) -> None:
        """
        Anything else raises L{ValueError} naming the text.
        """
        for text in ("", "M", "1.5G", "-1M", "12X"):
            self.assertRaises(ValueError, tap.parseSize, text)


class OptionsTests(SynchronousTestCase):
    """
    Tests for L{tap.Options}.
    """

    def parse(self, *argv: str) -> tap.Options:
        """
        Parse a command line.

        @param argv: the arguments.
        @return: the options.
        """
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        """
        A source with a 256 MiB stress guest by default.
        """
        options = self.parse("--control", "unix:/tmp/c.sock")
        self.assertEqual(
            (options["role"], options["guest"], options["ram"], options["incoming"]),
            ("source", "stress", 256 << 20, None),
        )

    def test_destination(self) -> None:
        """
        A destination takes C{--incoming} and the guest options.
        """
        options = self.parse(
            "--role", "destination", "--control", "unix:/tmp/c.sock", "--incoming",
            "tcp:127.0.0.1:4444", "--guest", "kv", "--ram", "64M",
            "--guest-option", "keys=1000", "--guest-option", "value-size=64",
        )
        self.assertEqual(options["incoming"], "tcp:127.0.0.1:4444")
        self.assertEqual((options["guest"], options["ram"]), ("kv", 64 << 20))
        self.assertEqual(options["guest-option"], {"keys": "1000", "value-size": "64"})

    def test_capabilities(self) -> None:
        """
        C{--capability NAME=on|off} accumulates start-up capabilities; a
        bad state is a usage error.
        """
        options = self.parse("--control", "unix:/c", "--capability", "postcopy-ram=on",
                             "--capability", "postcopy-blocktime=yes", "--capability", "events=off")
        self.assertEqual(options["capabilities"],
                         {"postcopy-ram": True, "postcopy-blocktime": True, "events": False})
        self.assertRaises(usage.UsageError, self.parse, "--control", "unix:/c", "--capability", "x=2")

    def test_snapshot(self) -> None:
        """
        C{--role snapshot} implies C{--guest none}.
        """
        options = self.parse("--role", "snapshot", "--control", "unix:/c", "--guest", "kv")
        self.assertEqual((options["role"], options["guest"]), ("snapshot", "none"))

    def test_controlRequired(self) -> None:
        """
        C{--control} is required.
        """
        self.assertRaises(usage.UsageError, self.parse)

    def test_incomingOnlyDestination(self) -> None:
        """
        A source refuses C{--incoming}.
        """
        self.assertRaises(usage.UsageError, self.parse, "--control", "unix:/c", "--incoming", "tcp:0:1")

    def test_badChoices(self) -> None:
        """
        Unknown roles, guests and sizes are usage errors.
        """
        for argv in (("--role", "middle"), ("--guest", "windows"), ("--ram", "lots"),
                     ("--guest-option", "novalue")):
            self.assertRaises(usage.UsageError, self.parse, "--control", "unix:/c", *argv)


class PluginTests(SynchronousTestCase):
    """
    Tests for C{twisted/plugins/twisted_postcopy_plugin.py}.
    """

    def test_importsOnlyServiceMaker(self) -> None:
        """
        The plugin imports nothing but L{ServiceMaker}, so a broken cffi
        build cannot break C{twistd --help}.
        """
        tree = ast.parse(PLUGIN.read_text())
        imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
        self.assertEqual(
            [(node.module, [a.name for a in node.names]) for node in imports],
            [("twisted.application.service", ["ServiceMaker"])],
        )

    def test_noPackageInit(self) -> None:
        """
        C{twisted/plugins} has no C{__init__.py}: it must not shadow
        Twisted's own C{twisted.plugins} package.
        """
        self.assertFalse((PLUGIN.parent / "__init__.py").exists())
        self.assertFalse((PLUGIN.parent.parent / "__init__.py").exists())

    def test_twistdHelp(self) -> None:
        """
        C{twistd -n postcopy --help} lists the daemon's options.
        """
        result = subprocess.run(
            [sys.executable, "-c", TWISTD,
             "-n", "postcopy", "--help"],
            env=pluginEnvironment(), capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in ("--role", "--control", "--incoming", "--guest", "--ram"):
            self.assertIn(option, result.stdout)


class MakeServiceTests(SynchronousTestCase):
    """
    Tests for L{tap.makeService}.
    """

    def make(self, *argv: str) -> MigrationService:
        """
        Build the service for a command line, on a memory reactor.

        @param argv: the plugin's options.
        @return: the service.
        """
        options = tap.Options()
        options.parseOptions(list(argv))
        return tap.makeService(options, MemoryReactorClock())

    def test_source(self) -> None:
        """
        A source daemon: a real manager, the control endpoint, no incoming.
        """
        service = self.make("--control", "unix:/tmp/x.sock", "--guest", "none")
        self.assertIsInstance(service, MigrationService)
        self.assertIsInstance(service.manager, MigrationManager)
        self.assertEqual((service.control, service.incoming), ("unix:/tmp/x.sock", None))

    def test_snapshotRole(self) -> None:
        """
        A C{--role snapshot} daemon runs no guest, serves the snapshot
        jobs, and refuses to migrate anything itself.
        """
        service = self.make("--role", "snapshot", "--control", "unix:/tmp/x.sock")
        self.assertIsNone(service.guest)
        self.assertIs(service.controlService.factory.snapshots, service.snapshots)
        self.assertRaises(MigrationError, service.manager.migrateIncoming, "tcp:127.0.0.1:1")
        self.assertRaises(MigrationError, service.manager.migrate, "tcp:127.0.0.1:1")

    def test_destinationWithoutGuest(self) -> None:
        """
        A destination without a guest refuses C{migrate-incoming}, naming
        the reason.
        """
        service = self.make("--role", "destination", "--control", "unix:/tmp/x.sock",
                            "--guest", "none", "--incoming", "tcp:127.0.0.1:4444")
        self.assertEqual(service.incoming, "tcp:127.0.0.1:4444")
        error = self.assertRaises(MigrationError, service.manager.migrateIncoming, "tcp:127.0.0.1:1")
        self.assertIn("--guest none", str(error))


class GuestSpecTests(SynchronousTestCase):
    """
    Tests for L{tap.guestSpec} and L{tap.attachPath}.
    """

    def options(self, *argv: str) -> tap.Options:
        """
        Parse a command line with a control socket.

        @param argv: more options.
        @return: the options.
        """
        options = tap.Options()
        options.parseOptions(["--control", "unix:/run/pc.sock:lockfile=1", *argv])
        return options

    def test_stress(self) -> None:
        """
        A stress guest's workers split the RAM block's pages; the seed and
        guest options become worker arguments.
        """
        spec = tap.guestSpec(self.options("--ram", "64M", "--workers", "4", "--seed", "9",
                                          "--guest-option", "rate=5000"))
        self.assertEqual((spec.name, spec.workers, spec.blocks), ("stress", 4, (("ram", 64 << 20),)))
        self.assertEqual(spec.arguments,
                         ("--working-set", str((64 << 20) // 4096 // 4), "--seed", "9", "--rate", "5000"))

    def test_kv(self) -> None:
        """
        A kv guest's workers learn how many share the block.
        """
        spec = tap.guestSpec(self.options("--guest", "kv", "--workers", "3"))
        self.assertEqual(spec.arguments, ("--workers", "3"))

    def test_attachPath(self) -> None:
        """
        Workers attach beside the control socket unless C{--attach} says.
        """
        self.assertEqual(tap.attachPath(self.options()), "/run/pc.sock.attach")
        self.assertEqual(tap.attachPath(self.options("--attach", "/tmp/a")), "/tmp/a")

    def test_badRAM(self) -> None:
        """
        RAM that is not a whole number of pages is a usage error.
        """
        self.assertRaises(usage.UsageError, self.options, "--ram", "1000B")

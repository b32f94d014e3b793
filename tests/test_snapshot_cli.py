# -*- test-case-name: tests.test_snapshot_cli -*-
"""
Tests for L{twisted_postcopy.snapshot.cli}: the offline commands (import,
verify, info, read) through the C{postcopy} entry point.  C{capture} and
C{restore} run their own reactor and are exercised as child processes by
C{tests/test_qemu_capture.py} and C{tests/test_qemu_restore.py}.
"""

from __future__ import annotations

import io
import json
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.test_snapshot_restore import makeSnapshot
from twisted_postcopy.cli import buildParser, main

DATA = os.path.join(os.path.dirname(__file__), "data", "qemu72-precopy-pc-32m.mig")


class SnapshotCommandTests(SynchronousTestCase):
    """
    C{postcopy snapshot ...}.
    """

    def setUp(self) -> None:
        """
        A stored snapshot, and captured stdout/stderr.
        """
        self.path = self.mktemp()
        self.contents = makeSnapshot(self.path)
        self.stdout = io.TextIOWrapper(io.BytesIO(), write_through=True)
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def snapshot(self, *arguments: str) -> tuple[int, bytes]:
        """
        @param arguments: C{snapshot} subcommand arguments.
        @return: exit status and stdout bytes.
        """
        code = main(["snapshot", *arguments])
        self.stdout.flush()
        return code, self.stdout.buffer.getvalue()

    def test_registered(self) -> None:
        """
        Every subcommand is registered.
        """
        for command in ("capture --listen tcp:127.0.0.1:0 d", "restore d --to tcp:h:1",
                        "import f d", "verify d", "info d", "read d b 0 1"):
            args = buildParser().parse_args(["snapshot", *command.split()])
            self.assertTrue(callable(args.func))

    def test_verify(self) -> None:
        """
        C{verify} exits 0 on an intact snapshot, 1 naming the tampered
        file otherwise.
        """
        self.assertEqual(self.snapshot("verify", self.path)[0], 0)
        with open(os.path.join(self.path, "devices.bin"), "r+b") as f:
            f.write(b"!")
        self.assertEqual(self.snapshot("verify", self.path)[0], 1)
        self.assertIn("devices.bin", self.stderr.getvalue())

    def test_infoJSON(self) -> None:
        """
        C{info --json} prints the machine, form and blocks.
        """
        code, out = self.snapshot("info", "--json", self.path)
        self.assertEqual(code, 0)
        info = json.loads(out)
        self.assertEqual(info["machine"], "pc-i440fx-7.2")
        self.assertEqual([b["idstr"] for b in info["blocks"]], list(self.contents))

    def test_infoText(self) -> None:
        """
        C{info} prints one line per block.
        """
        code, out = self.snapshot("info", self.path)
        self.assertEqual(code, 0)
        self.assertIn(b"pc.rom", out)

    def test_read(self) -> None:
        """
        C{read} writes the stored bytes to stdout (offsets in any base).
        """
        code, out = self.snapshot("read", self.path, "pc.ram", "0x10", "32")
        self.assertEqual((code, out), (0, self.contents["pc.ram"][16:48]))

    def test_readBadBlock(self) -> None:
        """
        C{read} of an unknown block exits 1 with a message.
        """
        self.assertEqual(self.snapshot("read", self.path, "nope", "0", "1")[0], 1)
        self.assertIn("nope", self.stderr.getvalue())

    def test_missing(self) -> None:
        """
        A directory that is not a snapshot exits 1 naming the manifest.
        """
        self.assertEqual(self.snapshot("info", self.mktemp())[0], 1)
        self.assertIn("manifest.json", self.stderr.getvalue())

    def test_import(self) -> None:
        """
        C{import} stores a real QEMU 7.2 stream file, which then verifies.
        """
        target = self.mktemp()
        self.assertEqual(self.snapshot("import", DATA, target)[0], 0)
        self.assertEqual(self.snapshot("verify", target)[0], 0)

# -*- test-case-name: tests.test_inspect -*-
"""
Tests for L{twisted_postcopy.inspect} (C{postcopy inspect}) on real QEMU 7.2
recordings: a precopy stream and the main stream of a postcopy migration
recorded by a TCP relay.
"""

from __future__ import annotations

import io
import json
import os

from twisted.trial.unittest import SynchronousTestCase

from tests.wirehelpers import buildPostcopyStream
from twisted_postcopy import wire
from twisted_postcopy.cli import buildParser
from twisted_postcopy.inspect import inspectCommand

DATA = os.path.join(os.path.dirname(__file__), "data")
PRECOPY = os.path.join(DATA, "qemu72-precopy-pc-32m.mig")
POSTCOPY = os.path.join(DATA, "qemu72-postcopy-pc-32m.main.mig")
PC_32M_BLOCKS = [
    {"id": "pc.ram", "length": 0x2000000}, {"id": "/rom@etc/acpi/tables", "length": 0x20000},
    {"id": "pc.bios", "length": 0x40000}, {"id": "pc.rom", "length": 0x20000},
    {"id": "/rom@etc/table-loader", "length": 0x1000}, {"id": "/rom@etc/acpi/rsdp", "length": 0x1000}]


def streamCounts(data: bytes) -> tuple[dict[str, int], list[str]]:
    """
    Count what a main stream holds, straight from the wire decoder (not
    from the inspector under test).

    @param data: a recorded main stream.
    @return: the page counts C{{"zero": n, "normal": n}} and the idstrs of
        the device sections in its (only) package, in order.
    """
    events = wire.decodeAll(data)
    kinds = [type(event).__name__ for event in events]
    pages = {"zero": kinds.count("ZeroPageReceived"), "normal": kinds.count("PageReceived")}
    packages = [event for event in events if type(event).__name__ == "PackageReceived"]
    sections = [event.idstr for package in packages for event in wire.decodeAll(package.data, header=False)
                if type(event).__name__ == "DeviceSectionReceived"]
    return pages, sections


def recording(path: str) -> bytes:
    """
    @param path: a recorded stream file.
    @return: its bytes.
    """
    with open(path, "rb") as f:
        return f.read()


def runInspect(*argv: str) -> tuple[int, str]:
    """
    Run C{postcopy inspect} through the real argument parser.

    @param argv: its arguments.
    @return: the exit status and the output.
    """
    args = buildParser().parse_args(["inspect", *argv])
    out = io.StringIO()
    status = inspectCommand(args, out)
    return status, out.getvalue()


class InspectTests(SynchronousTestCase):
    """
    C{postcopy inspect [--json] FILE}.
    """

    def test_precopyJSON(self) -> None:
        """
        A real precopy stream: header, blocks, pages, device sections,
        complete, no commands.
        """
        status, out = runInspect("--json", PRECOPY)
        result = json.loads(out)
        self.assertEqual(status, 0)
        self.assertEqual((result["version"], result["machine"]), (3, "pc-i440fx-7.2"))
        self.assertEqual(result["ram_blocks"], PC_32M_BLOCKS)
        pages, _ = streamCounts(recording(PRECOPY))
        self.assertEqual(result["pages"], pages)
        self.assertGreater(pages["normal"], 0)
        self.assertGreater(pages["zero"], 0)
        self.assertEqual(result["commands"], [])
        self.assertTrue(result["complete"])
        self.assertEqual(result["sections"][0], {
            "id": "ram", "section_id": 2, "instance": 0, "version": 4, "type": "START", "in_package": False})
        self.assertEqual(result["sections"][-1]["id"], "globalstate")
        self.assertIsNone(result["package"])

    def test_postcopyRelayRecording(self) -> None:
        """
        The main stream of a real postcopy migration: commands in order
        (package contents included), discards, the package's sections.
        """
        status, out = runInspect("--json", POSTCOPY)
        result = json.loads(out)
        self.assertEqual(status, 0)
        commands = result["commands"]
        self.assertEqual(commands[:3], ["OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE"])
        self.assertEqual(commands[-5:], ["PACKAGED", "POSTCOPY_LISTEN", "PING", "POSTCOPY_RUN", "PING"])
        self.assertEqual(result["pings"], [1, 2, 3, 4])
        self.assertEqual({d["block"] for d in result["discards"]}, {b["id"] for b in PC_32M_BLOCKS})
        package = result["package"]
        self.assertEqual(package["commands"], ["POSTCOPY_LISTEN", "PING", "POSTCOPY_RUN"])
        self.assertEqual(package["sections"][-1], "globalstate")
        _, sections = streamCounts(recording(POSTCOPY))
        self.assertEqual(package["sections"], sections)
        self.assertTrue(result["postcopy"])
        self.assertTrue(result["complete"])

    def test_human(self) -> None:
        """
        The default output is a readable summary.
        """
        status, out = runInspect(POSTCOPY)
        self.assertEqual(status, 0)
        self.assertIn("machine pc-i440fx-7.2", out)
        self.assertIn("package: ", out)
        self.assertIn("complete: yes", out)

    def test_truncatedFile(self) -> None:
        """
        A truncated recording is summarized up to the error, with status 1.
        """
        path = self.mktemp()
        with open(PRECOPY, "rb") as f, open(path, "wb") as g:
            g.write(f.read()[:100_000])
        status, out = runInspect("--json", path)
        result = json.loads(out)
        self.assertEqual(status, 1)
        self.assertIn("TruncatedStreamError", result["error"])
        self.assertFalse(result["complete"])
        self.assertEqual(len(result["ram_blocks"]), 6)

    def test_builtStream(self) -> None:
        """
        Our own postcopy stream: our guest section shows in the package.
        """
        path = self.mktemp()
        stream = buildPostcopyStream()[0]
        with open(path, "wb") as f:
            f.write(stream)
        result = json.loads(runInspect("--json", path)[1])
        pages, sections = streamCounts(stream)
        self.assertIn("twisted-postcopy/stress", result["package"]["sections"])
        self.assertEqual(result["package"]["sections"], sections)
        self.assertEqual(result["pages"], pages)

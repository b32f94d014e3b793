# -*- test-case-name: tests.test_qemu_streams -*-
"""
Decode real QEMU 7.2 migration streams recorded at test time.

Two recordings of the boot-sector guest are made once per test process
(QEMU with TCG, 32 MiB of RAM): a precopy stream saved with
C{migrate exec:cat > FILE}, and a postcopy migration between two QEMUs
through a L{RecordingRelay} (precopy throttled so that
C{migrate-start-postcopy} lands mid-precopy, postcopy throttled so that the
destination faults and requests pages).  Both migrations are checked end to
end first: the restored or migrated guest's counters must be a consistent
snapshot.  The tests then hold the wire codec to the recordings: every byte
decodes, RAM covers every block, the device package is byte-exact, the
return path decodes, and re-encoding gives back the recorded bytes.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterable

from attrs import frozen
from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy import wire
from twisted_postcopy.testing.bootsector import PAGE_SIZE, CounterSnapshot
from twisted_postcopy.testing.qemubaseline import (
    MIB,
    PostcopyResult,
    layoutFor,
    loadPrecopy,
    migratePostcopy,
    recordPrecopy,
)
from twisted_postcopy.testing.qemuhost import MACHINE, recordOnce

MEMORY_MIB = 32
LAYOUT = layoutFor(MEMORY_MIB, pages=1024)
#: C{PING(3)} then C{POSTCOPY_RUN}: the last 14 bytes of every 7.2 package.
PACKAGE_TAIL = bytes.fromhex("08 0002 0004 00000003" "08 0005 0000")


@frozen
class Recordings:
    """
    The streams recorded once per test process.

    @ivar directory: where the files are (removed at exit).
    @ivar precopyPath: the precopy stream file.
    @ivar precopy: its bytes.
    @ivar precopyLoaded: the counters of the guest restored from it.
    @ivar postcopy: the relayed postcopy migration.
    """

    directory: str
    precopyPath: str
    precopy: bytes
    precopyLoaded: CounterSnapshot
    postcopy: PostcopyResult

    @property
    def postcopyPath(self) -> str:
        """
        @return: a file holding the recorded postcopy main stream.
        """
        return os.path.join(self.directory, "postcopy.main")


def recordings() -> Recordings:
    """
    Record both streams on first use; later calls return the same ones (or
    raise the same error).

    @return: the recordings.
    @raise SkipTest: when QEMU is not installed (a failure in strict mode).
    """
    return recordOnce("streams", _record)


def _record() -> Recordings:
    """
    Run both QEMU migrations and keep their streams.

    @return: the recordings.
    """
    directory = tempfile.mkdtemp(prefix="qemu-streams-")
    atexit.register(shutil.rmtree, directory, True)
    precopyPath = os.path.join(directory, "precopy.bin")
    os.makedirs(os.path.join(directory, "pre"))
    recordPrecopy(os.path.join(directory, "pre"), precopyPath, MEMORY_MIB, LAYOUT)
    _, loaded = loadPrecopy(os.path.join(directory, "pre"), precopyPath, MEMORY_MIB, LAYOUT)
    os.makedirs(os.path.join(directory, "post"))
    postcopy = migratePostcopy(
        os.path.join(directory, "post"), MEMORY_MIB, LAYOUT,
        precopyBandwidth=4 * MIB, postcopyBandwidth=2 * MIB, startAfterBytes=MIB,
    )
    with open(precopyPath, "rb") as stream:
        precopy = stream.read()
    result = Recordings(directory, precopyPath, precopy, loaded, postcopy)
    with open(result.postcopyPath, "wb") as stream:
        stream.write(postcopy.main)
    return result


def decodeReturnPath(data: bytes) -> list[Any]:
    """
    @param data: a recorded return path.
    @return: all its events.
    """
    return wire.ReturnPathDecoder().decodeWhole(data)


def named(events: Iterable[object], kind: str) -> list[Any]:
    """
    @param events: decoded events.
    @param kind: an event class name, e.g. C{PingReceived}.
    @return: the events of that class, in order.
    """
    return [event for event in events if type(event).__name__ == kind]


def pageCoverage(events: Iterable[object]) -> dict[str, set[int]]:
    """
    @param events: decoded main-stream events.
    @return: the offsets of pages sent (normal or zero), by RAMBlock idstr.
    """
    covered: dict[str, set[int]] = {}
    for event in events:
        if type(event).__name__ in ("PageReceived", "ZeroPageReceived"):
            covered.setdefault(event.block, set()).add(event.offset)
    return covered


class RecordedMigrationTests(SynchronousTestCase):
    """
    The recorded migrations themselves worked (no codec involved).
    """

    def test_precopyRestores(self) -> None:
        """
        Loading the saved precopy stream into a fresh QEMU runs the guest
        from a consistent snapshot of its counters.
        """
        self.assertIsInstance(recordings().precopyLoaded, CounterSnapshot)

    def test_postcopyCompleted(self) -> None:
        """
        The postcopy migration completed on both sides, the destination
        faulted and requested pages, its one vCPU was blocked for them
        (QEMU's blocktime: more than 0, at most the migration's time, the
        all-vCPUs figure equal to the vCPU's), and its memory is
        consistent.
        """
        result = recordings().postcopy
        self.assertEqual(result.source["status"], "completed")
        self.assertEqual(result.destination["status"], "completed")
        self.assertGreater(result.source["ram"]["postcopy-requests"], 0)
        (vcpu,) = result.destination["postcopy-vcpu-blocktime"]
        self.assertEqual(result.destination["postcopy-blocktime"], vcpu, result.destination)
        self.assertGreater(vcpu, 0, result.destination)
        self.assertLessEqual(vcpu, result.source["total-time"], (result.destination, result.source))
        self.assertIsInstance(result.snapshot, CounterSnapshot)

    def test_oneConnection(self) -> None:
        """
        Without preempt, QEMU 7.2 uses one connection: the relay accepted
        exactly one, the main stream went forward on it and the return path
        (PONGs, page requests) came back on it.
        """
        result = recordings().postcopy
        self.assertEqual(result.connections, 1)
        self.assertTrue(result.main.startswith(b"QEVM\x00\x00\x00\x03"))
        self.assertEqual(len(named(decodeReturnPath(result.returnPath), "PagesRequested")),
                         result.source["ram"]["postcopy-requests"])


class StreamDecodeMixin:
    """
    Checks shared by both recorded main streams.

    @ivar data: a callable returning the recorded bytes.
    """

    data: Callable[[], bytes]
    assertEqual: Callable[..., None]
    assertTrue: Callable[..., None]
    assertGreaterEqual: Callable[..., None]

    def decode(self) -> list[Any]:
        """
        @return: all the events of the recording.
        """
        return wire.decodeAll(self.data())

    def test_decodesCompletely(self) -> None:
        """
        The whole recording decodes: a version 3 header, QEMU's machine
        type, and an EOF with nothing undecoded after it.
        """
        events = self.decode()
        self.assertEqual(named(events, "HeaderReceived")[0].version, 3)
        self.assertEqual(named(events, "ConfigurationReceived")[0].machine, MACHINE)
        self.assertEqual(len(named(events, "EOFReceived")), 1)

    def test_chunked(self) -> None:
        """
        Fed in odd-sized chunks, the decoder yields the same events.
        """
        data = self.data()
        chunks = (data[at : at + 65521] for at in range(0, len(data), 65521))
        summary = [_summary(event) for event in wire.iterChunks(chunks)]
        self.assertEqual(summary, [_summary(event) for event in self.decode()])

    def test_ramCoversBlocks(self) -> None:
        """
        Every page of every RAMBlock in the START list was sent at least
        once (normal or zero), and no page lies outside its block.
        """
        events = self.decode()
        (listed,) = named(events, "RAMBlocksListed")
        covered = pageCoverage(events)
        for block in listed.blocks:
            self.assertEqual(
                covered.get(block.idstr, set()),
                set(range(0, block.length, PAGE_SIZE)),
                f"pages of {block.idstr}",
            )
        self.assertEqual(set(covered), {block.idstr for block in listed.blocks})

    def test_reencodes(self) -> None:
        """
        Encoding the decoded events gives back the recorded bytes exactly.
        """
        encoded = wire.encodeEvents(self.decode())
        self.assertTrue(encoded == self.data(), "re-encoded stream differs")


def _summary(event: object) -> tuple[str, Any]:
    """
    @param event: a decoded event.
    @return: a comparable summary (page data compared by value).
    """
    if type(event).__name__ == "PageReceived":
        return ("PageReceived", (event.block, event.offset, bytes(event.data)))
    return (type(event).__name__, event)


class PrecopyStreamTests(StreamDecodeMixin, SynchronousTestCase):
    """
    The precopy stream saved with C{exec:cat}.
    """

    def data(self) -> bytes:
        """
        @return: the recorded precopy stream.
        """
        return recordings().precopy

    def test_devicesAtTopLevel(self) -> None:
        """
        Device sections come as byte-exact FULL sections in the main stream,
        followed by a JSON VMDESCRIPTION; no command is sent without a
        return path or postcopy.
        """
        events = self.decode()
        devices = named(events, "DeviceSectionReceived")
        self.assertIn("timer", {device.idstr for device in devices})
        data = self.data()
        for device in devices:
            self.assertIn(device.raw, data)
        (description,) = named(events, "VMDescriptionReceived")
        self.assertIn("devices", json.loads(description.json))
        self.assertEqual(named(events, "PingReceived"), [])


class PostcopyStreamTests(StreamDecodeMixin, SynchronousTestCase):
    """
    The postcopy main stream and return path recorded through the relay.
    """

    def data(self) -> bytes:
        """
        @return: the recorded postcopy main stream.
        """
        return recordings().postcopy.main

    def test_commandOrder(self) -> None:
        """
        The commands come in QEMU 7.2's order: OPEN_RETURN_PATH, PING(1),
        ADVISE, discards, PING(2), PACKAGED, PING(4).
        """
        kinds = [
            type(event).__name__ for event in self.decode()
            if type(event).__name__ not in _NOT_COMMANDS
        ]
        discards = kinds.count("DiscardReceived")
        self.assertGreaterEqual(discards, 1)
        self.assertEqual(kinds, [
            "ReturnPathOpened", "PingReceived", "PostcopyAdvised",
            *["DiscardReceived"] * discards,
            "PingReceived", "PackageReceived", "PingReceived",
        ])
        pings = [event.value for event in named(self.decode(), "PingReceived")]
        self.assertEqual(pings, [1, 2, 4])

    def test_packageByteExact(self) -> None:
        """
        The package is kept byte for byte: it follows its PACKAGED command
        in the recording and ends with PING(3) and RUN.
        """
        (package,) = named(self.decode(), "PackageReceived")
        data = self.data()
        at = data.index(package.data)
        header = bytes([8, 0, 7, 0, 4]) + len(package.data).to_bytes(4, "big")
        self.assertEqual(data[at - len(header) : at], header)
        self.assertEqual(package.data[-14:], PACKAGE_TAIL)

    def test_packageDecodes(self) -> None:
        """
        The package decodes as a nested stream: LISTEN, the device sections,
        PING(3), RUN, with every device section kept byte-exact.
        """
        (package,) = named(self.decode(), "PackageReceived")
        events = wire.decodeAll(package.data, header=False)
        kinds = [type(event).__name__ for event in events]
        self.assertEqual(kinds[0], "ListenReceived")
        self.assertEqual(kinds[-2:], ["PingReceived", "RunReceived"])
        devices = named(events, "DeviceSectionReceived")
        self.assertEqual(kinds.count("DeviceSectionReceived"), len(kinds) - 3)
        self.assertEqual(
            b"".join(device.raw for device in devices),
            package.data[5:-14],
        )

    def test_returnPath(self) -> None:
        """
        The return path decodes: PONGs for PING 1 to 4, page requests, and
        a final SHUT 0.  PONG 3 (from inside the package, answered by the
        main thread) and PONG 4 (answered by the listen thread) may come in
        either order.
        """
        events = decodeReturnPath(recordings().postcopy.returnPath)
        pongs = [event.value for event in named(events, "PongReceived")]
        self.assertEqual(pongs[:2], [1, 2])
        self.assertEqual(sorted(pongs[2:]), [3, 4])
        self.assertTrue(named(events, "PagesRequested"))
        self.assertEqual(type(events[-1]).__name__, "ShutReceived")
        self.assertEqual(events[-1].value, 0)

    def test_returnPathReencodes(self) -> None:
        """
        Encoding the decoded return path (REQ_PAGES vs REQ_PAGES_ID as
        recorded) gives back the recorded bytes exactly.
        """
        data = recordings().postcopy.returnPath
        encoder = wire.ReturnPathEncoder()
        encoded = b"".join(encoder.encode(event) for event in decodeReturnPath(data))
        self.assertTrue(encoded == data, "re-encoded return path differs")

    def test_packageReencodes(self) -> None:
        """
        Encoding the package's decoded events gives back the package.
        """
        (package,) = named(self.decode(), "PackageReceived")
        events = wire.decodeAll(package.data, header=False)
        self.assertTrue(wire.encodeEvents(events) == package.data)


_NOT_COMMANDS = {
    "HeaderReceived", "ConfigurationReceived", "SectionStarted", "SectionEnded",
    "RAMBlocksListed", "PageReceived", "ZeroPageReceived", "RAMSectionEOS",
    "DeviceSectionReceived", "EOFReceived", "VMDescriptionReceived",
}


class InspectTests(SynchronousTestCase):
    """
    C{postcopy inspect --json} on both recordings.
    """

    def inspect(self, path: str) -> dict[str, Any]:
        """
        Run the inspector in a subprocess.

        @param path: a recorded stream file.
        @return: its JSON report.
        """
        output = subprocess.run(
            [sys.executable, "-m", "twisted_postcopy.cli", "inspect", "--json", path],
            check=True, capture_output=True, timeout=120,
        ).stdout
        return json.loads(output)

    def assertReport(
        self, report: dict[str, Any], commands: list[str], postcopy: bool
    ) -> None:
        """
        Check the fields every report must carry.

        @param report: the JSON report.
        @param commands: the command names expected, in stream order
            (those inside the package included).
        @param postcopy: whether the stream switched to postcopy.
        """
        self.assertEqual(report["version"], 3)
        self.assertEqual(report["machine"], MACHINE)
        self.assertIs(report["complete"], True)
        self.assertIs(report["postcopy"], postcopy)
        self.assertIsNone(report["error"])
        self.assertEqual(report["commands"], commands)

    def test_precopy(self) -> None:
        """
        The precopy recording: no commands, complete, and the same RAM
        blocks as the decoder's START list.
        """
        data = recordings().precopy
        report = self.inspect(recordings().precopyPath)
        self.assertReport(report, [], postcopy=False)
        (listed,) = named(wire.decodeAll(data), "RAMBlocksListed")
        self.assertEqual(
            [(block["id"], block["length"]) for block in report["ram_blocks"]],
            [(block.idstr, block.length) for block in listed.blocks],
        )

    def test_postcopy(self) -> None:
        """
        The postcopy recording: its commands in order (the package's
        LISTEN, PING and RUN in place), PINGs 1 to 4, complete.
        """
        report = self.inspect(recordings().postcopyPath)
        discards = report["commands"].count("POSTCOPY_RAM_DISCARD")
        self.assertGreaterEqual(discards, 1)
        self.assertReport(report, [
            "OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE",
            *["POSTCOPY_RAM_DISCARD"] * discards,
            "PING", "PACKAGED", "POSTCOPY_LISTEN", "PING", "POSTCOPY_RUN", "PING",
        ], postcopy=True)
        self.assertEqual(report["pings"], [1, 2, 3, 4])

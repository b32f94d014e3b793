# -*- test-case-name: tests.test_fuzz -*-
"""
A mutation fuzzer for the decoders of everything a peer can send: the main
migration stream (and the packages inside it), the return path, the
preempt channel, the snapshot importer and the attach protocol's framing.

Seeds are real recorded QEMU 7.2 streams (C{tests/data/*.mig}, C{*.rp.bin}
of a checkout; reduced to a few pages so an input costs about a
millisecond, and whole now and then) and streams our own encoders write.
Each input is a seed with a few mutations (bit flips, interesting integers
over length fields, inserted, deleted, repeated and spliced ranges,
format tokens), fed in a random chunking.  The only allowed outcomes are
success or a L{ProtocolError} subclass carrying an offset within the input
(for the attach framing, an L{AttachProtocolError}); anything else, an
input over the CPU bound, or a sampled input over the memory bound is a
finding, reported with the index that replays it (C{bench/fuzz.py
--replay}).

Used by C{tests/test_fuzz.py} (a bounded run) and C{bench/fuzz.py} (a
million inputs).
"""

from __future__ import annotations

import random
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from attrs import define, evolve, field

from twisted_postcopy.errors import AttachProtocolError, ProtocolError
from twisted_postcopy.guests.attach import MessageReader, encodeMessage
from twisted_postcopy.snapshot.streamfile import StreamImporter
from twisted_postcopy.wire import events as e
from twisted_postcopy.wire.constants import RPMessage, SectionType
from twisted_postcopy.wire.encoder import StreamEncoder, encodeEvents
from twisted_postcopy.wire.events import RAMBlockInfo
from twisted_postcopy.wire.preempt import PreemptDecoder, PreemptEncoder
from twisted_postcopy.wire.returnpath import ReturnPathDecoder, ReturnPathEncoder, encodeMessage as rpMessage
from twisted_postcopy.wire.stream import StreamDecoder

#: Where recorded streams live in a checkout.
DATA = Path(__file__).resolve().parent.parent.parent / "tests" / "data"
#: CPU seconds one input may take.
CPU_BOUND = 1.0
#: Peak Python memory one sampled input may hold: this plus 16 × its size.
MEMORY_BOUND = 8 << 20
#: Every how many inputs one is run under tracemalloc.
MEMORY_SAMPLE = 97
#: Byte values and integers that break length and count fields.
_BYTES = (0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07, 0x08, 0x10, 0x20, 0x7E, 0x7F, 0x80, 0xFE, 0xFF)
_INTS = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
         0xFFFFFFFF, 0x100000000, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF)
#: Format tokens spliced in at random.
_TOKENS = (b"QEVM", b"\x00\x00\x00\x03", b"\x07", b"\x05", b"\x7e\x00\x00\x00\x02", b"\x03ram",
           b"\x01\x00\x00\x00\x02\x03ram\x00\x00\x00\x00\x00\x00\x00\x04",
           b"\x08\x00\x07\x00\x04", b"\x08\x00\x06", b"\x00\x06", b"\x06pc.ram", b"\x00\x03\x00\x0c",
           b"\x00\x04\x00\x0c", b"\x00\x05\x00\x01", b"\x00\x00\x00\x00\x00\x00\x00\x10",
           b"\xff\xff\xff\xff", b"\x00\x00\x00\x00\x00\x00\x10\x04", b"twisted-postcopy/",
           b'{"type":"hello"', b"[" * 64, b"[" * 3000)


def _chunks(data: bytes, rng: random.Random) -> Iterator[bytes]:
    """
    @param data: an input.
    @param rng: the randomness.
    @return: C{data} in a random chunking (whole, tiny pieces, socket-like
        pieces, or a mix).
    """
    style = rng.random()
    if style < 0.25:
        yield data
        return
    at = 0
    while at < len(data):
        if style < 0.4 and len(data) < 16384:
            size = rng.randint(1, 8)
        elif style < 0.8:
            size = rng.choice((1, 7, 64, 1000, 4096, 4104, 65536))
        else:
            size = rng.randint(1, 1 << rng.randint(0, 16))
        yield data[at:at + size]
        at += size


def mutate(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """
    @param data: a seed.
    @param rng: the randomness.
    @param others: seeds of the same kind, for splicing.
    @return: C{data} with one to a few mutations.
    """
    out = bytearray(data)
    for _ in range(1 + min(int(rng.expovariate(0.7)), 7)):
        choice = rng.randrange(10)
        at = rng.randrange(len(out) + 1)
        if choice == 0 and out:
            at = min(at, len(out) - 1)
            out[at] ^= 1 << rng.randrange(8)
        elif choice == 1 and out:
            at = min(at, len(out) - 1)
            out[at] = rng.choice(_BYTES) if rng.random() < 0.7 else rng.randrange(256)
        elif choice in (2, 3):
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(_INTS) & ((1 << 8 * width) - 1)
            if rng.random() < 0.3:
                value = rng.randrange(1 << 8 * width)
            out[at:at + width] = value.to_bytes(width, "big")
        elif choice == 4:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif choice == 5:
            del out[at:at + rng.randint(1, 64)]
        elif choice == 6 and out:
            start = rng.randrange(len(out))
            piece = bytes(out[start:start + rng.randint(1, 4096)])
            out[at:at] = piece * rng.randint(1, 4)
        elif choice == 7:
            del out[at:]
        elif choice == 8 and others:
            other = rng.choice(others)
            out[at:] = other[rng.randrange(len(other) + 1):]
        else:
            out[at:at] = rng.choice(_TOKENS)
    return bytes(out)


@define
class _NullBlock:
    """
    A block for the fuzzed snapshot importer: takes writes and keeps
    nothing (the importer's own logic runs; no memfd per input).
    """

    idstr: str
    length: int

    def write(self, offset: int, data: Any) -> None:
        """
        @param offset: checked against the length like a real block.
        @param data: ignored.
        """
        assert 0 <= offset and offset + len(data) <= self.length, (offset, len(data), self.length)

    def close(self) -> None:
        """
        Nothing to release.
        """


def _decodeStream(chunks: Iterator[bytes]) -> int:
    """
    Decode a main stream and every package in it, as a destination does.

    @return: the number of events.
    """
    decoder = StreamDecoder()
    count = 0
    for chunk in [*chunks, b""]:
        decoder.receiveData(chunk)
        for event in decoder.events():
            count += 1
            if event.__class__ is e.PackageReceived:
                package = decoder.packageDecoder(event.data)
                count += len(package.decodeWhole(event.data))
    return count


def _decodeWith(make: Callable[[], Any]) -> Callable[[Iterator[bytes]], int]:
    """
    @param make: makes a L{BufferedDecoder}.
    @return: a target feeding it the chunks and the end.
    """
    def target(chunks: Iterator[bytes]) -> int:
        decoder = make()
        count = 0
        for chunk in [*chunks, b""]:
            decoder.receiveData(chunk)
            for _ in decoder.events():
                count += 1
        return count
    return target


def _importSnapshot(chunks: Iterator[bytes]) -> int:
    """
    Run the snapshot importer over the chunks (blocks keep nothing).

    @return: the number of device sections.
    """
    importer = StreamImporter(_NullBlock)
    for chunk in chunks:
        importer.receiveData(chunk)
    importer.finish()
    return len(importer.devices)


def _readAttach(chunks: Iterator[bytes]) -> int:
    """
    Parse attach messages (no descriptors arrive).

    @return: the number of messages.
    """
    reader = MessageReader()
    count = 0
    for chunk in chunks:
        reader.feed(chunk)
        count += sum(1 for _ in reader.messages())
    return count


#: Blocks of the preempt channel seeds.
PREEMPT_BLOCKS = (RAMBlockInfo("pc.ram", 0x2000000), RAMBlockInfo("pc.bios", 0x40000))

#: Target name -> (decoding function, errors allowed besides ProtocolError).
TARGETS: dict[str, tuple[Callable[[Iterator[bytes]], int], tuple[type, ...]]] = {
    "stream": (_decodeStream, ()),
    "returnpath": (_decodeWith(ReturnPathDecoder), ()),
    "preempt": (_decodeWith(lambda: PreemptDecoder(PREEMPT_BLOCKS)), ()),
    "snapshot-import": (_importSnapshot, ()),
    "attach": (_readAttach, (AttachProtocolError,)),
}


def _reduce(data: bytes, keep: int = 3) -> bytes:
    """
    Shrink a recorded stream: keep every non-RAM element and the first
    C{keep} RAM records of each RAM section (re-encoded exactly), and the
    first 400 bytes of the VMDESCRIPTION JSON (opaque to the decoders).

    @param data: a whole recorded stream.
    @param keep: RAM records kept per section.
    @return: a smaller stream of the same shape.
    """
    events, inSection = [], 0
    for event in StreamDecoder().decodeWhole(data):
        if event.__class__ is e.SectionStarted:
            inSection = 0
        if event.__class__ is e.VMDescriptionReceived:
            event = e.VMDescriptionReceived(event.json[:400] + b"}")
        if event.__class__ in (e.PageReceived, e.ZeroPageReceived):
            inSection += 1
            if inSection > keep:
                continue
            if inSection == 1 and event.continued:
                event = evolve(event, continued=False)
        events.append(event)
    return encodeEvents(events)


def _ownStreams() -> list[bytes]:
    """
    @return: streams our encoder writes (what our source sends).
    """
    encoder = StreamEncoder()
    blocks = [RAMBlockInfo("pc.ram", 0x100000), RAMBlockInfo("pc.bios", 0x40000)]
    page = memoryview(bytes(range(256)) * 16)
    own = encoder.ownDeviceSection(46, "stress", b"\x7e\x00\x00\x00\x2e\x04 blob")
    parts = [encoder.header("pc-i440fx-7.2"), encoder.openReturnPath(), encoder.ping(1),
             encoder.postcopyAdvise(), encoder.ramStart(2, blocks),
             encoder.sectionHeader(SectionType.SECTION_PART, 2), *encoder.page("pc.ram", 0, page),
             *encoder.page("pc.ram", 0x1000, page), encoder.zeroPage("pc.bios", 0), encoder.eos(),
             encoder.sectionFooter(2), encoder.discard("pc.ram", [(0x10000, 0x1000), (0x20000, 0x3000)]),
             encoder.ping(2), encoder.package(own), encoder.ping(4),
             encoder.sectionHeader(SectionType.SECTION_END, 2), encoder.zeroPage("pc.bios", 0x1000),
             encoder.eos(), encoder.sectionFooter(2), encoder.eof()]
    postcopy = b"".join(bytes(part) for part in parts)
    precopy = (encoder.header("pc-i440fx-7.2") + StreamEncoder().ramStart(2, blocks)
               + encoder.sectionHeader(SectionType.SECTION_END, 2) + b"".join(
                   bytes(p) for p in StreamEncoder().page("pc.ram", 0x2000, page))
               + encoder.eos() + encoder.sectionFooter(2) + own + encoder.eof() + encoder.vmDescription(b"{}"))
    return [postcopy, precopy]


def _returnPaths() -> list[bytes]:
    """
    @return: return-path byte streams of every message type.
    """
    rp = ReturnPathEncoder()
    return [rp.pong(1) + rp.requestPages("pc.ram", 0x1000, 0x1000) + rp.requestPages("pc.ram", 0x5000, 0x1000)
            + rp.requestPages("pc.bios", 0, 0x1000) + rp.pong(3) + rp.shut(0),
            rp.recvBitmap("pc.ram", bytes(range(64))) + rp.resumeAck() + rp.requestPages("pc.ram", 0, 0x2000),
            rpMessage(RPMessage.PONG, b"\x00\x00\x00\x02")]


def _preempts() -> list[bytes]:
    """
    @return: preempt channels (pages, zero pages, EOS).
    """
    page = bytes(range(256)) * 16
    encoder = PreemptEncoder(alwaysNameBlock=False)
    parts = [*encoder.page("pc.ram", 0x3000, page), *encoder.page("pc.ram", 0x4000, page),
             encoder.zeroPage("pc.bios", 0x1000), *encoder.page("pc.bios", 0, page), encoder.eos()]
    named = PreemptEncoder()
    return [b"".join(bytes(p) for p in parts),
            b"".join(bytes(p) for p in [*named.page("pc.ram", 0, page), named.zeroPage("pc.ram", 0x1000),
                                        named.eos()])]


def _attaches() -> list[bytes]:
    """
    @return: attach message streams as both sides send them.
    """
    return [encodeMessage("hello", guest="g", worker="w0", pid=1234)
            + encodeMessage("blocks", mode="fault", fds=0,
                            blocks=[{"idstr": "pc.ram", "length": 1 << 20, "page_size": 4096}])
            + encodeMessage("mappings", mappings=[{"base": 140000000000, "idstr": "pc.ram", "offset": 0,
                                                   "length": 1 << 20, "page_size": 4096}]),
            encodeMessage("error", message="no such guest") + encodeMessage("device", state="AAAA")]


@define
class Corpus:
    """
    The seeds of each target.

    @ivar seeds: target name -> seeds.
    @ivar whole: target name -> whole recorded streams (fuzzed now and
        then: they cost ~10 ms an input).
    """

    seeds: dict[str, list[bytes]] = field(factory=dict)
    whole: dict[str, list[bytes]] = field(factory=dict)

    @classmethod
    def load(cls, data: Path = DATA) -> Corpus:
        """
        @param data: the directory of recorded streams (may be missing).
        @return: the corpus.
        """
        recorded = [path.read_bytes() for path in sorted(data.glob("*.mig"))] if data.is_dir() else []
        rpRecorded = [path.read_bytes() for path in sorted(data.glob("*.rp.bin"))] if data.is_dir() else []
        reduced = [_reduce(stream) for stream in recorded]
        own = _ownStreams()
        withVMDesc = [stream for stream in reduced + own if stream.endswith(b"}")]
        return cls(
            seeds={
                "stream": reduced + own,
                "returnpath": rpRecorded + _returnPaths(),
                "preempt": _preempts(),
                "snapshot-import": withVMDesc,
                "attach": _attaches(),
            },
            whole={"stream": recorded, "snapshot-import": [s for s in recorded if s.endswith(b"}")]},
        )


@define
class Outcome:
    """
    What one input did.

    @ivar kind: C{"ok"}, C{"error:<Class>"}, or C{"bad:<what>"} (a finding).
    @ivar seconds: CPU seconds it took.
    @ivar detail: for a finding, the exception text.
    """

    kind: str
    seconds: float
    detail: str = ""


def runOne(target: str, data: bytes, rng: random.Random, measureMemory: bool = False,
           cpuBound: float = CPU_BOUND) -> Outcome:
    """
    Decode one input in a random chunking and classify what happened.

    @param target: a key of L{TARGETS}.
    @param data: the input.
    @param rng: the randomness of the chunking.
    @param measureMemory: whether to measure its peak memory.
    @param cpuBound: the most CPU seconds allowed.
    @return: the outcome.
    """
    decode, allowed = TARGETS[target]
    if measureMemory:
        tracemalloc.start()
    started = time.process_time()
    try:
        decode(_chunks(data, rng))
        kind, detail = "ok", ""
    except ProtocolError as error:
        if error.offset is None or not 0 <= error.offset <= len(data):
            kind, detail = f"bad:offset:{type(error).__name__}", f"offset {error.offset!r}: {error}"
        else:
            kind, detail = f"error:{type(error).__name__}", ""
    except allowed as error:
        kind, detail = f"error:{type(error).__name__}", ""
    except Exception as error:  # noqa: BLE001 - any other exception is the finding
        kind, detail = f"bad:{type(error).__name__}", repr(error)[:300]
    seconds = time.process_time() - started
    if measureMemory:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if peak > MEMORY_BOUND + 16 * len(data):
            kind, detail = "bad:memory", f"peak {peak} bytes for a {len(data)}-byte input"
    if seconds > cpuBound and not kind.startswith("bad:"):
        kind, detail = "bad:slow", f"{seconds:.2f} s of CPU for a {len(data)}-byte input"
    return Outcome(kind, seconds, detail)


def makeInput(corpus: Corpus, seed: int, index: int) -> tuple[str, bytes, random.Random]:
    """
    The input number C{index} of a run (a pure function of both numbers,
    so any input can be replayed).

    @param corpus: the seeds.
    @param seed: the run's seed.
    @param index: the input's number.
    @return: its target, bytes and chunking randomness.
    """
    rng = random.Random(seed * 1_000_003 + index)
    target = rng.choice(sorted(corpus.seeds))
    whole = corpus.whole.get(target)
    pool = whole if whole and rng.random() < 0.002 else corpus.seeds[target]
    data = rng.choice(pool)
    if rng.random() < 0.97:
        data = mutate(data, rng, corpus.seeds[target])
    return target, data, rng


@define
class Report:
    """
    Counts of a run.

    @ivar counts: (target, outcome kind) -> inputs.
    @ivar findings: (index, target, kind, detail) of the first findings.
    @ivar maxSeconds: the slowest input's CPU seconds.
    @ivar inputs: inputs run.
    """

    counts: Counter = field(factory=Counter)
    findings: list[tuple[int, str, str, str]] = field(factory=list)
    maxSeconds: float = 0.0
    inputs: int = 0

    def add(self, index: int, target: str, outcome: Outcome) -> None:
        """
        Count one outcome.
        """
        self.inputs += 1
        self.counts[(target, outcome.kind)] += 1
        self.maxSeconds = max(self.maxSeconds, outcome.seconds)
        if outcome.kind.startswith("bad:") and len(self.findings) < 50:
            self.findings.append((index, target, outcome.kind, outcome.detail))

    def merge(self, other: Report) -> None:
        """
        Add another report's counts (a worker's).
        """
        self.counts.update(other.counts)
        self.findings.extend(other.findings[:50 - len(self.findings)])
        self.maxSeconds = max(self.maxSeconds, other.maxSeconds)
        self.inputs += other.inputs

    @property
    def bad(self) -> int:
        """
        @return: the number of findings.
        """
        return sum(n for (_, kind), n in self.counts.items() if kind.startswith("bad:"))


def fuzz(corpus: Corpus, seed: int, start: int, count: int, deadline: float | None = None) -> Report:
    """
    Run inputs C{start} to C{start + count}.

    @param corpus: the seeds.
    @param seed: the run's seed.
    @param start: the first input's number.
    @param count: how many inputs.
    @param deadline: a C{time.monotonic()} after which to stop early.
    @return: the counts.
    """
    report = Report()
    for index in range(start, start + count):
        if deadline is not None and time.monotonic() > deadline:
            break
        target, data, rng = makeInput(corpus, seed, index)
        report.add(index, target, runOne(target, data, rng, index % MEMORY_SAMPLE == 0))
    return report

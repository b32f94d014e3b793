# -*- test-case-name: tests.test_fuzz -*-
"""
Tests for L{twisted_postcopy.testing.fuzz}: a bounded fuzzing run over
every decoder a peer can reach (the million-input run is C{bench/fuzz.py}),
and the harness's own classification.
"""

from __future__ import annotations

import random
import time
from typing import Iterator

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.errors import BadLengthError
from twisted_postcopy.testing import fuzz

#: Wall-clock seconds of the bounded run.
RUN_SECONDS = 4.0


class BoundedRunTests(SynchronousTestCase):
    """
    A few seconds of fuzzing find nothing.
    """

    def test_noFindings(self) -> None:
        """
        Mutated recordings and our own streams, in random chunkings, end in
        success or a ProtocolError with an offset, within the CPU and memory
        bounds, for every target; each target sees both outcomes.
        """
        corpus = fuzz.Corpus.load()
        self.assertTrue(corpus.whole["stream"], "tests/data has the recorded QEMU streams")
        report = fuzz.fuzz(corpus, int(time.time()) % 1000, 0, 100_000, time.monotonic() + RUN_SECONDS)
        self.assertGreater(report.inputs, 300)
        self.assertEqual(report.findings, [])
        self.assertEqual(report.bad, 0)
        for target in fuzz.TARGETS:
            kinds = {kind for (each, kind), _ in report.counts.items() if each == target}
            self.assertIn("ok", kinds, target)
            self.assertTrue(any(kind.startswith("error:") for kind in kinds), target)

    def test_seedsDecode(self) -> None:
        """
        Every unmutated seed decodes without error, in any chunking (so the
        mutations start from valid input).
        """
        corpus = fuzz.Corpus.load()
        for target, seeds in corpus.seeds.items():
            for seed in seeds:
                for chunking in range(5):
                    outcome = fuzz.runOne(target, seed, random.Random(chunking))
                    self.assertEqual(outcome.kind, "ok", (target, len(seed), outcome.detail))


class ClassificationTests(SynchronousTestCase):
    """
    What the harness counts as a finding.
    """

    def setUp(self) -> None:
        """
        Remember the targets.
        """
        self.addCleanup(fuzz.TARGETS.__setitem__, "stream", fuzz.TARGETS["stream"])

    def use(self, decode: object) -> None:
        """
        Make C{decode} the stream target.
        """
        fuzz.TARGETS["stream"] = (decode, ())  # type: ignore[assignment]

    def test_otherException(self) -> None:
        """
        An exception that is not a ProtocolError is a finding.
        """
        def decode(chunks: Iterator[bytes]) -> int:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

        self.use(decode)
        outcome = fuzz.runOne("stream", b"x", random.Random(1))
        self.assertEqual(outcome.kind, "bad:UnicodeDecodeError")

    def test_offset(self) -> None:
        """
        A ProtocolError without an offset, or with one outside the input,
        is a finding; with one inside, an allowed outcome.
        """
        for offset, kind in ((None, "bad:offset:BadLengthError"), (99, "bad:offset:BadLengthError"),
                             (1, "error:BadLengthError")):
            def decode(chunks: Iterator[bytes], offset: int | None = offset) -> int:
                raise BadLengthError("bad", offset)

            self.use(decode)
            self.assertEqual(fuzz.runOne("stream", b"xy", random.Random(1)).kind, kind)

    def test_slow(self) -> None:
        """
        An input over the CPU bound is a finding.
        """
        def decode(chunks: Iterator[bytes]) -> int:
            end = time.process_time() + 0.05
            while time.process_time() < end:
                pass
            return 0

        self.use(decode)
        self.assertEqual(fuzz.runOne("stream", b"x", random.Random(1), cpuBound=0.01).kind, "bad:slow")

    def test_memory(self) -> None:
        """
        A sampled input whose decoding holds more than the memory bound is a
        finding.
        """
        def decode(chunks: Iterator[bytes]) -> int:
            held = bytearray(fuzz.MEMORY_BOUND + (1 << 20))
            return len(held)

        self.use(decode)
        self.assertEqual(fuzz.runOne("stream", b"x", random.Random(1), measureMemory=True).kind, "bad:memory")

    def test_replayable(self) -> None:
        """
        Input number N of a seed is the same every time.
        """
        corpus = fuzz.Corpus.load()
        first = fuzz.makeInput(corpus, 7, 1234)
        second = fuzz.makeInput(corpus, 7, 1234)
        self.assertEqual(first[:2], second[:2])


class FindingsTests(SynchronousTestCase):
    """
    What the fuzzer found, kept as regression tests.
    """

    def test_deeplyNestedAttachJSON(self) -> None:
        """
        An attach message of deeply nested JSON arrays is an
        L{AttachProtocolError} (it raised RecursionError inside the
        reader).
        """
        from twisted_postcopy.errors import AttachProtocolError
        from twisted_postcopy.guests.attach import MessageReader

        body = b"[" * 100_000
        reader = MessageReader()
        reader.feed(len(body).to_bytes(4, "big") + body)
        self.assertRaises(AttachProtocolError, list, reader.messages())

    def test_discardNameOverrunsPayload(self) -> None:
        """
        A POSTCOPY_RAM_DISCARD whose idstr length runs past its payload is
        a L{BadLengthError} at the length byte, inside the input (its offset
        pointed past the input: input 668859 of the first million).
        """
        from twisted_postcopy.errors import BadLengthError
        from twisted_postcopy.wire import StreamDecoder
        from twisted_postcopy.wire.commands import encodeCommand
        from twisted_postcopy.wire.constants import Command

        payload = b"\x00\xff" + b"a" * 30
        data = encodeCommand(Command.POSTCOPY_RAM_DISCARD, payload)
        error = self.assertRaises(BadLengthError, StreamDecoder(header=False).decodeWhole, data)
        self.assertEqual(error.offset, 6)
        self.assertIn("overruns", str(error))
        corpus = fuzz.Corpus.load()
        target, mutated, rng = fuzz.makeInput(corpus, 1, 668859)
        self.assertEqual(fuzz.runOne(target, mutated, rng).kind, "error:BadLengthError")

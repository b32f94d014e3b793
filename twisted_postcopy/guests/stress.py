# -*- test-case-name: tests.test_guests_stress -*-
"""
The C{stress} guest: workers dirtying a working set at a set rate, like
QEMU's guestperf, deterministic from a seed and self-verifying.

Worker C{k} owns pages C{[k*W, (k+1)*W)} of its block (C{W} =
C{--working-set}).  It first writes every one of them at generation 0,
then its step C{t} rewrites page C{perm[t % W]} (C{perm} a permutation of
its pages drawn from C{Random(seed, k)}) at the next generation.  So the
device state (seed, index, working set, steps done) fixes every page's
expected content: page C{perm[i]} has generation C{ceil((steps - i) / W)}
(0 when C{steps <= i}).  A page is a 32-byte header (magic
C{TPSTRESS}, seed, page index, generation: little-endian u64s) and a
fill of one u64 derived from the three.

Run as C{python -m twisted_postcopy.guests.stress --attach PATH --guest
stress --worker stress-K [--working-set W] [--rate PAGES_PER_S] [--seed S]}.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import threading
import time
from typing import Any

from attrs import frozen

from twisted_postcopy.errors import GuestError
from twisted_postcopy.guests import worker as _worker

PAGE = 4096
MAGIC = b"TPSTRESS"
_HEADER = struct.Struct("<8sQQQ")
_MASK = (1 << 64) - 1


def pageContent(seed: int, index: int, generation: int) -> bytes:
    """
    @param seed: the guest's seed.
    @param index: the page's index in its block.
    @param generation: how often it was rewritten.
    @return: the page's expected 4096 bytes.
    """
    word = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + generation * 0x94D049BB133111EB + 1) & _MASK
    return _HEADER.pack(MAGIC, seed, index, generation) + struct.pack("<Q", word) * ((PAGE - _HEADER.size) // 8)


@frozen
class StressState:
    """
    A stress worker's device state.

    @ivar seed: the guest's seed.
    @ivar index: the worker's index.
    @ivar workingSet: its number of pages.
    @ivar steps: page writes done after initialisation.
    @ivar block: the block's idstr.
    @ivar initialised: generation 0 has been written.
    """

    seed: int
    index: int
    workingSet: int
    steps: int
    block: str
    initialised: bool = True

    def encode(self) -> bytes:
        """
        @return: the blob (JSON).
        """
        return json.dumps({"seed": self.seed, "index": self.index, "working_set": self.workingSet,
                           "steps": self.steps, "block": self.block, "initialised": self.initialised}).encode()

    @classmethod
    def decode(cls, blob: bytes) -> StressState:
        """
        @param blob: from L{encode}.
        @return: the state.
        @raise GuestError: malformed.
        """
        try:
            f = json.loads(blob)
            return cls(int(f["seed"]), int(f["index"]), int(f["working_set"]), int(f["steps"]), str(f["block"]),
                       bool(f["initialised"]))
        except (ValueError, KeyError, TypeError) as error:
            raise GuestError(f"malformed stress device state: {error!r}") from None

    @property
    def first(self) -> int:
        """
        @return: the index of the worker's first page in the block.
        """
        return self.index * self.workingSet

    def permutation(self) -> list[int]:
        """
        @return: the order (block page indexes) in which steps rewrite pages.
        """
        pages = list(range(self.first, self.first + self.workingSet))
        random.Random(self.seed * 1000003 + self.index).shuffle(pages)
        return pages

    def expected(self) -> dict[int, int]:
        """
        @return: block page index -> expected generation (empty if never
            initialised).
        """
        if not self.initialised:
            return {}
        w, s = self.workingSet, self.steps
        return {page: (s - i + w - 1) // w if s > i else 0 for i, page in enumerate(self.permutation())}


def verifyMemory(memory: Any, state: StressState, limit: int = 8) -> list[str]:
    """
    Check a block's bytes against a worker's state.

    @param memory: the block's bytes (a buffer; every page present).
    @param state: the worker's state.
    @param limit: stop after this many bad pages.
    @return: one message per bad page (empty: all good).
    """
    view = memoryview(memory)
    errors = []
    for page, generation in sorted(state.expected().items()):
        found = view[page * PAGE : (page + 1) * PAGE]
        if found != pageContent(state.seed, page, generation):
            magic, seed, index, actual = _HEADER.unpack(found[: _HEADER.size])
            errors.append(f"page {page} of {state.block}: expected generation {generation}, found header "
                          f"magic={bytes(magic)!r} index={index} generation={actual} or a corrupted body")
            if len(errors) >= limit:
                break
    return errors


class StressWorker(_worker.GuestWorker):
    """
    One stress worker: a writer thread paced at C{--rate} pages/s.

    @ivar state: the current state (steps advance under C{lock}).
    @ivar order: the state's permutation.
    @ivar lock: held for each page write and its step increment.
    """

    def __init__(self, attachment: Any, options: argparse.Namespace) -> None:
        """
        @param attachment: the attachment.
        @param options: the command line.
        @raise GuestError: the working set does not fit the block.
        """
        super().__init__(attachment, options)
        block = attachment.block(options.block) if options.block else attachment.blocks[0]
        index = _worker.workerIndex(options.worker)
        if (index + 1) * options.working_set * PAGE > block.length:
            raise GuestError(f"working set {options.working_set} of worker {index} exceeds block {block.idstr}")
        self.view = block.view()
        self.state = StressState(options.seed, index, options.working_set, 0, block.idstr, False)
        self.order = self.state.permutation()
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.exiting = False
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _writePage(self, page: int, generation: int) -> None:
        """
        @param page: block page index.
        @param generation: its new generation.
        """
        self.view[page * PAGE : (page + 1) * PAGE] = pageContent(self.state.seed, page, generation)

    def _step(self) -> None:
        """
        Write the next step's page (under the lock, not while paused).
        """
        with self.lock:
            if not self.running.is_set():
                return
            s, w = self.state.steps, self.state.workingSet
            self._writePage(self.order[s % w], s // w + 1)
            self.state = StressState(self.state.seed, self.state.index, w, s + 1, self.state.block)

    def _write(self) -> None:
        """
        The writer thread.
        """
        rate = self.options.rate
        while not self.exiting:
            self.running.wait(0.2)
            began, done = time.monotonic(), 0
            while self.running.is_set() and not self.exiting:
                self._step()
                done += 1
                if rate:
                    delay = began + done / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)

    def resume(self) -> dict[str, Any]:
        """
        Initialise the working set on the first run, then let the writer go.

        @return: no info.
        """
        with self.lock:
            if not self.state.initialised:
                for page in range(self.state.first, self.state.first + self.state.workingSet):
                    self._writePage(page, 0)
                self.state = StressState(self.state.seed, self.state.index, self.state.workingSet, 0,
                                         self.state.block)
            self.running.set()
        return {}

    def pause(self) -> None:
        """
        Clear the run flag under the lock: no write can follow.
        """
        with self.lock:
            self.running.clear()

    def save(self) -> bytes:
        """
        @return: the state, taken under the lock.
        """
        with self.lock:
            return self.state.encode()

    def load(self, blob: bytes) -> None:
        """
        @param blob: the source worker's state.
        @raise GuestError: it is another worker's, or malformed.
        """
        state = StressState.decode(blob)
        if (state.index, state.workingSet, state.block) != (self.state.index, self.state.workingSet,
                                                            self.state.block):
            raise GuestError(f"stress state of worker {state.index} does not fit worker {self.state.index}")
        with self.lock:
            self.state, self.order = state, state.permutation()

    def verify(self) -> dict[str, Any]:
        """
        @return: C{ok}, C{pages} checked, C{steps}, C{errors}.
        """
        with self.lock:
            errors = verifyMemory(self.view, self.state)
            return {"ok": not errors, "pages": self.state.workingSet, "steps": self.state.steps, "errors": errors}

    def close(self) -> None:
        """
        Stop the writer thread.
        """
        self.pause()
        self.exiting = True


def addArguments(parser: argparse.ArgumentParser) -> None:
    """
    @param parser: gets the stress options.
    """
    parser.add_argument("--working-set", type=int, default=256, help="pages per worker")
    parser.add_argument("--rate", type=float, default=1000.0, help="pages/s per worker (0: unlimited)")
    parser.add_argument("--seed", type=int, default=1, help="the content seed")
    parser.add_argument("--block", default="", help="the block idstr (default: the first)")


if __name__ == "__main__":
    _worker.main(sys.argv[1:], StressWorker, addArguments)

# -*- test-case-name: tests.test_guests_stress -*-
"""
Tests for L{twisted_postcopy.guests.stress}: the expected-content model on
bytes, and real stress worker processes (run control, device state,
verification) through L{twisted_postcopy.guests.host.GuestHost}.
"""

from __future__ import annotations

import hashlib
import os
from base64 import b64encode

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_postcopy.errors import GuestError
from twisted_postcopy.guests.host import GuestHost
from twisted_postcopy.guests.stress import PAGE, StressState, pageContent, verifyMemory
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.testing.waiting import waitUntil

STRESS = "twisted_postcopy.guests.stress"


def simulate(state: StressState, pages: int) -> bytearray:
    """
    Replay a worker step by step (the model L{StressState.expected}
    must agree with).

    @param state: the state to reach.
    @param pages: the block's size in pages.
    @return: the block's bytes.
    """
    memory = bytearray(pages * PAGE)
    generations = {}
    for page in range(state.first, state.first + state.workingSet):
        generations[page] = 0
    order = state.permutation()
    for step in range(state.steps):
        generations[order[step % state.workingSet]] += 1
    for page, generation in generations.items():
        memory[page * PAGE : (page + 1) * PAGE] = pageContent(state.seed, page, generation)
    return memory


class ModelTests(SynchronousTestCase):
    """
    Tests for L{StressState}, L{pageContent} and L{verifyMemory}.
    """

    @settings(max_examples=40, deadline=None)
    @given(st.integers(0, 2**32), st.integers(0, 3), st.integers(1, 20), st.integers(0, 100))
    def test_expectedMatchesReplay(self, seed: int, index: int, workingSet: int, steps: int) -> None:
        """
        The closed form agrees with a step-by-step replay.
        """
        state = StressState(seed, index, workingSet, steps, "ram")
        self.assertEqual(verifyMemory(simulate(state, 4 * 20), state), [])

    def test_detectsCorruption(self) -> None:
        """
        One flipped byte, a stale generation or a page of another index is
        reported with its page number.
        """
        state = StressState(5, 1, 8, 21, "ram")
        good = simulate(state, 16)
        for page, damage in [(9, lambda m, at: m.__setitem__(at + 3000, m[at + 3000] ^ 1)),
                             (12, lambda m, at: m.__setitem__(slice(at, at + PAGE), pageContent(5, 12, 0))),
                             (15, lambda m, at: m.__setitem__(slice(at, at + PAGE), pageContent(5, 14, 3)))]:
            memory = bytearray(good)
            damage(memory, page * PAGE)
            if memory == good:
                continue
            (error,) = verifyMemory(memory, state)
            self.assertIn(f"page {page} of ram", error)

    def test_stateRoundTrip(self) -> None:
        """
        The blob decodes to the same state; garbage is a L{GuestError}.
        """
        state = StressState(1, 2, 3, 4, "pc.ram")
        self.assertEqual(StressState.decode(state.encode()), state)
        self.assertRaises(GuestError, StressState.decode, b"{}")


class WorkerTests(TestCase):
    """
    Real stress worker processes attached in C{plain} mode.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        """
        Two workers of 64 pages each on a 1 MiB block, attached and
        running.
        """
        self.block = RAMBlock("ram", 1 << 20)
        self.addCleanup(self.block.close)
        self.host = GuestHost(reactor, self.mktemp() + ".sock", [self.block], "plain")
        self.addCleanup(self.host.kill)
        self.host.spawn(STRESS, "stress", 2, ["--working-set", "64", "--rate", "5000", "--seed", "9"])
        yield self.host.whenAttached()
        yield self.host.run()
        yield self.bothStepped()

    def memory(self) -> bytes:
        """
        @return: the block's bytes (read from the memfd).
        """
        return os.pread(self.block.fd, self.block.length, 0)

    def bothStepped(self):
        """
        Wait until each running worker rewrote a page of its 64-page working
        set (one step at least), however slowly the machine runs them.

        @return: a Deferred.
        """
        size = 64 * PAGE
        before = self.memory()

        def stepped() -> bool:
            """
            @return: whether both working sets changed.
            """
            now = self.memory()
            return all(now[k * size : (k + 1) * size] != before[k * size : (k + 1) * size] for k in (0, 1))

        return waitUntil(reactor, stepped)

    @inlineCallbacks
    def test_stopSaveVerify(self) -> None:
        """
        After C{stop} nothing is written any more (state and memory stay
        the same); the memory verifies against the saved state, both in
        the workers and from the daemon's side.
        """
        yield self.host.stop()
        states = yield self.host.save()
        before = hashlib.sha256(os.pread(self.block.fd, self.block.length, 0)).digest()
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual((yield self.host.save()), states)
        self.assertEqual(hashlib.sha256(os.pread(self.block.fd, self.block.length, 0)).digest(), before)
        memory = os.pread(self.block.fd, self.block.length, 0)
        for blob in states.values():
            state = StressState.decode(blob)
            self.assertGreater(state.steps, 0)
            self.assertEqual(verifyMemory(memory, state), [])
        verified = yield self.host.verify()
        self.assertEqual([r["ok"] for r in verified.values()], [True, True])

    @inlineCallbacks
    def test_verifyDetectsCorruptPage(self) -> None:
        """
        A page changed behind the worker's back fails its verification,
        naming the page; the other worker still verifies.
        """
        yield self.host.stop()
        os.pwrite(self.block.fd, b"\xff" * 8, 70 * PAGE + 512)
        verified = yield self.host.verify()
        self.assertTrue(verified["stress-0"]["ok"])
        self.assertFalse(verified["stress-1"]["ok"])
        self.assertIn("page 70 of ram", verified["stress-1"]["errors"][0])

    @inlineCallbacks
    def test_loadContinues(self) -> None:
        """
        A worker loaded with another state continues from it: steps go on
        from the loaded count and memory verifies (the state fixes every
        page).
        """
        yield self.host.stop()
        states = yield self.host.save()
        yield self.host.load(states)
        yield self.host.run()
        yield self.bothStepped()
        yield self.host.stop()
        later = yield self.host.save()
        for name in states:
            self.assertGreater(StressState.decode(later[name]).steps, StressState.decode(states[name]).steps)
        verified = yield self.host.verify()
        self.assertEqual([r["ok"] for r in verified.values()], [True, True])

    @inlineCallbacks
    def test_loadRefusesOtherWorker(self) -> None:
        """
        Loading worker 1's state into worker 0 fails with L{GuestError}.
        """
        yield self.host.stop()
        states = yield self.host.save()
        error = yield self.assertFailure(self.host.workers["stress-0"].request(
            "load", blob=b64encode(states["stress-1"]).decode()), GuestError)
        self.assertIn("does not fit worker 0", str(error))

"""
Migrations between two C{twistd postcopy} daemons in network namespaces
(L{twisted_postcopy.testing.netns}), with silent cuts of the path between
them: what C{tests/test_recovery_netns.py} and C{bench/cuts.py} run.

Both daemons run the production code (real guest processes faulting
through userfaultfd, the real fault service); this module only drives
them through their control sockets, as an operator would, except that it
never issues a recovery command: with C{x-postcopy-auto-recover} on, the
daemons notice the cut and recover by themselves.  The times of every
C{MIGRATION} event are recorded as they arrive on the (local, uncut)
control sockets.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Sequence

from attrs import define, field
from twisted.internet.task import deferLater

from twisted_postcopy.control.daemon import Daemon, startDaemon
from twisted_postcopy.demo import waitForGuest
from twisted_postcopy.errors import PostcopyError
from twisted_postcopy.testing.netns import DESTINATION_ADDRESS, NetnsPath

#: The migration port (each namespace has its own port space).
PORT = 4444
#: The destination's URI.
URI = f"tcp:{DESTINATION_ADDRESS}:{PORT}"
#: Capabilities on both sides.
CAPABILITIES = {"postcopy-ram": True, "x-postcopy-auto-recover": True}
SIDES = ("source", "destination")


@define
class Cut:
    """
    One silent cut and what both sides did about it.

    @ivar phase: C{precopy} or C{postcopy}.
    @ivar hold: seconds the path stayed down.
    @ivar cutAt: when it went down (reactor time).
    @ivar upAt: when it carried packets again.
    @ivar paused: side -> seconds from the cut to its C{postcopy-paused}
        (or C{failed} in precopy); absent when the side did not notice.
    @ivar recovered: side -> seconds from link up to C{postcopy-active}.
    """

    phase: str
    hold: float
    cutAt: float = 0.0
    upAt: float = 0.0
    paused: dict[str, float] = field(factory=dict)
    recovered: dict[str, float] = field(factory=dict)


@define
class Events:
    """
    The C{MIGRATION} events of both daemons, with their arrival times.

    @ivar reactor: the clock.
    @ivar seen: side -> [(time, data)].
    """

    reactor: Any
    seen: dict[str, list[tuple[float, dict[str, Any]]]] = field(factory=lambda: {s: [] for s in SIDES})

    def observer(self, side: str) -> Any:
        """
        @param side: C{source} or C{destination}.
        @return: a control-client event observer recording that side.
        """
        def observe(event: str, data: dict[str, Any]) -> None:
            if event == "MIGRATION":
                self.seen[side].append((self.reactor.seconds(), dict(data)))
        return observe

    def first(self, side: str, statuses: Sequence[str], since: float) -> float | None:
        """
        @param side: the side.
        @param statuses: status names.
        @param since: a time.
        @return: the time of the first status change to one of them at or
            after C{since} (automatic recovery attempts, which repeat the
            status, are not status changes), or L{None}.
        """
        for when, data in self.seen[side]:
            if when >= since and data.get("status") in statuses and len(data) == 1:
                return when
        return None

    def statuses(self, side: str) -> list[str]:
        """
        @param side: the side.
        @return: its status changes, in order.
        """
        return [data["status"] for _, data in self.seen[side] if len(data) == 1]

    def attempts(self, side: str) -> int:
        """
        @param side: the side.
        @return: its automatic recovery attempts.
        """
        return sum("x-recover-attempt" in data and "x-recover-gave-up" not in data for _, data in self.seen[side])

    async def wait(self, side: str, statuses: Sequence[str], since: float, timeout: float) -> float | None:
        """
        @param side: the side.
        @param statuses: status names.
        @param since: a time.
        @param timeout: seconds to wait at most.
        @return: as L{first}, waiting for it.
        """
        deadline = self.reactor.seconds() + timeout
        while True:
            found = self.first(side, statuses, since)
            if found is not None or self.reactor.seconds() >= deadline:
                return found
            await sleep(self.reactor, 0.01)


async def sleep(reactor: Any, seconds: float) -> None:
    """
    @param reactor: the reactor.
    @param seconds: how long.
    """
    await deferLater(reactor, seconds, lambda: None)


async def startPair(reactor: Any, path: NetnsPath, workdir: Path, ram: int, seed: int,
                    guest: str = "stress", extra: Sequence[str] = ()) -> dict[str, Daemon]:
    """
    Start a destination daemon in the path's B namespace and a source in A.
    They migrate in plaintext across the namespaces' addresses, so both run
    with C{--insecure-migration} (the test path is private to the test).

    @param reactor: the reactor.
    @param path: the namespaces.
    @param workdir: where sockets and logs go.
    @param ram: guest RAM bytes.
    @param seed: the guest's seed.
    @param guest: the built-in guest.
    @param extra: more daemon options (both sides).
    @return: side -> daemon (stop them with C{Daemon.stop}).
    """
    daemons: dict[str, Daemon] = {}
    for side, namespace in (("destination", path.destination), ("source", path.source)):
        arguments = ["--role", side, "--guest", guest, "--ram", f"{ram}B", "--seed", str(seed),
                     "--insecure-migration", *extra]
        daemons[side] = await startDaemon(reactor, side, workdir, arguments, wrapper=path.execIn(namespace))
    return daemons


async def stopPair(reactor: Any, daemons: dict[str, Daemon]) -> None:
    """
    @param reactor: the reactor.
    @param daemons: from L{startPair}.
    """
    for daemon in daemons.values():
        await daemon.stop(reactor)


async def status(daemon: Daemon) -> str:
    """
    @param daemon: a daemon.
    @return: its C{query-migrate} status.
    """
    return (await daemon.client.queryMigrate()).get("status", "none")


async def migrateWithCuts(reactor: Any, path: NetnsPath, daemons: dict[str, Daemon], cuts: Sequence[Cut],
                          postcopyBandwidth: int, rng: random.Random, precopyBandwidth: int = 4 << 20,
                          timeout: float = 120.0,
                          inPostcopy: Callable[[], object] = lambda: None) -> dict[str, Any]:
    """
    Migrate with the given cuts, each at a random moment (0.1 to 0.6 s
    into the phase, or after the previous recovery), then wait for the
    end.

    A postcopy cut longer than the link timeout must be noticed by both
    sides and recovered by themselves once the link is back; a shorter
    one may go unnoticed (TCP retransmits) or be recovered the same way.
    A precopy cut must fail both sides.

    @param reactor: the reactor.
    @param path: the namespaces.
    @param daemons: from L{startPair}.
    @param cuts: the cuts, all of one phase.
    @param postcopyBandwidth: C{max-postcopy-bandwidth} (keeps postcopy
        long enough for the cuts).
    @param rng: the random moments' source.
    @param precopyBandwidth: C{max-bandwidth} (slow enough that precopy
        does not converge before C{migrate-start-postcopy}).
    @param timeout: seconds for any one wait.
    @param inPostcopy: called once both sides are in postcopy, before the
        first cut.
    @return: C{events} (L{Events}), C{final} (side -> C{query-migrate}),
        C{guest} (the destination's, or the source's after a failed
        precopy, C{query-guest}).
    @raise PostcopyError: a side did not reach a status in time.
    """
    events = Events(reactor)
    source, destination = daemons["source"], daemons["destination"]
    await waitForGuest(reactor, source, reactor.seconds() + timeout)
    for side, daemon in daemons.items():
        await daemon.client.subscribe(events.observer(side))
        await daemon.client.setCapabilities(CAPABILITIES)
    await destination.client.migrateIncoming(URI)
    await source.client.setParameters({"max-bandwidth": precopyBandwidth,
                                       "max-postcopy-bandwidth": postcopyBandwidth})
    began = reactor.seconds()
    await source.client.migrate(URI)
    phase = cuts[0].phase if cuts else "postcopy"
    if phase == "postcopy":
        await sleep(reactor, 0.2)
        await source.client.startPostcopy()
        for side in SIDES:
            if await events.wait(side, ["postcopy-active", "completed", "failed"], began, timeout) is None \
                    or events.first(side, ["postcopy-active"], began) is None:
                raise PostcopyError(f"{side} never reached postcopy-active: {events.statuses(side)}")
        inPostcopy()
    for cut in cuts:
        await sleep(reactor, rng.uniform(0.1, 0.6))
        if any(s in ("completed", "failed") for s in [await status(source), await status(destination)]):
            break
        await _cut(reactor, path, events, cut)
        if phase == "postcopy":
            for side in SIDES:
                back = await events.wait(side, ["postcopy-active", "completed"], cut.upAt, timeout)
                if back is not None and events.first(side, ["postcopy-paused"], cut.cutAt) is not None:
                    cut.recovered[side] = back - cut.upAt
            for side, daemon in daemons.items():
                if await _settled(reactor, daemon, timeout) not in ("postcopy-active", "completed"):
                    raise PostcopyError(f"{side} did not recover from a {cut.hold} s cut by itself")
    final: dict[str, Any] = {}
    for side in SIDES:
        if await events.wait(side, ["completed", "failed", "cancelled"], began, timeout) is None:
            raise PostcopyError(f"{side} did not finish within {timeout} s: {events.statuses(side)}")
        final[side] = await daemons[side].client.queryMigrate()
    guestSide = destination if final["destination"].get("status") == "completed" else source
    return {"events": events, "final": final, "guest": await guestSide.client.queryGuest()}


async def _cut(reactor: Any, path: NetnsPath, events: Events, cut: Cut) -> None:
    """
    Take the path down for C{cut.hold} seconds and record when each side
    noticed.

    @param reactor: the reactor.
    @param path: the namespaces.
    @param events: the recorder.
    @param cut: the cut (filled in).
    """
    noticed = ["postcopy-paused"] if cut.phase == "postcopy" else ["failed"]
    path.cut()
    cut.cutAt = reactor.seconds()
    try:
        await sleep(reactor, cut.hold)
    finally:
        path.restore()
    cut.upAt = reactor.seconds()
    for side in SIDES:
        when = events.first(side, noticed, cut.cutAt)
        if when is not None and when <= cut.upAt:
            cut.paused[side] = when - cut.cutAt


async def _settled(reactor: Any, daemon: Daemon, timeout: float) -> str:
    """
    Wait until a side is neither paused nor recovering.

    @param reactor: the reactor.
    @param daemon: the side.
    @param timeout: seconds at most.
    @return: its status then.
    """
    deadline = reactor.seconds() + timeout
    while True:
        current = await status(daemon)
        if current not in ("postcopy-paused", "postcopy-recover") or reactor.seconds() > deadline:
            return current
        await sleep(reactor, 0.05)

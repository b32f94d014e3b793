# -*- test-case-name: tests.test_autorecover -*-
"""
Automatic postcopy recovery: the C{x-postcopy-auto-recover} capability
(docs/recovery.md, "Automatic recovery").

QEMU 7.2 leaves a paused postcopy migration to an operator
(C{migrate-recover} on the destination, C{migrate} with C{resume} on the
source).  With the capability on, each side does its part by itself:

 - L{DestinationAutoRecovery}: once paused, the destination listens again
   on its recovery URI (the C{migrate-incoming} URI with the port actually
   bound), retrying the bind every L{REBIND_DELAY} seconds while the old
   listener is still going away.
 - L{SourceAutoRecovery}: once paused, the source tries C{migrate} with
   C{resume} to the URI it migrated to, at once and then with exponential
   backoff (L{BACKOFF_INITIAL} doubling up to L{BACKOFF_MAX}, each delay
   scaled by a random factor in [0.5, 1)), each connect bounded by a
   quarter of the link timeout (at least L{CONNECT_TIMEOUT_MIN}), until the migration is
   C{postcopy-active} again or C{x-recover-deadline-ms} passed since it
   paused; it then stays paused for an operator.

Every attempt is a C{MIGRATION} event (status C{postcopy-paused} with an
C{x-recover-attempt} count) and a log line.  A C{migrate-pause} issued on
a side suspends that side's automatic recovery until the operator's own
C{migrate-recover} or C{migrate … resume}: the operator asked for the
pause.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from twisted_postcopy.errors import MigrationError
from twisted_postcopy.source.machine import FINISHED, MigrationStatus as S

#: The capability (both sides).
AUTO_RECOVER = "x-postcopy-auto-recover"
#: The parameter bounding a source's retries, from the moment it paused.
RECOVER_DEADLINE = "x-recover-deadline-ms"
#: Its default: ten minutes.
DEFAULT_RECOVER_DEADLINE_MS = 600000
#: Seconds before the second attempt; doubled for each later one.
BACKOFF_INITIAL = 0.1
#: The longest wait between attempts, in seconds.
BACKOFF_MAX = 0.5
#: The shortest connect timeout of one attempt, in seconds.  A connect
#: whose SYN was lost is retransmitted by the kernel only after 1 s, so a
#: fresh attempt every half second notices a link that came back sooner.
CONNECT_TIMEOUT_MIN = 0.5
#: Seconds between binds of the destination's recovery listener while the
#: address is still in use.
REBIND_DELAY = 0.05

log = Logger()


def backoff(attempt: int, jitter: float) -> float:
    """
    @param attempt: attempts made so far (1 or more).
    @param jitter: a number in [0, 1).
    @return: seconds before the next attempt.
    """
    return min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (attempt - 1)) * (0.5 + 0.5 * jitter)


class SourceAutoRecovery:
    """
    The source's retries of C{migrate … resume}.

    @ivar reactor: the reactor.
    @ivar migration: the outgoing migration.
    @ivar uri: where to reconnect.
    @ivar enabled: returns whether the capability is on.
    @ivar deadlineMs: returns C{x-recover-deadline-ms}.
    @ivar timeoutMs: returns C{x-link-timeout-ms}.
    @ivar publish: publishes a C{MIGRATION} event's data.
    @ivar resume: C{(reactor, migration, uri) -> Deferred} firing with the
        connected protocol, or L{None} when the connect failed
        (L{twisted_postcopy.protocols.recovery.resumeOutgoing}).
    @ivar jitter: returns a number in [0, 1).
    @ivar suspended: a C{migrate-pause} on this side stopped the retries.
    @ivar pausedAt: when the current pause began, or L{None}.
    @ivar attempts: attempts since then.
    @ivar call: the scheduled attempt, if any.
    @ivar gaveUp: whether the deadline passed for the current pause.
    """

    def __init__(self, reactor: Any, migration: Any, uri: str, enabled: Callable[[], bool],
                 deadlineMs: Callable[[], int], timeoutMs: Callable[[], int],
                 publish: Callable[[dict[str, Any]], object],
                 resume: Callable[[Any, Any, str], Any],
                 jitter: Callable[[], float] = random.random) -> None:
        """
        @param reactor: the reactor.
        @param migration: the outgoing migration.
        @param uri: where to reconnect.
        @param enabled: the capability.
        @param deadlineMs: the deadline parameter.
        @param timeoutMs: the link timeout parameter.
        @param publish: the event publisher.
        @param resume: starts one resume connect.
        @param jitter: the random source.
        """
        self.reactor = reactor
        self.migration = migration
        self.uri = uri
        self.enabled = enabled
        self.deadlineMs = deadlineMs
        self.timeoutMs = timeoutMs
        self.publish = publish
        self.resume = resume
        self.jitter = jitter
        self.suspended = False
        self.pausedAt: float | None = None
        self.attempts = 0
        self.call: Any = None
        self.gaveUp = False

    def statusChanged(self, status: S) -> None:
        """
        The migration's status observer.

        @param status: the new status.
        """
        if status == S.POSTCOPY_PAUSED:
            if self.enabled() and not self.suspended:
                self._scheduleNext()
        elif status == S.POSTCOPY_ACTIVE:
            if self.pausedAt is not None:
                log.info("postcopy recovery: resumed after {attempts} attempt(s), {ms:.0f} ms after "
                         "the pause", attempts=self.attempts,
                         ms=(self.reactor.seconds() - self.pausedAt) * 1000)
            self._reset()
        elif status in FINISHED:
            self._reset()

    def _reset(self) -> None:
        """
        Forget the current pause.
        """
        self.stop()
        self.pausedAt = None
        self.attempts = 0
        self.gaveUp = False

    def stop(self) -> None:
        """
        Cancel a scheduled attempt.
        """
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None

    def suspend(self) -> None:
        """
        C{migrate-pause} on this side: no automatic attempts.
        """
        self.suspended = True
        self.stop()

    def unsuspend(self) -> None:
        """
        The operator's own C{migrate … resume}: automatic attempts again
        (after this one, should it fail).
        """
        self.suspended = False

    def _scheduleNext(self) -> None:
        """
        Schedule the next attempt, unless one is scheduled or the deadline
        passed.
        """
        if self.call is not None or self.gaveUp:
            return
        now = self.reactor.seconds()
        if self.pausedAt is None:
            self.pausedAt = now
        if (now - self.pausedAt) * 1000 >= self.deadlineMs():
            self.gaveUp = True
            log.warn("postcopy recovery: no success in {ms} ms ({attempts} attempts); staying "
                     "postcopy-paused for an operator", ms=self.deadlineMs(), attempts=self.attempts)
            self.publish({"status": S.POSTCOPY_PAUSED.value, "x-recover-attempt": self.attempts,
                          "x-recover-gave-up": True})
            return
        delay = 0.0 if self.attempts == 0 else backoff(self.attempts, self.jitter())
        self.call = self.reactor.callLater(delay, self._attempt)

    def _attempt(self) -> None:
        """
        One C{migrate … resume}.
        """
        self.call = None
        if self.migration.machine.status != S.POSTCOPY_PAUSED or self.suspended:
            return
        self.attempts += 1
        log.info("postcopy recovery: attempt {attempt}: migrate resume to {uri}",
                 attempt=self.attempts, uri=self.uri)
        self.publish({"status": S.POSTCOPY_PAUSED.value, "x-recover-attempt": self.attempts})
        try:
            connecting = self.resume(self.reactor, self.migration, self.uri)
        except MigrationError as error:
            log.warn("postcopy recovery: {error}", error=error)
            return
        timeout = max(CONNECT_TIMEOUT_MIN, self.timeoutMs() / 4000.0)
        timer = self.reactor.callLater(timeout, connecting.cancel)

        def connected(protocol: Any) -> None:
            """
            @param protocol: the new connection's protocol, or L{None} when
                the connect failed (then try again later; a connection that
                fails its handshake pauses the migration again, which
                schedules the next attempt).
            """
            if timer.active():
                timer.cancel()
            if protocol is None and self.migration.machine.status == S.POSTCOPY_PAUSED:
                self._scheduleNext()

        connecting.addCallback(connected)


class DestinationAutoRecovery:
    """
    The destination's recovery listener, opened again by itself once
    paused.

    @ivar reactor: the reactor.
    @ivar recovery: the L{twisted_postcopy.protocols.recovery.RecoveryListener}.
    @ivar enabled: returns whether the capability is on.
    @ivar uri: returns the recovery URI, or L{None} while the original
        listener still accepts connections (it hands them to recovery).
    @ivar publish: publishes a C{MIGRATION} event's data.
    @ivar suspended: a C{migrate-pause} on this side stopped it.
    @ivar call: a scheduled bind, if any.
    """

    def __init__(self, reactor: Any, recovery: Any, enabled: Callable[[], bool],
                 uri: Callable[[], str | None], publish: Callable[[dict[str, Any]], object]) -> None:
        """
        @param reactor: the reactor.
        @param recovery: the recovery listener.
        @param enabled: the capability.
        @param uri: the recovery URI.
        @param publish: the event publisher.
        """
        self.reactor = reactor
        self.recovery = recovery
        self.enabled = enabled
        self.uri = uri
        self.publish = publish
        self.suspended = False
        self.call: Any = None

    def statusChanged(self, status: S) -> None:
        """
        The incoming migration's status observer.

        @param status: the new status.
        """
        if status == S.POSTCOPY_PAUSED and self.enabled() and not self.suspended:
            if self.call is None:
                self.call = self.reactor.callLater(0, self._listen)
        elif status in FINISHED:
            self.stop()

    def stop(self) -> None:
        """
        Cancel a scheduled bind.
        """
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None

    def suspend(self) -> None:
        """
        C{migrate-pause} on this side.
        """
        self.suspended = True
        self.stop()

    def _listen(self) -> None:
        """
        Listen on the recovery URI unless a listener is up already.
        """
        self.call = None
        status = self.recovery.incoming.machine.status.status
        if status != S.POSTCOPY_PAUSED or self.suspended or self.recovery.port is not None:
            return
        uri = self.uri()
        if uri is None:
            return

        def listened(port: Any) -> None:
            """
            @param port: the recovery listener.
            """
            log.info("postcopy recovery: listening again on {uri}", uri=uri)
            self.publish({"status": S.POSTCOPY_PAUSED.value, "x-recover-listening": uri})

        def refused(failure: Any) -> None:
            """
            The address is still in use: try again shortly.

            @param failure: the listen failure.
            """
            failure.trap(CannotListenError)
            if self.call is None and not self.suspended:
                self.call = self.reactor.callLater(REBIND_DELAY, self._listen)

        self.recovery.listenAgain(uri).addCallbacks(listened, refused)

# -*- test-case-name: tests.test_deadlink -*-
"""
Dead-link detection on the migration channels (docs/recovery.md,
"Noticing a dead link").

A silent cut (no FIN, no RST: a cable, a switch or a route fails) leaves
a TCP connection looking alive for minutes.  Every migration socket (main
stream and return path, preempt channel, on both sides) gets two checks,
both bounded by the C{x-link-timeout-ms} migration parameter:

 - the kernel's: C{SO_KEEPALIVE} with C{TCP_KEEPIDLE}, C{TCP_KEEPINTVL}
   and C{TCP_KEEPCNT}, and C{TCP_USER_TIMEOUT}, so the kernel itself
   aborts a connection whose sent data stays unacknowledged, or whose
   keepalive probes stay unanswered, for the timeout (L{configureSocket});
 - the application's: a L{LinkWatchdog} asks the kernel (C{TCP_INFO}) how
   long ago anything at all (data, an ACK, an answer to a keepalive probe)
   arrived from the peer, and aborts the connection when nothing arrived
   for the timeout.  The measure is the kernel's, so neither a saturated
   link (ACKs keep arriving), an idle one (keepalive answers arrive every
   second) nor a late reactor on a loaded machine (bytes waiting unread
   were still received) looks dead.

Aborting the connection hands over to the existing paths: a postcopy
migration pauses, a precopy one fails (L{twisted_postcopy.source.recovery}
and L{twisted_postcopy.destination.recovery}).  Only TCP sockets are
watched: a UNIX socket cannot be cut silently.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Callable

from twisted.logger import Logger

#: The migration parameter holding the timeout (0 turns detection off).
LINK_TIMEOUT = "x-link-timeout-ms"
#: Its default: a side reaches C{postcopy-paused} within 2 s of a silent cut.
DEFAULT_LINK_TIMEOUT_MS = 2000
#: The smallest non-zero timeout: the kernel's keepalive counts whole
#: seconds, and an idle live link must get an answer to a probe (sent
#: after 1 s of silence) well within the timeout.
MIN_LINK_TIMEOUT_MS = 1500
#: The largest timeout (one hour).
MAX_LINK_TIMEOUT_MS = 3600000
#: The check acts this fraction of the timeout early (at most 100 ms), so
#: that the pause itself, which follows the abort on the next reactor
#: turns, still lands within the timeout of a cut.
LEAD = 0.05
#: C{struct tcp_info}'s head: eight bytes, then 32-bit fields up to
#: C{tcpi_last_ack_recv}.
_TCP_INFO = struct.Struct("=8B13I")
_TCP_INFO_SIZE = 104
#: Indexes (in L{_TCP_INFO}'s tuple) of C{tcpi_last_data_recv} and
#: C{tcpi_last_ack_recv}: milliseconds since data, and since an ACK,
#: arrived.
_LAST_DATA_RECV = 8 + 11
_LAST_ACK_RECV = 8 + 12

log = Logger()


def checkLinkTimeout(value: int) -> None:
    """
    @param value: a proposed C{x-link-timeout-ms}.
    @raise ValueError: neither 0 nor within the documented range.
    """
    if value != 0 and not MIN_LINK_TIMEOUT_MS <= value <= MAX_LINK_TIMEOUT_MS:
        raise ValueError(
            f"Parameter '{LINK_TIMEOUT}' expects 0 (off) or an integer in the range of "
            f"{MIN_LINK_TIMEOUT_MS} to {MAX_LINK_TIMEOUT_MS} ms")


def deadlineMs(timeoutMs: int) -> float:
    """
    @param timeoutMs: C{x-link-timeout-ms}.
    @return: the silence after which the watchdog drops a connection: the
        timeout less L{LEAD} of it (at most 100 ms).
    """
    return timeoutMs - min(100.0, timeoutMs * LEAD)


def _tcpSocket(transport: Any) -> socket.socket | None:
    """
    @param transport: a transport (TCP, or TLS over TCP: the socket is
        found under the TLS layer).
    @return: its TCP socket, or L{None} (a UNIX socket, a test transport).
    """
    from twisted_postcopy.protocols.sockets import transportSocket

    handle = transportSocket(transport)  # under TLS, getHandle() is OpenSSL's
    if not isinstance(handle, socket.socket) or handle.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    if handle.type != socket.SOCK_STREAM or handle.fileno() < 0:
        return None
    return handle


def keepaliveSettings(timeoutMs: int) -> dict[int, int]:
    """
    The kernel options for a timeout: the first keepalive probe after
    half the timeout (at least 1 s, the kernel's unit), one per second
    after that, and C{TCP_USER_TIMEOUT} at the timeout (which, with
    keepalive on, also bounds the probes).

    @param timeoutMs: C{x-link-timeout-ms} (non-zero).
    @return: C{IPPROTO_TCP} option -> value.
    """
    idle = max(1, timeoutMs // 2000)
    interval = max(1, min(idle, timeoutMs // 4000))
    count = max(1, (timeoutMs // 1000 - idle) // interval)
    return {
        socket.TCP_KEEPIDLE: idle,
        socket.TCP_KEEPINTVL: interval,
        socket.TCP_KEEPCNT: count,
        socket.TCP_USER_TIMEOUT: timeoutMs,
    }


def configureSocket(transport: Any, timeoutMs: int) -> bool:
    """
    Set keepalive and C{TCP_USER_TIMEOUT} on a migration socket.

    @param transport: the connection's transport.
    @param timeoutMs: C{x-link-timeout-ms}; 0 leaves the socket alone.
    @return: whether the socket is a TCP socket that was configured.
    """
    sock = _tcpSocket(transport)
    if sock is None or not timeoutMs:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in keepaliveSettings(timeoutMs).items():
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError as error:
        log.warn("could not set keepalive options on a migration socket: {error}", error=error)
        return False
    return True


def silenceMs(transport: Any) -> int | None:
    """
    @param transport: a TCP connection's transport.
    @return: milliseconds since the kernel last received anything at all
        from the peer (data or an ACK), or L{None} when unknown.
    """
    sock = _tcpSocket(transport)
    if sock is None:
        return None
    try:
        info = _TCP_INFO.unpack_from(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE))
    except (OSError, struct.error):
        return None
    return min(info[_LAST_DATA_RECV], info[_LAST_ACK_RECV])


class LinkWatchdog:
    """
    The application-level check of one connection: when the kernel says
    nothing arrived from the peer for the timeout, the connection is
    aborted (and C{onDead}, if given, is told first).

    The check runs at the moment the deadline (L{deadlineMs}: the timeout
    less a small lead) would expire, given the silence measured at the
    last check, so a cut is noticed within the timeout after the last
    byte arrived, with a handful of timer calls per timeout on a busy
    link.

    @ivar reactor: an L{IReactorTime<twisted.internet.interfaces.IReactorTime>}.
    @ivar transport: the watched connection.
    @ivar timeoutMs: returns the current C{x-link-timeout-ms} (read at
        each check, so C{migrate-set-parameters} applies at once).
    @ivar onDead: called with the silence in ms before the abort.
    @ivar silence: measures the silence (L{silenceMs}; replaceable in
        unit tests).
    @ivar call: the pending check, if any.
    @ivar detected: the silence (ms) that ended the connection, once it did.
    """

    def __init__(self, reactor: Any, transport: Any, timeoutMs: Callable[[], int],
                 onDead: Callable[[int], object] | None = None,
                 silence: Callable[[Any], int | None] = silenceMs) -> None:
        """
        @param reactor: an L{IReactorTime<twisted.internet.interfaces.IReactorTime>}.
        @param transport: the connection's transport.
        @param timeoutMs: returns the timeout.
        @param onDead: told before the abort.
        @param silence: the silence measure.
        """
        self.reactor = reactor
        self.transport = transport
        self.timeoutMs = timeoutMs
        self.onDead = onDead
        self.silence = silence
        self.call: Any = None
        self.detected: int | None = None

    def start(self) -> None:
        """
        Schedule the first check.
        """
        self._schedule(deadlineMs(self.timeoutMs() or DEFAULT_LINK_TIMEOUT_MS))

    def _schedule(self, delayMs: float) -> None:
        """
        @param delayMs: milliseconds to the next check.
        """
        self.call = self.reactor.callLater(max(delayMs, 10) / 1000.0, self._check)

    def _check(self) -> None:
        """
        Abort the connection when the peer was silent for the timeout.
        """
        self.call = None
        timeout = self.timeoutMs()
        if not timeout:
            self._schedule(DEFAULT_LINK_TIMEOUT_MS)
            return
        silent = self.silence(self.transport)
        if silent is None:
            return
        deadline = deadlineMs(timeout)
        if silent < deadline:
            self._schedule(deadline - silent)
            return
        self.detected = silent
        log.warn("migration link silent for {silent} ms (x-link-timeout-ms {timeout}): "
                 "dropping the connection", silent=silent, timeout=timeout)
        if self.onDead is not None:
            self.onDead(silent)
        self.transport.abortConnection()

    def stop(self) -> None:
        """
        The connection ended: no more checks.
        """
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None


def watchLink(reactor: Any, transport: Any, timeoutMs: Callable[[], int],
              onDead: Callable[[int], object] | None = None) -> LinkWatchdog | None:
    """
    Configure a migration socket and start its watchdog.

    @param reactor: an L{IReactorTime<twisted.internet.interfaces.IReactorTime>}.
    @param transport: the connection's transport.
    @param timeoutMs: returns C{x-link-timeout-ms}.
    @param onDead: told before a dead connection is aborted.
    @return: the running watchdog, or L{None} for a socket that is not TCP
        or when detection is off.
    """
    if not configureSocket(transport, timeoutMs()):
        return None
    watchdog = LinkWatchdog(reactor, transport, timeoutMs, onDead)
    watchdog.start()
    return watchdog


def lostReason(watchdog: LinkWatchdog | None, reason: Any) -> str:
    """
    @param watchdog: a connection's watchdog, or L{None}.
    @param reason: the connection's C{connectionLost} Failure.
    @return: why the connection was lost: the watchdog's finding when it
        dropped the connection, else the Failure's message.
    """
    if watchdog is not None and watchdog.detected is not None:
        return f"nothing received from the peer for {watchdog.detected} ms (dead link)"
    return reason.getErrorMessage()


def stopWatching(watchdog: LinkWatchdog | None) -> None:
    """
    @param watchdog: a watchdog from L{watchLink}, or L{None}.
    """
    if watchdog is not None:
        watchdog.stop()


def linkWatch(reactor: Any, timeoutMs: Callable[[], int]) -> Callable[[Any], LinkWatchdog | None]:
    """
    The dead-link check of an incoming migration's connections (main,
    recovery, preempt), handed to its factories and protocols through
    their constructors.

    @param reactor: an L{IReactorTime<twisted.internet.interfaces.IReactorTime>}.
    @param timeoutMs: returns C{x-link-timeout-ms}.
    @return: C{watch(transport)}: configures the connection's socket and
        starts its watchdog (L{watchLink}), returning it or L{None}.
    """

    def watch(transport: Any) -> LinkWatchdog | None:
        """
        @param transport: a connection's transport.
        @return: its running watchdog, or L{None}.
        """
        return watchLink(reactor, transport, timeoutMs)

    return watch


def noLinkWatch(transport: Any) -> None:
    """
    No dead-link check (the default of the destination's protocols, for
    unit tests).

    @param transport: a connection's transport.
    """

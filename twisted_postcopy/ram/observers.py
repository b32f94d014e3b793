# -*- test-case-name: tests.test_ram_faults -*-
"""
Observers of the fault service (for postcopy blocktime): QEMU's
address-keyed callbacks used by C{blocktime.py}.  An observer that raises
is logged and never stops the fault service.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.logger import Logger

_log = Logger()


def notify(callbacks: list[Callable[..., None]], *args: Any) -> None:
    """
    Call every observer; one that raises is logged and the others still run
    (an observer's bug must not leave a guest thread blocked).

    @param callbacks: the observers.
    @param args: their arguments.
    """
    for callback in callbacks:
        try:
            callback(*args)
        except Exception:
            _log.failure("fault service: observer {callback!r} failed", callback=callback)


class FaultObservers:
    """
    The fault service's observers.

    @ivar onFault: callables of (thread id, RAMBlock, offset, monotonic ns,
        whether the page was already received).
    @ivar onPlaced: callables of (RAMBlock, offset, monotonic ns), for
        pages that were waited for.
    """

    def __init__(self) -> None:
        """
        No observers yet.
        """
        self.onFault: list[Callable[[int, Any, int, int, bool], None]] = []
        self.onPlaced: list[Callable[[Any, int, int], None]] = []

    def faultBegan(self, threadId: int, ram: Any, offset: int, t: int, received: bool) -> None:
        """
        Tell every fault observer.

        @param threadId: the faulting thread.
        @param ram: the RAMBlock.
        @param offset: the page offset.
        @param t: monotonic ns.
        @param received: whether the page was already received.
        """
        notify(self.onFault, threadId, ram, offset, t, received)

    def pagePlaced(self, ram: Any, offset: int, t: int) -> None:
        """
        Tell every placement observer.

        @param ram: the RAMBlock.
        @param offset: the page offset.
        @param t: monotonic ns.
        """
        notify(self.onPlaced, ram, offset, t)

    def addFaultObserver(self, callback: Callable[[int, int, bool], None]) -> None:
        """
        Address-keyed fault observer (the shape of QEMU's
        C{mark_postcopy_blocktime_begin}).

        @param callback: called with (thread id, the page's address in the
            daemon's mapping, whether the page was already received).
        """
        self.onFault.append(lambda tid, ram, offset, t, received: callback(tid, ram.address + offset, received))

    def addPlacementObserver(self, callback: Callable[[int], None]) -> None:
        """
        Address-keyed placement observer (QEMU's
        C{mark_postcopy_blocktime_end}); called for pages that were faulted on.

        @param callback: called with the page's address in the daemon's mapping.
        """
        self.onPlaced.append(lambda ram, offset, t: callback(ram.address + offset))


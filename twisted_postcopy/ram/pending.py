# -*- test-case-name: tests.test_ram_faults -*-
"""
Pages that are missing and wanted: one request to the page source per
page, however many threads, clients or daemon callers wait for it.

Requests are fire-and-forget: the page source (the return path) answers
by the page arriving, never by a result.  While the migration is paused
the page source drops requests; after recovery L{PendingPages.rerequest}
sends every wanted page's request again (QEMU's
C{migrate_send_rp_req_pages_pending}).
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger()


@define(eq=False)
class PendingPage:
    """
    A page that is missing and wanted.

    @ivar waiters: (client, address in the client) of each fault.
    @ivar deferreds: the daemon's own waits (L{FaultService.requestPage}),
        fired once the page is placed.
    """

    waiters: list[tuple[Any, int]] = field(factory=list)
    deferreds: list[Deferred] = field(factory=list)


class PendingPages:
    """
    The table of wanted pages, keyed by (block idstr, page offset).

    @ivar pageSource: the L{twisted_postcopy.interfaces.IPageSource}.
    @ivar requestCount: requests sent to the page source.
    """

    def __init__(self, pageSource: Any) -> None:
        """
        @param pageSource: where missing pages are requested.
        """
        self.pageSource = pageSource
        self.requestCount = 0
        self._pages: dict[tuple[str, int], PendingPage] = {}

    def __len__(self) -> int:
        """
        @return: how many pages are wanted.
        """
        return len(self._pages)

    def addWaiter(self, key: tuple[str, int], client: Any, address: int) -> None:
        """
        A client faulted on a missing page: remember it and request the
        page if nobody waited for it yet.

        @param key: (block idstr, page offset).
        @param client: the faulting client.
        @param address: the page's address in the client.
        """
        pending = self._pages.get(key)
        first = pending is None
        if first:
            pending = self._pages[key] = PendingPage()
        pending.waiters.append((client, address))
        if first:
            self._request(key)

    def addDeferred(self, key: tuple[str, int]) -> Deferred:
        """
        The daemon wants a missing page.

        @param key: (block idstr, page offset).
        @return: a Deferred fired once it is placed (cancellable).
        """
        pending = self._pages.get(key)
        first = pending is None
        if first:
            pending = self._pages[key] = PendingPage()
        waiting: Deferred = Deferred(lambda d: pending.deferreds.remove(d) if d in pending.deferreds else None)
        pending.deferreds.append(waiting)
        if first:
            self._request(key)
        return waiting

    def _request(self, key: tuple[str, int]) -> None:
        """
        Ask the page source for a page (fire-and-forget).  A page source
        that raises is logged; the page stays wanted, and is asked for
        again by L{rerequest}.

        @param key: (block idstr, page offset).
        """
        self.requestCount += 1
        try:
            self.pageSource.requestPage(*key)
        except Exception:
            _log.failure("fault service: requesting {key} failed", key=key)

    def take(self, idstr: str, offset: int, length: int, pageSize: int) -> list[tuple[int, PendingPage]]:
        """
        Remove and return the wanted pages of a placed range.

        @param idstr: the block.
        @param offset: the range's byte offset.
        @param length: its length.
        @param pageSize: the block's page size.
        @return: (page offset, its waiting state) pairs.
        """
        if length == pageSize:
            pending = self._pages.pop((idstr, offset), None)
            return [] if pending is None else [(offset, pending)]
        if length // pageSize <= len(self._pages):
            keys = [(idstr, page) for page in range(offset, offset + length, pageSize) if (idstr, page) in self._pages]
        else:
            keys = [key for key in self._pages if key[0] == idstr and offset <= key[1] < offset + length]
        return [(key[1], self._pages.pop(key)) for key in keys]

    def forgetClient(self, client: Any) -> None:
        """
        Drop a removed client's waits.

        @param client: the client.
        """
        for pending in self._pages.values():
            pending.waiters = [waiter for waiter in pending.waiters if waiter[0] is not client]

    def rerequest(self) -> int:
        """
        Request every wanted page again (after recovery).

        @return: how many requests were sent.
        """
        again = list(self._pages)
        for key in again:
            self._request(key)
        return len(again)

    def failAll(self, reason: BaseException | Failure) -> None:
        """
        Fail every daemon wait (L{addDeferred}); the pages stay wanted.

        @param reason: the exception or failure.
        """
        failure = reason if isinstance(reason, Failure) else Failure(reason)
        for pending in list(self._pages.values()):
            deferreds, pending.deferreds = pending.deferreds, []
            for waiting in deferreds:
                waiting.errback(failure)

    def clear(self) -> None:
        """
        Forget every wanted page.
        """
        self._pages.clear()

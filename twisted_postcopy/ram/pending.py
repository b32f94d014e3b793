# -*- test-case-name: tests.test_ram_faults -*-
"""
Pages that are missing and wanted: one request to the page source per
page, however many threads, clients or daemon callers wait for it.
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
    @ivar deferreds: Deferreds to fire once the page is placed.
    @ivar requested: whether a page source request is outstanding.
    """

    waiters: list[tuple[Any, int]] = field(factory=list)
    deferreds: list[Deferred] = field(factory=list)
    requested: bool = False


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
        page unless a request is already out.

        @param key: (block idstr, page offset).
        @param client: the faulting client.
        @param address: the page's address in the client.
        """
        pending = self._pages.get(key)
        if pending is None:
            pending = self._pages[key] = PendingPage()
        pending.waiters.append((client, address))
        if not pending.requested:
            self._request(key, pending)

    def addDeferred(self, key: tuple[str, int]) -> Deferred:
        """
        The daemon wants a missing page.

        @param key: (block idstr, page offset).
        @return: a Deferred fired once it is placed (cancellable).
        """
        pending = self._pages.get(key)
        if pending is None:
            pending = self._pages[key] = PendingPage()
        waiting: Deferred = Deferred(lambda d: pending.deferreds.remove(d) if d in pending.deferreds else None)
        pending.deferreds.append(waiting)
        if not pending.requested:
            self._request(key, pending)
        return waiting

    def _request(self, key: tuple[str, int], pending: PendingPage) -> None:
        """
        Ask the page source for a page.

        @param key: (block idstr, page offset).
        @param pending: the page's waiting state.
        """
        pending.requested = True
        self.requestCount += 1
        try:
            requested = self.pageSource.requestPage(*key)
        except Exception:
            self._requestFailed(Failure(), key, pending)
            return
        if isinstance(requested, Deferred):
            requested.addErrback(self._requestFailed, key, pending)

    def _requestFailed(self, reason: Failure, key: tuple[str, int], pending: PendingPage) -> None:
        """
        The page source could not deliver: fail the page's Deferreds; its
        faulting threads stay blocked until L{rerequest}.

        @param reason: the failure (e.g. L{PostcopyPaused}).
        @param key: (block idstr, page offset).
        @param pending: the page's waiting state.
        """
        if self._pages.get(key) is not pending:
            return
        pending.requested = False
        deferreds, pending.deferreds = pending.deferreds, []
        _log.info("fault service: request for {key} failed: {reason}", key=key, reason=reason.getErrorMessage())
        for waiting in deferreds:
            waiting.errback(reason)

    def take(self, idstr: str, offset: int, length: int, pageSize: int) -> list[tuple[int, PendingPage]]:
        """
        Remove and return the wanted pages of a placed range.

        @param idstr: the block.
        @param offset: the range's byte offset.
        @param length: its length.
        @param pageSize: the block's page size.
        @return: (page offset, its waiting state) pairs.
        """
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
        Request again every page whose request failed.

        @return: how many requests were sent.
        """
        again = [(key, pending) for key, pending in self._pages.items() if not pending.requested]
        for key, pending in again:
            self._request(key, pending)
        return len(again)

    def failAll(self, reason: BaseException | Failure) -> None:
        """
        Fail every wanted page's Deferreds.

        @param reason: the exception or failure.
        """
        failure = reason if isinstance(reason, Failure) else Failure(reason)
        for key, pending in list(self._pages.items()):
            self._requestFailed(failure, key, pending)

    def clear(self) -> None:
        """
        Forget every wanted page.
        """
        self._pages.clear()

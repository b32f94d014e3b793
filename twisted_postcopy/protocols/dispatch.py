# -*- test-case-name: tests.test_protocols_stream -*-
"""
From wire events to engine calls.

L{IncomingStreamReader} feeds main-stream bytes to a
L{twisted_postcopy.wire.StreamDecoder} and calls the matching method of an
L{twisted_postcopy.destination.incoming.IncomingMigration} per event.
L{ReturnPathReader} does the same with a
L{twisted_postcopy.wire.ReturnPathDecoder} for an
L{twisted_postcopy.source.outgoing.OutgoingMigration}.

Device sections are collected and handed over in one call: the package's
sections when RUN arrives, and the precopy tail's sections at EOF.  A
package with QEMU 7.2's layout (LISTEN, sections, PING 3, RUN) is split
without decoding its sections, so its device bytes stay exact even where
the section-end heuristic would have to guess.
"""

from __future__ import annotations

from typing import Any

from twisted_postcopy.errors import LimitExceededError
from twisted_postcopy.wire import NEED_DATA, ReturnPathDecoder, StreamDecoder
from twisted_postcopy.wire import events as e
from twisted_postcopy.wire.commands import PACKAGE_HEAD, PACKAGE_PING_VALUE, PACKAGE_TAIL
from twisted_postcopy.wire.constants import RAM_FLAGS_MASK as _FLAGS_MASK
from twisted_postcopy.wire.constants import TARGET_PAGE_SIZE, RAMFlag

_PAGE = int(RAMFlag.PAGE)


#: The most RAM records the main stream's decoder scans into one event.
RAM_BATCH = 256


class IncomingStreamReader:
    """
    Decodes the main stream for an incoming migration.

    @ivar incoming: the incoming migration.
    @ivar decoder: the stream decoder.
    @ivar devices: device bytes not yet handed over.
    @ivar heldDeviceBytes: the length of C{devices}, at most the
        decoder's C{maxDeviceBytes}.
    @ivar finished: whether the stream ended (the migration completed).
    """

    def __init__(self, incoming: Any) -> None:
        """
        @param incoming: the incoming migration.
        """
        self.incoming = incoming
        self.decoder = StreamDecoder(ramBatch=RAM_BATCH)
        self.devices: list[bytes] = []
        self.heldDeviceBytes = 0
        self.finished = False
        self._calls = {
            e.ConfigurationReceived: lambda ev: incoming.configurationReceived(ev.machine, ev.subsections),
            e.ReturnPathOpened: lambda ev: incoming.openReturnPath(),
            e.PingReceived: lambda ev: incoming.ping(ev.value),
            e.PostcopyAdvised: lambda ev: incoming.advise(ev.pageSizeSummary or 0, ev.targetPageSize or 0),
            e.RAMBlocksListed: lambda ev: incoming.ramBlocksListed(
                [(b.idstr, b.length, b.pageSize) for b in ev.blocks]),
            e.PageReceived: lambda ev: incoming.page(ev.block, ev.offset, ev.data),
            e.ZeroPageReceived: lambda ev: incoming.zero(ev.block, ev.offset, ev.fill),
            e.RAMRecordsReceived: self._records,
            e.DiscardReceived: lambda ev: incoming.discard(ev.block, ev.ranges),
            e.ListenReceived: lambda ev: incoming.listen(),
            e.RunReceived: self._run,
            e.DeviceSectionReceived: lambda ev: self._hold(ev.raw),
            e.PackageReceived: lambda ev: self._package(ev.data),
            e.EOFReceived: self._eof,
            e.VMDescriptionReceived: lambda ev: self._end(),
        }

    def receiveData(self, data: bytes | memoryview, borrowed: bool = False) -> None:
        """
        Decode and act on everything C{data} completes.

        @param data: main-stream bytes.
        @param borrowed: whether C{data} is a connection's receive buffer,
            read into again once this returns: pages are placed straight
            from it, and what is left unconsumed is copied before this
            returns (L{twisted_postcopy.wire.buffer.ReceiveBuffer.borrow}).
        @raise twisted_postcopy.errors.PostcopyError: bad input, or the
            engine refused it.
        """
        decoder = self.decoder
        (decoder.receiveBorrowed if borrowed else decoder.receiveData)(data)
        try:
            self._act()
        finally:
            if borrowed:
                decoder.releaseBorrowed()

    def _act(self) -> None:
        """
        Act on every event decodable now.
        """
        decoder = self.decoder
        calls = self._calls
        while not self.finished:
            event = decoder.nextEvent()
            if event is NEED_DATA:
                return
            call = calls.get(event.__class__)
            if call is not None:
                call(event)

    def _records(self, event: e.RAMRecordsReceived) -> None:
        """
        A run of CONTINUE records, scanned in C: to the incoming migration
        in one call where it takes the run, else record by record (no
        event object per record).

        @param event: the run.
        """
        records = getattr(self.incoming, "records", None)
        if records is not None and records(event.block, event):
            return
        page, zero, block, data = self.incoming.page, self.incoming.zero, event.block, event.data
        for word, at in zip(event.words, event.payloads):
            flags = word & _FLAGS_MASK
            if flags & _PAGE:
                page(block, word - flags, data[at:at + TARGET_PAGE_SIZE])
            else:
                zero(block, word - flags, data[at])

    def _package(self, data: bytes) -> None:
        """
        A PACKAGED body.

        @param data: its bytes.
        """
        if data.startswith(PACKAGE_HEAD) and data.endswith(PACKAGE_TAIL):
            self.incoming.listen()
            body = data[len(PACKAGE_HEAD) : -len(PACKAGE_TAIL)]
            if body:
                self._hold(body)
            self.incoming.ping(PACKAGE_PING_VALUE)
            self._run(None)
            return
        package = self.decoder.packageDecoder(data, self.heldDeviceBytes)
        package.receiveData(data)
        package.receiveData(b"")
        for event in package.events():
            call = self._calls.get(event.__class__)
            if call is not None:
                call(event)
            if event.__class__ is e.RunReceived:
                return

    def _hold(self, raw: bytes) -> None:
        """
        Keep device bytes until RUN or EOF.

        @param raw: device sections.
        @raise LimitExceededError: if more than the decoder's
            C{maxDeviceBytes} would be held.
        """
        self.heldDeviceBytes += len(raw)
        limit = self.decoder.maxDeviceBytes
        if self.heldDeviceBytes > limit:
            raise LimitExceededError(f"more than {limit} bytes of device state held",
                                     self.decoder.position, "max-device-bytes")
        self.devices.append(raw)

    def _handDevices(self) -> None:
        """
        Give the collected device bytes to the VM.
        """
        if self.devices:
            raw, self.devices = b"".join(self.devices), []
            self.heldDeviceBytes = 0
            self.incoming.deviceState(raw)

    def _run(self, event: Any) -> None:
        """
        POSTCOPY_RUN: devices first, then the guest starts.

        @param event: the event (unused).
        """
        self._handDevices()
        self.incoming.run()

    def _eof(self, event: Any) -> None:
        """
        EOF: in postcopy the end; in precopy the vmdesc comes next.

        @param event: the event (unused).
        """
        self._handDevices()
        if self.incoming.machine.inPostcopy:
            self._end()

    def _end(self) -> None:
        """
        The stream is over: complete the incoming migration.
        """
        self.finished = True
        self.incoming.eof()


class ReturnPathReader:
    """
    Decodes the return path for an outgoing migration.

    @ivar outgoing: the outgoing migration.
    @ivar decoder: the return-path decoder.
    """

    def __init__(self, outgoing: Any) -> None:
        """
        @param outgoing: the outgoing migration.
        """
        self.outgoing = outgoing
        self.decoder = ReturnPathDecoder()
        self._calls = {
            e.PagesRequested: self._pagesRequested,
            e.ShutReceived: lambda ev: outgoing.shut(ev.value),
            e.PongReceived: lambda ev: outgoing.pong(ev.value),
        }

    def receiveData(self, data: bytes) -> None:
        """
        Decode and act on return-path bytes.

        @param data: the bytes.
        @raise twisted_postcopy.errors.PostcopyError: bad input or a page
            request the source refuses.
        """
        self.decoder.receiveData(data)
        calls = self._calls
        for event in self.decoder.events():
            call = calls.get(event.__class__)
            if call is not None:
                call(event)

    def _pagesRequested(self, event: e.PagesRequested) -> None:
        """
        A page request: queue it (de-duplicated and capped by the source).

        @param event: the request.
        @raise LimitExceededError: too many requests are queued (with the
            stream offset after the request).
        """
        try:
            self.outgoing.pagesRequested(event.block, event.start, event.length)
        except LimitExceededError as error:
            if error.offset is not None:
                raise
            raise LimitExceededError(error.reason, self.decoder.position, error.limit) from None

# -*- test-case-name: tests.test_protocols_stream -*-
"""
The destination's return-path writer: PONG, SHUT and page requests on the
reverse direction of the main connection (return-path-preempt-recovery.md
1.3-1.4), encoded by L{twisted_postcopy.wire.ReturnPathEncoder}.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field

from twisted_postcopy.wire import ReturnPathEncoder


@define
class ReturnPathWriter:
    """
    Writes return-path messages to a transport.

    @ivar transport: the main connection's transport.
    @ivar encoder: the encoder; it remembers the block of the previous
        request (QEMU's C{mis->last_rb}), so a request for another block is
        REQ_PAGES_ID and one for the same block is REQ_PAGES.
    @ivar requests: page requests sent.
    """

    transport: Any
    encoder: ReturnPathEncoder = field(factory=ReturnPathEncoder)
    requests: int = 0

    def pong(self, value: int) -> None:
        """
        @param value: the PING value to echo.
        """
        self.transport.write(self.encoder.pong(value))

    def shut(self, value: int) -> None:
        """
        @param value: 0 for success, 1 for an input error.
        """
        self.transport.write(self.encoder.shut(value))

    def requestPages(self, block: str, start: int, length: int) -> None:
        """
        Ask for pages.

        @param block: the block idstr.
        @param start: byte offset.
        @param length: byte length.
        """
        self.requests += 1
        self.transport.write(self.encoder.requestPages(block, start, length))

    def reset(self) -> None:
        """
        Forget the previous request's block (at LISTEN).
        """
        self.encoder.reset()

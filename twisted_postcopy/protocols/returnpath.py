# -*- test-case-name: tests.test_protocols_stream -*-
"""
The destination's return-path writer: PONG, SHUT and page requests on the
reverse direction of the main connection (return-path-preempt-recovery.md
1.3-1.4).
"""

from __future__ import annotations

import struct
from typing import Any

from attrs import define

from twisted_postcopy.protocols import _codec as c


@define
class ReturnPathWriter:
    """
    Encodes return-path messages onto a transport.

    @ivar transport: the main connection's transport.
    @ivar lastBlock: the block of the previous page request (QEMU's
        C{mis->last_rb}); a request for another block names it
        (REQ_PAGES_ID), one for the same block does not (REQ_PAGES).
    @ivar requests: page requests sent.
    """

    transport: Any
    lastBlock: str | None = None
    requests: int = 0

    def pong(self, value: int) -> None:
        """
        @param value: the PING value to echo.
        """
        self.transport.write(c.rpMessage(c.RP_PONG, struct.pack(">I", value)))

    def shut(self, value: int) -> None:
        """
        @param value: 0 for success, 1 for an input error.
        """
        self.transport.write(c.rpMessage(c.RP_SHUT, struct.pack(">I", value)))

    def requestPages(self, block: str, start: int, length: int) -> None:
        """
        Ask for pages.

        @param block: the block idstr.
        @param start: byte offset.
        @param length: byte length.
        """
        self.requests += 1
        payload = struct.pack(">QI", start, length)
        if block == self.lastBlock:
            self.transport.write(c.rpMessage(c.RP_REQ_PAGES, payload))
            return
        self.lastBlock = block
        self.transport.write(c.rpMessage(c.RP_REQ_PAGES_ID, payload + c.str8(block)))

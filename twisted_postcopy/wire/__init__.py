"""
The pure sans-IO codec of QEMU 7.2's migration stream, return path and
preempt channel (stdlib and attrs, and the C loops of the RAM records in
C{twisted_postcopy.ram._uffd}; no reactor).

See C{docs/wire-format.md}.
"""

from twisted_postcopy.wire.encoder import StreamEncoder, encodeEvents
from twisted_postcopy.wire.events import NEED_DATA
from twisted_postcopy.wire.preempt import PreemptDecoder, PreemptEncoder
from twisted_postcopy.wire.returnpath import ReturnPathDecoder, ReturnPathEncoder
from twisted_postcopy.wire.stream import StreamDecoder, decodeAll, iterChunks

__all__ = [
    "NEED_DATA",
    "PreemptDecoder",
    "PreemptEncoder",
    "ReturnPathDecoder",
    "ReturnPathEncoder",
    "StreamDecoder",
    "StreamEncoder",
    "decodeAll",
    "encodeEvents",
    "iterChunks",
]

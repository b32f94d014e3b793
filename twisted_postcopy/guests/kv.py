# -*- test-case-name: tests.test_guests_kv -*-
"""
The C{kv} guest: a key-value server whose table lives in guest RAM.

The table is open addressing with linear probing over 256-byte slots of
the worker's share of its block (worker C{k} of C{n} gets slots
C{[k*S, (k+1)*S)}, C{S = block slots // --workers}).  A slot is: byte 0
used flag, byte 1 key length (1-64), bytes 2-3 value length (big-endian,
0-184), the key at byte 4, the value at byte 68.  The home slot is
C{crc32(key) % S}.

Clients speak lines over TCP (C{--host}, C{--port}; 0 picks a port, sent
to the daemon in an C{info {port}} message): C{SET key value} -> C{OK};
C{GET key} -> the value, or C{ERR no such key}.  Keys and values are
printable ASCII without spaces; values never start with C{ERR}.  A write
is answered C{OK} only after it is in guest RAM, under the table lock;
once the daemon stops the worker (switchover) every request is answered
C{ERR stopped} so clients reconnect to the destination, which serves the
same table from the migrated RAM.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import zlib
from typing import Any

from twisted_postcopy.errors import GuestError
from twisted_postcopy.guests import worker as _worker

SLOT = 256
MAX_KEY = 64
MAX_VALUE = 184
_SLOT_HEADER = struct.Struct(">BBH")
_VALUE_AT = 4 + MAX_KEY


class Table:
    """
    The hash table over a memoryview of guest RAM.

    @ivar view: the table's bytes.
    @ivar slots: the number of slots.
    """

    def __init__(self, view: memoryview) -> None:
        """
        @param view: the worker's share of the block.
        """
        self.view, self.slots = view, len(view) // SLOT

    def _find(self, key: bytes) -> tuple[int, bool]:
        """
        @param key: a key.
        @return: (slot, whether it holds C{key}); a free slot (or -1 when
            the table is full) when not.
        """
        home = zlib.crc32(key) % self.slots
        for probe in range(self.slots):
            slot = (home + probe) % self.slots
            at = slot * SLOT
            used, length, _ = _SLOT_HEADER.unpack_from(self.view, at)
            if not used:
                return slot, False
            if self.view[at + 4 : at + 4 + length] == key:
                return slot, True
        return -1, False

    def get(self, key: bytes) -> bytes | None:
        """
        @param key: a key.
        @return: its value, or L{None}.
        """
        slot, found = self._find(key)
        if not found:
            return None
        at = slot * SLOT
        _, _, length = _SLOT_HEADER.unpack_from(self.view, at)
        return bytes(self.view[at + _VALUE_AT : at + _VALUE_AT + length])

    def set(self, key: bytes, value: bytes) -> None:
        """
        @param key: 1-64 bytes.
        @param value: 0-184 bytes.
        @raise GuestError: the table is full.
        """
        slot, _ = self._find(key)
        if slot < 0:
            raise GuestError("kv table is full")
        at = slot * SLOT
        self.view[at + 4 : at + 4 + len(key)] = key
        self.view[at + _VALUE_AT : at + _VALUE_AT + len(value)] = value
        _SLOT_HEADER.pack_into(self.view, at, 1, len(key), len(value))


def parseRequest(line: bytes) -> tuple[str, bytes, bytes]:
    """
    @param line: one request line, without the newline.
    @return: (verb, key, value).
    @raise ValueError: malformed, with the error text to answer.
    """
    parts = line.split()
    if len(parts) == 3 and parts[0] == b"SET":
        verb, key, value = "SET", parts[1], parts[2]
    elif len(parts) == 2 and parts[0] == b"GET":
        verb, key, value = "GET", parts[1], b""
    else:
        raise ValueError("usage: SET key value | GET key")
    if len(key) > MAX_KEY or len(value) > MAX_VALUE or value.startswith(b"ERR"):
        raise ValueError(f"key up to {MAX_KEY} bytes, value up to {MAX_VALUE} bytes not starting with ERR")
    return verb, key, value


class KVWorker(_worker.GuestWorker):
    """
    One kv worker: a listening socket and a thread per client.

    @ivar table: the table in guest RAM.
    @ivar lock: serialises table access with run control.
    @ivar running: requests are served (not stopped).
    @ivar listener: the listening socket, once running.
    """

    def __init__(self, attachment: Any, options: argparse.Namespace) -> None:
        """
        @param attachment: the attachment.
        @param options: the command line.
        """
        super().__init__(attachment, options)
        block = attachment.block(options.block) if options.block else attachment.blocks[0]
        share = (block.length // SLOT // options.workers) * SLOT
        index = _worker.workerIndex(options.worker)
        if share == 0 or index >= options.workers:
            raise GuestError(f"kv worker {index} of {options.workers} has no room in {block.idstr}")
        self.table = Table(block.view()[index * share : (index + 1) * share])
        self.lock = threading.Lock()
        self.running = False
        self.listener: socket.socket | None = None

    def _listen(self) -> None:
        """
        Open the listening socket and its accept thread.
        """
        self.listener = socket.create_server((self.options.host, self.options.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        """
        Accept clients until the socket closes.

        @param listener: the listening socket.
        """
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        """
        Answer one client's lines.

        @param connection: the client.
        """
        with connection, connection.makefile("rb") as lines:
            for line in lines:
                connection.sendall(self.answer(line.rstrip(b"\r\n")) + b"\n")

    def answer(self, line: bytes) -> bytes:
        """
        @param line: one request.
        @return: its answer (after a SET is in guest RAM).
        """
        try:
            verb, key, value = parseRequest(line)
        except ValueError as error:
            return b"ERR " + str(error).encode()
        with self.lock:
            if not self.running:
                return b"ERR stopped"
            try:
                if verb == "SET":
                    self.table.set(key, value)
                    return b"OK"
                found = self.table.get(key)
            except GuestError as error:
                return b"ERR " + str(error).encode()
        return b"ERR no such key" if found is None else found

    def resume(self) -> dict[str, Any]:
        """
        Serve requests (opening the port on the first run).

        @return: C{{"port": port}}.
        """
        with self.lock:
            if self.listener is None:
                self._listen()
            self.running = True
        assert self.listener is not None
        return {"port": self.listener.getsockname()[1]}

    def pause(self) -> None:
        """
        Refuse requests from now on; a SET in progress completes first.
        """
        with self.lock:
            self.running = False

    def save(self) -> bytes:
        """
        @return: the table geometry (the data itself is in RAM).
        """
        return json.dumps({"slots": self.table.slots}).encode()

    def load(self, blob: bytes) -> None:
        """
        @param blob: the source worker's state.
        @raise GuestError: its table has another size.
        """
        try:
            slots = json.loads(blob)["slots"]
        except (ValueError, KeyError, TypeError) as error:
            raise GuestError(f"malformed kv device state: {error!r}") from None
        if slots != self.table.slots:
            raise GuestError(f"kv state has {slots} slots, this worker {self.table.slots}")

    def close(self) -> None:
        """
        Stop serving and close the port.
        """
        self.pause()
        if self.listener is not None:
            self.listener.close()


def addArguments(parser: argparse.ArgumentParser) -> None:
    """
    @param parser: gets the kv options.
    """
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on")
    parser.add_argument("--port", type=int, default=0, help="the TCP port (0: any)")
    parser.add_argument("--workers", type=int, default=1, help="how many workers share the block")
    parser.add_argument("--block", default="", help="the block idstr (default: the first)")


if __name__ == "__main__":
    _worker.main(sys.argv[1:], KVWorker, addArguments)

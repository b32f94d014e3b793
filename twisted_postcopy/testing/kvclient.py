"""
A client of the C{kv} guest (L{twisted_postcopy.guests.kv}) for tests that
write while a migration runs, run as a program inside a network namespace
(C{ip netns exec NS python -m twisted_postcopy.testing.kvclient ...}).

  - C{set PORT PREFIX COUNT}: store C{COUNT} keys, each until acknowledged.
  - C{write PORT PREFIX STOPFILE}: store keys C{PREFIX-0}, C{PREFIX-1}, ...
    until C{STOPFILE} exists, printing the index of each acknowledged write
    (C{OK}) on its own line as soon as it is acknowledged; a write that
    got no C{OK} (connection lost, C{ERR stopped}) is tried again on a new
    connection and only counts once acknowledged.
  - C{check PORT PREFIX INDEXFILE}: read back every key whose index is
    listed in C{INDEXFILE} (or C{0..N-1} for C{INDEXFILE} = C{:N}) and print
    one JSON object: C{keys}, C{matched}, and up to ten C{wrong} keys.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

#: Seconds one request may wait (a write that faults on a page still on
#: the source waits for it, through any cut and recovery).
REQUEST_TIMEOUT = 120.0
#: Seconds to keep reconnecting before giving up.
CONNECT_TIMEOUT = 60.0


def value(prefix: str, index: int) -> str:
    """
    @param prefix: the keys' prefix.
    @param index: the key's index.
    @return: the value stored under C{PREFIX-INDEX}.
    """
    return f"value-{index}-{prefix}"


class Client:
    """
    A line client that reconnects.

    @ivar port: the kv worker's loopback port.
    """

    def __init__(self, port: int) -> None:
        """
        @param port: the kv worker's loopback port.
        """
        self.port = port
        self.stream = None
        self.connection: socket.socket | None = None

    def _connect(self) -> None:
        """
        Connect, retrying while refused.

        @raise OSError: no connection within L{CONNECT_TIMEOUT}.
        """
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            try:
                self.connection = socket.create_connection(("127.0.0.1", self.port), timeout=REQUEST_TIMEOUT)
                self.stream = self.connection.makefile("rwb")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def request(self, line: str) -> str | None:
        """
        @param line: one request.
        @return: the answer, or L{None} when the connection broke (it is
            closed; the next request reconnects).
        """
        if self.stream is None:
            self._connect()
        try:
            self.stream.write(line.encode() + b"\n")
            self.stream.flush()
            answer = self.stream.readline().decode().rstrip("\n")
        except OSError:
            answer = ""
        if not answer:
            self.close()
            return None
        return answer

    def store(self, key: str, text: str) -> None:
        """
        Store until acknowledged.

        @param key: the key.
        @param text: the value.
        """
        while self.request(f"SET {key} {text}") != "OK":
            self.close()
            time.sleep(0.05)

    def close(self) -> None:
        """
        Drop the connection.
        """
        if self.connection is not None:
            self.connection.close()
        self.connection = self.stream = None


def main(argv: list[str]) -> int:
    """
    @param argv: the command line (see the module docstring).
    @return: the exit status.
    """
    command, port, prefix = argv[0], int(argv[1]), argv[2]
    client = Client(port)
    if command == "set":
        for index in range(int(argv[3])):
            client.store(f"{prefix}-{index}", value(prefix, index))
        print(argv[3])
    elif command == "write":
        index = 0
        while not os.path.exists(argv[3]):
            client.store(f"{prefix}-{index}", value(prefix, index))
            print(index, flush=True)
            index += 1
    elif command == "check":
        source = argv[3]
        if source.startswith(":"):
            indexes = list(range(int(source[1:])))
        else:
            with open(source) as listed:
                indexes = [int(line) for line in listed if line.strip()]
        wrong = []
        for index in indexes:
            key = f"{prefix}-{index}"
            answer = client.request(f"GET {key}")
            if answer != value(prefix, index):
                wrong.append(key)
        print(json.dumps({"keys": len(indexes), "matched": len(indexes) - len(wrong), "wrong": wrong[:10]}))
    else:
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

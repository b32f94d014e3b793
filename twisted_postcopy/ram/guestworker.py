# -*- test-case-name: tests.test_ram_faults -*-
"""
A minimal guest process for tests and benchmarks of the fault service.

The worker (C{python -m twisted_postcopy.ram.guestworker SPEC}) maps the
memfds it inherited, registers its mappings (MISSING) on its own
userfaultfd with C{THREAD_ID}, sends that uffd and its mapping table over
an inherited Unix socket (SCM_RIGHTS), then obeys JSON commands, one per
line on stdin, answering one JSON line each on stdout:

  - C{{"op": "touch", "block": i, "first": page, "count": n, "threads": t,
    "write": false, "shared": false, "stride": 1}}: C{t} threads touch the
    C{n} pages C{first, first+stride, ...} (default: C{first..first+n}) (thread C{k} takes every C{t}-th page, or all of
    them when C{shared}; C{t = 0}: the worker's main thread, whose id the
    ready line carries, touches them all) through C{lib.tp_touch_pages},
    in C with the GIL released; answers C{checksum} (sum of the bytes read), C{latencies}
    (ns per touch, from C{CLOCK_MONOTONIC}), C{tids} and C{elapsed} (ns
    for the whole command);
  - C{{"op": "digest", "block": i}}: SHA-256 of the whole mapping (only
    once every page is present);
  - C{{"op": "exit"}}.

L{WorkerProcess} is the parent's side: it spawns the worker on the reactor
and attaches it to a L{FaultService}.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from zope.interface import implementer

from twisted_postcopy.childprocess import childEnvironment, pythonArguments
from twisted_postcopy.interfaces import IPageSource
from twisted_postcopy.ram import uffd
from twisted_postcopy.ram._uffd import ffi, lib
from twisted_postcopy.ram.dirty import registerWriteTracking


def _touch(base: int, pageSize: int, pages: list[int], write: bool, threads: int, shared: bool,
           stride: int = 1) -> dict[str, Any]:
    """
    Touch pages from C{threads} threads (worker side).

    @param base: the mapping's address.
    @param pageSize: its page size.
    @param pages: first and count of the pages to touch.
    @param write: write instead of read.
    @param threads: number of threads.
    @param shared: every thread touches every page (instead of every
        C{threads}-th page).
    @param stride: pages between two consecutive pages of the command.
    @return: the command's answer.
    """
    first, count = pages
    inline = threads == 0
    threads = max(threads, 1)
    step = 1 if shared else threads
    results: list[Any] = [None] * threads

    def run(k: int) -> None:
        """
        @param k: this thread's index.
        """
        start = 0 if shared else k
        n = len(range(start, count, step))
        began, ended, checksum = ffi.new("int64_t[]", n), ffi.new("int64_t[]", n), ffi.new("uint64_t *")
        lib.tp_touch_pages(base + (first + start * stride) * pageSize, step * stride * pageSize, n, write,
                           began, ended, checksum)
        results[k] = (threading.get_native_id(), checksum[0], [ended[i] - began[i] for i in range(n)])

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    began = lib.tp_monotonic_ns()
    if inline:
        run(0)
        workers = []
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {"checksum": sum(r[1] for r in results), "tids": [r[0] for r in results],
            "latencies": [lat for r in results for lat in r[2]], "elapsed": lib.tp_monotonic_ns() - began}


def main(spec: dict[str, Any]) -> None:
    """
    The worker program.

    @param spec: C{sock} (fd of the Unix socket), C{blocks}: a list of
        (fd, length, pageSize, idstr), and C{mode}: C{"fault"} (register
        MISSING for a L{FaultService}) or C{"track"} (write tracking for a
        L{twisted_postcopy.ram.dirty.DirtyTracker}).
    """
    track = spec.get("mode") == "track"
    fd = None if track else uffd.openWithFeatures(uffd.UFFD_FEATURE_THREAD_ID)
    mappings = []
    for memfd, length, pageSize, idstr in spec["blocks"]:
        address = lib.tp_mmap(memfd, length, lib.MAP_SHARED)
        uffd.check(address, "mmap")
        if track:
            fd = registerWriteTracking(address, length, fd)
        else:
            uffd.register(fd, address, length)
        mappings.append({"base": address, "block": idstr, "offset": 0, "length": length, "pageSize": pageSize})
    sock = socket.socket(fileno=spec["sock"])
    socket.send_fds(sock, [json.dumps(mappings).encode()], [fd])
    os.close(fd)
    print(json.dumps({"ready": True, "tid": threading.get_native_id()}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "exit":
            break
        mapping = mappings[command["block"]]
        if command["op"] == "touch":
            answer = _touch(mapping["base"], mapping["pageSize"], [command["first"], command["count"]],
                            command.get("write", False), command.get("threads", 1), command.get("shared", False),
                            command.get("stride", 1))
        else:
            view = ffi.buffer(ffi.cast("char *", mapping["base"]), mapping["length"])
            answer = {"digest": hashlib.sha256(view).hexdigest()}
        print(json.dumps(answer), flush=True)


class WorkerProcess(protocol.ProcessProtocol):
    """
    The parent's side of one worker.

    @ivar service: the fault service (or dirty tracker) to attach the
        worker to.
    @ivar client: the L{FaultClient} once attached.
    @ivar tid: the worker's main thread id once attached (it touches
        pages for C{threads=0}).
    @ivar ready: fires with the worker's main thread id once it mapped its
        blocks and sent its userfaultfd.
    @ivar attached: fires with the client once the worker is attached.
    @ivar ended: fires with the exit reason when the process ends.
    """

    def __init__(self, service: Any, sock: socket.socket) -> None:
        """
        @param service: a L{FaultService}, or L{None} until L{attachTo}.
        @param sock: the parent's end of the Unix socket.
        """
        self.service, self.sock = service, sock
        self.client: Any = None
        self.tid = 0
        self._ready: tuple[int, Any] | None = None
        self.ready: Deferred = Deferred()
        self.attached: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self._answers: list[Deferred] = []
        self._buffer = b""
        self.errors = b""

    def outReceived(self, data: bytes) -> None:
        """
        One or more answer lines.

        @param data: stdout bytes.
        """
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            answer = json.loads(line)
            if answer.get("ready"):
                table, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 1)
                self.tid = answer.get("tid", 0)
                self._ready = (fds[0], json.loads(table))
                self.ready.callback(self.tid)
                self._attach()
            else:
                self._answers.pop(0).callback(answer)

    def attachTo(self, service: Any) -> None:
        """
        Attach the worker to C{service} (a worker spawned with no service
        yet, e.g. before LISTEN, is attached as soon as it is ready).

        @param service: a L{FaultService}.
        """
        self.service = service
        self._attach()

    def _attach(self) -> None:
        """
        Hand the worker's userfaultfd and mapping table to the service once
        both are there.
        """
        if self.service is None or self._ready is None:
            return
        (fd, table), self._ready = self._ready, None
        attach = getattr(self.service, "addClient", None) or self.service.addProcess
        self.client = attach(fd, table, pid=self.transport.pid)
        self.attached.callback(self.client)

    def errReceived(self, data: bytes) -> None:
        """
        @param data: stderr bytes (kept for failure messages).
        """
        self.errors += data

    def command(self, **command: Any) -> Deferred:
        """
        Send one command.

        @param command: the command's fields.
        @return: a Deferred firing with the answer.
        """
        answer: Deferred = Deferred()
        self._answers.append(answer)
        self.transport.write(json.dumps(command).encode() + b"\n")
        return answer

    def processEnded(self, reason: Any) -> None:
        """
        @param reason: the exit status.
        """
        self.sock.close()
        for answer in self._answers:
            answer.errback(RuntimeError(f"worker ended: {self.errors.decode(errors='replace')}"))
        self._answers = []
        if self._ready is not None:
            os.close(self._ready[0])
            self._ready = None
        failure = RuntimeError(f"worker failed ({reason.value}): {self.errors.decode(errors='replace')}")
        if not self.ready.called:
            self.ready.errback(failure)
        if not self.attached.called:
            self.attached.errback(failure)
        self.ended.callback(reason.value)

    def exit(self) -> Deferred:
        """
        Ask the worker to exit.

        @return: L{ended}.
        """
        self.transport.write(b'{"op": "exit"}\n')
        self.transport.closeStdin()
        return self.ended


def spawnWorker(reactor: Any, service: Any, blocks: list[Any], mode: str = "fault") -> WorkerProcess:
    """
    Start a worker mapping C{blocks} and attach it to C{service}.

    @param reactor: an C{IReactorProcess}.
    @param service: the L{FaultService}, or a
        L{twisted_postcopy.ram.dirty.DirtyTracker} in C{"track"} mode, or
        L{None} to attach later (L{WorkerProcess.attachTo}).
    @param blocks: the RAMBlocks (memfd-backed) to map, in order.
    @param mode: C{"fault"} or C{"track"}.
    @return: the worker; wait on its C{attached}.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", theirs.fileno(): theirs.fileno()}
    spec: dict[str, Any] = {"sock": theirs.fileno(), "blocks": [], "mode": mode}
    for block in blocks:
        fds[block.fd] = block.fd
        spec["blocks"].append([block.fd, block.length, block.pageSize, block.idstr])
    worker = WorkerProcess(service, ours)
    reactor.spawnProcess(worker, sys.executable,
                         pythonArguments("-m", "twisted_postcopy.ram.guestworker", json.dumps(spec)),
                         env=childEnvironment(), childFDs=fds)
    theirs.close()
    return worker



@implementer(IPageSource)
class MemoryPageSource:
    """
    An in-process L{IPageSource} holding each block's contents: a request
    places the page at once (or after C{delay} seconds on C{clock}).

    @ivar service: the fault service pages are placed into.
    @ivar contents: idstr -> the block's full contents (zero pages are
        placed with C{placeZero}).
    @ivar requests: the (block, offset) pairs requested, in order.
    """

    def __init__(self, contents: dict[str, bytes], clock: Any = None, delay: float = 0.0) -> None:
        """
        @param contents: idstr -> bytes.
        @param clock: an C{IReactorTime} for delayed answers, or L{None}.
        @param delay: seconds before a page is placed when C{clock} is set.
        """
        self.service: Any = None
        self.contents = contents
        self.requests: list[tuple[str, int]] = []
        self.clock, self.delay = clock, delay

    def requestPage(self, block: str, offset: int) -> None:
        """
        Place the page now, or after C{delay} on C{clock} (fire-and-forget).

        @param block: the idstr.
        @param offset: the page offset.
        """
        self.requests.append((block, offset))
        if self.clock is None:
            self.place(block, offset)
        else:
            self.clock.callLater(self.delay, self.place, block, offset)

    def place(self, block: str, offset: int) -> None:
        """
        Place one page from C{contents}.

        @param block: the idstr.
        @param offset: the page offset.
        """
        size = self.service.blocks[block].pageSize
        data = self.contents[block]
        if offset + size <= len(data) and lib.tp_buffer_is_zero(ffi.from_buffer(data) + offset, size):
            self.service.placeZero(block, offset, size)
        else:
            self.service.placePages(block, offset, memoryview(data)[offset : offset + size])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

# -*- test-case-name: tests.test_guests_stress -*-
"""
The run-control loop shared by guest worker programs.

A worker program attaches (L{twisted_postcopy.guests.attach.attach}) and
then obeys the daemon's requests on its main thread while its own threads
do the guest's work.  It reports its thread ids (C{threads}) once attached
and again before each C{running}:

  - C{run} -> L{GuestWorker.resume}, then C{info} (if it returned
    fields) and C{running};
  - C{stop} -> L{GuestWorker.pause} (returns once no more guest writes can
    happen), then C{stopped};
  - C{save} -> C{state {blob}} (base64 of L{GuestWorker.save});
  - C{load {blob}} -> L{GuestWorker.load}, then C{loaded};
  - C{verify} -> C{verified} with L{GuestWorker.verify}'s fields;
  - C{digest} -> C{digested {sha256: [hex per block]}}, read through the
    worker's own mappings (missing pages fault and are served by the
    daemon).

The worker exits when the daemon closes the connection.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import threading
from typing import Any, Callable, Sequence

from twisted_postcopy.errors import AttachProtocolError, GuestError
from twisted_postcopy.guests.attach import Attachment, attach


class GuestWorker:
    """
    Base class of a guest's worker: override the hooks.

    @ivar attachment: the attachment (blocks mapped).
    @ivar options: the parsed command line.
    """

    def __init__(self, attachment: Attachment, options: argparse.Namespace) -> None:
        """
        @param attachment: the attachment.
        @param options: the command line.
        """
        self.attachment, self.options = attachment, options

    def resume(self) -> dict[str, Any]:
        """
        Start or continue the guest's work.

        @return: fields for an C{info} message sent before C{running}
            (empty: none sent).
        """
        return {}

    def pause(self) -> None:
        """
        Stop the guest's work; return only once no more writes can happen.
        """

    def save(self) -> bytes:
        """
        @return: the device state.
        """
        return b""

    def load(self, blob: bytes) -> None:
        """
        @param blob: a device state from L{save} (of the source's worker).
        """

    def verify(self) -> dict[str, Any]:
        """
        @return: C{ok} and details of the guest's self-check.
        """
        return {"ok": True}

    def threadIds(self) -> list[int]:
        """
        The native thread ids of the threads that run the guest's work (its
        "vCPUs", for C{postcopy-blocktime}).  By default every live Python
        thread of the worker but the main one, which only answers the
        daemon's requests (or the main thread alone when there is no
        other); override to report other threads.

        @return: the ids, as the kernel reports them in C{uffd_msg} C{ptid}.
        """
        main = threading.main_thread()
        threads = [t for t in threading.enumerate() if t is not main and t.native_id is not None]
        return [t.native_id for t in threads or [main] if t.native_id is not None]

    def close(self) -> None:
        """
        The daemon went away: end the work.
        """
        self.pause()


def reportThreads(worker: GuestWorker) -> None:
    """
    Send C{threads} with the worker's current thread ids.

    @param worker: the worker.
    """
    worker.attachment.send("threads", threads=worker.threadIds())


def serve(worker: GuestWorker) -> None:
    """
    Answer the daemon's requests until it closes the connection.

    @param worker: the worker.
    """
    attachment = worker.attachment
    reportThreads(worker)
    while True:
        try:
            message = attachment.receive()
        except (AttachProtocolError, OSError):
            break
        try:
            if message.kind == "run":
                info = worker.resume()
                if info:
                    attachment.send("info", **info)
                reportThreads(worker)
                attachment.send("running")
            elif message.kind == "stop":
                worker.pause()
                attachment.send("stopped")
            elif message.kind == "save":
                attachment.send("state", blob=base64.b64encode(worker.save()).decode())
            elif message.kind == "load":
                worker.load(base64.b64decode(message["blob"]))
                attachment.send("loaded")
            elif message.kind == "verify":
                attachment.send("verified", **worker.verify())
            elif message.kind == "digest":
                attachment.send("digested", sha256=[hashlib.sha256(b.view()).hexdigest() for b in attachment.blocks])
            else:
                raise GuestError(f"unknown request {message.kind}")
        except GuestError as error:
            attachment.send("error", message=str(error))
            break
    worker.close()
    attachment.close()


def main(argv: Sequence[str], factory: Callable[[Attachment, argparse.Namespace], GuestWorker],
         addArguments: Callable[[argparse.ArgumentParser], None]) -> None:
    """
    A worker program: parse C{--attach PATH --guest NAME --worker NAME}
    and the guest's own options, attach, serve.

    @param argv: the arguments (without the program name).
    @param factory: builds the worker.
    @param addArguments: adds the guest's options.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--attach", required=True, help="the daemon's attach socket")
    parser.add_argument("--guest", required=True, help="the guest name")
    parser.add_argument("--worker", required=True, help="this worker's name (NAME-INDEX)")
    addArguments(parser)
    options = parser.parse_args(argv)
    attachment = attach(options.attach, options.guest, options.worker)
    try:
        worker = factory(attachment, options)
    except Exception as error:
        print(f"{options.worker}: {error}", file=sys.stderr)
        attachment.close()
        raise SystemExit(2)
    serve(worker)


def workerIndex(name: str) -> int:
    """
    @param name: a worker name C{GUEST-INDEX}.
    @return: INDEX.
    @raise ValueError: no index.
    """
    return int(name.rsplit("-", 1)[1])

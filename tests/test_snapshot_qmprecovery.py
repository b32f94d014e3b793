# -*- test-case-name: tests.test_snapshot_qmprecovery -*-
"""
Tests for L{twisted_postcopy.snapshot.qmprecovery}'s QMP client and QEMU
recovery steps against a scripted QMP monitor on a UNIX socket (a stand-in
for QEMU that answers by a script; the real QEMU runs in
C{tests/test_qemu_netns_recovery.py}).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.snapshot.qmprecovery import (
    QMPClient, QMPError, reachable, recoverQEMUDestination, resumeQEMUSource)


class _Monitor:
    """
    A QMP monitor answering each command with C{answer(command, arguments)}.

    @ivar path: its socket.
    @ivar commands: the commands received, with their arguments.
    """

    def __init__(self, test: SynchronousTestCase, answer: Callable[[str, dict], Any]) -> None:
        """
        @param test: stops the monitor at its end.
        @param answer: returns a return value, or raises L{QMPError} to
            answer an error.
        """
        directory = tempfile.mkdtemp(prefix="qmpt-")
        test.addCleanup(shutil.rmtree, directory, True)
        self.path = os.path.join(directory, "qmp.sock")
        self.answer = answer
        self.commands: list[tuple[str, dict]] = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen()
        test.addCleanup(self.listener.close)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        """
        Serve one client at a time.
        """
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection, connection.makefile("rwb") as stream:
                stream.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
                stream.flush()
                for line in stream:
                    message = json.loads(line)
                    command, arguments = message["execute"], message.get("arguments", {})
                    self.commands.append((command, arguments))
                    stream.write(b'{"event": "NOISE", "data": {}}\n')
                    try:
                        reply = {"return": self.answer(command, arguments)}
                    except QMPError as error:
                        reply = {"error": {"class": "GenericError", "desc": str(error)}}
                    stream.write(json.dumps(reply).encode() + b"\n")
                    stream.flush()


class QMPClientTests(SynchronousTestCase):
    """
    L{QMPClient}.
    """

    def test_execute(self) -> None:
        """
        Capabilities are negotiated first; events in between are skipped;
        errors carry QEMU's text.
        """
        def answer(command: str, arguments: dict) -> Any:
            if command == "bad":
                raise QMPError("The command bad has not been found")
            return {"status": "postcopy-active"} if command == "query-migrate" else {}

        monitor = _Monitor(self, answer)
        client = QMPClient(monitor.path)
        self.addCleanup(client.close)
        self.assertEqual(client.status(), "postcopy-active")
        error = self.assertRaises(QMPError, client.execute, "bad")
        self.assertEqual(str(error), "bad: The command bad has not been found")
        self.assertEqual([c for c, _ in monitor.commands], ["qmp_capabilities", "query-migrate", "bad"])


class RecoveryStepTests(SynchronousTestCase):
    """
    The QEMU side of a restore's and a capture's recovery.
    """

    def _qemu(self, paused: list[bool]) -> _Monitor:
        """
        @param paused: whether QEMU is paused (C{migrate-pause} sets it).
        @return: a monitor acting as a QEMU in postcopy.
        """
        def answer(command: str, arguments: dict) -> Any:
            if command == "migrate-pause":
                paused[0] = True
            if command == "migrate":
                paused[0] = False
            if command == "query-migrate":
                return {"status": "postcopy-paused" if paused[0] else "postcopy-active"}
            return {}

        return _Monitor(self, answer)

    def test_destination(self) -> None:
        """
        A QEMU destination still postcopy-active is paused, then listens
        again with migrate-recover.
        """
        monitor = self._qemu([False])
        done = recoverQEMUDestination(monitor.path, "tcp:10.0.0.1:4444", time.monotonic() + 10)
        self.assertEqual(done, "QEMU listens on tcp:10.0.0.1:4444")
        self.assertIn(("migrate-pause", {}), monitor.commands)
        self.assertEqual(monitor.commands[-1], ("migrate-recover", {"uri": "tcp:10.0.0.1:4444"}))

    def test_source(self) -> None:
        """
        A QEMU source already paused resumes to our recovery URI.
        """
        monitor = self._qemu([True])
        done = resumeQEMUSource(monitor.path, "tcp:10.0.0.2:4444", None, time.monotonic() + 10)
        self.assertEqual(done, "QEMU resumed to tcp:10.0.0.2:4444")
        self.assertNotIn(("migrate-pause", {}), monitor.commands)
        self.assertIn(("migrate", {"uri": "tcp:10.0.0.2:4444", "resume": True}), monitor.commands)

    def test_reachable(self) -> None:
        """
        A host that refuses the probe answers; so does one that accepts.
        """
        self.assertTrue(reachable("127.0.0.1"))

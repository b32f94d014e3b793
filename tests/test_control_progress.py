# -*- test-case-name: tests.test_control_progress -*-
"""
Tests for L{twisted_postcopy.control.progress}.
"""

from __future__ import annotations

import io

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.control import progress

MIB = 1 << 20


class FractionTests(SynchronousTestCase):
    """
    Tests for L{progress.fractionDone}.
    """

    def test_remaining(self) -> None:
        """
        The fraction is what is no longer remaining.
        """
        info = {"status": "active", "ram": {"total": 100 * MIB, "remaining": 25 * MIB}}
        self.assertEqual(progress.fractionDone(info, 1), 0.75)

    def test_transferredOnly(self) -> None:
        """
        Without C{remaining}, transferred bytes over the RAM size, capped.
        """
        self.assertEqual(progress.fractionDone({"ram": {"transferred": 50}}, 100), 0.5)
        self.assertEqual(progress.fractionDone({"ram": {"transferred": 500}}, 100), 1.0)

    def test_completedAndEmpty(self) -> None:
        """
        C{completed} is 1; no statistics at all is 0.
        """
        self.assertEqual(progress.fractionDone({"status": "completed"}, 100), 1.0)
        self.assertEqual(progress.fractionDone({"status": "setup"}, 100), 0.0)


class ProgressTests(SynchronousTestCase):
    """
    Tests for L{progress.Progress}.
    """

    info = {"status": "active", "ram": {"total": 64 * MIB, "remaining": 32 * MIB,
                                        "transferred": 32 * MIB, "mbps": 900.4}}

    def test_terminal(self) -> None:
        """
        On a terminal the bar is redrawn in place and ended by L{finish}.
        """
        out = io.StringIO()
        bar = progress.Progress(out, 64 * MIB, tty=True)
        bar.update("source", self.info)
        bar.update("source", self.info)
        bar.finish()
        text = out.getvalue()
        self.assertEqual(text.count("\r"), 2)
        self.assertIn(" 50.0% active", text)
        self.assertIn("900 Mbps", text)
        self.assertTrue(text.endswith("\n"))

    def test_lines(self) -> None:
        """
        Elsewhere, a line per status change and every L{progress.LINE_EVERY}
        updates, without control characters.
        """
        out = io.StringIO()
        lines = progress.Progress(out, 64 * MIB, tty=False)
        for _ in range(progress.LINE_EVERY):
            lines.update("source", self.info)
        lines.update("source", dict(self.info, status="postcopy-active"))
        lines.finish()
        text = out.getvalue()
        self.assertEqual(len(text.splitlines()), 3)
        self.assertNotIn("\r", text)

    def test_detectsTerminal(self) -> None:
        """
        By default the stream's C{isatty} decides.
        """
        self.assertFalse(progress.Progress(io.StringIO(), 1).tty)


class ReportTests(SynchronousTestCase):
    """
    Tests for L{progress.formatReport}.
    """

    def test_report(self) -> None:
        """
        The report names the statuses, times, pages, requests, blocktime and
        the memory check.
        """
        text = progress.formatReport({
            "source": {"status": "completed", "total-time": 2300, "setup-time": 5, "downtime": 40,
                       "ram": {"transferred": 70 * MIB, "mbps": 812.0, "normal": 16000,
                               "duplicate": 400, "postcopy-requests": 57}},
            "destination": {"status": "completed", "postcopy-blocktime": 120,
                            "postcopy-vcpu-blocktime": [80, 40]},
            "source-statuses": ["setup", "active", "postcopy-active", "completed"],
            "guest": {"verified": True}, "verified": True, "guest-name": "stress",
            "ram-bytes": 64 * MIB, "uri": "tcp:127.0.0.1:4444",
        })
        for needle in ("stress guest, 64.0 MiB", "completed: total 2300 ms", "downtime 40 ms",
                       "16000 pages", "57 postcopy requests", "blocktime 120 ms",
                       "per vCPU 80, 40 ms", "verified: yes",
                       "statuses: setup -> active -> postcopy-active -> completed"):
            self.assertIn(needle, text)

    def test_notVerified(self) -> None:
        """
        A failed check shows in capitals; missing statistics show as C{-}.
        """
        text = progress.formatReport({"source": {"status": "failed"},
                                      "destination": {"status": "failed"}, "verified": False})
        self.assertIn("verified: NO", text)
        self.assertIn("total - ms", text)

    def test_kv(self) -> None:
        """
        A kv run reports how many entries came back.
        """
        text = progress.formatReport({"source": {}, "destination": {}, "verified": True,
                                      "kv": {"keys": 1000, "matched": 1000}})
        self.assertIn("kv entries read back from the destination: 1000 of 1000", text)

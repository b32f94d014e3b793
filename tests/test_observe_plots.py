# -*- test-case-name: tests.test_observe_plots -*-
"""
Tests for L{twisted_postcopy.observe.plots} (C{postcopy report}) and
C{postcopy demo --report DIR}: the PNGs are opened and checked for size
and non-blank content.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.cli import main
from twisted_postcopy.observe import plots
from twisted_postcopy.testing.real import missingReal


def _requireMatplotlib() -> None:
    """
    Give up unless matplotlib (the 'report' extra, which brings Pillow) is
    installed.
    """
    try:
        import matplotlib  # noqa: F401
        import PIL  # noqa: F401
    except ImportError:
        missingReal("matplotlib (the 'report' extra) is not installed")


def pictureFigures(path: Path) -> dict[str, Any]:
    """
    Measure a PNG.

    @param path: the file.
    @return: C{size} (width, height), C{colours} (distinct colours) and
        C{ink} (the fraction of pixels that are not white).
    """
    import numpy
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
        size = rgb.size
        pixels = numpy.asarray(rgb).reshape(-1, 3)
    ink = float((pixels != 255).any(axis=1).mean())
    return {"size": size, "colours": len(numpy.unique(pixels, axis=0)), "ink": ink}


def synthetic() -> dict[str, Any]:
    """
    A source and destination timeline with a pause and a recovery, 300
    timed requests and two vCPUs.

    @return: the document, as C{postcopy demo --report} writes it.
    """
    statuses = [[0.0, "setup"], [0.01, "active"], [0.5, "postcopy-active"], [1.0, "postcopy-paused"],
                [1.4, "postcopy-recover"], [1.5, "postcopy-active"], [2.5, "completed"]]
    source = {"version": 1, "role": "source", "start": 1000.0, "window-ms": 100.0,
              "bytes": [int(1e7 + i * 1e5) if not 10 <= i < 14 else 0 for i in range(25)],
              "requests": [0] * 25, "statuses": statuses, "latency": {"count": 0},
              "blocktime": None}
    destination = dict(source, role="destination", start=1000.02,
                       requests=[0] * 5 + [20] * 20,
                       latency={"count": 300, "max-ms": 40.0,
                                "samples-us": [500 + (i * 137) % 20000 for i in range(300)]},
                       blocktime={"vcpu-threads": [101, 102], "window": list(range(25)),
                                  "total-ms": [i * 2 for i in range(25)],
                                  "vcpu-ms": [[i * 3, i * 4] for i in range(25)],
                                  "final-ms": 50, "final-vcpu-ms": [75, 100]})
    return {"source": source, "destination": destination}


class ReportTests(SynchronousTestCase):
    """
    Tests for C{postcopy report}.
    """

    def setUp(self) -> None:
        """
        Need matplotlib; work in a temporary directory.
        """
        _requireMatplotlib()
        self.directory = Path(tempfile.mkdtemp(prefix="observe-plots-"))
        self.addCleanup(shutil.rmtree, self.directory, True)

    def test_command(self) -> None:
        """
        C{postcopy report TIMELINE.json -o DIR} writes the three PNGs, each
        of its expected size, with many colours and a fair share of ink
        (neither blank nor solid).
        """
        timeline = self.directory / "timeline.json"
        timeline.write_text(json.dumps(synthetic()))
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(main(["report", str(timeline), "-o", str(self.directory / "plots")]), 0)
        self.assertEqual(out.getvalue().split(), [str(self.directory / "plots" / n) for n in plots.PLOTS])
        sizes = {"throughput.png": (1000, 550), "latency.png": (1100, 450), "blocktime.png": (1000, 550)}
        for name in plots.PLOTS:
            figures = pictureFigures(self.directory / "plots" / name)
            self.assertEqual(figures["size"], sizes[name], name)
            self.assertGreater(figures["colours"], 50, name)
            self.assertTrue(0.03 < figures["ink"] < 0.6, (name, figures))

    def test_oneSide(self) -> None:
        """
        One daemon's timeline (as C{x-query-migrate-timeline} answers) is
        drawn too; a side without requests or blocktime says so in its
        plot rather than leaving it blank.
        """
        written = plots.writeReport(synthetic()["source"], self.directory)
        for path in written:
            self.assertGreater(pictureFigures(path)["ink"], 0.02, path)

    def test_notATimeline(self) -> None:
        """
        Another JSON document is refused with a clear error, exit status 1.
        """
        path = self.directory / "other.json"
        path.write_text(json.dumps({"status": "completed"}))
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(main(["report", str(path), "-o", str(self.directory)]), 1)
        self.assertIn("not a migration timeline", err.getvalue())

    def test_missingMatplotlib(self) -> None:
        """
        Without matplotlib the error names the extra.
        """
        saved = sys.modules.get("matplotlib")
        sys.modules["matplotlib"] = None  # type: ignore[assignment]
        self.addCleanup(sys.modules.__setitem__, "matplotlib", saved)
        error = self.assertRaises(plots.ReportError, plots.requireMatplotlib)
        self.assertIn("'report' extra", str(error))


class DemoReportTests(SynchronousTestCase):
    """
    C{postcopy demo --report DIR} with real daemons, userfaultfd and
    loopback TCP.
    """

    def test_demoReport(self) -> None:
        """
        The demo writes both daemons' timelines and the three plots; the
        timelines went through postcopy and agree with the demo's JSON.
        """
        _requireMatplotlib()
        from twisted_postcopy.ram.support import checkUserfaultfd
        from twisted_postcopy.errors import UffdUnavailableError

        try:
            checkUserfaultfd()
        except UffdUnavailableError as e:
            missingReal(f"userfaultfd: {e}")
        directory = Path(tempfile.mkdtemp(prefix="observe-demo-"))
        self.addCleanup(shutil.rmtree, directory, True)
        result = subprocess.run(
            [sys.executable, "-m", "twisted_postcopy.cli", "demo", "--json", "--ram", "64M",
             "--postcopy-after", "0", "--report", str(directory)],
            capture_output=True, text=True, timeout=180)
        self.assertEqual(result.returncode, 0, result.stderr)
        report = json.loads(result.stdout)
        self.assertEqual(sorted(Path(p).name for p in report["report"]),
                         sorted(["timeline.json", *plots.PLOTS]))
        document = json.loads((directory / "timeline.json").read_text())
        source, destination = document["source"], document["destination"]
        self.assertIn("postcopy-active", [s for _, s in source["statuses"]])
        self.assertEqual(source["statuses"][-1][1], "completed")
        self.assertEqual(source["counters"]["postcopy-requests"],
                         report["source"]["ram"]["postcopy-requests"])
        self.assertEqual(destination["blocktime"]["final-ms"], report["destination"]["postcopy-blocktime"])
        self.assertEqual(destination["latency"]["count"],
                         destination["counters"]["pages"]["received"]["urgent"])
        for name in plots.PLOTS:
            figures = pictureFigures(directory / name)
            self.assertGreater(figures["colours"], 50, name)
            self.assertTrue(0.03 < figures["ink"] < 0.6, (name, figures))

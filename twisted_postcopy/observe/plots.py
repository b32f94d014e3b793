# -*- test-case-name: tests.test_observe_plots -*-
"""
C{postcopy report TIMELINE.json -o DIR}: PNG plots of migration timelines
(C{x-query-migrate-timeline} answers) with matplotlib's Agg backend (the
C{report} extra):

  - C{throughput.png}: MB/s per window over time for each side, with the
    switch to postcopy, pauses and completion marked;
  - C{latency.png}: the page-request latency histogram and its CDF;
  - C{blocktime.png}: postcopy blocktime per vCPU (and overall) over time.

The JSON is one side's timeline, or C{{"source": ..., "destination": ...}}
as C{postcopy demo --report DIR} writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

#: The extra that brings matplotlib.
EXTRA = "report"
#: The files written.
PLOTS = ("throughput.png", "latency.png", "blocktime.png")
#: Colours of the sides and markers.
SIDE_COLOURS = {"source": "tab:blue", "destination": "tab:green"}
MARKS = {"postcopy-active": ("tab:orange", "switch to postcopy"),
         "postcopy-paused": ("tab:red", "paused"),
         "postcopy-recover": ("tab:purple", "recovering"),
         "completed": ("black", "completed"),
         "failed": ("tab:red", "failed")}


class ReportError(Exception):
    """
    The plots cannot be drawn (no matplotlib, a bad timeline file).
    """


def requireMatplotlib() -> Any:
    """
    @return: C{matplotlib.pyplot} on the Agg backend.
    @raise ReportError: matplotlib is missing (naming the extra).
    """
    try:
        import matplotlib
    except ImportError:
        raise ReportError("postcopy report draws with matplotlib: install the 'report' extra "
                          "(python3 -m pip install 'twisted-postcopy[report]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sides(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """
    The timelines of a report document.

    @param document: one timeline, or C{source}/C{destination} timelines.
    @return: side name -> timeline.
    @raise ReportError: neither shape.
    """
    if isinstance(document, dict) and "version" in document:
        return {document.get("role") or "daemon": document}
    if isinstance(document, dict) and any(k in document for k in ("source", "destination")):
        found = {k: v for k, v in document.items() if k in ("source", "destination") and v}
        if all(isinstance(v, dict) and "version" in v for v in found.values()):
            return found
    raise ReportError("not a migration timeline (x-query-migrate-timeline) nor "
                      "{source, destination} timelines")


def _origin(timelines: dict[str, dict[str, Any]]) -> float:
    """
    @param timelines: side -> timeline.
    @return: the earliest start (Unix seconds), the plots' time 0.
    """
    starts = [t["start"] for t in timelines.values() if t.get("start") is not None]
    return min(starts) if starts else 0.0


def _offset(timeline: dict[str, Any], origin: float) -> float:
    """
    @param timeline: a timeline.
    @param origin: time 0 of the plots.
    @return: seconds from time 0 to the timeline's start.
    """
    return (timeline["start"] - origin) if timeline.get("start") is not None else 0.0


def _markStatuses(axes: Any, timelines: dict[str, dict[str, Any]], origin: float) -> None:
    """
    Mark the switch to postcopy, pauses (shaded until the next status),
    recovery and the end, once per label.

    @param axes: the axes.
    @param timelines: side -> timeline.
    @param origin: time 0.
    """
    labelled: set[str] = set()
    for timeline in timelines.values():
        offset = _offset(timeline, origin)
        statuses = timeline.get("statuses") or []
        for index, (t, status) in enumerate(statuses):
            if status not in MARKS:
                continue
            colour, label = MARKS[status]
            if status == "postcopy-active" and index and statuses[index - 1][1] == "postcopy-recover":
                colour, label = "tab:olive", "resumed after recovery"
            text = label if label not in labelled else None
            labelled.add(label)
            if status == "postcopy-paused":
                end = statuses[index + 1][0] if index + 1 < len(statuses) else t
                axes.axvspan(offset + t, offset + end, color=colour, alpha=0.15, label=text)
            else:
                axes.axvline(offset + t, color=colour, linestyle="--", linewidth=1.2, label=text)


def _finishTimeAxes(axes: Any, timelines: dict[str, dict[str, Any]], origin: float, title: str,
                    ylabel: str, empty: str | None, twin: Any = None) -> None:
    """
    Mark the statuses, label a plot over time and put its legend below it.

    @param axes: the axes.
    @param timelines: side -> timeline.
    @param origin: time 0.
    @param title: the title.
    @param ylabel: the y axis label, with its unit.
    @param empty: a note written across an empty plot, or L{None}.
    @param twin: a second y axis whose legend entries join, or L{None}.
    """
    _markStatuses(axes, timelines, origin)
    axes.set_title(title)
    axes.set_xlabel("time since the migration started (s)")
    axes.set_ylabel(ylabel)
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    if empty is not None:
        axes.text(0.5, 0.5, empty, transform=axes.transAxes, ha="center", va="center")
    handles, labels = axes.get_legend_handles_labels()
    if twin is not None:
        axes.set_zorder(twin.get_zorder() + 1)
        axes.patch.set_visible(False)
        more, moreLabels = twin.get_legend_handles_labels()
        handles, labels = handles + more, labels + moreLabels
    axes.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3,
                fontsize="small", frameon=False)


def _save(plt: Any, figure: Any, path: Path) -> None:
    """
    Lay out, write and close a figure.

    @param plt: pyplot.
    @param figure: the figure.
    @param path: the PNG to write.
    """
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plotThroughput(plt: Any, timelines: dict[str, dict[str, Any]], path: Path) -> None:
    """
    Throughput over time.

    @param plt: pyplot.
    @param timelines: side -> timeline.
    @param path: the PNG to write.
    """
    origin = _origin(timelines)
    figure, axes = plt.subplots(figsize=(10, 5.5), dpi=100)
    drawn = False
    twin = None
    for side, timeline in timelines.items():
        window = timeline["window-ms"] / 1000
        offset = _offset(timeline, origin)
        values = timeline.get("bytes") or []
        if not values:
            continue
        times = [offset + (i + 1) * window for i in range(len(values))]
        rates = [v / window / 1e6 for v in values]
        what = "sent (wire bytes)" if timeline.get("role") == "source" else "received (RAM bytes)"
        axes.step(times, rates, where="pre", color=SIDE_COLOURS.get(side, "tab:gray"),
                  linewidth=1.5, label=f"{side}: {what}, {timeline['window-ms']:g} ms windows")
        requests = timeline.get("requests") or []
        if timeline.get("role") == "destination" and any(requests):
            if twin is None:
                twin = axes.twinx()
            twin.bar([t - window / 2 for t in times], requests, width=window * 0.8, color="tab:gray",
                     alpha=0.35, label="page requests sent (destination, per window)")
            twin.set_ylabel("page requests per window")
        drawn = True
    _finishTimeAxes(axes, timelines, origin, "Migration throughput", "throughput (MB/s)",
                    None if drawn else "no throughput windows recorded", twin)
    _save(plt, figure, path)


def _latencySamples(timelines: dict[str, dict[str, Any]]) -> tuple[list[float], dict[str, Any] | None]:
    """
    @param timelines: side -> timeline.
    @return: the latency samples (ms) of the side that timed requests,
        and its latency summary.
    """
    for timeline in timelines.values():
        latency = timeline.get("latency") or {}
        if latency.get("count"):
            return sorted(us / 1000 for us in latency.get("samples-us", [])), latency
    return [], None


def plotLatency(plt: Any, timelines: dict[str, dict[str, Any]], path: Path) -> None:
    """
    The page-request latency histogram and CDF.

    @param plt: pyplot.
    @param timelines: side -> timeline.
    @param path: the PNG to write.
    """
    import numpy

    samples, summary = _latencySamples(timelines)
    figure, (histogram, cdf) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    figure.suptitle("Page-request latency (guest fault to placement, destination)")
    if samples:
        low, high = max(min(samples), 1e-3), max(samples)
        bins = numpy.logspace(numpy.log10(low), numpy.log10(high * 1.01 if high > low else low * 10), 40)
        histogram.hist(samples, bins=bins, color="tab:blue", edgecolor="white",
                       label=f"{len(samples)} sampled of {summary['count']} requests")
        histogram.set_xscale("log")
        fractions = numpy.arange(1, len(samples) + 1) / len(samples)
        cdf.plot(samples, fractions, color="tab:blue", linewidth=1.5, label="CDF")
        cdf.set_xscale("log")
        for q, colour in ((0.5, "tab:green"), (0.99, "tab:red")):
            value = samples[min(len(samples) - 1, int(q * len(samples)))]
            cdf.axvline(value, color=colour, linestyle="--", linewidth=1,
                        label=f"p{int(q * 100)} = {value:.2f} ms")
        cdf.axhline(1.0, color="gray", linewidth=0.5)
        histogram.legend(fontsize="small")
        cdf.legend(loc="lower right", fontsize="small")
    else:
        for axes in (histogram, cdf):
            axes.text(0.5, 0.5, "no page requests timed", transform=axes.transAxes,
                      ha="center", va="center")
    histogram.set_title("Histogram")
    histogram.set_xlabel("latency (ms, log scale)")
    histogram.set_ylabel("requests")
    cdf.set_title(f"CDF (max {summary['max-ms']:.2f} ms)" if summary else "CDF")
    cdf.set_xlabel("latency (ms, log scale)")
    cdf.set_ylabel("fraction of requests at most this latency")
    cdf.set_ylim(0, 1.05)
    for axes in (histogram, cdf):
        axes.grid(True, alpha=0.3)
    _save(plt, figure, path)


def plotBlocktime(plt: Any, timelines: dict[str, dict[str, Any]], path: Path) -> None:
    """
    Postcopy blocktime per vCPU over time.

    @param plt: pyplot.
    @param timelines: side -> timeline.
    @param path: the PNG to write.
    """
    origin = _origin(timelines)
    figure, axes = plt.subplots(figsize=(10, 5.5), dpi=100)
    drawn = False
    for timeline in timelines.values():
        blocktime = timeline.get("blocktime")
        if not blocktime or not blocktime.get("window"):
            continue
        window = timeline["window-ms"] / 1000
        offset = _offset(timeline, origin)
        times = [offset + (i + 1) * window for i in blocktime["window"]]
        vcpus = [list(v) for v in blocktime["vcpu-ms"]]
        totals = list(blocktime["total-ms"])
        statuses = timeline.get("statuses") or []
        if blocktime.get("final-ms") is not None and statuses and statuses[-1][1] == "completed":
            times.append(offset + statuses[-1][0])
            vcpus.append(list(blocktime.get("final-vcpu-ms") or []))
            totals.append(blocktime["final-ms"])
        threads = blocktime.get("vcpu-threads") or []
        count = max(len(v) for v in vcpus) if vcpus else 0
        for vcpu in range(count):
            values = [v[vcpu] if vcpu < len(v) else 0 for v in vcpus]
            thread = f" (thread {threads[vcpu]})" if vcpu < len(threads) else ""
            axes.plot(times, values, linewidth=1.5, label=f"vCPU {vcpu}{thread}")
        axes.plot(times, totals, color="black", linewidth=2, linestyle=":",
                  label="all vCPUs blocked at once (postcopy-blocktime)")
        drawn = True
    _finishTimeAxes(axes, timelines, origin, "Postcopy blocktime per vCPU (cumulative)",
                    "blocked time (ms)",
                    None if drawn else "no blocktime recorded (postcopy-blocktime capability off?)")
    _save(plt, figure, path)


def writeReport(document: dict[str, Any], directory: Path) -> list[Path]:
    """
    Draw every plot of a timeline document.

    @param document: a timeline or C{source}/C{destination} timelines.
    @param directory: where the PNGs go (created if missing).
    @return: the files written.
    @raise ReportError: no matplotlib, or not a timeline.
    """
    plt = requireMatplotlib()
    timelines = sides(document)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in zip(PLOTS, (plotThroughput, plotLatency, plotBlocktime)):
        path = directory / name
        draw(plt, timelines, path)
        written.append(path)
    return written


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """
    C{postcopy report}.

    @param args: the parsed arguments.
    @param out: standard output (default: C{sys.stdout}).
    @param err: standard error (default: C{sys.stderr}).
    @return: the exit status.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        document = json.loads(Path(args.timeline).read_text())
        written = writeReport(document, Path(args.output))
    except (OSError, ValueError, ReportError) as e:
        print(f"error: {e}", file=err)
        return 1
    for path in written:
        print(path, file=out)
    return 0


def register(subparsers: Any) -> None:
    """
    Add C{postcopy report} to the C{postcopy} parser.

    @param subparsers: the C{add_subparsers} object.
    """
    parser = subparsers.add_parser(
        "report", help="draw PNG plots of a migration timeline",
        description="Draw throughput.png, latency.png and blocktime.png from a migration "
        "timeline (x-query-migrate-timeline, or the timeline.json of postcopy demo --report).")
    parser.add_argument("timeline", metavar="TIMELINE.json", help="the timeline file")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="where the PNGs go")
    parser.set_defaults(func=run)


async def saveDemoReport(source: Any, destination: Any, directory: str) -> list[str]:
    """
    For C{postcopy demo --report DIR}: fetch both daemons' timelines, write
    them as C{DIR/timeline.json} and draw the plots beside it.

    @param source: the source L{twisted_postcopy.control.daemon.Daemon}.
    @param destination: the destination daemon.
    @param directory: the report directory.
    @return: the files written.
    @raise ReportError: matplotlib is missing.
    """
    document = {"source": await source.client.queryMigrateTimeline(),
                "destination": await destination.client.queryMigrateTimeline()}
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "timeline.json").write_text(json.dumps(document))
    return [str(path / "timeline.json")] + [str(p) for p in writeReport(document, path)]

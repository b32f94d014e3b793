# -*- test-case-name: tests.test_control_progress -*-
"""
Progress and reports of a migration, rendered from C{query-migrate}
answers: the progress bar of C{postcopy demo} and its final report.
"""

from __future__ import annotations

from typing import Any, TextIO

from attrs import define, field

#: Bar width in characters.
BAR = 30
#: Without a terminal, a line every this many updates of one side.
LINE_EVERY = 5


def _mib(value: Any) -> str:
    """
    Format a byte count in MiB.

    @param value: bytes, or L{None}.
    @return: the text (C{-} when unknown).
    """
    return "-" if value is None else f"{value / (1 << 20):.1f} MiB"


def fractionDone(info: dict[str, Any], ram: int) -> float:
    """
    How much of RAM is on the destination, from a C{query-migrate} answer.

    @param info: the answer.
    @param ram: the guest's RAM size, when C{ram.total} is missing.
    @return: a fraction between 0 and 1 (1 once completed).
    """
    if info.get("status") == "completed":
        return 1.0
    stats = info.get("ram") or {}
    total = stats.get("total") or ram
    remaining = stats.get("remaining")
    done = total - remaining if remaining is not None else stats.get("transferred", 0)
    return max(0.0, min(1.0, done / total)) if total else 0.0


def progressLine(name: str, info: dict[str, Any], ram: int) -> str:
    """
    One line of progress for one side.

    @param name: the side's name.
    @param info: its C{query-migrate} answer.
    @param ram: the guest's RAM size.
    @return: the line, without a newline.
    """
    fraction = fractionDone(info, ram)
    stats = info.get("ram") or {}
    filled = int(fraction * BAR)
    return (
        f"{name:<11} [{'#' * filled}{'.' * (BAR - filled)}] {fraction * 100:5.1f}% "
        f"{info.get('status', '?'):<16} sent {_mib(stats.get('transferred'))}, "
        f"{stats.get('mbps', 0):.0f} Mbps, {stats.get('postcopy-requests', 0)} requests"
    )


@define
class Progress:
    """
    Shows migration progress on a stream: one bar redrawn in place on a
    terminal, otherwise plain lines (on status changes and now and then).

    @ivar stream: where to write (standard error).
    @ivar ram: the guest's RAM size in bytes.
    @ivar tty: whether C{stream} is a terminal.
    """

    stream: TextIO
    ram: int
    tty: bool = field(default=None)
    _statuses: dict[str, str] = field(factory=dict)
    _updates: dict[str, int] = field(factory=dict)
    _drawn: bool = False

    def __attrs_post_init__(self) -> None:
        """
        Find out whether the stream is a terminal.
        """
        if self.tty is None:
            self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, name: str, info: dict[str, Any]) -> None:
        """
        Show one side's latest C{query-migrate} answer.

        @param name: the side's name.
        @param info: the answer.
        """
        line = progressLine(name, info, self.ram)
        count = self._updates[name] = self._updates.get(name, 0) + 1
        changed = self._statuses.get(name) != info.get("status")
        self._statuses[name] = info.get("status", "?")
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
            self._drawn = True
        elif changed or count % LINE_EVERY == 0:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """
        End the bar's line, if one was drawn.
        """
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def sourceReportLines(source: dict[str, Any], statuses: list[str] | None) -> list[str]:
    """
    The source's lines of the final report.

    @param source: its C{query-migrate} answer.
    @param statuses: the statuses it went through (from events).
    @return: the lines.
    """
    ram = source.get("ram") or {}
    return [
        f"source       {source.get('status')}: total {source.get('total-time', '-')} ms, "
        f"setup {source.get('setup-time', '-')} ms, downtime {source.get('downtime', '-')} ms",
        f"             sent {_mib(ram.get('transferred'))} at {ram.get('mbps', 0):.0f} Mbps: "
        f"{ram.get('normal', '-')} pages, {ram.get('duplicate', '-')} zero pages, "
        f"{ram.get('postcopy-requests', '-')} postcopy requests",
        f"             statuses: {' -> '.join(statuses or ['-'])}",
    ]


def destinationReportLines(destination: dict[str, Any]) -> list[str]:
    """
    The destination's line of the final report.

    @param destination: its C{query-migrate} answer.
    @return: the lines.
    """
    vcpu = destination.get("postcopy-vcpu-blocktime")
    return [
        f"destination  {destination.get('status')}: postcopy blocktime "
        f"{destination.get('postcopy-blocktime', '-')} ms"
        + (f", per vCPU {', '.join(map(str, vcpu))} ms" if vcpu else ""),
    ]


def formatReport(result: dict[str, Any]) -> str:
    """
    The human-readable final report of C{postcopy demo}.

    @param result: C{source} and C{destination} C{query-migrate} answers,
        C{source-statuses}, C{guest} (C{query-guest}), C{verified}, C{guest-name},
        C{ram-bytes} and C{uri}.
    @return: the report text.
    """
    lines = [
        f"postcopy demo: {result.get('guest-name')} guest, {_mib(result.get('ram-bytes'))}, "
        f"migrated over {result.get('uri')}",
        *sourceReportLines(result["source"], result.get("source-statuses")),
        *destinationReportLines(result["destination"]),
        f"guest memory verified: {'yes' if result.get('verified') else 'NO'}",
    ]
    if "kv" in result:
        kv = result["kv"]
        lines.insert(-1, f"kv entries read back from the destination: {kv['matched']} of {kv['keys']}")
    return "\n".join(lines)

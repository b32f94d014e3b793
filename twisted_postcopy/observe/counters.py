# -*- test-case-name: tests.test_observe_counters -*-
"""
One snapshot of a daemon's migration counters, read from what the engine
already keeps for C{query-migrate} (the source's
L{twisted_postcopy.source.stats.TransferStats}, the destination's received
bitmaps, fault service and blocktime context).  Nothing here adds work per
page: it is called by a scrape or a 100 ms timeline sample.
"""

from __future__ import annotations

from typing import Any

#: The target page size: the unit of QEMU's page counters.
TARGET_PAGE = 4096


def _receivedPages(incoming: Any) -> tuple[int, int]:
    """
    Pages the destination holds: from the placer's received table when it
    keeps one (one byte per host page, nonzero once received), else from
    its RAMBlocks' received bitmaps (QEMU's C{receivedmap}).

    @param incoming: an L{twisted_postcopy.destination.incoming.IncomingMigration}.
    @return: (host pages received, bytes they cover).
    """
    placer = getattr(incoming, "placer", None)
    received = getattr(placer, "received", None)
    pages = size = 0
    if received is not None:
        for idstr, bits in list(received.items()):
            count = len(bits) - bits.count(0)
            pages += count
            size += count * placer.blocks[idstr].pageSize
        return pages, size
    blocks = getattr(placer, "blocks", None) or getattr(getattr(incoming, "faults", None), "blocks", None) or {}
    for block in list(blocks.values()):
        receivedMap = getattr(block, "receivedMap", None)
        if receivedMap is not None:
            count = receivedMap.count()
            pages += count
            size += count * block.pageSize
    return pages, size


def _destinationRequests(incoming: Any) -> int:
    """
    @param incoming: the incoming migration.
    @return: page requests sent to the source so far.
    """
    pending = getattr(getattr(incoming, "faults", None), "pending", None)
    count = getattr(pending, "requestCount", None)
    if count is None:
        count = getattr(incoming, "pageRequests", 0)
    return int(count or 0)


def readCounters(manager: Any, urgentReceived: int = 0) -> dict[str, Any]:
    """
    The current counters of a manager's migration.

    @param manager: a L{twisted_postcopy.manager.MigrationManager}.
    @param urgentReceived: pages placed that a guest thread waited for (the
        timeline counts them from the fault service's observer).
    @return: C{status} (QEMU's name), C{role} (C{source}, C{destination}
        or C{none}), C{pages} and C{bytes} (direction -> kind -> count),
        C{transferred} (wire bytes written: C{total}, C{precopy},
        C{downtime}, C{postcopy}), C{postcopy-requests}, C{blocktime-ms}
        and C{vcpu-blocktime-ms} (L{None}/[] without the
        C{postcopy-blocktime} capability) and C{vcpu-threads}.
    """
    status = manager.status.value
    answer: dict[str, Any] = {
        "status": status, "role": "none", "pages": {}, "bytes": {}, "transferred": {},
        "postcopy-requests": 0, "blocktime-ms": None, "vcpu-blocktime-ms": [], "vcpu-threads": [],
    }
    outgoing, incoming = manager.outgoing, manager.incoming
    if outgoing is not None:
        stats = outgoing.stats
        urgent = getattr(stats, "urgent", 0)
        answer["role"] = "source"
        answer["pages"]["sent"] = {"normal": stats.normal, "zero": stats.duplicate, "urgent": urgent}
        answer["bytes"]["sent"] = {"normal": stats.normal * TARGET_PAGE,
                                   "zero": stats.duplicate * TARGET_PAGE,
                                   "urgent": urgent * TARGET_PAGE}
        answer["transferred"] = {"total": stats.transferred, "precopy": stats.precopyBytes,
                                 "downtime": stats.downtimeBytes, "postcopy": stats.postcopyBytes}
        answer["postcopy-requests"] = stats.postcopyRequests
    elif incoming is not None:
        pages, size = _receivedPages(incoming)
        answer["role"] = "destination"
        answer["pages"]["received"] = {"all": pages, "urgent": urgentReceived}
        answer["bytes"]["received"] = {"all": size, "urgent": urgentReceived * TARGET_PAGE}
        answer["postcopy-requests"] = _destinationRequests(incoming)
    blocktime = manager.blocktime
    if blocktime is not None and incoming is not None and outgoing is None:
        answer["blocktime-ms"] = blocktime.total
        answer["vcpu-blocktime-ms"] = list(blocktime.vcpuTotal)
        answer["vcpu-threads"] = list(blocktime.vcpuThreads)[:len(blocktime.vcpuTotal)]
    return answer


def movedBytes(counters: dict[str, Any]) -> int:
    """
    The byte count a throughput is measured on: wire bytes written by a
    source, RAM bytes received by a destination.

    @param counters: a L{readCounters} answer.
    @return: the bytes.
    """
    if counters["role"] == "source":
        return counters["transferred"]["total"]
    if counters["role"] == "destination":
        return counters["bytes"]["received"]["all"]
    return 0

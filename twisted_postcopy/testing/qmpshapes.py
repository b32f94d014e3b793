"""
One QMP session, the same against QEMU 7.2 and against a twisted-postcopy
daemon's C{--qmp} socket, reduced to the shapes (keys and JSON types) of
what came back, so a test can compare the two::

    python3 -m twisted_postcopy.testing.qmpshapes /path/to/qmp.sock

It uses the C{qemu.qmp} client library (C{QMPClient}, the asyncio one tools
are written against) and prints one JSON object: for each probe, the shape
of the reply (or C{{"error": {"class": ..., "desc": ...}}} verbatim, since
error texts are meant to be QEMU's), the greeting's shape, the C{MIGRATION}
events of a migration to a refused port, and a few values (the names of
C{query-commands}, the capability names) for subset checks.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

#: The port C{migrate} is pointed at: nothing listens there, so the
#: migration fails at connect on both sides.
REFUSED_URI = "tcp:127.0.0.1:1"


def shape(value: Any) -> Any:
    """
    The shape of a JSON value: objects keep their keys with the shapes of
    their values, arrays the union of their elements' shapes, scalars
    become their JSON type name.

    @param value: the value.
    @return: its shape.
    """
    if isinstance(value, dict):
        return {key: shape(each) for key, each in sorted(value.items())}
    if isinstance(value, list):
        shapes: list[Any] = []
        for each in value:
            if shape(each) not in shapes:
                shapes.append(shape(each))
        return shapes
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "null"


async def _call(client: Any, name: str, arguments: dict[str, Any] | None = None,
                oob: bool = False) -> Any:
    """
    Run one command.

    @param client: a connected C{QMPClient}.
    @param name: the command.
    @param arguments: its arguments.
    @param oob: send it with C{exec-oob}.
    @return: C{{"return": shape}} or C{{"error": {class, desc}}}.
    """
    from qemu.qmp import ExecuteError

    try:
        return {"return": shape(await client.execute(name, arguments, oob=oob))}
    except ExecuteError as e:
        return {"error": {"class": e.error_class, "desc": str(e)}}


async def session(path: str, timeout: float = 60.0) -> dict[str, Any]:
    """
    Run the probes.

    @param path: the QMP Unix socket.
    @param timeout: seconds allowed for the failed migration's events.
    @return: the shapes and values.
    """
    from qemu.qmp import ExecuteError, QMPClient

    result: dict[str, Any] = {}
    raw = QMPClient("shapes")
    raw.await_greeting = True
    raw.negotiate = False
    await raw.connect(path)
    result["greeting"] = shape(dict(raw.greeting._raw))
    try:
        await raw.execute("query-status")
    except ExecuteError as e:
        result["before-negotiation"] = {"class": e.error_class, "desc": str(e)}
    await raw.disconnect()

    client = QMPClient("shapes")
    await client.connect(path)
    for name in ("query-version", "query-status", "query-migrate",
                 "query-migrate-capabilities", "query-migrate-parameters", "query-commands"):
        result[name] = await _call(client, name)
    result["values"] = {
        "commands": sorted(each["name"] for each in await client.execute("query-commands")),
        "capabilities": [each["capability"]
                         for each in await client.execute("query-migrate-capabilities")],
        "parameters": await client.execute("query-migrate-parameters"),
    }
    probes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("unknown-command", "no-such-command", None),
        ("missing-argument", "migrate", {}),
        ("argument-type", "migrate", {"uri": 5}),
        ("unexpected-argument", "migrate", {"uri": REFUSED_URI, "bogus": 1}),
        ("unknown-capability", "migrate-set-capabilities",
         {"capabilities": [{"capability": "nope", "state": True}]}),
        ("capability-state-type", "migrate-set-capabilities",
         {"capabilities": [{"capability": "events", "state": "yes"}]}),
        ("unknown-parameter", "migrate-set-parameters", {"nope": 1}),
        ("downtime-out-of-range", "migrate-set-parameters", {"downtime-limit": 2000001}),
        ("preempt-without-postcopy", "migrate-set-capabilities",
         {"capabilities": [{"capability": "postcopy-preempt", "state": True}]}),
        ("start-postcopy-without-capability", "migrate-start-postcopy", None),
        ("pause-not-postcopy", "migrate-pause", None),
        ("recover-not-paused", "migrate-recover", {"uri": "tcp:127.0.0.1:0"}),
        ("negotiate-again", "qmp_capabilities", None),
        ("cancel-idle", "migrate_cancel", None),
    ]
    for label, name, arguments in probes:
        result[label] = await _call(client, name, arguments)
    result["pause-out-of-band"] = await _call(client, "migrate-pause", oob=True)
    result["status-out-of-band"] = await _call(client, "query-status", oob=True)

    await client.execute("migrate-set-capabilities",
                         {"capabilities": [{"capability": "events", "state": True}]})
    events: list[dict[str, Any]] = []
    with client.listener() as listener:
        result["migrate"] = await _call(client, "migrate", {"uri": REFUSED_URI})

        async def collect() -> None:
            async for event in listener:
                events.append(dict(event))
                if event["event"] == "MIGRATION" and event["data"]["status"] == "failed":
                    return

        await asyncio.wait_for(collect(), timeout)
    result["events"] = [shape(event) for event in events]
    result["event-statuses"] = [event["data"].get("status") for event in events]
    result["query-migrate-failed"] = await _call(client, "query-migrate")
    await client.disconnect()
    return result


def main(argv: list[str]) -> int:
    """
    Print the session's shapes as one JSON object.

    @param argv: C{[SOCKET]}.
    @return: 0.
    """
    print(json.dumps(asyncio.run(session(argv[0])), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

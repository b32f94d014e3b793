"""
One QMP session, the same against QEMU 7.2 and against a twisted-postcopy
daemon's C{--qmp} socket, reduced to the shapes (keys and JSON types) of
what came back, so a test can compare the two::

    python3 -m twisted_postcopy.testing.qmpshapes /path/to/qmp.sock
    python3 -m twisted_postcopy.testing.qmpshapes --migrate SRC.sock DST.sock tcp:127.0.0.1:0

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


#: Members of QAPI type C{number} (a C double) in what these tests
#: compare: QEMU prints a whole double without a fraction (C{%.17g}: 0, 268),
#: so JSON reads it as an integer; their shape is C{number} either way.
QAPI_NUMBERS = frozenset({"mbps"})


def shape(value: Any) -> Any:
    """
    The shape of a JSON value: objects keep their keys with the shapes of
    their values, arrays the union of their elements' shapes, scalars
    become their JSON type name (members named in L{QAPI_NUMBERS} are
    C{number} whenever they hold a JSON number).

    @param value: the value.
    @return: its shape.
    """
    if isinstance(value, dict):
        return {key: "number" if key in QAPI_NUMBERS and isinstance(each, (int, float))
                and not isinstance(each, bool) else shape(each)
                for key, each in sorted(value.items())}
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


async def migration(sourcePath: str, destinationPath: str, uri: str = "tcp:127.0.0.1:0",
                    timeout: float = 120.0) -> dict[str, Any]:
    """
    One postcopy migration driven over QMP, as a QEMU user drives it:
    C{postcopy-ram} and C{events} on both sides (and
    C{postcopy-blocktime} on the destination), C{migrate-incoming},
    C{max-bandwidth} 4 MiB/s so that precopy cannot finish first,
    C{migrate}, C{migrate-start-postcopy} at once, then both sides'
    C{MIGRATION} events until C{completed} or C{failed}.

    @param sourcePath: the source's QMP socket.
    @param destinationPath: the destination's QMP socket.
    @param uri: where the destination listens (port 0: a free port,
        which the source learns from the destination's C{query-migrate}
        C{socket-address}, as with QEMU).
    @param timeout: seconds allowed for the migration.
    @return: per side (C{source}, C{destination}): C{statuses} (from the
        events), C{passes} (how many C{MIGRATION_PASS} events), and
        C{query-migrate} (its shape at the end); C{listening}: the shape of
        the destination's C{query-migrate} while it listens.
    """
    from qemu.qmp import QMPClient

    clients = {"source": QMPClient("source"), "destination": QMPClient("destination")}
    await clients["source"].connect(sourcePath)
    await clients["destination"].connect(destinationPath)
    result: dict[str, Any] = {side: {"statuses": [], "passes": 0} for side in clients}
    capabilities = {"source": ["postcopy-ram", "events"],
                    "destination": ["postcopy-ram", "events", "postcopy-blocktime"]}
    for side, client in clients.items():
        await client.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": name, "state": True} for name in capabilities[side]]})

    async def follow(side: str, listener: Any) -> None:
        async for event in listener:
            if event["event"] == "MIGRATION_PASS":
                result[side]["passes"] += 1
            elif event["event"] == "MIGRATION":
                result[side]["statuses"].append(event["data"]["status"])
                if event["data"]["status"] in ("completed", "failed"):
                    return

    with clients["source"].listener() as sourceEvents, \
            clients["destination"].listener() as destinationEvents:
        await clients["destination"].execute("migrate-incoming", {"uri": uri})
        listening = await clients["destination"].execute("query-migrate")
        result["listening"] = shape(listening)
        address = listening["socket-address"][0]
        target = f"tcp:{address['host']}:{address['port']}"
        await clients["source"].execute("migrate-set-parameters", {"max-bandwidth": 4 << 20})
        await clients["source"].execute("migrate", {"uri": target})
        await clients["source"].execute("migrate-start-postcopy")
        await asyncio.wait_for(asyncio.gather(follow("source", sourceEvents),
                                              follow("destination", destinationEvents)), timeout)
    for side, client in clients.items():
        result[side]["query-migrate"] = shape(await _settled(client))
        await client.disconnect()
    return result


async def _settled(client: Any, timeout: float = 5.0) -> Any:
    """
    C{query-migrate} once the migration's incoming state is gone.  QEMU
    7.2's destination completes a postcopy migration from its listen
    thread and only then frees the incoming state, so for a moment a
    completed answer still carries the C{socket-address} of the listener.

    @param client: a connected C{QMPClient}.
    @param timeout: seconds to wait for C{socket-address} to go.
    @return: the last answer.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    answer = await client.execute("query-migrate")
    while "socket-address" in answer and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        answer = await client.execute("query-migrate")
    return answer


def main(argv: list[str]) -> int:
    """
    Print the session's shapes as one JSON object: C{SOCKET} runs
    L{session}, C{--migrate SOURCE DESTINATION URI} runs L{migration}.

    @param argv: the arguments.
    @return: 0.
    """
    if argv[0] == "--migrate":
        result = asyncio.run(migration(*argv[1:4]))
    else:
        result = asyncio.run(session(argv[0]))
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

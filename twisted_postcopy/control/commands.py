# -*- test-case-name: tests.test_control_commands -*-
"""
The AMP commands of the control API.

Each command mirrors one QMP command of QEMU 7.2 (named in its docstring);
arguments and results carry QEMU's names.  Structured results (parameters,
C{query-migrate}) travel as JSON text, which stays far below AMP's 64 KiB
value limit.  Every command declares the same L{MIGRATION_ERRORS} map, so a
L{twisted_postcopy.errors.MigrationError} raised by the manager arrives
typed, with QEMU's text, at the caller.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols.amp import (
    AmpList, Argument, Boolean, Command, Integer, ListOf, String, Unicode,
)

from twisted_postcopy.errors import (
    GuestError,
    IllegalTransitionError,
    MigrationCancelled,
    MigrationError,
    MigrationFailed,
    PostcopyError,
    PostcopyPaused,
    SnapshotBusyError,
    SnapshotError,
    SnapshotReadTooLargeError,
    UffdUnavailableError,
)

#: Errors that cross the control API typed.  AMP picks the first class that
#: matches, so subclasses come before their bases.
MIGRATION_ERRORS: dict[type[Exception], bytes] = {
    IllegalTransitionError: b"ILLEGAL_TRANSITION",
    MigrationFailed: b"MIGRATION_FAILED",
    MigrationCancelled: b"MIGRATION_CANCELLED",
    PostcopyPaused: b"POSTCOPY_PAUSED",
    MigrationError: b"MIGRATION_ERROR",
    UffdUnavailableError: b"UFFD_UNAVAILABLE",
    GuestError: b"GUEST_ERROR",
    PostcopyError: b"POSTCOPY_ERROR",
}

#: The errors of the C{snapshot-*} commands: the snapshot errors first
#: (subclasses before L{SnapshotError}), then L{MIGRATION_ERRORS}.
SNAPSHOT_ERRORS: dict[type[Exception], bytes] = {
    SnapshotBusyError: b"SNAPSHOT_BUSY",
    SnapshotReadTooLargeError: b"SNAPSHOT_READ_TOO_LARGE",
    SnapshotError: b"SNAPSHOT_ERROR",
    **MIGRATION_ERRORS,
}


class JSON(Argument):
    """
    An AMP argument holding any JSON-serialisable value.
    """

    def toString(self, inObject: Any) -> bytes:
        """
        Encode a value as compact JSON.

        @param inObject: the value.
        @return: UTF-8 JSON text.
        """
        return json.dumps(inObject, separators=(",", ":")).encode("utf-8")

    def fromString(self, inString: bytes) -> Any:
        """
        Decode JSON text.

        @param inString: UTF-8 JSON text.
        @return: the value.
        """
        return json.loads(inString.decode("utf-8"))


def _capabilityList() -> AmpList:
    """
    The QMP shape of a capability list: C{[{capability, state}, ...]}.

    @return: an L{AmpList} argument.
    """
    return AmpList([(b"capability", Unicode()), (b"state", Boolean())])


class SetCapabilities(Command):
    """
    C{migrate-set-capabilities}: switch migration capabilities on or off.
    """

    arguments = [(b"capabilities", _capabilityList())]
    response: list = []
    errors = MIGRATION_ERRORS


class QueryCapabilities(Command):
    """
    C{query-migrate-capabilities}: every capability and its state.
    """

    arguments: list = []
    response = [(b"capabilities", _capabilityList())]
    errors = MIGRATION_ERRORS


class SetParameters(Command):
    """
    C{migrate-set-parameters}: set migration parameters, given as a JSON
    object of QEMU parameter names (C{max-bandwidth}, C{downtime-limit}...).
    """

    arguments = [(b"parameters", JSON())]
    response: list = []
    errors = MIGRATION_ERRORS


class QueryParameters(Command):
    """
    C{query-migrate-parameters}: every parameter and its value.
    """

    arguments: list = []
    response = [(b"parameters", JSON())]
    errors = MIGRATION_ERRORS


class Migrate(Command):
    """
    C{migrate}: start an outgoing migration to C{uri} (C{tcp:HOST:PORT} or
    C{unix:PATH}); with C{resume}, resume a paused postcopy migration.
    """

    arguments = [(b"uri", Unicode()), (b"resume", Boolean(optional=True))]
    response: list = []
    errors = MIGRATION_ERRORS


class MigrateIncoming(Command):
    """
    C{migrate-incoming}: listen for an incoming migration on C{uri}.
    """

    arguments = [(b"uri", Unicode())]
    response: list = []
    errors = MIGRATION_ERRORS


class MigrateRecover(Command):
    """
    C{migrate-recover}: listen on C{uri} for the source of a paused postcopy
    migration to reconnect (destination side).
    """

    arguments = [(b"uri", Unicode())]
    response: list = []
    errors = MIGRATION_ERRORS


class MigratePause(Command):
    """
    C{migrate-pause}: force a postcopy migration into C{postcopy-paused}.
    """

    arguments: list = []
    response: list = []
    errors = MIGRATION_ERRORS


class StartPostcopy(Command):
    """
    C{migrate-start-postcopy}: switch a running precopy migration to
    postcopy.
    """

    arguments: list = []
    response: list = []
    errors = MIGRATION_ERRORS


class CancelMigration(Command):
    """
    C{migrate-cancel}: cancel the outgoing migration.
    """

    arguments: list = []
    response: list = []
    errors = MIGRATION_ERRORS


class QueryMigrate(Command):
    """
    C{query-migrate}: the migration's status and statistics, as the JSON
    object QMP returns (C{status}, C{total-time}, C{ram}, ...).
    """

    arguments: list = []
    response = [(b"info", JSON())]
    errors = MIGRATION_ERRORS


class QueryGuest(Command):
    """
    C{query-guest} (a twisted-postcopy extension, no QMP equivalent): the
    built-in guest's state as a JSON object: C{name}, C{ram}, C{running},
    and on a destination after migration C{verified} (every page checked
    against what the source guest wrote).
    """

    arguments: list = []
    response = [(b"info", JSON())]
    errors = MIGRATION_ERRORS


class Subscribe(Command):
    """
    Ask for events: from now on the server calls L{MigrationEvent} on this
    connection for every QMP event (C{MIGRATION}, ...).  QMP sends events
    to every monitor; AMP clients opt in.
    """

    arguments: list = []
    response: list = []
    errors = MIGRATION_ERRORS


class MigrationEvent(Command):
    """
    Server to client: a QMP event, such as C{MIGRATION} with data
    C{{"status": "postcopy-active"}}.  No answer is expected.
    """

    arguments = [(b"event", Unicode()), (b"data", JSON())]
    response: list = []
    errors = MIGRATION_ERRORS
    requiresAnswer = False


class SnapshotCapture(Command):
    """
    C{snapshot-capture} (ours): listen on C{uri} for one incoming QEMU
    migration (as QEMU's C{migrate-incoming} does) and store it as a
    snapshot in C{dir}.  Answers with the URI listened on (the real port
    when C{uri} asked for port 0) once listening; progress with
    L{QuerySnapshot}.  With C{qmp} (the QEMU source's QMP socket path), a
    paused capture resumes QEMU through it.
    """

    arguments = [(b"uri", Unicode()), (b"dir", Unicode()), (b"postcopy", Boolean(optional=True)),
                 (b"machine", Unicode(optional=True)), (b"qmp", Unicode(optional=True)),
                 # docs/tls.md: server credentials and authz of the daemon's objects
                 (b"tls-creds", Unicode(optional=True)), (b"tls-authz", Unicode(optional=True))]
    response = [(b"uri", Unicode())]
    errors = SNAPSHOT_ERRORS


class SnapshotRestore(Command):
    """
    C{snapshot-restore} (ours): migrate the snapshot in C{dir} to every
    destination in C{uris} at once (clones), by postcopy unless
    C{postcopy} is false, each limited to C{max-bandwidth} bytes/s (0:
    unlimited).  Answers once the hashes are checked (unless C{verify} is
    false) and every connection is started; progress with
    L{QuerySnapshot}.  With C{qmp} (one QMP socket path per destination,
    C{""} for none), a paused clone's QEMU is recovered through it.  With
    C{postcopy-preempt}, requested pages go on a preempt channel (each
    destination needs the capability too); C{parameters} (a JSON object)
    are more migration parameters for every destination, checked as by
    C{migrate-set-parameters} before anything starts (the C{x-} ones of
    docs/prefetch.md, for one).
    """

    arguments = [(b"dir", Unicode()), (b"uris", ListOf(Unicode())),
                 (b"postcopy", Boolean(optional=True)), (b"max-bandwidth", Integer(optional=True)),
                 (b"verify", Boolean(optional=True)), (b"qmp", ListOf(Unicode(), optional=True)),
                 (b"postcopy-preempt", Boolean(optional=True)), (b"parameters", JSON(optional=True)),
                 # docs/tls.md: client credentials of the daemon's objects
                 (b"tls-creds", Unicode(optional=True)), (b"tls-hostname", Unicode(optional=True))]
    response: list = []
    errors = SNAPSHOT_ERRORS


class SnapshotVerify(Command):
    """
    C{snapshot-verify} (ours): check every file's size and sha256; answers
    with the snapshot's info, or a C{SNAPSHOT_ERROR} naming the first bad
    file.
    """

    arguments = [(b"dir", Unicode())]
    response = [(b"info", JSON())]
    errors = SNAPSHOT_ERRORS


class SnapshotInfo(Command):
    """
    C{snapshot-info} (ours): the snapshot's machine, device state and
    blocks, as a JSON object.
    """

    arguments = [(b"dir", Unicode())]
    response = [(b"info", JSON())]
    errors = SNAPSHOT_ERRORS


class SnapshotRead(Command):
    """
    C{snapshot-read} (ours): C{length} bytes of RAM block C{block} at
    C{offset}, from the snapshot in C{dir}, or from the capture in
    progress when C{dir} is its directory or empty (in postcopy, pages not
    yet received are first requested from the source).  At most
    L{twisted_postcopy.snapshot.jobs.MAX_READ} bytes per call.
    """

    arguments = [(b"dir", Unicode()), (b"block", Unicode()), (b"offset", Integer()),
                 (b"length", Integer())]
    response = [(b"data", String())]
    errors = SNAPSHOT_ERRORS


class QuerySnapshot(Command):
    """
    C{query-snapshot} (ours): the daemon's capture and restores as a JSON
    object (C{capture}, C{restores}), see C{docs/amp-api.md}.
    """

    arguments: list = []
    response = [(b"info", JSON())]
    errors = SNAPSHOT_ERRORS


class ChunkedJSON(Argument):
    """
    A JSON value that may exceed AMP's 64 KiB value limit: its text is
    split over keys C{NAME.0}, C{NAME.1}, ... of at most
    L{ChunkedJSON.CHUNK} bytes, and C{NAME} holds the chunk count (at most
    L{ChunkedJSON.MAX_CHUNKS}).
    """

    #: Bytes per chunk (below AMP's 65535-byte value limit).
    CHUNK = 60000
    #: Chunks accepted from a peer (so 3.6 MB of JSON at most).
    MAX_CHUNKS = 60

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        """
        Encode the value into chunks.

        @param name: the argument's wire name.
        @param strings: the box being built.
        @param objects: the Python values by identifier.
        @param proto: the protocol.
        """
        value = self.retrieve(objects, name.decode("ascii").replace("-", "_"), proto)
        text = json.dumps(value, separators=(",", ":")).encode("utf-8")
        chunks = [text[i:i + self.CHUNK] for i in range(0, len(text), self.CHUNK)]
        strings[name] = str(len(chunks)).encode("ascii")
        for index, chunk in enumerate(chunks):
            strings[name + b".%d" % (index,)] = chunk

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        """
        Join and decode the chunks.

        @param name: the argument's wire name.
        @param strings: the received box.
        @param objects: where the decoded value goes.
        @param proto: the protocol.
        @raise ValueError: a bad or too large chunk count, or a chunk missing.
        """
        count = int(strings[name])
        if not 0 < count <= self.MAX_CHUNKS:
            raise ValueError(f"{name.decode()}: {count} chunks (at most {self.MAX_CHUNKS})")
        text = b"".join(strings[name + b".%d" % (index,)] for index in range(count))
        objects[name.decode("ascii").replace("-", "_")] = json.loads(text.decode("utf-8"))


class QueryMigrateTimeline(Command):
    """
    C{x-query-migrate-timeline} (ours, experimental as the C{x-} says): the
    bounded timeline of the daemon's current or latest migration
    (throughput per window, request latencies, blocktime per vCPU, status
    changes), shaped as C{docs/observability.md} describes.
    """

    commandName = b"x-query-migrate-timeline"
    arguments: list = []
    response = [(b"timeline", ChunkedJSON())]
    errors = MIGRATION_ERRORS


class ObjectAdd(Command):
    """
    C{object-add}: create a C{tls-creds-x509} object (C{dir},
    C{endpoint}, C{verify-peer}) or an C{authz-simple} one (C{identity});
    see docs/tls.md.  The properties travel as one JSON object.
    """

    arguments = [(b"qom-type", Unicode()), (b"id", Unicode()), (b"props", JSON(optional=True))]
    response: list = []
    errors = MIGRATION_ERRORS


class ObjectDel(Command):
    """
    C{object-del}: remove an object created by C{object-add}.
    """

    arguments = [(b"id", Unicode())]
    response: list = []
    errors = MIGRATION_ERRORS


class QueryObjects(Command):
    """
    C{query-objects} (ours: with each object's properties, as a JSON list
    of C{{qom-type, id, ...}}).
    """

    arguments: list = []
    response = [(b"objects", JSON())]
    errors = MIGRATION_ERRORS

# -*- test-case-name: tests.test_control_qmp -*-
"""
A QMP endpoint: the QEMU Machine Protocol as QEMU 7.2 speaks it, so that a
tool written for QEMU (the C{qemu.qmp} library, C{qmp-shell}, a libvirt-like
driver) drives a twisted-postcopy daemon unchanged.  See C{docs/qmp.md}.

The greeting, C{qmp_capabilities} negotiation, C{execute}/C{exec-oob}
requests, C{return}/C{error} replies and C{MIGRATION}/C{MIGRATION_PASS}
events follow QEMU 7.2, error texts included.  Commands hold no logic:
each calls the same L{twisted_postcopy.manager.MigrationManager} method
the AMP responder of L{twisted_postcopy.control.server} calls.

Input is bounded: one JSON value is at most L{MAX_INPUT_SIZE} bytes and
L{MAX_NESTING} levels deep (a longer or deeper one is answered with
QEMU's limit error and discarded to its end, in linear time); at most
L{MAX_QUEUED} in-band commands wait behind the running one before the
connection stops being read; a client that does not read its replies
stops being read too.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any, Callable

from attrs import define, field
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.python.failure import Failure
from zope.interface import implementer

import twisted_postcopy
from twisted_postcopy.control.server import capabilitiesFromList
from twisted_postcopy.errors import MigrationError, PostcopyError

#: The QEMU release whose QMP dialect and migration stream this speaks.
QEMU_VERSION = {"micro": 0, "minor": 2, "major": 7}
#: What C{query-version} and the greeting give as the package.
PACKAGE = f"twisted-postcopy {twisted_postcopy.__version__}"
#: The QMP capabilities offered: out-of-band execution is implemented
#: (C{migrate-pause} and C{migrate-recover} run at once, past a queue of
#: in-band commands), as in QEMU 7.2.
OFFERED_CAPABILITIES = ("oob",)

#: Largest JSON value accepted, in bytes (QEMU: 64 MiB per token stream).
MAX_INPUT_SIZE = 1 << 20
#: Deepest nesting of objects and arrays (QEMU: 1024).
MAX_NESTING = 64
#: In-band commands that may wait behind the running one before the
#: connection stops being read (QEMU's C{QMP_REQ_QUEUE_LEN_MAX}).
MAX_QUEUED = 8

_NEGOTIATE = "Expecting capabilities negotiation with 'qmp_capabilities'"
_BLANK = re.compile(rb"[^ \t\r\n]")
_CONTAINER = re.compile(rb'["{}\[\]]')
_STRING = re.compile(rb'["\\]')
_SCALAR_END = re.compile(rb'[ \t\r\n"{}\[\],:]')


class QMPError(PostcopyError):
    """
    A QMP error reply: C{{"error": {"class": errorClass, "desc": desc}}}.

    @ivar errorClass: QEMU's error class (C{GenericError},
        C{CommandNotFound}).
    """

    def __init__(self, desc: str, errorClass: str = "GenericError") -> None:
        """
        @param desc: the description (QEMU's text).
        @param errorClass: the class.
        """
        super().__init__(desc)
        self.errorClass = errorClass


def _parseError(text: bytes) -> str | None:
    """
    Check that a complete JSON value parses.

    @param text: the value.
    @return: QEMU's C{JSON parse error, ...} text, or L{None} if it parses.
    """
    try:
        json.loads(text, parse_constant=_noConstant)
    except UnicodeDecodeError:
        return "JSON parse error, invalid UTF-8 sequence in string"
    except ValueError as e:
        message = getattr(e, "msg", str(e))
        return f"JSON parse error, {message[:1].lower()}{message[1:]}"
    return None


def _noConstant(name: str) -> Any:
    """
    Refuse C{NaN} and C{Infinity}, as QEMU's parser does.

    @param name: the constant.
    @raise ValueError: always.
    """
    raise ValueError(f"invalid keyword '{name}'")


@define
class JSONSplitter:
    """
    Splits a byte stream into JSON values (sans-IO, incremental over any
    chunking, linear in the input): what QEMU's JSON streamer does for a
    monitor.

    L{feed} returns C{("value", bytes)} for each complete value and
    C{("error", desc)} for input that cannot be one: a value over
    C{maxSize} bytes or C{maxNesting} levels (the rest of it is then
    discarded), a stray closing bracket.

    @ivar maxSize: the largest value, in bytes.
    @ivar maxNesting: the deepest nesting.
    """

    maxSize: int = MAX_INPUT_SIZE
    maxNesting: int = MAX_NESTING
    _value: bytearray | None = field(default=None, init=False)
    _size: int = field(default=0, init=False)
    _depth: int = field(default=0, init=False)
    _inString: bool = field(default=False, init=False)
    _escape: bool = field(default=False, init=False)
    _scalar: bool = field(default=False, init=False)
    _discarding: bool = field(default=False, init=False)

    def feed(self, data: bytes) -> list[tuple[str, Any]]:
        """
        Consume bytes.

        @param data: the next bytes of the stream.
        @return: the values and errors they completed, in order.
        """
        out: list[tuple[str, Any]] = []
        position, end = 0, len(data)
        while position < end:
            if self._value is None and not self._discarding:
                position = self._start(data, position, out)
            elif self._scalar:
                match = _SCALAR_END.search(data, position)
                stop = match.start() if match else end
                self._keep(data, position, stop, out)
                position = stop
                if match:
                    self._finish(out)
            elif self._inString:
                position = self._string(data, position, out)
            else:
                match = _CONTAINER.search(data, position)
                if match is None:
                    self._keep(data, position, end, out)
                    break
                stop = match.end()
                self._keep(data, position, stop, out)
                position = stop
                self._structural(data[stop - 1:stop], out)
        return out

    def _start(self, data: bytes, position: int, out: list[tuple[str, Any]]) -> int:
        """
        Between values: skip blanks and begin the next value.

        @param data: the chunk.
        @param position: where to look.
        @param out: where errors go.
        @return: the position after what was consumed.
        """
        match = _BLANK.search(data, position)
        if match is None:
            return len(data)
        position = match.start()
        char = data[position:position + 1]
        if char in (b"]", b"}", b",", b":"):
            out.append(("error", "JSON parse error, expecting value"))
            return position + 1
        self._value, self._size = bytearray(), 0
        if char in (b"{", b"["):
            self._keep(data, position, position + 1, out)
            self._structural(char, out)
            return position + 1
        if char == b'"':
            self._keep(data, position, position + 1, out)
            self._inString = True
            return position + 1
        self._scalar = True
        return position

    def _string(self, data: bytes, position: int, out: list[tuple[str, Any]]) -> int:
        """
        Inside a string: find its end, minding escapes.

        @param data: the chunk.
        @param position: where to look.
        @param out: where values and errors go.
        @return: the position after what was consumed.
        """
        if self._escape:
            self._escape = False
            self._keep(data, position, position + 1, out)
            return position + 1
        match = _STRING.search(data, position)
        if match is None:
            self._keep(data, position, len(data), out)
            return len(data)
        stop = match.end()
        self._keep(data, position, stop, out)
        if data[stop - 1:stop] == b"\\":
            self._escape = True
        else:
            self._inString = False
            if self._depth == 0:
                self._finish(out)
        return stop

    def _structural(self, char: bytes, out: list[tuple[str, Any]]) -> None:
        """
        A bracket or quote inside a container.

        @param char: the character.
        @param out: where values and errors go.
        """
        if char == b'"':
            self._inString = True
        elif char in (b"{", b"["):
            self._depth += 1
            if self._depth > self.maxNesting and not self._discarding:
                self._discard("JSON nesting depth limit exceeded", out)
        else:
            self._depth -= 1
            if self._depth == 0:
                self._finish(out)

    def _keep(self, data: bytes, start: int, stop: int, out: list[tuple[str, Any]]) -> None:
        """
        Add bytes to the value in progress, unless it is being discarded.

        @param data: the chunk.
        @param start: the first byte.
        @param stop: after the last byte.
        @param out: where a size error goes.
        """
        if self._discarding:
            return
        self._size += stop - start
        if self._size > self.maxSize:
            self._discard("JSON token size limit exceeded", out)
            return
        self._value += data[start:stop]

    def _discard(self, desc: str, out: list[tuple[str, Any]]) -> None:
        """
        Give up on the value in progress: report, then drop the rest of it.

        @param desc: the error.
        @param out: where the error goes.
        """
        out.append(("error", f"{desc} (limits: {self.maxSize} bytes, "
                             f"{self.maxNesting} levels)"))
        self._value, self._discarding = None, True

    def _finish(self, out: list[tuple[str, Any]]) -> None:
        """
        The value in progress ended.

        @param out: where it goes (unless discarded).
        """
        if not self._discarding:
            out.append(("value", bytes(self._value or b"")))
        self._value, self._size, self._depth = None, 0, 0
        self._scalar = self._inString = self._escape = self._discarding = False


@define(frozen=True)
class Arguments:
    """
    The arguments schema of one QMP command, checked the way QEMU's
    input visitor checks them (its error texts).

    @ivar required: name -> JSON type name (C{string}, C{boolean},
        C{integer}, C{array}, C{object}).
    @ivar optional: the same for optional members.
    @ivar open: members not named are left to the command (as
        C{migrate-set-parameters} does with the manager's parameters).
    """

    required: dict[str, str] = field(factory=dict)
    optional: dict[str, str] = field(factory=dict)
    open: bool = False

    def check(self, arguments: dict[str, Any], prefix: str = "") -> None:
        """
        @param arguments: the C{arguments} member.
        @param prefix: prefix of member names in errors (C{capabilities[0].}).
        @raise QMPError: a member is missing, unexpected or of the wrong type.
        """
        for name in self.required:
            if name not in arguments:
                raise QMPError(f"Parameter '{prefix}{name}' is missing")
        for name, value in arguments.items():
            kind = self.required.get(name) or self.optional.get(name)
            if kind is None:
                if self.open:
                    continue
                raise QMPError(f"Parameter '{prefix}{name}' is unexpected")
            if not _isType(value, kind):
                raise QMPError(f"Invalid parameter type for '{prefix}{name}', expected: {kind}")


def _isType(value: Any, kind: str) -> bool:
    """
    @param value: a JSON value.
    @param kind: a QAPI JSON type name.
    @return: whether the value has that type.
    """
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "array": list,
                              "object": dict, "number": (int, float)}[kind])


@define(frozen=True)
class QMPCommand:
    """
    One QMP command.

    @ivar name: its QMP name.
    @ivar arguments: its schema.
    @ivar run: C{(protocol, arguments) -> result or Deferred}.
    @ivar allowOOB: whether C{exec-oob} may run it (QEMU's
        C{allow-oob}).
    """

    name: str
    arguments: Arguments
    run: Callable[[Any, dict[str, Any]], Any]
    allowOOB: bool = False


_CAPABILITY = Arguments({"capability": "string", "state": "boolean"})


def _setCapabilities(protocol: QMPProtocol, arguments: dict[str, Any]) -> Any:
    """
    C{migrate-set-capabilities}: each entry checked as QEMU does, then the
    manager's method.

    @param protocol: the connection.
    @param arguments: C{{"capabilities": [...]}}.
    @return: the manager's result.
    """
    entries = arguments["capabilities"]
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise QMPError(f"Invalid parameter type for 'capabilities[{index}]', expected: object")
        _CAPABILITY.check(entry, f"capabilities[{index}].")
    return protocol.manager.setCapabilities(capabilitiesFromList(entries))


def _setParameters(protocol: QMPProtocol, arguments: dict[str, Any]) -> Any:
    """
    C{migrate-set-parameters}: QEMU's flat arguments; integer parameters
    type-checked as QEMU's visitor does, names and ranges by the manager.

    @param protocol: the connection.
    @param arguments: parameter name -> value.
    @return: the manager's result.
    """
    from twisted_postcopy.manager import PARAMETERS

    Arguments(optional={name: "integer" for name in PARAMETERS}, open=True).check(arguments)
    return protocol.manager.setParameters(dict(arguments))


def _migrate(protocol: QMPProtocol, arguments: dict[str, Any]) -> Any:
    """
    C{migrate}: C{blk} and C{inc} (block migration) are refused; C{detach}
    is accepted and ignored, as by QEMU.

    @param protocol: the connection.
    @param arguments: C{uri}, C{resume}, ...
    @return: the manager's result.
    """
    if arguments.get("blk") or arguments.get("inc"):
        raise MigrationError("Block migration (blk, inc) is not supported by twisted-postcopy")
    return protocol.manager.migrate(arguments["uri"], resume=bool(arguments.get("resume")))


def _objectAdd(protocol: QMPProtocol, arguments: dict[str, Any]) -> Any:
    """
    C{object-add}: QEMU's flat arguments, C{qom-type}, C{id} and the
    type's properties (docs/tls.md: C{tls-creds-x509}, C{authz-simple}).

    @param protocol: the connection.
    @param arguments: the arguments.
    @return: the manager's result.
    """
    properties = {k: v for k, v in arguments.items() if k not in ("qom-type", "id")}
    return protocol.manager.objectAdd(arguments["qom-type"], arguments["id"], **properties)


def _queryGuest(protocol: QMPProtocol, arguments: dict[str, Any]) -> Any:
    """
    C{x-query-guest}: AMP's C{query-guest} (not a QEMU command, hence the
    C{x-} prefix QEMU gives its own extensions).

    @param protocol: the connection.
    @param arguments: none.
    @return: the guest's state.
    """
    if protocol.guest is None:
        raise MigrationError("This daemon runs no guest")
    return protocol.guest.query()


def _empty(result: Any) -> dict[str, Any]:
    """
    @param result: what a command without a QMP return value gave.
    @return: C{{}}, QMP's empty return.
    """
    return {}


def _commands() -> dict[str, QMPCommand]:
    """
    @return: the commands served after negotiation, by name.
    """
    none = Arguments()
    uri = Arguments({"uri": "string"})
    table = [
        QMPCommand("qmp_capabilities", Arguments(optional={"enable": "array"}),
                   lambda p, a: p.negotiate(a)),
        QMPCommand("query-migrate", none, lambda p, a: p.manager.queryMigrate()),
        QMPCommand("migrate", Arguments({"uri": "string"}, {
            "blk": "boolean", "inc": "boolean", "detach": "boolean", "resume": "boolean"}),
            lambda p, a: maybeDeferred(_migrate, p, a).addCallback(_empty)),
        QMPCommand("migrate-incoming", uri,
                   lambda p, a: maybeDeferred(p.manager.migrateIncoming, a["uri"]).addCallback(_empty)),
        QMPCommand("migrate-set-capabilities", Arguments({"capabilities": "array"}),
                   lambda p, a: maybeDeferred(_setCapabilities, p, a).addCallback(_empty)),
        QMPCommand("migrate-set-parameters", Arguments(open=True),
                   lambda p, a: maybeDeferred(_setParameters, p, a).addCallback(_empty)),
        QMPCommand("query-migrate-capabilities", none, lambda p, a: [
            {"capability": name, "state": bool(state)}
            for name, state in p.manager.queryCapabilities().items()]),
        QMPCommand("query-migrate-parameters", none, lambda p, a: p.manager.queryParameters()),
        QMPCommand("migrate-start-postcopy", none,
                   lambda p, a: maybeDeferred(p.manager.startPostcopy).addCallback(_empty)),
        QMPCommand("migrate-pause", none,
                   lambda p, a: maybeDeferred(p.manager.migratePause).addCallback(_empty),
                   allowOOB=True),
        QMPCommand("migrate-recover", uri,
                   lambda p, a: maybeDeferred(p.manager.migrateRecover, a["uri"]).addCallback(_empty),
                   allowOOB=True),
        QMPCommand("migrate_cancel", none,
                   lambda p, a: maybeDeferred(p.manager.cancel).addCallback(_empty)),
        QMPCommand("query-status", none, lambda p, a: p.manager.queryStatus()),
        QMPCommand("query-version", none,
                   lambda p, a: {"qemu": dict(QEMU_VERSION), "package": PACKAGE}),
        QMPCommand("query-commands", none,
                   lambda p, a: [{"name": name} for name in COMMANDS]),
        QMPCommand("x-query-guest", none, _queryGuest),
        QMPCommand("x-query-migrate-timeline", none, lambda p, a: p.manager.queryMigrateTimeline()),
        QMPCommand("object-add", Arguments({"qom-type": "string", "id": "string"}, open=True),
                   lambda p, a: maybeDeferred(_objectAdd, p, a).addCallback(_empty)),
        QMPCommand("object-del", Arguments({"id": "string"}),
                   lambda p, a: maybeDeferred(p.manager.objectDel, a["id"]).addCallback(_empty)),
    ]
    return {command.name: command for command in table}


#: The commands, by QMP name.
COMMANDS = _commands()


def greeting() -> dict[str, Any]:
    """
    @return: the greeting sent when a client connects.
    """
    return {"QMP": {"version": {"qemu": dict(QEMU_VERSION), "package": PACKAGE},
                    "capabilities": list(OFFERED_CAPABILITIES)}}


_NO_ID = object()


@define
class _Request:
    """
    A checked request waiting to run.

    @ivar command: what to run.
    @ivar arguments: its arguments.
    @ivar id: the request's C{id}, or C{_NO_ID}.
    """

    command: QMPCommand
    arguments: dict[str, Any]
    id: Any


@implementer(IPushProducer)
class QMPProtocol(Protocol):
    """
    One QMP monitor connection.

    In-band commands (C{execute}) run one at a time, in order; with the
    C{oob} capability negotiated, C{exec-oob} commands that allow it run
    at once.  Events go to every negotiated connection: C{MIGRATION} and
    C{MIGRATION_PASS} only while the C{events} migration capability is on,
    as in QEMU.

    @ivar manager: the daemon's MigrationManager.
    @ivar guest: the daemon's guest (C{x-query-guest}), or L{None}.
    @ivar clock: returns the time in seconds (event timestamps).
    @ivar negotiated: C{qmp_capabilities} succeeded.
    @ivar oob: out-of-band execution was enabled.
    """

    def __init__(self, manager: Any, guest: Any = None, clock: Callable[[], float] | None = None) -> None:
        """
        @param manager: the MigrationManager.
        @param guest: the guest, if any.
        @param clock: the clock (default: the manager's reactor's).
        """
        self.manager = manager
        self.guest = guest
        self.clock = clock or manager.reactor.seconds
        self.negotiated = False
        self.oob = False
        self._splitter = JSONSplitter()
        self._queue: deque[_Request] = deque()
        self._running = False
        self._readPaused = False
        self._writePaused = False
        self._unsubscribe: list[Callable[[], None]] = []

    def connectionMade(self) -> None:
        """
        Greet; watch the write buffer (a client that does not read stops
        being read).
        """
        self.transport.registerProducer(self, True)
        self._send(greeting())

    def connectionLost(self, reason: Failure | None = None) -> None:
        """
        Stop forwarding events and drop queued commands.

        @param reason: why.
        """
        self.connected = False
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        self._queue.clear()

    def pauseProducing(self) -> None:
        """
        The transport's write buffer is full: stop reading commands.
        """
        self._writePaused = True
        self._updateReading()

    def resumeProducing(self) -> None:
        """
        The write buffer drained.
        """
        self._writePaused = False
        self._updateReading()

    def stopProducing(self) -> None:
        """
        The connection is going away.
        """
        self._queue.clear()

    def _updateReading(self) -> None:
        """
        Read while the write buffer and the command queue have room.
        """
        pause = self._writePaused or len(self._queue) >= MAX_QUEUED
        if pause != self._readPaused and self.transport is not None:
            self._readPaused = pause
            (self.transport.pauseProducing if pause else self.transport.resumeProducing)()

    def _send(self, message: dict[str, Any]) -> None:
        """
        Write one JSON message, ended as QEMU ends it.

        @param message: the message.
        """
        if self.transport is not None and self.connected:
            self.transport.write(json.dumps(message).encode("utf-8") + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        """
        Split the input into requests and handle each.

        @param data: the bytes.
        """
        for kind, item in self._splitter.feed(data):
            if kind == "error":
                self._reply(_NO_ID, error=QMPError(item))
                continue
            self._received(item)
        self._updateReading()

    def _received(self, text: bytes) -> None:
        """
        Check one request and run or queue it (QEMU's C{qmp_dispatch}
        checks, in its order).

        @param text: the request's JSON text.
        """
        problem = _parseError(text)
        if problem is not None:
            self._reply(_NO_ID, error=QMPError(problem))
            return
        request = json.loads(text)
        if not isinstance(request, dict):
            self._reply(_NO_ID, error=QMPError("QMP input must be a JSON object"))
            return
        ident = request.get("id", _NO_ID)
        try:
            checked, outOfBand = self._check(request, ident)
        except QMPError as e:
            self._reply(ident, error=e)
            return
        if outOfBand:
            self._execute(checked)
        else:
            self._queue.append(checked)
            self._next()

    def _check(self, request: dict[str, Any], ident: Any) -> tuple[_Request, bool]:
        """
        @param request: a request object.
        @param ident: its C{id}.
        @return: the request to run and whether it runs out of band.
        @raise QMPError: QEMU's text for what is wrong.
        """
        for member in request:
            if member in ("execute", "arguments", "id"):
                continue
            if member == "exec-oob" and self.oob:
                continue
            raise QMPError(f"QMP input member '{member}' is unexpected")
        outOfBand = "exec-oob" in request
        if outOfBand and "execute" in request:
            raise QMPError("QMP input must not contain both 'execute' and 'exec-oob'")
        key = "exec-oob" if outOfBand else "execute"
        if key not in request:
            raise QMPError("QMP input lacks member 'execute'")
        name = request[key]
        if not isinstance(name, str):
            raise QMPError(f"QMP input member '{key}' must be a string")
        arguments = request.get("arguments", {})
        if not isinstance(arguments, dict):
            raise QMPError("QMP input member 'arguments' must be an object")
        command = COMMANDS.get(name)
        if not self.negotiated and name != "qmp_capabilities":
            raise QMPError(_NEGOTIATE, "CommandNotFound")
        if self.negotiated and name == "qmp_capabilities":
            raise QMPError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        if command is None:
            raise QMPError(f"The command {name} has not been found", "CommandNotFound")
        if outOfBand and not command.allowOOB:
            raise QMPError(f"The command {name} does not support OOB")
        command.arguments.check(arguments)
        return _Request(command, arguments, ident), outOfBand

    def _next(self) -> None:
        """
        Run the next in-band command unless one is running.
        """
        if self._running or not self._queue:
            return
        self._running = True
        self._execute(self._queue.popleft()).addBoth(self._ran)

    def _ran(self, _: object) -> None:
        """
        An in-band command answered: run the next one.

        @param _: ignored.
        """
        self._running = False
        self._updateReading()
        self._next()

    def _execute(self, request: _Request) -> Deferred:
        """
        Run a command and reply.

        @param request: the checked request.
        @return: a Deferred firing (with L{None}) once the reply is sent.
        """
        d = maybeDeferred(request.command.run, self, request.arguments)
        d.addCallbacks(lambda value: self._reply(request.id, value=value),
                       lambda failure: self._failed(request.id, failure))
        return d

    def _failed(self, ident: Any, failure: Failure) -> None:
        """
        Reply with a command's error: its text, as C{GenericError} unless
        it is a L{QMPError}.

        @param ident: the request's C{id}.
        @param failure: what went wrong.
        """
        error = failure.value
        if not isinstance(error, PostcopyError):
            error = QMPError(f"Internal error: {failure.getErrorMessage()}")
        self._reply(ident, error=error)

    def _reply(self, ident: Any, value: Any = None, error: Exception | None = None) -> None:
        """
        Send a reply, shaped (and ordered) as QEMU's.

        @param ident: the request's C{id}, or C{_NO_ID}.
        @param value: the return value.
        @param error: the error, instead of a value.
        """
        if error is not None:
            message: dict[str, Any] = {} if ident is _NO_ID else {"id": ident}
            message["error"] = {"class": getattr(error, "errorClass", "GenericError"),
                                "desc": str(error)}
        else:
            message = {"return": value}
            if ident is not _NO_ID:
                message["id"] = ident
        self._send(message)

    def negotiate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """
        C{qmp_capabilities}: enter command mode, enabling the asked
        capabilities; events start to flow.

        @param arguments: C{{"enable": [...]}} or nothing.
        @return: C{{}}.
        @raise QMPError: an unknown capability (QEMU's text).
        """
        enable = arguments.get("enable", [])
        for name in enable:
            if name not in ("oob",):
                raise QMPError(f"Parameter 'null' does not accept value '{name}'")
            if name not in OFFERED_CAPABILITIES:
                raise QMPError(f"Capability '{name}' not available")
        self.oob = "oob" in enable
        self.negotiated = True
        self._unsubscribe = [self.manager.subscribe(self.event),
                             self.manager.subscribePasses(self.event)]
        return {}

    def event(self, event: dict[str, Any]) -> None:
        """
        Send a manager event, with its timestamp, while the C{events}
        migration capability is on (QEMU's rule).

        @param event: C{{"event": NAME, "data": {...}}}.
        """
        if not self.manager.queryCapabilities().get("events"):
            return
        microseconds = int(self.clock() * 1_000_000)
        self._send({"timestamp": {"seconds": microseconds // 1_000_000,
                                  "microseconds": microseconds % 1_000_000},
                    "event": event["event"], "data": event.get("data", {})})


class QMPFactory(ServerFactory):
    """
    Builds a L{QMPProtocol} per QMP connection, all on one manager.

    @ivar manager: the daemon's MigrationManager.
    @ivar guest: the daemon's guest, or L{None}.
    """

    def __init__(self, manager: Any, guest: Any = None) -> None:
        """
        @param manager: the MigrationManager.
        @param guest: the guest answering C{x-query-guest}, if any.
        """
        self.manager = manager
        self.guest = guest

    def buildProtocol(self, addr: Any) -> QMPProtocol:
        """
        @param addr: the peer address.
        @return: a L{QMPProtocol}.
        """
        protocol = QMPProtocol(self.manager, self.guest)
        protocol.factory = self
        return protocol


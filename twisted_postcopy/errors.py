# -*- test-case-name: tests.test_errors -*-
"""
The exception hierarchy of twisted-postcopy.

Every error the package raises derives from L{PostcopyError}.  Protocol
errors are split in two, as h11 does: L{LocalProtocolError} means this side
misused the API (asked the encoder for something the format cannot say),
L{RemoteProtocolError} means the peer sent something QEMU 7.2 would reject.
"""

from __future__ import annotations


class PostcopyError(Exception):
    """
    Root of every error raised by twisted-postcopy.
    """


class ProtocolError(PostcopyError):
    """
    A migration stream or return path broke the QEMU 7.2 format.

    @ivar offset: the byte offset in the stream (or package) where the
        offending element starts, or L{None} when unknown.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        """
        @param message: what was wrong and what was expected.
        @param offset: the stream offset of the offending element.
        """
        if offset is not None:
            message = f"{message} (at stream offset {offset})"
        super().__init__(message)
        self.offset = offset


class LocalProtocolError(ProtocolError):
    """
    This side asked for something the wire format cannot express.
    """


class RemoteProtocolError(ProtocolError):
    """
    The peer sent bytes that QEMU 7.2 would reject.
    """


class UnsupportedFeatureError(RemoteProtocolError):
    """
    The peer used a feature of the format that twisted-postcopy does not
    implement (XBZRLE, compression, RDMA hooks, multifd, COLO).  The message
    names the capability to switch off on the peer.
    """


class LimitExceededError(RemoteProtocolError):
    """
    An element or a per-migration total is larger than a documented limit
    (C{docs/wire-format.md}, "Limits"); nothing beyond the limit was
    buffered.

    @ivar limit: the limit's name (e.g. C{"max-ram-blocks"}), or L{None}.
    @ivar reason: the message without the offset and the limit's name.
    """

    def __init__(self, message: str, offset: int | None = None, limit: str | None = None) -> None:
        """
        @param message: what was too large.
        @param offset: the stream offset of the offending element.
        @param limit: the limit's name, put in the message too.
        """
        self.reason = message
        if limit is not None:
            message = f"{message} [{limit}]"
        super().__init__(message, offset)
        self.limit = limit


class MigrationError(PostcopyError):
    """
    A migration could not proceed (bad state, bad command, bad argument).
    """


class IllegalTransitionError(MigrationError):
    """
    A state machine was asked to move between two states the QEMU model
    does not connect.
    """


class MigrationFailed(MigrationError):
    """
    The migration ended in the C{failed} state; the message says why.
    """


class MigrationCancelled(MigrationError):
    """
    The migration was cancelled (C{migrate-cancel}).
    """


class PostcopyPaused(MigrationError):
    """
    Outstanding work was abandoned because the migration entered
    C{postcopy-paused}; it is retried after recovery.
    """


class UffdError(OSError, PostcopyError):
    """
    A userfaultfd system call failed.  C{errno} carries the kernel's error
    number and the message names the operation.
    """


class UffdUnavailableError(PostcopyError):
    """
    userfaultfd cannot be used here (kernel support, privilege, sysctl or
    huge page reservation); the message names the fix.
    """


class SnapshotError(PostcopyError):
    """
    A snapshot directory is missing, truncated or tampered with.
    """


class DaemonError(PostcopyError):
    """
    A C{twistd postcopy} daemon process could not be started, or exited
    while in use; the message ends with the last lines of its log.
    """


class GuestPatternError(PostcopyError):
    """
    A memory dump of the boot-sector test guest is not a consistent
    snapshot of its running counters (a page was lost, stale or misplaced);
    the message names the first offending page.
    """


class BadHeaderError(RemoteProtocolError):
    """
    The stream header is wrong: bad magic, unsupported version, missing or
    malformed configuration element.
    """


class UnknownElementError(RemoteProtocolError):
    """
    An element type byte, command number or return-path message type that
    QEMU 7.2 does not accept where it appeared.
    """


class BadLengthError(RemoteProtocolError):
    """
    A command or return-path message has a length its type does not allow,
    or an id string has length 0.
    """


class SectionMismatchError(RemoteProtocolError):
    """
    A section footer is missing or names another section, or a PART/END
    names a section id that no START announced.
    """


class BadRAMRecordError(RemoteProtocolError):
    """
    A RAM record is malformed: unknown flag combination, CONTINUE with no
    previous block, unknown RAMBlock, or an offset outside its block.
    """


class DuplicateRAMBlockError(RemoteProtocolError):
    """
    A RAM START list names a RAMBlock twice, or a stream has a second RAM
    START (QEMU 7.2 sends exactly one).
    """


class DeviceSectionBoundaryError(RemoteProtocolError):
    """
    The end of an unframed device-section payload could not be found (no
    footer followed by a plausible next element within the bound).
    """


class TruncatedStreamError(RemoteProtocolError):
    """
    The input ended (EOF) in the middle of an element.
    """


class QEMUError(PostcopyError):
    """
    A QEMU process driven by the test harness failed: it exited, its QMP
    monitor returned an error, or a migration it ran failed.  The message
    ends with the last lines of its stderr.
    """


class QEMUTimeoutError(QEMUError):
    """
    A QEMU process driven by the test harness did not reach the awaited
    state (QMP socket, run state, migration status, event) in time.
    """


class RAMBlockError(PostcopyError):
    """
    A RAMBlock was created or used with bad arguments: an unknown backing,
    a length or offset that is not a multiple of the page size, a range
    past the block's end, or a write after userfaultfd registration.
    """


class MappingTableError(PostcopyError):
    """
    A guest process's mapping table (base address, block idstr, offset,
    length, page size) names an unknown block, is misaligned, runs past
    the block or overlaps another entry.
    """


class BitmapError(RemoteProtocolError):
    """
    A received bitmap (QEMU's little-endian u64 words, as sent in
    MIG_RP_MSG_RECV_BITMAP) has the wrong length for its block.
    """


class DirtyTrackingUnavailableError(UffdUnavailableError):
    """
    Dirty tracking with userfaultfd WP_ASYNC and PAGEMAP_SCAN is not
    available (kernel before 6.7, or the feature bits are missing); the
    message names what is missing.
    """


class AttachProtocolError(PostcopyError):
    """
    A guest process and the daemon disagree on the attach protocol: a
    malformed or oversized message, an unexpected message type, a file
    descriptor count that does not match, or an C{error} the other side
    sent (its message is quoted).
    """


class GuestError(PostcopyError):
    """
    A guest of ours failed: a worker process exited or refused a command,
    its device state is malformed, or its RAM does not verify (the message
    names the first offending page).
    """


class SnapshotBusyError(SnapshotError):
    """
    A daemon was asked to start a snapshot capture while its previous
    capture is still listening or receiving (one capture at a time).
    """


class SnapshotReadTooLargeError(SnapshotError):
    """
    A C{snapshot-read} over the control API asked for more bytes than one
    AMP value can carry (L{twisted_postcopy.snapshot.jobs.MAX_READ}); the
    client splits longer reads.
    """


class AccessError(PostcopyError):
    """
    A listening endpoint or a peer is not allowed by the daemon's access
    policy (see C{docs/security.md}): an off-host plaintext control
    endpoint, an unknown group, a bad allow-list entry.
    """

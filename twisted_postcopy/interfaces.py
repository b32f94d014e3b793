# -*- test-case-name: tests.test_interfaces -*-
"""
Zope interfaces shared between the subpackages.

Interfaces describe how the state machines reach what they migrate: the
source reads an L{IOutgoingVM}, the destination fills an L{IIncomingVM}, and
the fault service asks an L{IPageSource} for missing pages.  Methods are
declared without C{self}, as zope.interface wants.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IPageSource(Interface):
    """
    Something that can fetch a missing page for the destination: in a
    migration, the return path to the source (QEMU's REQ_PAGES).
    """

    def requestPage(block, offset):
        """
        Ask for the host page of C{block} at C{offset}: fire-and-forget.
        The answer is the page arriving (L{IFaultService.placePages} or
        C{placeZero}); a request made while the migration is paused may be
        dropped, and is made again by L{IFaultService.rerequestPending}.

        @param block: the RAMBlock's idstr.
        @type block: L{str}
        @param offset: byte offset of the page in the block, page aligned.
        @type offset: L{int}
        @return: L{None}.
        """


class IFaultService(Interface):
    """
    The destination's one owner of page state from POSTCOPY_LISTEN on:
    which host pages are received, which are holes left by precopy ZERO
    records, which are requested and who waits for them (QEMU's
    C{receivedmap}, its page request tree and its fault thread).  The
    incoming migration tells it that pages arrived and asks it nothing
    twice; it requests missing pages from an L{IPageSource} and wakes
    faulting guest threads once their page is placed.
    Implemented by L{twisted_postcopy.ram.faults.FaultService}.
    """

    blocks = Attribute("idstr -> the RAMBlocks it serves (L{dict}).")

    def placePages(block, offset, data):
        """
        Pages arrived: place them (C{UFFDIO_COPY}), mark them received and
        wake the threads waiting on them.

        @param block: the RAMBlock's idstr.
        @param offset: page-aligned byte offset.
        @param data: one or more contiguous whole pages.
        @raise twisted_postcopy.errors.RemoteProtocolError: a page of the
            range was already received.
        """

    def placeRecords(block, records):
        """
        A run of RAM records decoded in C arrived (a
        L{twisted_postcopy.wire.events.RAMRecordsReceived}, block of 4 KiB
        pages): as L{placePages} and L{placeZero} for each run in it, the
        pages placed straight from the receive buffer.

        @param block: the RAMBlock's idstr.
        @param records: the records.
        """

    def placeZero(block, offset, length):
        """
        Zero pages arrived: as L{placePages} with C{UFFDIO_ZEROPAGE}.

        @param block: the RAMBlock's idstr.
        @param offset: page-aligned byte offset.
        @param length: whole pages.
        """

    def requestPage(block, offset):
        """
        The daemon itself wants a page (e.g. to read it during a capture);
        shares the request with any fault on it.

        @return: a Deferred firing with L{None} once the page is placed.
        """

    def rerequestPending():
        """
        After recovery: request every page still wanted again.

        @return: how many requests were made.
        """

    def missingPages():
        """
        @return: how many pages of its blocks have not been received.
        """

    def fillHoles():
        """
        Place zero pages over the holes left by precopy ZERO records (at
        completion, before L{stop}).
        """

    def receivedBitmap(block):
        """
        @param block: the RAMBlock's idstr.
        @return: QEMU's received bitmap of the block (RECV_BITMAP payload).
        """

    def stop(reason=None):
        """
        Detach every guest and close the userfaultfds.  Only once every
        page is placed, or when the guests are finished anyway.
        """


class IDirtyTracker(Interface):
    """
    Dirty page tracking of guest RAM on the source.
    """

    def start():
        """
        Begin tracking: every page counts as clean from now on.
        """

    def sync():
        """
        Collect the pages written since the previous C{start} or C{sync}.

        @return: a mapping of block idstr to an iterable of (offset, length)
            byte ranges that were written.
        """

    def stop():
        """
        End tracking and release its resources.
        """


class IOutgoingVM(Interface):
    """
    What a source migrates: a guest of ours, or a stored snapshot.

    Optional member (documented here, not declared, so that C{verifyObject}
    does not demand it):

      - C{configuration}: the configuration section's bytes after its 0x07
        type byte (be32 name length, name, subsections), sent verbatim.  A
        VM without it gets the section built from C{machine}.
    """

    machine = Attribute("The machine type name sent in the configuration section (L{str}).")
    blocks = Attribute("The RAMBlocks to send, in QEMU's list order (sequence of RAMBlock).")
    dirtyTracker = Attribute("An L{IDirtyTracker}, or L{None} when RAM never changes.")

    def stop():
        """
        Stop the VM for switchover: after this returns (or its Deferred
        fires) no write reaches RAM.

        @return: L{None} or a Deferred.
        """

    def deviceState():
        """
        The device sections to send after RAM, as wire bytes.

        @return: L{bytes} (or a Deferred firing with them): a sequence of
            complete FULL sections, each with its footer.
        """

    def resume():
        """
        Let the VM run again on the source after a failed or cancelled
        migration.
        """


class IIncomingVM(Interface):
    """
    What a destination fills: a guest of ours, or a snapshot being captured.

    Optional members (documented here, not declared, so that
    C{verifyObject} does not demand them):

      - C{configurationReceived(raw, machine)}: the stream's configuration
        section arrived.  C{raw} (L{bytes}) is the section after its 0x07
        type byte: be32 name length, name, subsections; C{machine} (L{str})
        is the machine type name in it.  Called once, before RAM START,
        only when the VM has this method.
      - C{vcpuThreads}: a live sequence of the native thread ids that touch
        guest RAM (its vCPUs), by vCPU index, for C{postcopy-blocktime}.
        Without it the blocktime figures read 0.
    """

    def ramBlocksListed(blocks):
        """
        The RAM START section listed the source's blocks.

        @param blocks: sequence of (idstr, length, pageSize or None).
        @return: a mapping of idstr to the RAMBlock that receives its pages.
        @raise twisted_postcopy.errors.MigrationError: the blocks do not
            match this VM.
        """

    def deviceStateReceived(raw):
        """
        Device sections arrived (from the package, or the precopy tail).

        @param raw: the exact wire bytes of the device sections.
        @type raw: L{bytes}
        """

    def run():
        """
        Start the VM (POSTCOPY_RUN, or the end of a precopy migration).
        """

    def completed():
        """
        Every page has arrived; the migration completed.
        """

    def failed(reason):
        """
        The incoming migration failed.

        @param reason: a L{twisted.python.failure.Failure} or exception.
        """

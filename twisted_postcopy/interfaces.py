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
    migration, the return path to the source.
    """

    def requestPage(block, offset):
        """
        Ask for the host page of C{block} at C{offset}.

        @param block: the RAMBlock's idstr.
        @type block: L{str}
        @param offset: byte offset of the page in the block, page aligned.
        @type offset: L{int}
        @return: a Deferred that fires (with L{None}) once the page has been
            placed, or fails with L{twisted_postcopy.errors.PostcopyPaused}
            or L{twisted_postcopy.errors.MigrationFailed}.
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


class IFaultObserver(Interface):
    """
    Observes the destination's fault service (for postcopy blocktime).
    Times are C{CLOCK_MONOTONIC} nanoseconds.
    """

    def faultBegan(threadId, block, offset, t):
        """
        A guest thread faulted on a page that has not been received.

        @param threadId: the faulting thread's id (C{uffd_msg} C{ptid}).
        @type threadId: L{int}
        @param block: the RAMBlock's idstr.
        @type block: L{str}
        @param offset: the page's byte offset in the block.
        @type offset: L{int}
        @param t: when the fault was read.
        @type t: L{int}
        """

    def pagePlaced(block, offset, t):
        """
        A page that some thread faulted on was placed and its waiters woken.

        @param block: the RAMBlock's idstr.
        @type block: L{str}
        @param offset: the page's byte offset in the block.
        @type offset: L{int}
        @param t: when the waiters were woken.
        @type t: L{int}
        """

# -*- test-case-name: tests.test_ram_support -*-
"""
The early check: can this process use userfaultfd for postcopy?

The destination calls L{checkUserfaultfd} when it receives
C{POSTCOPY_ADVISE} (QEMU's C{postcopy_ram_supported_by_host}), so a
missing privilege or kernel feature fails the migration before any page
is discarded, with a message that names the fix.
"""

from __future__ import annotations

import errno
import gc
import os
from typing import Callable

from twisted_postcopy.errors import UffdError, UffdUnavailableError
from twisted_postcopy.ram import uffd

#: Where the huge page pool is sized.
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"

#: Free 2 MiB huge pages.
FREE_HUGEPAGES = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"

_PRIVILEGE = (
    "userfaultfd is not permitted for this process ({error}). Fix one of: run the daemon as root "
    "or with CAP_SYS_PTRACE; `sysctl vm.unprivileged_userfaultfd=1`; or give the daemon's user "
    "read-write access to /dev/userfaultfd (Linux 6.1+). Kernel-mode faults (vCPUs, system calls) "
    "need a full-privilege userfaultfd, so UFFD_USER_MODE_ONLY is not an option for postcopy."
)

_NO_KERNEL = (
    "this kernel has no userfaultfd ({error}): it was built without CONFIG_USERFAULTFD; "
    "postcopy needs a kernel with CONFIG_USERFAULTFD=y (4.11 or later for shared memory)."
)


def unavailableError(error: UffdError) -> UffdUnavailableError:
    """
    @param error: the failure to open a userfaultfd.
    @return: the error to raise, with the fix.
    """
    if error.errno == errno.ENOSYS:
        return UffdUnavailableError(_NO_KERNEL.format(error=error))
    if error.errno in (errno.EPERM, errno.EACCES):
        return UffdUnavailableError(_PRIVILEGE.format(error=error))
    return UffdUnavailableError(f"userfaultfd could not be opened: {error}")


def _readInt(path: str) -> int:
    """
    @param path: a sysfs or procfs file holding one integer.
    @return: its value, or 0 when it cannot be read.
    """
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def checkHugePages(pages: int = 1) -> None:
    """
    Check that C{pages} free 2 MiB huge pages are reserved.

    @param pages: how many huge pages are needed.
    @raise UffdUnavailableError: fewer are free; the message gives the
        C{nr_hugepages} command.
    """
    free = availableHugePages()
    if free < pages:
        total = _readInt(NR_HUGEPAGES)
        raise UffdUnavailableError(
            f"hugetlbfs RAM needs {pages} free 2 MiB huge page(s) but {free} of {total} are free: "
            f"reserve them as root with `echo {total - free + pages} > {NR_HUGEPAGES}`"
        )


def reserveHugePages(pages: int, control: str | None = None,
                     free: str | None = None) -> Callable[[], None]:
    """
    Make C{pages} free 2 MiB huge pages available: when fewer are free,
    grow the pool through C{/proc/sys/vm/nr_hugepages} by the shortfall.
    Other processes may size the pool at the same time, so the growth is
    relative to what is free now, and the release function shrinks the
    pool by what this call added (relative to the pool's size then), never
    back to an absolute value.

    @param pages: how many free huge pages are needed.
    @param control: the pool size file (default L{NR_HUGEPAGES}).
    @param free: the free-page count file (default L{FREE_HUGEPAGES}).
    @return: a function giving back what was added (idempotent; a no-op
        when nothing was added).
    @raise UffdUnavailableError: the pool could not be grown (no
        permission, no huge page support) or the kernel found too little
        memory; the message names C{/proc/sys/vm/nr_hugepages}.
    """
    control = NR_HUGEPAGES if control is None else control
    free = FREE_HUGEPAGES if free is None else free
    shortfall = pages - availableHugePages(free)
    if shortfall <= 0:
        return lambda: None
    # Raising the pool first turns surplus pages (in use beyond an earlier
    # size) back into persistent ones: they must be counted in.
    growth = shortfall + _readInt(os.path.join(os.path.dirname(free), "surplus_hugepages"))
    try:
        _adjustPool(control, growth)
    except (OSError, ValueError) as error:
        raise UffdUnavailableError(
            f"hugetlbfs RAM needs {pages} free 2 MiB huge page(s), {pages - shortfall} are free, and "
            f"{control} could not be raised by {shortfall} ({error}): reserve them as root, "
            f"e.g. `echo $(( $(cat {control}) + {shortfall} )) > {control}`") from None
    added = [growth]

    def release() -> None:
        """
        Shrink the pool by what was added (once).
        """
        if added:
            _adjustPool(control, -added.pop())

    now = availableHugePages(free)
    if now < pages:
        release()
        raise UffdUnavailableError(
            f"hugetlbfs RAM needs {pages} free 2 MiB huge page(s) but the kernel found memory for only "
            f"{now} after raising {control} (not enough free memory, or too fragmented): free memory or "
            f"reserve them early, e.g. at boot")
    return release


def availableHugePages(free: str | None = None) -> int:
    """
    @param free: the free-page count file (default L{FREE_HUGEPAGES});
        C{resv_hugepages} beside it is read too.
    @return: free 2 MiB huge pages not yet promised to a mapping (free
        pages include those reserved by C{mmap}s that have not touched
        them yet).
    """
    free = FREE_HUGEPAGES if free is None else free
    return _readInt(free) - _readInt(os.path.join(os.path.dirname(free), "resv_hugepages"))


def _adjustPool(control: str, delta: int) -> None:
    """
    Add C{delta} (possibly negative) to the huge page pool size.

    @param control: the pool size file.
    @param delta: pages to add.
    @raise OSError: the file could not be read or written.
    @raise ValueError: it did not hold a number.
    """
    with open(control) as f:
        size = int(f.read().strip() or 0)
    with open(control, "w") as f:
        f.write(str(max(0, size + delta)))


def checkUserfaultfd(hugetlb: bool = False, hugePages: int = 1) -> int:
    """
    Check that postcopy can run here (QEMU's
    C{postcopy_ram_supported_by_host}): a userfaultfd opens with full
    privilege, the handshake works, MISSING faults on shared memory are
    supported (and on hugetlbfs, with huge pages reserved, if asked).

    @param hugetlb: whether hugetlbfs-backed RAM will be used.
    @param hugePages: how many 2 MiB pages that RAM needs.
    @return: the kernel's C{UFFD_FEATURE_*} bits.
    @raise UffdUnavailableError: something is missing; the message names
        the fix.
    """
    try:
        features = uffd.probeFeatures()
    except UffdError as error:
        raise unavailableError(error) from None
    if not features & uffd.UFFD_FEATURE_MISSING_SHMEM:
        raise UffdUnavailableError(
            "userfaultfd cannot trap missing pages of shared memory (UFFD_FEATURE_MISSING_SHMEM, "
            "Linux 4.11+): upgrade the kernel"
        )
    if hugetlb:
        if not features & uffd.UFFD_FEATURE_MISSING_HUGETLBFS:
            raise UffdUnavailableError(
                "userfaultfd cannot trap missing hugetlbfs pages (UFFD_FEATURE_MISSING_HUGETLBFS, "
                "Linux 4.11+): upgrade the kernel or use 4 KiB pages"
            )
        checkHugePages(hugePages)
    return features


def collectGarbage() -> None:
    """
    A full collection of cyclic garbage, for a moment when nothing waits:
    the destination calls it at C{POSTCOPY_ADVISE}, while precopy is still
    to come, so that L{tuneGarbageCollector} at C{POSTCOPY_LISTEN} (the
    switchover, with the stream and the guest's start waiting) need not
    collect.  In a destination daemon a full collection takes 10 to 20 ms
    (about 48,000 objects), and profiles showed up to 40 ms at LISTEN on a
    busy machine.
    """
    gc.collect()


def tuneGarbageCollector(threshold: int = 100000) -> None:
    """
    Keep the cyclic garbage collector off the fault path: freeze what
    exists (daemon start-up objects are never scanned again) and make
    young-generation collections rare.  With CPython's default threshold
    (700) a collection runs every hundred or so faults and is the p99
    fault latency (see C{bench/faults.py}).  Call it once in the
    destination daemon, e.g. at C{POSTCOPY_LISTEN}.  It does not collect
    (freezing takes microseconds), so call L{collectGarbage} first, off
    the critical path; garbage cycles made in between stay frozen.

    @param threshold: the new generation-0 threshold.
    """
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(threshold, second, third)


def describeFeatures(features: int) -> list[str]:
    """
    @param features: C{UFFD_FEATURE_*} bits.
    @return: the names of the bits this module knows, for logs.
    """
    names = [name for name in dir(uffd) if name.startswith("UFFD_FEATURE_")]
    return sorted(name[len("UFFD_FEATURE_"):] for name in names if features & getattr(uffd, name))


if __name__ == "__main__":  # pragma: no cover
    print(", ".join(describeFeatures(checkUserfaultfd())), "pid", os.getpid())

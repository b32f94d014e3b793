# -*- test-case-name: tests.test_ram_uffd -*-
"""
Tests for L{twisted_postcopy.ram.uffd} against the real kernel.  The test
process never touches registered memory: it checks results with C{pread}
on the block's memfd.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import select
import threading

from twisted.trial.unittest import SynchronousTestCase

from twisted_postcopy.errors import UffdError
from twisted_postcopy.ram import uffd, uffdmsg
from twisted_postcopy.ram._uffd import lib
from twisted_postcopy.ram.block import RAMBlock
from twisted_postcopy.testing.real import missingReal, requireUserfaultfd

PAGE = 4096


class _Writer(threading.Thread):
    """
    Writes bytes to an address with C{ctypes.memmove}, a C call that
    releases the GIL, so the thread may block in a userfault while the test
    goes on.

    @ivar threadId: receives the thread's kernel id once it runs.
    """

    def __init__(self, address: int, data: bytes) -> None:
        """
        @param address: where to write (in this process).
        @param data: what to write.
        """
        super().__init__(daemon=True)
        self.address = address
        self.data = data
        self.threadId: queue.Queue[int] = queue.Queue()

    def run(self) -> None:
        """
        Report the thread id, then write.
        """
        self.threadId.put(threading.get_native_id())
        ctypes.memmove(self.address, self.data, len(self.data))


class UffdTests(SynchronousTestCase):
    """
    The wrappers on a memfd RAMBlock registered on a fresh userfaultfd.
    """

    def setUp(self) -> None:
        """
        An 8-page block and a handshaken userfaultfd.
        """
        requireUserfaultfd()
        self.block = RAMBlock("pc.ram", 8 * PAGE)
        self.addCleanup(self.block.close)
        self.fd = uffd.openWithFeatures(uffd.UFFD_FEATURE_THREAD_ID)
        self.addCleanup(os.close, self.fd)

    def assertErrno(self, code, f, *args):
        """
        C{f(*args)} raises L{UffdError} with C{code}.
        """
        error = self.assertRaises(UffdError, f, *args)
        self.assertEqual(error.errno, code)
        return error

    def test_probe(self):
        """
        The probe reports the features postcopy needs, on a throwaway fd.
        """
        features = uffd.probeFeatures()
        self.assertTrue(features & uffd.UFFD_FEATURE_THREAD_ID)
        self.assertTrue(features & uffd.UFFD_FEATURE_MISSING_SHMEM)

    def test_handshakeOnce(self):
        """
        A second handshake on one fd, or an unknown feature bit, is EINVAL.
        """
        self.assertErrno(errno.EINVAL, uffd.api, self.fd, 0)
        fd = uffd.openUffd()
        self.addCleanup(os.close, fd)
        self.assertErrno(errno.EINVAL, uffd.api, fd, 1 << 40)

    def test_devUserfaultfd(self):
        """
        C{/dev/userfaultfd} with C{USERFAULTFD_IOC_NEW} (the fallback when
        the system call is refused) gives a working userfaultfd.
        """
        fd = lib.tp_uffd_dev_open(uffd.DEFAULT_FLAGS)
        if fd in (-errno.ENOENT, -errno.EACCES):
            missingReal(f"/dev/userfaultfd unavailable: {os.strerror(-fd)}")
        self.addCleanup(os.close, uffd.check(fd, "USERFAULTFD_IOC_NEW"))
        self.assertTrue(uffd.api(fd, uffd.UFFD_FEATURE_THREAD_ID)[0] & uffd.UFFD_FEATURE_THREAD_ID)

    def test_badOpenFlags(self):
        """
        Unknown open flags are EINVAL.
        """
        self.assertErrno(errno.EINVAL, uffd.openUffd, 0x4)

    def test_register(self):
        """
        Registration reports the resolving ioctls; misaligned ranges are
        EINVAL; another uffd on the same range gets EBUSY.
        """
        ioctls = uffd.register(self.fd, self.block.address, self.block.length)
        wanted = uffd.UFFDIO_COPY_BIT | uffd.UFFDIO_ZEROPAGE_BIT | uffd.UFFDIO_WAKE_BIT
        self.assertEqual(ioctls & wanted, wanted)
        self.assertErrno(errno.EINVAL, uffd.register, self.fd, self.block.address + 1, PAGE)
        other = uffd.openWithFeatures()
        self.addCleanup(os.close, other)
        self.assertErrno(errno.EBUSY, uffd.register, other, self.block.address, PAGE)
        uffd.unregister(self.fd, self.block.address, self.block.length)
        uffd.register(other, self.block.address, PAGE)

    def test_copyZeroWake(self):
        """
        COPY and ZEROPAGE fill the memfd; a second COPY is EEXIST; WAKE with
        no waiter succeeds; nothing is queued to read.
        """
        uffd.register(self.fd, self.block.address, self.block.length)
        data = os.urandom(2 * PAGE)
        self.assertEqual(uffd.copy(self.fd, self.block.address, data), 2 * PAGE)
        self.assertEqual(uffd.zeropage(self.fd, self.block.address + 2 * PAGE, PAGE), PAGE)
        self.assertEqual(os.pread(self.block.fd, 3 * PAGE, 0), data + bytes(PAGE))
        self.assertErrno(errno.EEXIST, uffd.copy, self.fd, self.block.address, data)
        uffd.wake(self.fd, self.block.address, self.block.length)
        self.assertIsNone(uffd.MessageBuffer().read(self.fd))

    def test_placeRun(self):
        """
        A run over present and missing pages places the missing ones and
        counts the present ones as existing.
        """
        uffd.register(self.fd, self.block.address, self.block.length)
        uffd.copy(self.fd, self.block.address + PAGE, b"\1" * PAGE)
        data = os.urandom(4 * PAGE)
        result = uffd.placeRun(self.fd, self.block.address, data, len(data), PAGE)
        self.assertEqual(result, (0, 4 * PAGE, PAGE))
        expected = data[:PAGE] + b"\1" * PAGE + data[2 * PAGE :]
        self.assertEqual(os.pread(self.block.fd, 4 * PAGE, 0), expected)
        self.assertEqual(uffd.placeRun(self.fd, self.block.address + 4 * PAGE, None, 4 * PAGE, PAGE),
                         (0, 4 * PAGE, 0))
        result, done, _ = uffd.placeRun(self.fd, self.block.address + 1, None, PAGE, PAGE)
        self.assertEqual((result, done), (-errno.EINVAL, 0))

    def test_continue(self):
        """
        MINOR mode: a page in the page cache (pwrite) is mapped by CONTINUE;
        CONTINUE again is EEXIST.
        """
        self.block.write(0, b"\2" * PAGE)
        ioctls = uffd.register(self.fd, self.block.address, self.block.length,
                               uffd.UFFDIO_REGISTER_MODE_MISSING | uffd.UFFDIO_REGISTER_MODE_MINOR)
        self.assertTrue(ioctls & uffd.UFFDIO_CONTINUE_BIT)
        self.assertEqual(uffd.continuePages(self.fd, self.block.address, PAGE), PAGE)
        self.assertErrno(errno.EEXIST, uffd.continuePages, self.fd, self.block.address, PAGE)

    def test_writeProtect(self):
        """
        A write to a write-protected page of shmem faults: the writer (a C
        memmove on another thread, without the GIL) blocks, a WP page fault
        naming the page and the thread is queued, the page keeps its old
        bytes; unprotecting with wake lets the write through.  Misaligned
        ranges are EINVAL.
        """
        fd = uffd.openWithFeatures(uffd.UFFD_FEATURE_THREAD_ID | uffd.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
        self.addCleanup(os.close, fd)
        old = b"\3" * (2 * PAGE)
        self.block.write(0, old)
        ioctls = uffd.register(fd, self.block.address, self.block.length, uffd.UFFDIO_REGISTER_MODE_WP)
        self.assertTrue(ioctls & uffd.UFFDIO_WRITEPROTECT_BIT)
        self.assertErrno(errno.EINVAL, uffd.writeProtect, fd, self.block.address + 1, PAGE)
        uffd.writeProtect(fd, self.block.address, 2 * PAGE)
        target = self.block.address + PAGE + 64
        writer = _Writer(target, b"new!" * 4)
        writer.start()
        self.assertTrue(select.select([fd], [], [], 30)[0], "no fault was queued")
        (fault,) = uffdmsg.decodeMessages(uffd.MessageBuffer().read(fd))
        self.assertIsInstance(fault, uffdmsg.PageFault)
        self.assertTrue(fault.flags & uffdmsg.UFFD_PAGEFAULT_FLAG_WP, fault)
        self.assertTrue(fault.write, fault)
        self.assertEqual(fault.address & ~(PAGE - 1), self.block.address + PAGE)
        self.assertEqual(fault.threadId, writer.threadId.get(timeout=30))
        self.assertTrue(writer.is_alive())
        self.assertEqual(os.pread(self.block.fd, 2 * PAGE, 0), old)
        uffd.writeProtect(fd, self.block.address + PAGE, PAGE, protect=False, wakeWriters=True)
        writer.join(30)
        self.assertFalse(writer.is_alive(), "the writer was not woken")
        self.assertEqual(os.pread(self.block.fd, 16, PAGE + 64), b"new!" * 4)
        self.assertIsNone(uffd.MessageBuffer().read(fd))

    def test_unregisteredRange(self):
        """
        COPY into an unregistered range is ENOENT.
        """
        self.assertErrno(errno.ENOENT, uffd.copy, self.fd, self.block.address, bytes(PAGE))

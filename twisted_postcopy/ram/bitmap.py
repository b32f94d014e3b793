# -*- test-case-name: tests.test_ram_bitmap -*-
"""
Page bitmaps: QEMU's C{receivedmap} and dirty bitmaps of a RAMBlock.

Bit C{i} (page C{i}) lives in byte C{i // 8}, bit C{i % 8}.  That is
exactly QEMU's on-wire received bitmap (C{MIG_RP_MSG_RECV_BITMAP}:
little-endian u64 words, page C{i} in word C{i // 64}, bit C{i % 64}), so
encoding only pads to whole words.
"""

from __future__ import annotations

from typing import Iterator

from twisted_postcopy.errors import BitmapError
from twisted_postcopy.wire.constants import TARGET_PAGE_SIZE

#: For each byte value, its 8 bits as 8 bytes of 0/1 (bit 0 first).
_EXPAND = [bytes((value >> bit) & 1 for bit in range(8)) for value in range(256)]
#: C{str.translate} table from a bitmap's C{"0"}/C{"1"} digits to dirty flags.
_NOT_RECEIVED = bytes.maketrans(b"01", b"\x01\x00")


def bitmapSize(length: int) -> int:
    """
    @param length: a block's used length in bytes.
    @return: QEMU's received-bitmap size for it: one bit per target page,
        rounded up to whole 64-bit words.
    """
    pages = -(-length // TARGET_PAGE_SIZE)
    return -(-pages // 64) * 8


def dirtyFromReceived(bitmap: bytes, length: int, pageSize: int) -> bytearray:
    """
    QEMU's C{ram_dirty_bitmap_reload} for one block: dirty := NOT received.

    @param bitmap: the received bitmap (little-endian 64-bit words, one bit
        per target page).
    @param length: the block's used length.
    @param pageSize: the block's host page size (a host page is dirty if
        any of its target pages is missing).
    @return: one byte per host page, 1 = to send.
    """
    pages = length // TARGET_PAGE_SIZE
    digits = format(int.from_bytes(bitmap, "little"), f"0{len(bitmap) * 8}b")[::-1][:pages]
    dirty = digits.encode("ascii").translate(_NOT_RECEIVED)
    ratio = pageSize // TARGET_PAGE_SIZE
    if ratio <= 1:
        return bytearray(dirty)
    return bytearray(int(1 in dirty[page:page + ratio]) for page in range(0, pages, ratio))


class PageBitmap:
    """
    One bit per page.

    @ivar pages: the number of pages.
    """

    def __init__(self, pages: int) -> None:
        """
        @param pages: the number of pages (all clear).
        """
        self.pages = pages
        self._bits = bytearray((pages + 7) // 8)

    def _checkRange(self, page: int, count: int) -> None:
        """
        @param page: first page.
        @param count: number of pages.
        @raise IndexError: the range is outside the bitmap.
        """
        if page < 0 or count < 0 or page + count > self.pages:
            raise IndexError(f"pages {page}..{page + count} outside a bitmap of {self.pages}")

    def test(self, page: int) -> bool:
        """
        @param page: a page number.
        @return: whether its bit is set.
        """
        return bool(self._bits[page >> 3] & (1 << (page & 7)))

    def _assign(self, page: int, count: int, value: bool) -> None:
        """
        Set or clear a range of bits, whole bytes at a time in the middle.

        @param page: first page.
        @param count: number of pages.
        @param value: the new bit value.
        """
        self._checkRange(page, count)
        end = page + count
        while page < end and page & 7:
            self._setBit(page, value)
            page += 1
        wholeEnd = end & ~7
        if page < wholeEnd:
            self._bits[page >> 3 : wholeEnd >> 3] = (b"\xff" if value else b"\x00") * ((wholeEnd - page) >> 3)
            page = wholeEnd
        while page < end:
            self._setBit(page, value)
            page += 1

    def _setBit(self, page: int, value: bool) -> None:
        """
        @param page: a page number.
        @param value: the new bit value.
        """
        if value:
            self._bits[page >> 3] |= 1 << (page & 7)
        else:
            self._bits[page >> 3] &= ~(1 << (page & 7)) & 0xFF

    def set(self, page: int, count: int = 1) -> None:
        """
        Set C{count} bits from C{page}.

        @param page: first page.
        @param count: number of pages.
        @raise IndexError: outside the bitmap.
        """
        if count == 1 and 0 <= page < self.pages:
            self._bits[page >> 3] |= 1 << (page & 7)
            return
        self._assign(page, count, True)

    def clear(self, page: int, count: int = 1) -> None:
        """
        Clear C{count} bits from C{page}.

        @param page: first page.
        @param count: number of pages.
        @raise IndexError: outside the bitmap.
        """
        if count == 1 and 0 <= page < self.pages:
            self._bits[page >> 3] &= ~(1 << (page & 7)) & 0xFF
            return
        self._assign(page, count, False)

    def anySet(self, page: int, count: int) -> bool:
        """
        @param page: first page.
        @param count: number of pages.
        @return: whether any bit of the range is set (whole bytes at a time
            in the middle).
        @raise IndexError: outside the bitmap.
        """
        self._checkRange(page, count)
        end = page + count
        while page < end and page & 7:
            if self.test(page):
                return True
            page += 1
        wholeEnd = end & ~7
        if page < wholeEnd:
            chunk = self._bits[page >> 3 : wholeEnd >> 3]
            if chunk.count(0) != len(chunk):
                return True
            page = wholeEnd
        while page < end:
            if self.test(page):
                return True
            page += 1
        return False

    def setAll(self) -> None:
        """
        Set every bit.
        """
        self._assign(0, self.pages, True)

    def count(self) -> int:
        """
        @return: how many bits are set.
        """
        return int.from_bytes(self._bits, "little").bit_count()

    def all(self) -> bool:
        """
        @return: whether every page's bit is set.
        """
        return self.count() == self.pages

    def runs(self, value: bool = True) -> Iterator[tuple[int, int]]:
        """
        Iterate over maximal runs of pages whose bit equals C{value}.

        @param value: which runs to report.
        @return: an iterator of (first page, page count).
        """
        flat = b"".join([_EXPAND[byte] for byte in self._bits])[: self.pages]
        want, other = (b"\x01", b"\x00") if value else (b"\x00", b"\x01")
        start = flat.find(want)
        while start >= 0:
            end = flat.find(other, start)
            if end < 0:
                end = self.pages
            yield start, end - start
            start = flat.find(want, end)

    def scaled(self, factor: int) -> PageBitmap:
        """
        The same bitmap at a finer granularity: each bit becomes C{factor}
        bits (e.g. one 2 MiB host page -> 512 target pages of 4 KiB, since
        QEMU's C{receivedmap} counts target pages).

        @param factor: bits per bit.
        @return: a new bitmap of C{pages * factor} pages.
        """
        finer = PageBitmap(self.pages * factor)
        for start, count in self.runs():
            finer.set(start * factor, count * factor)
        return finer

    def toBytes(self) -> bytes:
        """
        QEMU's encoding: little-endian u64 words, padded with zero bits.

        @return: the bitmap, a multiple of 8 bytes long.
        """
        words = (self.pages + 63) // 64
        return bytes(self._bits).ljust(words * 8, b"\x00")

    @classmethod
    def fromBytes(cls, pages: int, data: bytes) -> PageBitmap:
        """
        Decode QEMU's encoding.

        @param pages: the block's page count.
        @param data: little-endian u64 words.
        @return: the bitmap.
        @raise BitmapError: C{data} is not C{ceil(pages / 64)} words long.
        """
        words = (pages + 63) // 64
        if len(data) != words * 8:
            raise BitmapError(f"received bitmap of {len(data)} bytes for {pages} pages (expected {words * 8})")
        bitmap = cls(pages)
        bitmap._bits[:] = data[: len(bitmap._bits)]
        if pages & 7:
            bitmap._bits[-1] &= (1 << (pages & 7)) - 1
        return bitmap

    def __eq__(self, other: object) -> bool:
        """
        @param other: another bitmap.
        @return: whether both have the same pages and bits.
        """
        if not isinstance(other, PageBitmap):
            return NotImplemented
        return self.pages == other.pages and self._bits == other._bits

    def __repr__(self) -> str:
        """
        @return: a short description.
        """
        return f"<PageBitmap {self.count()}/{self.pages} set>"

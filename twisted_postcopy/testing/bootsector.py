# -*- test-case-name: tests.test_bootsector -*-
"""
The project's own x86 test guest: a 512-byte boot sector built from
hand-emitted machine code.

The guest switches to 32-bit protected mode with a flat GDT, sets the counter
byte of every 4 KiB page of a guest-physical range C{[start, end)} to zero,
then loops forever: one I{pass} increments the counter byte (at C{offset}
within the page) of every page in ascending order, writes the marker byte
C{P} to the serial port C{0x3f8}, and spins C{delay} iterations.

Whenever the guest is stopped, the counters therefore form a consistent
snapshot of a running counter: pages below some boundary hold C{v + 1} and the
others C{v} (mod 256).  L{checkCounterPattern} verifies exactly that, so a
memory dump of a migrated guest proves that no page was lost, duplicated
from an older round, or placed at the wrong address.

No assembler is needed: the few instructions are written out as bytes below,
each with its mnemonic, and the parameters are little-endian immediates
patched in by L{buildBootSector}.
"""

from __future__ import annotations

import struct

from attrs import frozen

from twisted_postcopy.errors import GuestPatternError

PAGE_SIZE = 4096
SECTOR_SIZE = 512
LOAD_ADDRESS = 0x7C00
BOOT_SIGNATURE = b"\x55\xaa"
MARKER = b"P"
SERIAL_PORT = 0x3F8

_CODE_SELECTOR = 0x08
_DATA_SELECTOR = 0x10


@frozen
class GuestLayout:
    """
    The patchable parameters of the boot-sector guest.

    @ivar start: guest-physical address of the first counted page.
    @ivar end: guest-physical address just past the last counted page.
    @ivar offset: byte offset of the counter within each page.
    @ivar delay: iterations of an idle loop after each pass (slows the
        serial marker output; 0 for none).
    """

    start: int = 0x100000
    end: int = 0x100000 + 256 * PAGE_SIZE
    offset: int = 0
    delay: int = 100_000

    @property
    def pageCount(self) -> int:
        """
        @return: the number of counted pages.
        """
        return (self.end - self.start) // PAGE_SIZE

    def validate(self) -> None:
        """
        Check that the layout can be encoded and that the guest can run it.

        @raise ValueError: when the range is empty, not page aligned, overlaps
            the boot sector, or the offset is outside a page.
        """
        if self.start % PAGE_SIZE or self.end % PAGE_SIZE:
            raise ValueError(f"range {self!r} is not 4 KiB aligned")
        if not 0x100000 <= self.start < self.end <= 0xFFFFF000:
            raise ValueError(f"range {self!r} must lie in [1 MiB, 4 GiB)")
        if not 0 <= self.offset < PAGE_SIZE:
            raise ValueError(f"offset {self.offset} is outside a page")
        if not 0 <= self.delay < 2**32 - 1:
            raise ValueError(f"delay {self.delay} does not fit 32 bits")


def _u16(value: int) -> bytes:
    """
    @param value: an unsigned 16-bit integer.
    @return: its little-endian encoding.
    """
    return struct.pack("<H", value)


def _u32(value: int) -> bytes:
    """
    @param value: an unsigned 32-bit integer.
    @return: its little-endian encoding.
    """
    return struct.pack("<I", value)


def _rel8(source: int, target: int) -> bytes:
    """
    Encode a short jump displacement.

    @param source: the offset just after the jump instruction.
    @param target: the offset jumped to.
    @return: the signed 8-bit displacement.
    """
    return struct.pack("<b", target - source)


def _realMode(gdtr: int, protected: int) -> bytes:
    """
    The 16-bit prologue: segments, A20, GDT, protection enable, far jump.

    @param gdtr: the linear address of the 6-byte GDT pointer.
    @param protected: the linear address of the 32-bit entry point.
    @return: the machine code (34 bytes).
    """
    return b"".join([
        b"\xfa",                              # cli
        b"\x31\xc0",                          # xor ax, ax
        b"\x8e\xd8",                          # mov ds, ax
        b"\x8e\xd0",                          # mov ss, ax
        b"\xbc" + _u16(LOAD_ADDRESS),         # mov sp, 0x7c00
        b"\xe4\x92",                          # in al, 0x92
        b"\x0c\x02",                          # or al, 2      (fast A20)
        b"\xe6\x92",                          # out 0x92, al
        b"\x0f\x01\x16" + _u16(gdtr),         # lgdt [gdtr]
        b"\x0f\x20\xc0",                      # mov eax, cr0
        b"\x0c\x01",                          # or al, 1      (CR0.PE)
        b"\x0f\x22\xc0",                      # mov cr0, eax
        b"\xea" + _u16(protected) + _u16(_CODE_SELECTOR),  # jmp 08:pm32
    ])


def _pageLoop(
    layout: GuestLayout, base: int, opcode: bytes, immediate: bytes = b""
) -> bytes:
    """
    A loop applying C{body} to every page: C{ebx} walks C{[start, end)}.

    @param layout: the range and counter offset.
    @param base: the offset of this loop within the sector.
    @param opcode: the opcode of one instruction addressing C{[ebx + disp32]}
        (ModRM C{0x83}, the C{/0} form, and the displacement follow it).
    @param immediate: the instruction's immediate operand, if any.
    @return: the machine code.
    """
    head = b"\xbb" + _u32(layout.start)       # mov ebx, start
    loop = b"".join([
        opcode + b"\x83" + _u32(layout.offset) + immediate,
        b"\x81\xc3" + _u32(PAGE_SIZE),        # add ebx, 4096
        b"\x81\xfb" + _u32(layout.end),       # cmp ebx, end
    ])
    top = base + len(head)
    return head + loop + b"\x72" + _rel8(top + len(loop) + 2, top)  # jb


def _protectedMode(layout: GuestLayout, base: int) -> bytes:
    """
    The 32-bit part: data segments, the clearing pass, the counting loop.

    @param layout: the guest parameters.
    @param base: the offset of this code within the sector.
    @return: the machine code.
    """
    setup = b"".join([
        b"\x66\xb8" + _u16(_DATA_SELECTOR),   # mov ax, 0x10
        b"\x8e\xd8",                          # mov ds, ax
        b"\x8e\xc0",                          # mov es, ax
        b"\x8e\xd0",                          # mov ss, ax
        b"\xbc" + _u32(LOAD_ADDRESS),         # mov esp, 0x7c00
    ])
    # mov byte [ebx + offset], 0: opcode C6, ModRM 0x83, disp32, imm8 0
    clear = _pageLoop(layout, base + len(setup), b"\xc6", b"\x00")
    passStart = base + len(setup) + len(clear)
    # inc byte [ebx + offset]: opcode FE /0, ModRM 0x83, disp32
    count = _pageLoop(layout, passStart, b"\xfe")
    tail = b"".join([
        b"\xb0" + MARKER,                     # mov al, 'P'
        b"\x66\xba" + _u16(SERIAL_PORT),      # mov dx, 0x3f8
        b"\xee",                              # out dx, al
        b"\xb9" + _u32(layout.delay),         # mov ecx, delay
        b"\x41",                              # inc ecx
        b"\x49",                              # dec ecx
        b"\x75\xfd",                          # jnz (dec ecx)
    ])
    jumpFrom = passStart + len(count) + len(tail) + 2
    return setup + clear + count + tail + b"\xeb" + _rel8(jumpFrom, passStart)


def _gdt() -> bytes:
    """
    @return: a flat GDT: null, 4 GiB code (0x08), 4 GiB data (0x10).
    """
    return b"".join([
        struct.pack("<Q", 0),
        struct.pack("<Q", 0x00CF9A000000FFFF),
        struct.pack("<Q", 0x00CF92000000FFFF),
    ])


def buildBootSector(layout: GuestLayout = GuestLayout()) -> bytes:
    """
    Build the boot sector for C{layout}.

    @param layout: the guest parameters.
    @return: exactly 512 bytes ending in the C{55 AA} signature.
    @raise ValueError: when the layout is invalid (see
        L{GuestLayout.validate}).
    """
    layout.validate()
    gdtAt, gdtrAt, protectedAt = 0x1C0, 0x1D8, 0x28
    real = _realMode(LOAD_ADDRESS + gdtrAt, LOAD_ADDRESS + protectedAt)
    protected = _protectedMode(layout, protectedAt)
    gdt = _gdt()
    sector = bytearray(SECTOR_SIZE)
    sector[: len(real)] = real
    sector[protectedAt : protectedAt + len(protected)] = protected
    sector[gdtAt : gdtAt + len(gdt)] = gdt
    gdtr = _u16(len(gdt) - 1) + _u32(LOAD_ADDRESS + gdtAt)
    sector[gdtrAt : gdtrAt + len(gdtr)] = gdtr
    sector[-2:] = BOOT_SIGNATURE
    assert len(real) <= protectedAt, "16-bit code overlaps 32-bit code"
    assert protectedAt + len(protected) <= gdtAt, "code overlaps the GDT"
    return bytes(sector)


def writeBootImage(path: str, layout: GuestLayout = GuestLayout()) -> str:
    """
    Write the boot sector to C{path} as a raw disk image.

    @param path: the image file to create or replace.
    @param layout: the guest parameters.
    @return: C{path}.
    """
    with open(path, "wb") as image:
        image.write(buildBootSector(layout))
    return path


@frozen
class CounterSnapshot:
    """
    A verified snapshot of the guest's counters.

    @ivar value: the counter value C{v} of the pages not yet incremented in
        the current pass.
    @ivar boundary: the number of leading pages already holding C{v + 1}
        (0 when all pages hold C{v}).
    """

    value: int
    boundary: int


def counters(memory: bytes, layout: GuestLayout, base: int = 0) -> bytes:
    """
    Extract the counter bytes from a memory dump.

    @param memory: guest-physical memory starting at C{base}.
    @param layout: the guest parameters.
    @param base: the guest-physical address of C{memory[0]}.
    @return: one byte per counted page.
    @raise GuestPatternError: when the dump does not cover the range.
    """
    if base > layout.start or base + len(memory) < layout.end:
        raise GuestPatternError(
            f"dump [{base:#x}, {base + len(memory):#x}) does not cover "
            f"[{layout.start:#x}, {layout.end:#x})"
        )
    first = layout.start - base + layout.offset
    stop = layout.end - base
    return bytes(memory[first:stop:PAGE_SIZE])


def checkCounterPattern(
    memory: bytes, layout: GuestLayout, base: int = 0
) -> CounterSnapshot:
    """
    Check that a dump holds a consistent snapshot of the counting guest:
    every counter is C{v + 1} up to one boundary and C{v} after it (mod 256).

    @param memory: guest-physical memory starting at C{base}.
    @param layout: the guest parameters.
    @param base: the guest-physical address of C{memory[0]}.
    @return: the snapshot's value and boundary.
    @raise GuestPatternError: naming the first page that breaks the pattern.
    """
    values = counters(memory, layout, base)
    last = values[-1]
    boundary = 0
    while boundary < len(values) and values[boundary] == (last + 1) % 256:
        boundary += 1
    for index in range(boundary, len(values)):
        if values[index] != last:
            address = layout.start + index * PAGE_SIZE
            raise GuestPatternError(
                f"page {index} at {address:#x} holds {values[index]}, expected "
                f"{last} (pages before {boundary} hold {(last + 1) % 256})"
            )
    return CounterSnapshot(value=last, boundary=boundary)

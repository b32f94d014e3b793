# -*- test-case-name: tests.test_wire_stream -*-
"""
Numbers of QEMU 7.2's migration stream and return path, under QEMU's names.

Sources: C{migration/savevm.c} (section types, C{MIG_CMD_*}),
C{migration/ram.c} (C{RAM_SAVE_FLAG_*}), C{migration/migration.h}
(C{MIG_RP_MSG_*}); see C{docs/wire-format.md}.
"""

from __future__ import annotations

import enum
from typing import Final


class SectionType(enum.IntEnum):
    """
    The one-byte type of a top-level element (C{QEMU_VM_*}).
    """

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


#: Section kinds that carry the full header (idstr, instance, version).
FULL_HEADER_KINDS: Final = frozenset({SectionType.SECTION_START, SectionType.SECTION_FULL})
#: Section kinds that carry only the section id.
SHORT_HEADER_KINDS: Final = frozenset({SectionType.SECTION_PART, SectionType.SECTION_END})


class Command(enum.IntEnum):
    """
    The C{be16} number of a C{QEMU_VM_COMMAND} (C{MIG_CMD_*}).
    """

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10


#: QEMU's C{mig_cmd_args} table: the exact payload length of each fixed-length
#: command, or L{None} for the variable-length ones (checked by the handler).
COMMAND_LENGTHS: Final[dict[Command, int | None]] = {
    Command.OPEN_RETURN_PATH: 0,
    Command.PING: 4,
    Command.POSTCOPY_ADVISE: None,
    Command.POSTCOPY_LISTEN: 0,
    Command.POSTCOPY_RUN: 0,
    Command.POSTCOPY_RAM_DISCARD: None,
    Command.PACKAGED: 4,
    Command.ENABLE_COLO: 0,
    Command.POSTCOPY_RESUME: 0,
    Command.RECV_BITMAP: None,
}


class RPMessage(enum.IntEnum):
    """
    The C{be16} type of a return-path message (C{MIG_RP_MSG_*}).
    """

    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6


#: Exact payload length of the fixed-length return-path messages
#: (L{None}: variable, checked by the decoder).
RP_MESSAGE_LENGTHS: Final[dict[RPMessage, int | None]] = {
    RPMessage.SHUT: 4,
    RPMessage.PONG: 4,
    RPMessage.REQ_PAGES_ID: None,
    RPMessage.REQ_PAGES: 12,
    RPMessage.RECV_BITMAP: None,
    RPMessage.RESUME_ACK: 4,
}


class RAMFlag(enum.IntFlag):
    """
    The low 12 bits of a RAM record word (C{RAM_SAVE_FLAG_*}).
    """

    FULL = 0x001
    ZERO = 0x002
    MEM_SIZE = 0x004
    PAGE = 0x008
    EOS = 0x010
    CONTINUE = 0x020
    XBZRLE = 0x040
    HOOK = 0x080
    COMPRESS_PAGE = 0x100
    MULTIFD_FLUSH = 0x200


#: Flags twisted-postcopy refuses, with the capability to switch off on
#: the peer (C{MULTIFD_FLUSH} is from QEMU 8; 7.2 never sends it).
UNSUPPORTED_RAM_FLAGS: Final[dict[RAMFlag, str]] = {
    RAMFlag.XBZRLE: "xbzrle",
    RAMFlag.COMPRESS_PAGE: "compress",
    RAMFlag.HOOK: "rdma (x-rdma: URI)",
    RAMFlag.MULTIFD_FLUSH: "multifd",
}

#: C{QEMU_VM_FILE_MAGIC}, "QEVM".
QEMU_VM_FILE_MAGIC: Final = 0x5145564D
#: C{QEMU_VM_FILE_VERSION}.
QEMU_VM_FILE_VERSION: Final = 3
#: C{QEMU_VM_FILE_VERSION_COMPAT}: rejected as obsolete.
QEMU_VM_FILE_VERSION_COMPAT: Final = 2

#: Target page size and bits on x86.
TARGET_PAGE_BITS: Final = 12
TARGET_PAGE_SIZE: Final = 1 << TARGET_PAGE_BITS
#: The flag bits of a RAM record word.
RAM_FLAGS_MASK: Final = TARGET_PAGE_SIZE - 1
#: The record word of an EOS record.
RAM_EOS_WORD: Final = int(RAMFlag.EOS)

#: The RAM section's idstr, instance and version.
RAM_IDSTR: Final = "ram"
RAM_SECTION_VERSION: Final = 4
#: The section id QEMU 7.2 gives the RAM section on C{pc} machines (what our
#: source sends, and what a recovery main channel carries).
RAM_SECTION_ID: Final = 2

#: Longest id string (C{str8}); an empty one is a read failure in QEMU.
MAX_IDSTR_LENGTH: Final = 255
#: Largest return-path payload the source accepts.
MAX_RP_MESSAGE_LEN: Final = 512
#: Trailing mark of a return-path RECV_BITMAP (outside C{len}).
RECV_BITMAP_ENDING: Final = 0x0123456789ABCDEF
#: Ranges per POSTCOPY_RAM_DISCARD command a 7.2 source sends at most.
MAX_DISCARDS_PER_COMMAND: Final = 12
#: Version byte of POSTCOPY_RAM_DISCARD.
POSTCOPY_RAM_DISCARD_VERSION: Final = 0
#: RESUME_ACK's only accepted value.
RESUME_ACK_VALUE: Final = 1

#: Default limit of a PACKAGED body (7.2 allows up to UINT32_MAX).
DEFAULT_MAX_PACKAGE_SIZE: Final = 256 * 1024 * 1024
#: Default limit of one device section (header, payload, footer).
DEFAULT_MAX_DEVICE_SECTION_SIZE: Final = 16 * 1024 * 1024
#: Default limit of the VMDESCRIPTION JSON.
DEFAULT_MAX_VMDESC_SIZE: Final = 16 * 1024 * 1024
#: Default limit of a RAM START block list (max-block-list-size).
DEFAULT_MAX_BLOCK_LIST_SIZE: Final = 1024 * 1024
#: Limit of the configuration element (max-configuration-size; QEMU 7.2
#: sends about 100 bytes).
MAX_CONFIGURATION_SIZE: Final = 64 * 1024
#: Limit of the capability count of C{configuration/capabilities}
#: (max-capabilities; 7.2 knows one, C{x-ignore-shared}).
MAX_CAPABILITIES: Final = 64
#: Default limit of the RAMBlocks a START lists (max-ram-blocks).
DEFAULT_MAX_RAM_BLOCKS: Final = 512
#: Default limit of the RAM a START lists, in bytes (max-total-ram).
DEFAULT_MAX_TOTAL_RAM: Final = 1 << 40
#: Default limit of the device-section bytes one stream holds (device
#: state is kept until RUN or EOF; max-device-bytes).
DEFAULT_MAX_DEVICE_BYTES: Final = 256 * 1024 * 1024
#: Default limit of distinct section ids one stream announces (max-sections).
DEFAULT_MAX_SECTIONS: Final = 4096
#: Default limit of page-request ranges queued on a source (de-duplicated
#: first; max-queued-requests).
DEFAULT_MAX_QUEUED_REQUESTS: Final = 65536
#: Default limit of preempt-channel bytes held before the RAM block list is
#: known (a 7.2 source writes there only in postcopy; max-preempt-held).
DEFAULT_MAX_PREEMPT_HELD: Final = 4 * 1024 * 1024
#: Limit of one AMP box on the control socket (keys and values; max-amp-box).
MAX_AMP_BOX_SIZE: Final = 4 * 1024 * 1024
#: Largest host page size a block list may carry (1 GiB huge pages).
MAX_PAGE_SIZE: Final = 1 << 30
#: Default limit of a return-path RECV_BITMAP body (covers 2 TiB of RAM).
DEFAULT_MAX_RECV_BITMAP_SIZE: Final = 64 * 1024 * 1024

#: idstr prefix of twisted-postcopy guests' own device sections, whose
#: payload is C{be32 len} + blob.
OWN_SECTION_PREFIX: Final = "twisted-postcopy/"

#: Configuration subsection names (section 1 of migration-stream.md).
CONFIG_TARGET_PAGE_BITS: Final = "configuration/target-page-bits"
CONFIG_CAPABILITIES: Final = "configuration/capabilities"
CONFIG_UUID: Final = "configuration/uuid"

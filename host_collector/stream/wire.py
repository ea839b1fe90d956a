"""Wire constants of QEMU's migration stream (main channel), versions 7.2 to 10.2.

Values and layouts are checked against QEMU 7.2's ``migration/savevm.c``,
``migration/ram.c`` and ``migration/vmstate.c`` (docs/stream-proxy.md lists
where each one comes from). Only what the parser needs is named here.
"""

from __future__ import annotations

import enum
import struct

#: "QEVM", then the file version.
FILE_MAGIC = 0x5145564D
FILE_VERSION = 3
#: An old stream version the destination refuses as obsolete.
FILE_VERSION_COMPAT = 2

#: First four bytes of a multifd channel (before its BE32 version).
MULTIFD_MAGIC = 0x11223344

# Top-level item types (savevm.h).
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

# Commands (savevm.c enum qemu_vm_cmd) the parser lets through, with their fixed length.
CMD_OPEN_RETURN_PATH = 1
CMD_PING = 2
CMD_POSTCOPY_ADVISE = 3
CMD_PACKAGED = 7
CMD_ENABLE_COLO = 8
#: QEMU 10.0+, machine types >= 10.0: sent once right before the END sections.
CMD_SWITCHOVER_START = 11
PASSABLE_COMMANDS: dict[int, int] = {
    CMD_OPEN_RETURN_PATH: 0,
    CMD_PING: 4,
    CMD_SWITCHOVER_START: 0,
}
COMMAND_NAMES: dict[int, str] = {
    0: "INVALID",
    1: "OPEN_RETURN_PATH",
    2: "PING",
    3: "POSTCOPY_ADVISE",
    4: "POSTCOPY_LISTEN",
    5: "POSTCOPY_RUN",
    6: "POSTCOPY_RAM_DISCARD",
    7: "PACKAGED",
    8: "ENABLE_COLO",
    9: "POSTCOPY_RESUME",
    10: "RECV_BITMAP",
    11: "SWITCHOVER_START",
}

# The RAM section.
RAM_IDSTR = b"ram"
RAM_INSTANCE = 0
RAM_VERSION = 4

# RAM record flags: the low TARGET_PAGE_BITS of each record's BE64 header word.
TARGET_PAGE_BITS = 12
PAGE_SIZE = 1 << TARGET_PAGE_BITS
FLAGS_MASK = PAGE_SIZE - 1
FLAG_ZERO = 0x02
FLAG_MEM_SIZE = 0x04
FLAG_PAGE = 0x08
FLAG_EOS = 0x10
FLAG_CONTINUE = 0x20
FLAG_XBZRLE = 0x40
FLAG_HOOK = 0x80
FLAG_COMPRESS_PAGE = 0x100
FLAG_MULTIFD_FLUSH = 0x200

# Configuration subsections (savevm.c vmstate_configuration).
SUB_TARGET_PAGE_BITS = b"configuration/target-page-bits"
SUB_CAPABILITIES = b"configuration/capabilities"
SUB_UUID = b"configuration/uuid"
#: Validated capabilities the parser understands in the capabilities subsection.
#: ``x-ignore-shared`` adds one BE64 (the block's MemoryRegion address) to every
#: MEM_SIZE entry; ignored blocks are never sent, so rewriting stays sound.
CAP_IGNORE_SHARED = b"x-ignore-shared"
KNOWN_CAPABILITIES = frozenset({CAP_IGNORE_SHARED})

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


class Phase(enum.Enum):
    """Where the parser is in the stream. Phases only move forward."""

    #: Waiting for the file header and configuration.
    HEADER = "header"
    #: Commands and START sections before any page record (dirty logging is on
    #: once the MEM_SIZE record is out: qemu-stream.md section 6).
    SETUP = "setup"
    #: ``ram`` PART sections while the guest runs.
    ITERATION = "iteration"
    #: The ``ram`` END section: the guest is stopped.
    COMPLETION = "completion"
    #: Everything after the ``ram`` END section (device state, EOF, VM
    #: description): relayed verbatim, no page record can follow in precopy.
    DEVICE_STATE = "device-state"
    #: The parser gave up; the rest of the stream is relayed verbatim.
    PASSTHROUGH = "passthrough"

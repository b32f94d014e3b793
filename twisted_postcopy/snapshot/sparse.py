# -*- test-case-name: tests.test_snapshot_store -*-
"""
Sparse files: where a file (or memfd) holds data and where it has holes,
for the snapshot store (which writes and hashes only data) and for block
mappings (which map holes on the zero page).
"""

from __future__ import annotations

import os
from typing import Iterator

__all__ = ["dataRuns"]


def dataRuns(fd: int, length: int) -> Iterator[tuple[int, int]]:
    """
    The data (non-hole) runs of a file, by C{SEEK_DATA}/C{SEEK_HOLE}.

    @param fd: an open file or memfd.
    @param length: how far to look.
    @return: (offset, length) runs, ascending.
    """
    offset = 0
    while offset < length:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            return
        if start >= length:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), length)
        yield start, end - start
        offset = end

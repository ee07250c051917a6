"""A partner's encoded table, held in memory or spilled to a file on the node's disk.

Why: a partner's file can be larger than the node's memory. Its encoded form
(float32, one column per model input) is often larger still: the 2 GB table of
``bench/data.py`` encodes to 85 inputs × 12M rows, about 4 GB. Loading stays
streaming (blocks of rows), and the encoded blocks go to a :class:`RowSink`
that keeps them in memory up to a budget and past it moves them to a spill
file. Everything a node does with its table is then block-wise (the DP
statistics release and the evaluation sums add up over blocks) or gathers
a batch of rows (DP-SGD's Poisson batches): :class:`EncodedRows` offers just
those two operations, for either kind of storage.

Reads are explicit ``pread`` calls into fresh arrays, not a memory map: pages
of a mapped file that a process has touched count in its resident set until
the kernel evicts them, so randomly sampled batches would, over a run, pull
the whole spill file into the node's RSS. Read pages stay in the page cache,
which the kernel reclaims under pressure and does not charge to the node.

The spill file holds the partner's data, encoded: it is created in the node's
own state directory, 0600 (``mkstemp``), and unlinked at once, so it lives
exactly as long as the open file descriptor and nothing is left behind when
the process ends, however it ends.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedvault.errors import DataError

__all__ = [
    "BLOCK_ROWS",
    "IN_MEMORY",
    "NODE_MEMORY_BYTES",
    "VALIDATE_ONLY",
    "EncodedRows",
    "MemoryRows",
    "RowSink",
    "SpilledRows",
    "Storage",
]

FloatRows = npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.intp]

BLOCK_ROWS = 65_536
# What a node keeps in memory per encoded table before it spills: with a
# training and a test table, their standardised copies and one parse block,
# a node stays well under 1 GB whatever the file size (bench/data.py).
NODE_MEMORY_BYTES = 128 << 20
# take(): a chunk of this many rows is read whole when at least
# 1/_DENSE_FRACTION of its rows are wanted, else row by row. One pread
# costs ~2 µs with Python's overhead; a 16k-row chunk (85 inputs: 5.6 MB)
# ~1 ms from the page cache, so reading whole pays from ~1/64 of it.
_CHUNK_ROWS = 16_384
_DENSE_FRACTION = 64


class EncodedRows(Protocol):
    """What a node needs of its encoded table."""

    @property
    def n_rows(self) -> int: ...

    @property
    def width(self) -> int: ...

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[FloatRows]:
        """Consecutive blocks of rows, top to bottom."""
        ...

    def take(self, indices: IndexArray) -> FloatRows:
        """The rows at ``indices`` (any order, no duplicates needed), in that order."""
        ...

    def array(self) -> FloatRows:
        """The whole table as one array (reads a spilled table back into memory)."""
        ...


class MemoryRows:
    """An encoded table in one read-only array."""

    def __init__(self, array: FloatRows) -> None:
        array.flags.writeable = False
        self._array = array

    @property
    def n_rows(self) -> int:
        return int(self._array.shape[0])

    @property
    def width(self) -> int:
        return int(self._array.shape[1])

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[FloatRows]:
        for start in range(0, self.n_rows, rows):
            yield self._array[start : start + rows]

    def take(self, indices: IndexArray) -> FloatRows:
        return self._array[indices]

    def array(self) -> FloatRows:
        return self._array


class SpilledRows:
    """An encoded table in an unlinked file, read with ``pread``."""

    def __init__(self, fd: int, n_rows: int, width: int) -> None:
        self._fd = fd
        self._n_rows = n_rows
        self._width = width
        self._row_bytes = 4 * width
        self._closer = weakref.finalize(self, os.close, fd)

    @property
    def n_rows(self) -> int:
        return self._n_rows

    @property
    def width(self) -> int:
        return self._width

    def close(self) -> None:
        self._closer()

    def _read(self, first: int, out: FloatRows) -> None:
        """Fill ``out`` (C-contiguous rows) from row ``first`` on."""
        view = out.data.cast("B")
        offset = first * self._row_bytes
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:  # the file is ours and unlinked: only a disk fault gets here
                raise DataError("the node's spilled copy of the table ended early")
            done += got

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[FloatRows]:
        for start in range(0, self._n_rows, rows):
            out = np.empty((min(rows, self._n_rows - start), self._width), dtype=np.float32)
            self._read(start, out)
            yield out

    def take(self, indices: IndexArray) -> FloatRows:
        idx = np.asarray(indices, dtype=np.intp)
        out = np.empty((len(idx), self._width), dtype=np.float32)
        if not len(idx):
            return out
        order = np.argsort(idx, kind="stable")
        wanted = idx[order]
        if wanted[0] < 0 or wanted[-1] >= self._n_rows:
            raise IndexError("row index out of range")
        gathered = np.empty_like(out)
        chunk = np.empty((_CHUNK_ROWS, self._width), dtype=np.float32)
        edges = np.searchsorted(wanted, np.arange(0, self._n_rows + _CHUNK_ROWS, _CHUNK_ROWS))
        for c in np.flatnonzero(np.diff(edges)):
            lo, hi = int(edges[c]), int(edges[c + 1])
            first = int(c) * _CHUNK_ROWS
            if (hi - lo) * _DENSE_FRACTION >= _CHUNK_ROWS:
                size = min(_CHUNK_ROWS, self._n_rows - first)
                self._read(first, chunk[:size])
                gathered[lo:hi] = chunk[wanted[lo:hi] - first]
            else:
                for k in range(lo, hi):
                    self._read(int(wanted[k]), gathered[k : k + 1])
        out[order] = gathered
        return out

    def array(self) -> FloatRows:
        out = np.empty((self._n_rows, self._width), dtype=np.float32)
        self._read(0, out)
        return out


class RowSink:
    """Collects a table's encoded blocks, in memory up to a budget, then spilled.

    ``memory_bytes=None``: everything stays in memory (the library default:
    tests, benchmarks and small tables). ``keep=False``: nothing is kept, only
    rows are counted (validation without training). ``expected_rows``, when
    known and within budget, preallocates the whole table so that blocks are
    encoded in place (:meth:`buffer`) with no concatenating copy.
    """

    def __init__(
        self,
        width: int,
        *,
        memory_bytes: int | None = None,
        spill_dir: Path | None = None,
        keep: bool = True,
        expected_rows: int | None = None,
    ) -> None:
        self.width = width
        self.rows = 0
        self._budget = memory_bytes
        self._spill_dir = spill_dir
        self._keep = keep
        self._blocks: list[FloatRows] = []
        self._held = 0
        self._fd: int | None = None
        self._whole: FloatRows | None = None
        if keep and expected_rows is not None and self._fits(expected_rows * 4 * width):
            self._whole = np.empty((expected_rows, width), dtype=np.float32)

    def _fits(self, nbytes: int) -> bool:
        return self._budget is None or nbytes <= self._budget

    def buffer(self, rows: int) -> FloatRows:
        """An array to encode the next ``rows`` rows into (then :meth:`commit` it)."""
        if self._whole is not None and self.rows + rows <= len(self._whole):
            return self._whole[self.rows : self.rows + rows]
        return np.empty((rows, self.width), dtype=np.float32)

    def commit(self, block: FloatRows) -> None:
        """Add encoded rows (a :meth:`buffer` or any (rows, width) float32 array)."""
        n = int(block.shape[0])
        if not self._keep or not n:
            self.rows += n
            return
        if self._whole is not None:
            if block.base is self._whole or block is self._whole:
                self.rows += n
                return
            self._blocks = [self._whole[: self.rows]]
            self._held = self.rows * 4 * self.width
            self._whole = None
        if self._fd is None:
            self._blocks.append(np.ascontiguousarray(block, dtype=np.float32))
            self._held += int(self._blocks[-1].nbytes)
            self.rows += n
            if not self._fits(self._held):
                self._spill()
            return
        self._write(np.ascontiguousarray(block, dtype=np.float32))
        self.rows += n

    def _spill(self) -> None:
        directory = self._spill_dir or Path(tempfile.gettempdir())
        try:
            fd, name = tempfile.mkstemp(prefix=".fedvault-spill-", dir=directory)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise DataError(
                f"the table does not fit the node's memory budget and cannot be spilled "
                f"to {directory} ({reason})"
            ) from None
        os.unlink(name)
        self._fd = fd
        blocks, self._blocks, self._held = self._blocks, [], 0
        for block in blocks:
            self._write(block)

    def _write(self, block: FloatRows) -> None:
        fd = self._fd
        if fd is None:  # pragma: no cover - only called once spilled
            raise RuntimeError("not spilling")
        view = block.data.cast("B")
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            self.discard()
            reason = exc.strerror or type(exc).__name__
            raise DataError(f"cannot spill the encoded table to disk ({reason})") from None

    def discard(self) -> None:
        """Drop what was collected (an invalid file: nothing of it is kept)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._blocks, self._whole, self._held = [], None, 0

    def finish(self) -> EncodedRows:
        """The table collected (an empty one when ``keep=False``)."""
        if not self._keep:
            return MemoryRows(np.empty((0, self.width), dtype=np.float32))
        if self._fd is not None:
            fd, self._fd = self._fd, None
            return SpilledRows(fd, self.rows, self.width)
        if self._whole is not None:
            return MemoryRows(self._whole[: self.rows])
        if len(self._blocks) == 1:
            return MemoryRows(self._blocks[0])
        if not self._blocks:
            return MemoryRows(np.empty((0, self.width), dtype=np.float32))
        return MemoryRows(np.concatenate(self._blocks))


@dataclass(frozen=True, slots=True)
class Storage:
    """Where a loaded table's encoded rows go (see :class:`RowSink`)."""

    memory_bytes: int | None = None
    spill_dir: Path | None = None
    keep: bool = True

    def sink(self, width: int, expected_rows: int | None = None) -> RowSink:
        return RowSink(
            width,
            memory_bytes=self.memory_bytes,
            spill_dir=self.spill_dir,
            keep=self.keep,
            expected_rows=expected_rows,
        )


IN_MEMORY = Storage()
VALIDATE_ONLY = Storage(keep=False)

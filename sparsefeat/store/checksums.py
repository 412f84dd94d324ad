"""Per-block checksums of a store's row data, so damaged rows are found instead of trained on.

For every site, `checksums/<site>` [blocks] uint32 holds a checksum of the bytes of each
chunk-aligned block of rows (block c = rows [c·chunk_rows, (c+1)·chunk_rows), cut at the committed
rows), as stored (dtype, C order, before any compression); the dataset's `algorithm` attribute names
it. Stores are written with CRC-32 (`zlib.crc32`: 3.8 GB/s here, against 2.1 GB/s for Adler-32,
which the first version 2 stores used and which is still read). The writer extends the checksum of
the last, partly filled block as rows arrive (both can be continued), so a block's checksum always
covers exactly its committed rows.
"""

from __future__ import annotations

import zlib

import h5py
import numpy as np

from .h5 import StoreError

ALGORITHM = "crc32"  # what new stores are written with
GROUP = "checksums"
# name -> (function(bytes, value to continue from), the checksum of no bytes)
ALGORITHMS = {"crc32": (zlib.crc32, 0), "adler32": (zlib.adler32, 1)}


def algorithm_of(ds: h5py.Dataset, path) -> str:
    """The algorithm a `checksums/<site>` dataset was written with (one line if unknown)."""
    name = ds.attrs.get("algorithm", "adler32")  # the first version 2 stores: Adler-32
    name = name.decode() if isinstance(name, bytes) else str(name)
    if name not in ALGORITHMS:
        raise StoreError(f"{path}: unknown checksum algorithm {name!r} for {ds.name} "
                         f"(known: {', '.join(ALGORITHMS)}); a newer sparsefeat wrote it")
    return name


def extend(sums: np.ndarray, rows: np.ndarray, start: int, chunk_rows: int,
           algorithm: str = ALGORITHM) -> np.ndarray:
    """Checksums of blocks after appending `rows` at row `start`: `sums` holds the blocks before
    (the last one possibly partial); returns the new array (blocks up to the new end)."""
    fn, empty = ALGORITHMS[algorithm]
    stop = start + rows.shape[0]
    rows = np.ascontiguousarray(rows)
    out = np.concatenate([sums[: -(-stop // chunk_rows)].astype(np.uint32),
                          np.full(max(0, -(-stop // chunk_rows) - sums.shape[0]), empty, dtype=np.uint32)])
    lo = start
    while lo < stop:
        c = lo // chunk_rows
        hi = min(stop, (c + 1) * chunk_rows)
        prev = int(out[c]) if lo % chunk_rows else empty
        out[c] = fn(rows[lo - start:hi - start], prev)
        lo = hi
    return out


class BlockVerifier:
    """Checks each block of one site against its stored checksum, once per reader.

    The last block of a store that is not complete is not checked: a live or killed writer may
    have extended its checksum past the rows committed when the reader opened the file."""

    def __init__(self, f: h5py.File, path, site: str, committed: int, complete: bool):
        ds = f[GROUP][site]
        self.path, self.site, self.committed = path, site, committed
        self.chunk_rows = int(ds.attrs["chunk_rows"])
        self.algorithm = algorithm_of(ds, path)
        self._fn = ALGORITHMS[self.algorithm][0]
        n_blocks = -(-committed // self.chunk_rows)
        self.sums = ds[:n_blocks]
        if self.sums.shape[0] < n_blocks:
            raise StoreError(f"{path}: truncated or corrupt (site {site!r} has {self.sums.shape[0]} "
                             f"checksums for {n_blocks} blocks)")
        self.done = np.zeros(n_blocks, dtype=bool)
        if not complete and committed % self.chunk_rows:
            self.done[-1] = True

    def check(self, start: int, stop: int, data) -> None:
        """`data`: the bytes of rows [start, stop) of a block (start on a block boundary)."""
        c = start // self.chunk_rows
        if self.done[c]:
            return
        if start % self.chunk_rows or stop != min(start + self.chunk_rows, self.committed):
            raise ValueError(f"not a whole block: rows {start}..{stop}")
        if self._fn(data) != int(self.sums[c]):
            raise StoreError(f"{self.path}: the row data of site {self.site!r} is damaged: block {c} "
                             f"(rows {start}..{stop - 1}) fails its checksum; write the store again")
        self.done[c] = True

    def check_rows(self, start: int, rows: np.ndarray) -> None:
        """Check every whole block inside `rows` (rows[0] is row `start`, a block boundary)."""
        for lo in range(0, rows.shape[0], self.chunk_rows):
            s = start + lo
            e = min(s + self.chunk_rows, self.committed)
            if e - start <= rows.shape[0]:
                self.check(s, e, np.ascontiguousarray(rows[lo:e - start]))

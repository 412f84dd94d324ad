"""Shuffled batches in constant memory: one mixing buffer over a small row-source interface.

`shuffled_batches` takes whole blocks of rows in a random order into a buffer of about
`buffer_rows` rows, shuffles what it holds, cuts batches, and carries the rows left over into the
next fill (like SAELens's mixing buffer, with blocks instead of model batches). It never touches a
file: a row source holds the rows and hands them over by reference, so the same random draws give
the same batches whichever source holds them:

- `MappedRows`: the rows stay in a read-only memory map of the file; a reference is a row's byte
  offset and a batch is one gather from the map (one copy of each row);
- `CopiedRows`: blocks are read into one preallocated buffer; a reference is a row's place in it
  (two copies of each row).

Each source can check every block it reads against its checksum (`check(start, stop, bytes)`).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

Check = Callable[[int, int, object], None]


class RowSource(Protocol):
    def begin(self, carry: np.ndarray) -> np.ndarray:
        """Start a fill keeping the rows `carry` (references from the last fill); their references now."""

    def add(self, start: int, stop: int, rows: np.ndarray) -> np.ndarray:
        """Take the block of rows [start, stop); references of its rows `rows` (numbers within the block)."""

    def take(self, refs: np.ndarray) -> np.ndarray:
        """The rows `refs`, in that order, as a new [len(refs), d] array."""


def shuffled_batches(source: RowSource, blocks: Sequence[tuple[int, int, np.ndarray]], batch_size: int, *,
                     seed: int, epochs: int | None, shuffle: bool, drop_last: bool,
                     buffer_rows: int) -> Iterator[np.ndarray]:
    """Batches of the rows `blocks` lists ((start, stop, rows within the block) each): every listed
    row once per epoch; epoch e draws from the stream (seed, e); `epochs=None` repeats forever."""
    target = max(buffer_rows, batch_size)  # rows to hold before cutting batches
    epoch = 0
    while epochs is None or epoch < epochs:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(blocks)) if shuffle else np.arange(len(blocks))
        carry = np.zeros(0, dtype=np.int64)
        i = 0
        while i < len(order):
            refs, fill = [source.begin(carry)], carry.shape[0]
            while i < len(order) and fill < target:
                start, stop, rows = blocks[order[i]]
                refs.append(source.add(start, stop, rows))
                fill += stop - start  # the buffer holds whole blocks, kept rows or not
                i += 1
            idx = np.concatenate(refs)
            if shuffle:
                rng.shuffle(idx)
            full = idx.shape[0] // batch_size * batch_size
            for j in range(0, full, batch_size):
                yield source.take(idx[j:j + batch_size])
            carry = idx[full:]
        if carry.shape[0] and not drop_last:
            yield source.take(carry)
        epoch += 1


class MappedRows:
    """Rows of chunk-aligned blocks at known byte offsets of a read-only buffer (a file's map).

    A block holds `chunk_rows` whole rows at its byte offset, so row r of the block at row `start`
    begins at offsets[start // chunk_rows] + r * row_bytes. The buffer is viewed as overlapping
    row-sized records, one starting at every byte, so a batch is a single gather by byte offset."""

    def __init__(self, buffer, offsets: np.ndarray, chunk_rows: int, row_bytes: int, dtype, d: int,
                 check: Check | None = None):
        self.offsets, self.chunk_rows, self.row_bytes, self.dtype, self.d = offsets, chunk_rows, row_bytes, dtype, d
        self.check = check
        self.bytes = np.frombuffer(buffer, dtype=np.uint8)
        self.records = np.ndarray((self.bytes.shape[0] - row_bytes + 1,), dtype=np.dtype((np.void, row_bytes)),
                                  buffer=buffer, strides=(1,))

    def begin(self, carry):
        return carry

    def add(self, start, stop, rows):
        at = int(self.offsets[start // self.chunk_rows])
        if self.check is not None:
            self.check(start, stop, self.bytes[at:at + (stop - start) * self.row_bytes])
        return at + rows.astype(np.int64) * self.row_bytes

    def take(self, refs):
        return self.records[refs].view(self.dtype).reshape(refs.shape[0], self.d)


class CopiedRows:
    """Blocks read into one preallocated buffer with `read(start, stop, out)` (which may fill up to
    `chunk_rows` rows of `out`); holds `capacity` rows plus one block."""

    def __init__(self, read: Callable[[int, int, np.ndarray], None], capacity: int, chunk_rows: int, d: int,
                 dtype, check: Check | None = None):
        self.read, self.check = read, check
        self.buf = np.empty((capacity + chunk_rows, d), dtype=dtype)
        self.fill = 0

    def begin(self, carry):
        n = carry.shape[0]
        self.buf[:n] = self.buf[carry]  # (the right side is a copy, so no overlap)
        self.fill = n
        return np.arange(n, dtype=np.int64)

    def add(self, start, stop, rows):
        out = self.buf[self.fill:]
        self.read(start, stop, out)
        if self.check is not None:
            self.check(start, stop, out[:stop - start])
        refs = rows.astype(np.int64) + self.fill
        self.fill += stop - start
        return refs

    def take(self, refs):
        return self.buf[refs]  # a new array: the buffer is refilled later


def prefetched(it: Iterator, depth: int) -> Iterator:
    """Run an iterator in a background thread, `depth` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def worker():
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # hand the error to the consumer
            q.put(e)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()

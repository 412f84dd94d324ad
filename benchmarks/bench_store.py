"""Shuffled batch stream of the store beside a raw contiguous read of the same dataset, in one process.

    .venv/bin/python benchmarks/bench_store.py [--mb 300] [--d 384] [--repeats 3] [--batch 4096]

Writes a float16 store of about `--mb` MB (width `--d`, 10% test rows) in a temporary folder, then
times, interleaved per repeat so that load from other processes hits all alike:
- raw: the whole dataset read front to back in large slices with `read_direct` into one buffer
  (the fastest way HDF5 can hand over these bytes: the baseline);
- stream: `ActivationStore.batches` over split "all" (every row once, shuffled), float16 tensors;
- stream32: the same, converted to float32 tensors (what the trainer usually asks for);
- train: split "train" (skips the test rows inside each chunk), float16;
- first: `stream` from a freshly opened store, so every block is checked against its checksum
  (a reader checks each block once; the cases above reuse one reader whose blocks are checked),
  with CRC-32, the algorithm stores are written with;
- first-adler32: the same as first on a copy of the store whose checksums are Adler-32 (the
  algorithm of the first version 2 stores);
- first-nocheck: a fresh store with the checksum check switched off, to isolate its cost;
- crc32, adler32: the checksum alone over every block's bytes (from the file's map, one thread):
  the bytes a hash gets through per second against the bytes a raw read delivers.
Rates are MB/s of rows delivered; ratios are against raw, from the best (shortest) time of each.
Targets: stream / raw >= 0.7 and first / raw >= 0.7. Files are read warm (from the page cache)
after the first repeat.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import h5py

import numpy as np
import torch

from sparsefeat.store import ActivationStore, StoreWriter, split_rows


def write_store(path: Path, rows: int, d: int) -> None:
    rng = np.random.default_rng(0)
    block = 1 << 15
    with StoreWriter(path, sites={"x": d}, provenance={"bench": True}, kind="import", dtype="float16",
                     test_fraction=0.1) as w:
        for lo in range(0, rows, block):
            n = min(block, rows - lo)
            w.append({"x": rng.standard_normal((n, d), dtype=np.float32)}, test=split_rows(n, 0.1, 0, lo))


def raw_read(s: ActivationStore) -> int:
    ds = s.f["activations/x"]
    n, d = ds.shape
    step = ds.chunks[0] * 64
    buf = np.empty((step, d), dtype=ds.dtype)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        ds.read_direct(buf, np.s_[lo:hi], np.s_[0:hi - lo])
    return n * d * ds.dtype.itemsize


def stream(s: ActivationStore, split: str, batch: int, dtype: torch.dtype) -> int:
    rows = 0
    for b in s.batches("x", split, batch, seed=1, dtype=dtype):
        rows += b.shape[0]
    return rows * s.width("x") * 2  # bytes as stored (float16)


def as_adler32(src: Path, dst: Path) -> None:
    """A copy of the store with Adler-32 checksums, as the first version 2 stores were written."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "a") as f:
        c, x = f["checksums/x"], f["activations/x"]
        rows, n = int(c.attrs["chunk_rows"]), x.shape[0]
        c[:] = [zlib.adler32(np.ascontiguousarray(x[lo:min(n, lo + rows)])) for lo in range(0, n, rows)]
        c.attrs["algorithm"] = "adler32"


def hash_blocks(s: ActivationStore, fn) -> int:
    """The checksum `fn` over every block's bytes as a reader hashes them (from the map)."""
    rows = s._mapped_rows(s.f["activations/x"])
    n = 0
    for start, stop in s._blocks(s.f["activations/x"]):
        at = int(rows.offsets[start // rows.chunk_rows])
        n += (stop - start) * rows.row_bytes
        fn(rows.bytes[at:at + (stop - start) * rows.row_bytes])
    return n


def fresh(path: Path, batch: int, check: bool = True) -> int:
    """One pass of `stream` over a freshly opened store: its first, checked pass."""
    with ActivationStore(path) as s:
        if not check:
            s._verifier = lambda ds: None
        return stream(s, "all", batch, torch.float16)


def best_time(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    nbytes = fn()
    return time.perf_counter() - t0, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=300)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4096)
    args = ap.parse_args()
    rows = int(args.mb * 1e6 / (args.d * 2))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        t0 = time.perf_counter()
        write_store(path, rows, args.d)
        size = path.stat().st_size / 1e6
        print(f"store: {rows} rows x {args.d} float16 = {size:.0f} MB, written in {time.perf_counter() - t0:.1f} s; "
              f"batch {args.batch}, {torch.get_num_threads()} torch threads")
        adler = Path(tmp) / "bench-adler32.h5"
        as_adler32(path, adler)
        cases = {
            "raw": lambda s: raw_read(s),
            "stream": lambda s: stream(s, "all", args.batch, torch.float16),
            "stream32": lambda s: stream(s, "all", args.batch, torch.float32),
            "train": lambda s: stream(s, "train", args.batch, torch.float16),
            "first": lambda s: fresh(path, args.batch),
            "first-adler32": lambda s: fresh(adler, args.batch),
            "first-nocheck": lambda s: fresh(path, args.batch, check=False),
            "crc32": lambda s: hash_blocks(s, zlib.crc32),
            "adler32": lambda s: hash_blocks(s, zlib.adler32),
        }
        best = {name: (np.inf, 0) for name in cases}
        with ActivationStore(path) as s:
            raw_read(s)  # warm the page cache
            for r in range(args.repeats):
                line = []
                for name, fn in cases.items():
                    t, nbytes = best_time(lambda: fn(s))
                    best[name] = min(best[name], (t, nbytes))
                    line.append(f"{name} {nbytes / 1e6 / t:.0f}")
                print(f"repeat {r} (MB/s): " + "  ".join(line))
        raw_rate = best["raw"][1] / 1e6 / best["raw"][0]
        print("best:")
        for name, (t, nbytes) in best.items():
            rate = nbytes / 1e6 / t
            print(f"  {name:13s} {rate:7.0f} MB/s   ratio to raw {rate / raw_rate:.2f}")
        ratio = best["stream"][1] / best["stream"][0] / (best["raw"][1] / best["raw"][0])
        print(f"stream/raw = {ratio:.2f} (target >= 0.7): {'met' if ratio >= 0.7 else 'MISSED'}")
        first = best["first"][1] / best["first"][0] / (best["raw"][1] / best["raw"][0])
        print(f"first pass (every block checked) / raw = {first:.2f} (target >= 0.7): "
              f"{'met' if first >= 0.7 else 'MISSED'}")


if __name__ == "__main__":
    main()

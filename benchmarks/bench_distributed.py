"""Scale-out on one machine: a sweep's members across 2 processes, one dictionary data-parallel (--ddp)
on 2 processes, and the harvest's shard merge vs a VDS.

    .venv/bin/python benchmarks/bench_distributed.py [--repeats 2] [--steps 300] [--merge-rows 200000]

1. Members across ranks: a 6-size sweep (d=64, sizes 0.5x..16x, 2 seeds, batch 1024) run end to end
   as `torchrun --nproc-per-node 2 -m sparsefeat sweep` (gloo, 1 thread per process: torchrun's
   default) and as `python -m sparsefeat sweep` with 2 threads (OMP_NUM_THREADS=2), alternating over
   the repeats so that load from other processes hits both alike. Printed: each wall time and the
   ratio single / distributed of their totals (> 1: the two processes are faster).
2. One dictionary data-parallel: one 16x dictionary (d=64, 1024 latents, batch 1024) as
   `torchrun --nproc-per-node 2 -m sparsefeat sweep ... --ddp` (each rank 512 rows per step, gradients
   averaged by DDP over gloo) against one process with 2 threads and with 1 thread, alternating.
3. Shards into one store (the harvest's last step): the crash-safe merge (`merge_shards`: a copy
   through `StoreWriter`, checksums of the whole computed as it writes) against an HDF5 virtual
   dataset over the shards plus the checksum pass a single store needs anyway (chunk-aligned blocks
   straddle the shard boundaries, so the shards' checksums do not carry over), and the time of one
   full read of each result.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparsefeat.distributed import merge_shards  # noqa: E402
from sparsefeat.store import StoreWriter, checksums  # noqa: E402
from sparsefeat.store.writer import chunk_rows_for  # noqa: E402
from sparsefeat.toys import write_toy  # noqa: E402

SIZES = "0.5x,1x,2x,4x,8x,16x"


def sweep_command(store: Path, out: Path, steps: int, ranks: int, threads: int = 2, sizes: str = SIZES,
                  seeds: str = "0,1", extra: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    args = ["sweep", str(store), "--out", str(out), "--sizes", sizes, "--seeds", seeds, "--steps", str(steps),
            "--batch-size", "1024", "--log-every", "50", "--checkpoint-every", "0", "--device", "cpu",
            "--no-progress", "--force", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1",
               OMP_NUM_THREADS="1" if ranks > 1 else str(threads))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m"] if ranks > 1 \
        else [sys.executable, "-m"]
    return [*launch, "sparsefeat", *args], env


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def bench_members(tmp: Path, repeats: int, steps: int) -> None:
    store = write_toy("sparse", tmp / "toy.h5", n_samples=40_000, n_features=256, d=64, progress=False)
    single, two, one_thread = [], [], []
    for r in range(repeats):  # alternating: shared-core load hits all alike
        single.append(timed(*sweep_command(store, tmp / "one.h5", steps, 1)))
        two.append(timed(*sweep_command(store, tmp / "two.h5", steps, 2)))
        one_thread.append(timed(*sweep_command(store, tmp / "one1.h5", steps, 1, threads=1)))
        print(f"  repeat {r + 1}: one process x 2 threads {single[-1]:.1f} s, "
              f"2 processes x 1 thread {two[-1]:.1f} s, one process x 1 thread {one_thread[-1]:.1f} s", flush=True)
    print(f"members across ranks ({SIZES}, 2 seeds, {steps} steps, end to end): "
          f"speed-up {sum(single) / sum(two):.2f}x (one process 2 threads / 2 processes); "
          f"{sum(one_thread) / sum(two):.2f}x against one process with 1 thread")


def bench_ddp(tmp: Path, repeats: int, steps: int) -> None:
    store = write_toy("sparse", tmp / "toy_ddp.h5", n_samples=40_000, n_features=256, d=64, progress=False)
    one = dict(sizes="16x", seeds="0")
    single, two, one_thread = [], [], []
    for r in range(repeats):  # alternating: shared-core load hits all alike
        single.append(timed(*sweep_command(store, tmp / "one.h5", steps, 1, **one)))
        two.append(timed(*sweep_command(store, tmp / "ddp.h5", steps, 2, extra=("--ddp",), **one)))
        one_thread.append(timed(*sweep_command(store, tmp / "one1.h5", steps, 1, threads=1, **one)))
        print(f"  repeat {r + 1}: one process x 2 threads {single[-1]:.1f} s, "
              f"--ddp 2 processes x 1 thread {two[-1]:.1f} s, one process x 1 thread {one_thread[-1]:.1f} s",
              flush=True)
    print(f"one 16x dictionary data-parallel (--ddp, {steps} steps, end to end): "
          f"speed-up {sum(single) / sum(two):.2f}x (one process 2 threads / 2 processes); "
          f"{sum(one_thread) / sum(two):.2f}x against one process with 1 thread")


def write_shards(tmp: Path, rows: int, d: int, parts: int = 2) -> list[Path]:
    shards, rng = [], np.random.default_rng(0)
    per = rows // parts
    for k in range(parts):
        path = tmp / f"rank-{k}.h5"
        with StoreWriter(path, sites={"a": d, "b": d}, provenance={"bench": 1}, kind="model", tokens=True,
                         split_unit="document", test_fraction=0.1) as w:
            for lo in range(0, per, 10_000):
                n = min(10_000, per - lo)
                x = rng.standard_normal((n, d), dtype=np.float32)
                ids = np.arange(lo, lo + n) + k * per
                w.append({"a": x, "b": x}, test=np.zeros(n, "u1"), tokens=dict(doc=ids // 100, pos=ids % 100, ids=ids),
                         documents_test=np.zeros(n // 100, "u1"))
        shards.append(path)
    return shards


def virtual_store(shards: list[Path], out: Path) -> None:
    """One file whose row datasets are virtual over the shards, and the checksums of the whole."""
    with h5py.File(shards[0], "r") as f0, h5py.File(out, "w", libver="latest") as dst:
        counts = []
        for s in shards:
            with h5py.File(s, "r") as f:
                counts.append(int(f["rows/committed"][0]))
        n = sum(counts)
        names = [f"activations/{k}" for k in f0["activations"]] + ["rows/test"] + \
                [f"tokens/{k}" for k in f0["tokens"]]
        for name in names:
            ds0 = f0[name]
            layout = h5py.VirtualLayout(shape=(n,) + ds0.shape[1:], dtype=ds0.dtype)
            at = 0
            for s, c in zip(shards, counts):
                layout[at:at + c] = h5py.VirtualSource(str(s), name, shape=(c,) + ds0.shape[1:])[:c]
                at += c
            dst.create_virtual_dataset(name, layout)
    # HDF5 opens the sources with the virtual file's own access mode: read it read-only, then write.
    sums = {}
    with h5py.File(out, "r") as f:
        for site, ds in f["activations"].items():
            chunk = chunk_rows_for(ds.shape[1], ds.dtype.itemsize)
            sums[site] = np.zeros(0, np.uint32)
            for lo in range(0, n, chunk * 32):
                sums[site] = checksums.extend(sums[site], ds[lo:min(n, lo + chunk * 32)], lo, chunk)
    with h5py.File(out, "a") as f:
        for site, c in sums.items():
            f.create_dataset(f"checksums/{site}", data=c)


def full_read(path: Path) -> float:
    t0 = time.perf_counter()
    with h5py.File(path, "r") as f:
        for site in f["activations"]:
            ds = f["activations"][site]
            for lo in range(0, ds.shape[0], 65536):
                ds[lo:lo + 65536]
    return time.perf_counter() - t0


def bench_merge(tmp: Path, rows: int, repeats: int) -> None:
    d = 384
    shards = write_shards(tmp, rows, d)
    gb = rows * d * 4 * 2 / 1e9
    merge_t, vds_t, merge_read, vds_read = [], [], [], []
    for r in range(repeats):
        for p in (tmp / "merged.h5", tmp / "virtual.h5"):
            p.unlink(missing_ok=True)
        t0 = time.perf_counter()
        merge_shards(shards, tmp / "merged.h5", progress=False)
        merge_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        virtual_store(shards, tmp / "virtual.h5")
        vds_t.append(time.perf_counter() - t0)
        merge_read.append(full_read(tmp / "merged.h5"))
        vds_read.append(full_read(tmp / "virtual.h5"))
    print(f"shards -> one store ({rows:,} rows, 2 sites of d={d}, {gb:.2f} GB), best of {repeats}:")
    print(f"  merge (copy + checksums):      {min(merge_t):6.2f} s  ({gb / min(merge_t):.2f} GB/s); "
          f"full read {min(merge_read):.2f} s")
    print(f"  virtual dataset + checksums:   {min(vds_t):6.2f} s  ({gb / min(vds_t):.2f} GB/s); "
          f"full read {min(vds_read):.2f} s")
    print(f"  merge / virtual time: {min(merge_t) / min(vds_t):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--merge-rows", type=int, default=200_000)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--skip-ddp", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_merge:
            bench_merge(Path(tmp), args.merge_rows, args.repeats)
        if not args.skip_sweep:
            bench_members(Path(tmp), args.repeats, args.steps)
        if not args.skip_ddp:
            bench_ddp(Path(tmp), args.repeats, args.steps)


if __name__ == "__main__":
    main()

"""The whole process: `sparsefeat sweep` start to finish beside a bare PyTorch script on the same rows.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_whole.py [--data ACTS.npy] [--sizes 1536] [--steps 200]
        [--batch 4096] [--reps 3] [--threads 2]
    ... --sizes 0.5x,1x,2x,4x,8x,16x --steps 50      # a 6-size sweep in one pass vs six bare runs in a row
    ... --bf16                                         # sparsefeat under bf16 autocast (sweep --bf16)
    PYTHONPATH=. .venv/bin/python benchmarks/bench_whole.py --quick     # seconds: a smoke run on toy data

A store (d from the data) is written once from the peers harness's activations (`make_data.py`'s .npy)
with sparsefeat's StoreWriter (10% test rows) and not timed. Then, each repetition, two subprocesses
are timed from start to exit, their order alternating over repetitions:

- `sparsefeat sweep STORE --sizes S --seeds 0 --steps N --batch-size B --out ... --force --no-progress`
  (every default otherwise: normalisation statistics, median pre-bias, the shuffled stream, logs,
  checkpoints, the final evaluation of train and test splits, the results file);
- this script with --bare: imports torch and h5py, reads the store's train rows into memory, then for
  each size in turn trains a ReLU + L1 SAE (the harness's reference maths, α = sparsefeat's default 0.3,
  Adam lr 1e-3) for N steps on consecutive batches, and exits. No evaluation, no output file.

Printed: each repetition's seconds and the ratio bare / sparsefeat (above 1: sparsefeat faster), and the
ratio of the medians. Both processes get OMP_NUM_THREADS=--threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = f"{os.environ.get('TMPDIR', '/tmp')}/peers-data/acts_d384.npy"


def sizes_of(text: str, d: int) -> list[int]:
    """'1536' or '0.5x,1x': absolute sizes, ratios of d as the sweep CLI reads them."""
    return [round(float(s[:-1]) * d) if s.endswith("x") else int(s) for s in text.split(",") if s.strip()]


def bare(store: str, sizes: str, steps: int, batch: int, l1: float, lr: float) -> None:
    """The bare script's body (run in its own process by --bare)."""
    import h5py
    import numpy as np
    import torch
    import torch.nn.functional as F

    with h5py.File(store, "r") as f:
        train = torch.from_numpy(np.ascontiguousarray(f["activations/x"][:][f["rows/test"][:] == 0]))
    n_batches, d = len(train) // batch, train.shape[1]
    for m in sizes_of(sizes, d):
        w = torch.randn(m, d)
        w = w / w.norm(dim=1, keepdim=True) * 0.1
        enc, dec = w.clone().requires_grad_(), w.t().contiguous().requires_grad_()
        b_enc, b_dec = torch.zeros(m, requires_grad=True), torch.zeros(d, requires_grad=True)
        opt = torch.optim.Adam([enc, dec, b_enc, b_dec], lr=lr)
        for i in range(steps):
            x = train[(i % n_batches) * batch:(i % n_batches + 1) * batch]
            c = torch.relu(F.linear(x - b_dec, enc, b_enc))
            loss = (F.linear(c, dec, b_dec) - x).pow(2).sum(-1).mean() + l1 * c.sum(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        print(f"m={m}: loss {float(loss):.4f}")


def write_store(array, path: Path) -> None:
    from sparsefeat.store import StoreWriter, split_rows

    with StoreWriter(path, sites={"x": array.shape[1]}, provenance={"bench": "whole"}) as w:
        for s in range(0, len(array), 65536):
            part = array[s:s + 65536]
            w.append({"x": part}, test=split_rows(len(part), 0.1, 0, offset=s))


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="activations .npy [N, d] float32")
    ap.add_argument("--rows", type=int, default=0, help="use the first ROWS rows (0: all)")
    ap.add_argument("--sizes", default="1536", help="the sweep's --sizes (comma list, absolute or 2x)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--l1", type=float, default=0.3, help="α for both (sparsefeat's default)")
    ap.add_argument("--bf16", action="store_true", help="sparsefeat sweep --bf16 (the bare script stays float32)")
    ap.add_argument("--bare", metavar="STORE", help=argparse.SUPPRESS)  # the bare subprocess
    ap.add_argument("--quick", action="store_true", help="smoke run on toy data (d=32, 2 sizes, 20 steps)")
    args = ap.parse_args()
    if args.bare:
        return bare(args.bare, args.sizes, args.steps, args.batch, args.l1, 1e-3)

    import numpy as np

    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_quality import toy_data
        array = toy_data(8192, 32)
        args.sizes, args.steps, args.batch, args.reps = "1x,2x", 20, 256, 1
    else:
        array = np.load(args.data, mmap_mode="r")
        array = array[: args.rows or len(array)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store.h5"
        t0 = time.perf_counter()
        write_store(array, store)
        print(f"store: {array.shape[0]} rows × d={array.shape[1]} ({store.stat().st_size / 2**20:.0f} MB), "
              f"written in {time.perf_counter() - t0:.1f} s; sizes {sizes_of(args.sizes, array.shape[1])}, "
              f"{args.steps} steps, batch {args.batch}, {args.threads} threads, load {os.getloadavg()[0]:.1f}")
        ours_cmd = [sys.executable, "-m", "sparsefeat", "sweep", str(store), "--out", str(Path(tmp) / "sweep.h5"),
                    "--sizes", args.sizes, "--seeds", "0", "--steps", str(args.steps), "--batch-size",
                    str(args.batch), "--l1", str(args.l1), "--force", "--no-progress"] + ["--bf16"] * args.bf16
        bare_cmd = [sys.executable, __file__, "--bare", str(store), "--sizes", args.sizes, "--steps",
                    str(args.steps), "--batch", str(args.batch), "--l1", str(args.l1)]
        print("sparsefeat:", " ".join(ours_cmd[1:]))
        ours, bares = [], []
        for rep in range(args.reps):
            if rep % 2 == 0:
                ours.append(timed(ours_cmd, env))
                bares.append(timed(bare_cmd, env))
            else:
                bares.append(timed(bare_cmd, env))
                ours.append(timed(ours_cmd, env))
            print(f"rep {rep + 1}: sparsefeat {ours[-1]:7.1f} s   bare {bares[-1]:7.1f} s   "
                  f"bare / sparsefeat {bares[-1] / ours[-1]:.2f}   load {os.getloadavg()[0]:.1f}", flush=True)
        print(f"median: sparsefeat {statistics.median(ours):.1f} s, bare {statistics.median(bares):.1f} s, "
              f"bare / sparsefeat {statistics.median(bares) / statistics.median(ours):.2f}")


if __name__ == "__main__":
    main()

"""The stack's dense products on the CPU: BLAS `baddbmm` against a oneDNN call per member (products.py).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_products.py [--threads 2] [--reps 5] [--quick]

Part 1: each of a relu-l1 step's five float32 products at d=384, m=1536, batch 4096 (encoder and
decoder forward, the codes' gradient, both weight gradients), timed with torch's BLAS (what autograd
and `baddbmm` run) and with oneDNN (`products._onednn`), interleaved; best of reps, ms and GFLOP/s,
and the largest relative difference of the two results.

Part 2: one whole training step (`training_loss`, backward, Adam, the unit-norm constraint; the path
each architecture picks by itself) with `products.ONEDNN` on and off, interleaved, from the sizes of
the demo's toys (d=32, 6 members, batch 256) to the peers harness (d=384, m=1536..6144, batch 4096).
The oneDNN arm ignores `ONEDNN_MIN_WORK`, so the table shows where the threshold belongs. Ratio > 1:
oneDNN is faster.
"""

from __future__ import annotations

import argparse
import time

import torch

from sparsefeat import products
from sparsefeat.sae import ReluL1, SAEOptions, TopK

try:
    from bench_sparse import bias_for_density, step_time
except ImportError:  # run as benchmarks/bench_products.py from the root
    from benchmarks.bench_sparse import bias_for_density, step_time


def best_of(fns: dict, reps: int) -> dict:
    best = {k: float("inf") for k in fns}
    for r in range(reps + 1):  # the first round warms up
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            if r:
                best[k] = min(best[k], time.perf_counter() - t0)
    return best


def products_table(reps: int, batch: int = 4096, d: int = 384, m: int = 1536) -> None:
    g = torch.Generator().manual_seed(0)
    x, grad_x = torch.randn(batch, d, generator=g), torch.randn(batch, d, generator=g)
    codes, grad_pre = torch.randn(batch, m, generator=g).relu(), torch.randn(batch, m, generator=g)
    enc, dec, bias = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g), torch.randn(m, generator=g)
    cases = {  # name: (BLAS, oneDNN)
        "encoder  x·Weᵀ + b": (lambda: torch.addmm(bias, x, enc.t()), lambda: products._onednn(x, enc, bias)),
        "decoder  c·Wd": (lambda: codes @ dec, lambda: products._onednn(codes, dec.t())),
        "∂codes   ∂x̂·Wdᵀ": (lambda: grad_x @ dec.t(), lambda: products._onednn(grad_x, dec)),
        "∂Wd      cᵀ·∂x̂": (lambda: codes.t() @ grad_x, lambda: products._onednn(codes.t(), grad_x.t())),
        "∂We      ∂preᵀ·x": (lambda: grad_pre.t() @ x, lambda: products._onednn(grad_pre.t(), x.t())),
    }
    flop = 2 * batch * d * m
    print(f"Part 1: products at batch {batch}, d={d}, m={m} ({flop / 1e9:.1f} GFLOP each), best of {reps}")
    print(f"{'product':20s} {'BLAS ms':>8s} {'oneDNN ms':>10s} {'BLAS GF/s':>10s} {'oneDNN GF/s':>12s} "
          f"{'ratio':>6s} {'max rel diff':>13s}")
    for name, (blas, onednn) in cases.items():
        t = best_of({"blas": blas, "onednn": onednn}, reps)
        a, b = blas(), onednn()
        diff = float((a - b).abs().max() / a.abs().max())
        print(f"{name:20s} {t['blas'] * 1e3:8.1f} {t['onednn'] * 1e3:10.1f} {flop / t['blas'] / 1e9:10.0f} "
              f"{flop / t['onednn'] / 1e9:12.0f} {t['blas'] / t['onednn']:6.2f} {diff:13.1e}")


def make(arch, d, m, members):
    """A stack of `members` seeds (one sparsity setting per member)."""
    seeds = list(range(members))
    if arch == "topk":
        return TopK(d, m, [32] * members, seeds, SAEOptions(pre_bias="none"))
    return ReluL1(d, m, [0.05] * members, seeds, SAEOptions(pre_bias="none"))


def steps_table(cases, reps: int) -> None:
    print(f"\nPart 2: one training step, float32, BLAS vs oneDNN (ONEDNN_MIN_WORK ignored), best of {reps}")
    print(f"{'arch':8s} {'d':>4s} {'m':>5s} {'G':>3s} {'batch':>6s} {'L0/m':>6s} {'path':>7s} {'rows·m·d':>9s} "
          f"{'BLAS ms':>8s} {'oneDNN ms':>10s} {'ratio':>6s}")
    for arch, d, m, members, batch, density in cases:
        x = torch.randn(batch, d, generator=torch.Generator().manual_seed(1))
        arms = {}
        for arm in ("blas", "onednn"):
            torch.manual_seed(0)
            sae = make(arch, d, m, members)
            if arch == "relu-l1":
                bias_for_density(sae, x, density)
            arms[arm] = (sae, torch.optim.Adam(sae.parameters(), lr=1e-5))  # tiny lr: the density stays put
        best = {"blas": float("inf"), "onednn": float("inf")}
        saved = products.ONEDNN, products.ONEDNN_MIN_WORK
        try:
            for r in range(reps + 1):
                for arm, (sae, opt) in arms.items():
                    products.ONEDNN, products.ONEDNN_MIN_WORK = (arm == "onednn" and saved[0]), 0
                    t = step_time(sae, opt, x, "auto")
                    if r:
                        best[arm] = min(best[arm], t)
        finally:
            products.ONEDNN, products.ONEDNN_MIN_WORK = saved
        sae = arms["blas"][0]
        path = "sparse" if sae.use_sparse(batch) else "dense"
        label = "k=32" if arch == "topk" else f"{density:.2f}"
        print(f"{arch:8s} {d:4d} {m:5d} {members:3d} {batch:6d} {label:>6s} {path:>7s} {batch * m * d:9.1e} "
              f"{best['blas'] * 1e3:8.2f} {best['onednn'] * 1e3:10.2f} {best['blas'] / best['onednn']:6.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="two small cases only (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not products.ONEDNN:
        raise SystemExit("this torch has no oneDNN linear kernel (torch.ops.mkldnn._linear_pointwise)")
    if args.quick:
        products_table(1, batch=512, d=64, m=128)
        steps_table([("relu-l1", 32, 64, 3, 256, 0.3), ("topk", 64, 512, 1, 512, 0.0)], 1)
        return
    products_table(args.reps)
    cases = [("relu-l1", 32, m, 6, 256, 0.3) for m in (16, 64, 256)]
    cases += [("relu-l1", 384, m, 6, 256, 0.3) for m in (32, 128, 256)]
    cases += [("relu-l1", 384, 1536, 1, 4096, dens) for dens in (0.3, 0.05)]
    cases += [("relu-l1", 384, 6144, 1, 4096, 0.3), ("relu-l1", 384, 1536, 3, 4096, 0.3)]
    cases += [("topk", 384, m, 1, 4096, 0.0) for m in (1536, 6144)]
    steps_table(cases, args.reps)


if __name__ == "__main__":
    main()

"""Trainer throughput beside bare PyTorch, and a sweep in one pass beside its members one by one.

    .venv/bin/python benchmarks/bench_train.py [--device cpu|cuda] [--repeats 3] [--steps 20]

1. One relu-l1 SAE (d=384, m=1536, batch 4096): samples/s of the trainer's step loop (`Sweep.train`,
   reading shuffled batches from the HDF5 store) beside a bare PyTorch loop doing the same maths on
   in-memory batches (F.linear encoder, ReLU, decoder, MSE + α·L1, parallel-gradient removal,
   Adam, decoder renormalisation). Target: ratio >= 0.95.
2. A 6-size sweep (d=384, sizes 0.25x..8x, batch 1024) with `train_sweep` in one pass, beside six
   `train_sweep` calls of one size each on the same store, end to end (set-up, training, evaluation,
   results file). Target: the one pass no slower (ratio >= 1).
Timings are interleaved over the repeats so that load from other processes hits all alike; the
ratios use the best (shortest) time of each, the estimate least hurt by shared cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsefeat.store import ActivationStore
from sparsefeat.toys import write_toy
from sparsefeat.train import Sweep, SweepConfig, train_sweep

D = 384


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(x_batches: list[torch.Tensor], m: int, steps: int, alpha: float, device: torch.device) -> float:
    """Seconds for `steps` steps of the same maths in plain PyTorch (after 3 warm-up steps)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(m, D, generator=g)
    w /= w.norm(dim=1, keepdim=True)
    enc = w.clone().to(device).requires_grad_()
    dec = w.clone().to(device).requires_grad_()
    b_enc = torch.zeros(m, device=device, requires_grad=True)
    b_dec = torch.zeros(D, device=device, requires_grad=True)
    opt = torch.optim.Adam([enc, b_enc, dec, b_dec], lr=1e-3, fused=True)

    def step(x):
        c = F.linear(x, enc, b_enc).relu()
        x_hat = c @ dec + b_dec
        loss = (x_hat - x).pow(2).sum(-1).mean() + alpha * c.sum(-1).mean()
        loss.backward()
        with torch.no_grad():
            dec.grad.sub_((dec.grad * dec).sum(-1, keepdim=True) * dec)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            dec.div_(dec.norm(dim=-1, keepdim=True))

    for i in range(3):
        step(x_batches[i % len(x_batches)])
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(x_batches[i % len(x_batches)])
    sync(device)
    return time.perf_counter() - t0


def trainer_loop(store: Path, out: Path, m: int, steps: int, alpha: float, device: str) -> float:
    """Seconds for `steps` steps of Sweep.train (after 3 warm-up steps), batches read from the store."""
    cfg = SweepConfig(sizes=[str(m)], l1=[alpha], seeds=[0], steps=steps + 3, batch_size=4096, log_every=10_000,
                      test_curve_points=0, checkpoint_every=0, device=device, test_curve_rows=1)
    with ActivationStore(store) as s:
        sweep = Sweep(s, cfg, out, progress=False)
        sweep.start(resume=False, force=True)
        sweep.train(until=3)
        sync(sweep.device)
        t0 = time.perf_counter()
        sweep.train(until=steps + 3)  # ends with a log: the losses come back to the host
        return time.perf_counter() - t0


def one_pass_vs_one_by_one(store: Path, tmp: Path, steps: int, device: str) -> tuple[float, float]:
    sizes = ["0.25x", "0.5x", "1x", "2x", "4x", "8x"]
    common = dict(l1=[0.3], seeds=[0], steps=steps, batch_size=1024, log_every=50, test_curve_points=2,
                  checkpoint_every=0, device=device)
    t0 = time.perf_counter()
    train_sweep(store, SweepConfig(sizes=sizes, **common), tmp / "all.h5", force=True, progress=False)
    one_pass = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in sizes:
        train_sweep(store, SweepConfig(sizes=[s], **common), tmp / f"one-{s}.h5", force=True, progress=False)
    return one_pass, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="timed steps of part 1")
    ap.add_argument("--sweep-steps", type=int, default=100, help="training steps of each sweep in part 2")
    ap.add_argument("--rows", type=int, default=60_000, help="rows of the toy store (10%% test)")
    args = ap.parse_args()
    device = torch.device(args.device)
    m, alpha = 4 * D, 0.3
    print(f"device {device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = write_toy("sparse", tmp / "toy.h5", n_samples=args.rows, seed=0, n_features=4 * D, d=D,
                          mean_active=12.0, progress=False)
        with ActivationStore(store) as s:
            data = s.load("x", "train")
        scale = float(data[:65536].pow(2).sum(1).mean().rsqrt())
        x_batches = [(data[i:i + 4096] * scale).to(device) for i in range(0, 4 * 4096, 4096)]

        print(f"\n1. relu-l1, d={D}, m={m}, batch 4096, {args.steps} timed steps; samples/s")
        bare, ours = [], []
        for r in range(args.repeats):
            bare.append(bare_loop(x_batches, m, args.steps, alpha, device))
            ours.append(trainer_loop(store, tmp / "one.h5", m, args.steps, alpha, args.device))
            print(f"   repeat {r + 1}: bare {args.steps * 4096 / bare[-1]:9,.0f}   sparsefeat "
                  f"{args.steps * 4096 / ours[-1]:9,.0f}   ratio {bare[-1] / ours[-1]:.3f}")
        print(f"   best:     bare {args.steps * 4096 / min(bare):9,.0f}   sparsefeat "
              f"{args.steps * 4096 / min(ours):9,.0f}   ratio {min(bare) / min(ours):.3f}  (target >= 0.95)")

        print(f"\n2. 6 sizes (0.25x..8x of d={D}), batch 1024, {args.sweep_steps} steps, end to end; seconds")
        one, six = [], []
        for r in range(args.repeats):
            a, b = one_pass_vs_one_by_one(store, tmp, args.sweep_steps, args.device)
            one.append(a)
            six.append(b)
            print(f"   repeat {r + 1}: one pass {a:6.1f}   one by one {b:6.1f}   ratio {b / a:.2f}")
        print(f"   best:     one pass {min(one):6.1f}   one by one {min(six):6.1f}   ratio {min(six) / min(one):.2f}"
              "  (target >= 1)")


if __name__ == "__main__":
    main()

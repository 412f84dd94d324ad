"""Trainer throughput beside bare PyTorch, and a sweep in one pass beside its members one by one.

    .venv/bin/python benchmarks/bench_train.py [--device cpu|cuda] [--threads N] [--rounds 10] [--repeats 2]

1. One relu-l1 SAE (d=384, m=1536, batch 4096): samples/s of the trainer's step loop (`Sweep.train`:
   shuffled batches streamed from the HDF5 store, scaling, the step, a log at the end of each round)
   beside a bare PyTorch loop doing the same maths on in-memory batches (F.linear encoder, ReLU,
   decoder, MSE + α·L1, parallel-gradient removal, fused Adam, decoder renormalisation). The two run
   in alternating rounds of a few steps, so that load from other processes on shared cores hits both
   alike; the ratio is of their total times. Target: >= 0.95.
2. A 6-size sweep (d=384, sizes 0.125x..4x, batch 1024) with `train_sweep` in one pass, beside six
   `train_sweep` calls of one size each on the same store, end to end (set-up, training, evaluation,
   results file), alternating over the repeats. Target: the one pass no slower (ratio >= 1).
Runtime: about 1.5 minutes on 2 idle CPU cores. On cores shared with other processes, --threads 1 is
steadier (and there often faster: a 2-thread op waits for its descheduled thread).
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


class BareLoop:
    """The same maths in plain PyTorch on in-memory batches: F.linear encoder, ReLU, decoder, MSE + α·L1,
    parallel-gradient removal, fused Adam, decoder renormalisation."""

    def __init__(self, x_batches: list[torch.Tensor], m: int, alpha: float, device: torch.device):
        g = torch.Generator().manual_seed(0)
        w = torch.randn(m, D, generator=g)
        w /= w.norm(dim=1, keepdim=True)
        self.enc = w.clone().to(device).requires_grad_()
        self.dec = w.clone().to(device).requires_grad_()
        self.b_enc = torch.zeros(m, device=device, requires_grad=True)
        self.b_dec = torch.zeros(D, device=device, requires_grad=True)
        self.opt = torch.optim.Adam([self.enc, self.b_enc, self.dec, self.b_dec], lr=1e-3, fused=True)
        self.x_batches, self.alpha, self.i = x_batches, alpha, 0

    def steps(self, n: int) -> None:
        enc, dec = self.enc, self.dec
        for _ in range(n):
            x = self.x_batches[self.i % len(self.x_batches)]
            self.i += 1
            c = F.linear(x, enc, self.b_enc).relu()
            x_hat = c @ dec + self.b_dec
            loss = (x_hat - x).pow(2).sum(-1).mean() + self.alpha * c.sum(-1).mean()
            loss.backward()
            with torch.no_grad():
                dec.grad.sub_((dec.grad * dec).sum(-1, keepdim=True) * dec)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                dec.div_(dec.norm(dim=-1, keepdim=True))
        float(loss.detach())  # wait for the device, as the trainer does at its logs


def step_loops(store: Path, tmp: Path, x_batches, m: int, alpha: float, device: str, rounds: int,
               per_round: int) -> tuple[float, float, list[float]]:
    """Seconds of the bare loop and of the trainer (`Sweep.train`: store stream, scaling, step, a log at
    the end of each round), run in alternation, `per_round` steps each, so both see the same load."""
    cfg = SweepConfig(sizes=[str(m)], l1=[alpha], seeds=[0], steps=10**9, batch_size=4096, log_every=10**9,
                      test_curve_points=0, checkpoint_every=0, device=device, test_curve_rows=1)
    bare = BareLoop(x_batches, m, alpha, torch.device(device))
    with ActivationStore(store) as s:
        sweep = Sweep(s, cfg, tmp / "one.h5", force=True, progress=False)
        bare.steps(3)
        sweep.train(until=3)  # warm-up
        t_bare = t_ours = 0.0
        ratios = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            bare.steps(per_round)
            t1 = time.perf_counter()
            sweep.train(until=sweep.step + per_round)
            t2 = time.perf_counter()
            t_bare, t_ours = t_bare + t1 - t0, t_ours + t2 - t1
            ratios.append((t1 - t0) / (t2 - t1))
    return t_bare, t_ours, ratios


def one_pass_vs_one_by_one(store: Path, tmp: Path, steps: int, device: str) -> tuple[float, float]:
    sizes = ["0.125x", "0.25x", "0.5x", "1x", "2x", "4x"]
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
    ap.add_argument("--repeats", type=int, default=2, help="part 2: repetitions")
    ap.add_argument("--rounds", type=int, default=10, help="part 1: alternating rounds")
    ap.add_argument("--per-round", type=int, default=3, help="part 1: steps of each loop per round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--sweep-steps", type=int, default=100, help="training steps of each sweep in part 2 (0: skip part 2)")
    ap.add_argument("--rows", type=int, default=60_000, help="rows of the toy store (10%% test)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    m, alpha = 4 * D, 0.3
    print(f"device {device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = write_toy("sparse", tmp / "toy.h5", n_samples=args.rows, seed=0, n_features=4 * D, d=D,
                          mean_active=12.0, progress=False)
        with ActivationStore(store) as s:
            data = s.load("x", "train")
        x_batches = [data[i:i + 4096].to(device) for i in range(0, 4 * 4096, 4096)]

        print(f"\n1. relu-l1, d={D}, m={m}, batch 4096: {args.rounds} alternating rounds of {args.per_round} steps")
        t_bare, t_ours, ratios = step_loops(store, tmp, x_batches, m, alpha, args.device, args.rounds, args.per_round)
        n = args.rounds * args.per_round * 4096
        ratios.sort()
        print(f"   bare {n / t_bare:9,.0f} samples/s   sparsefeat {n / t_ours:9,.0f} samples/s   "
              f"ratio {t_bare / t_ours:.3f} (rounds: median {ratios[len(ratios) // 2]:.3f}, "
              f"min {ratios[0]:.3f}, max {ratios[-1]:.3f})  target >= 0.95")

        if not args.sweep_steps:
            return
        print(f"\n2. 6 sizes (0.125x..4x of d={D}), batch 1024, {args.sweep_steps} steps, end to end; seconds")
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

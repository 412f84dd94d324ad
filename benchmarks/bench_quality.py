"""Time to quality: seconds of training until held-out FVU reaches the level a bare PyTorch loop reaches.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_quality.py [--data ACTS.npy] [--m 1536] [--steps 1000]
        [--scales 1.0 0.1] [--eval-every 20] [--threads 2] [--out curves.jsonl]
        [--reference "bare PyTorch, unit decoder"] [--bf16]
    PYTHONPATH=. .venv/bin/python benchmarks/bench_quality.py --quick      # seconds: a smoke run on toy data

Data: the peers harness's activations (/work/shared/peers/make_data.py, [N, d] float32 .npy). The last
`--heldout` rows are held out; batch i is training rows [i·B, (i+1)·B), wrapping over the rest, the
harness's order. Methods, all ReLU + L1 (loss = Σ(x̂-x)²/row + α·Σc/row, Adam at a constant lr, the
harness's maths and hyper-parameters):

- bare: a plain PyTorch loop written here (encoder rows random at norm 0.1, decoder = encoderᵀ, zero
  biases, x̂ = relu((x - b_d) W_eᵀ + b_e) W_dᵀ + b_d, torch.optim.Adam; no constraint, no bookkeeping);
- bare, unit decoder: the same loop with its atoms (decoder columns) at unit norm from the start and
  renormalised after every step, the constraint sparsefeat keeps (so α prices the same sparsity);
- sparsefeat at each --scales value: `Sweep.step_on` on the same batches (as bench_peer_sparsefeat.py:
  normalise off, pre_bias none, `SAEOptions.encoder_scale` = the value);
- with `--bf16`, the unit-decoder bare loop and each sparsefeat row again under bfloat16 autocast
  (`sweep --bf16`); held-out FVU and L0 are always computed in float32.

They step in turn, one step each (so load from other processes hits all alike), in one process. Every
`--eval-every` steps each method's FVU on the held-out rows (Σ‖x - x̂‖² / Σ‖x - mean‖²) is recorded
and its held-out L0 (mean non-zero codes per row) against its own cumulative training seconds
(evaluation not counted): an FVU level at one α compares different trade-offs when the L0s differ. The level is
the `--reference` method's held-out FVU after `--steps` steps (default the unconstrained bare loop; the
unit-decoder loop prices sparsity as sparsefeat does); a method's time to quality is the training time at which its FVU first reaches
that level (linear between the two evaluations around it). The others run on to `--max-factor` × steps
if they have not reached it. Printed: steps and seconds to the level, ratio to the fastest.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparsefeat import products
from sparsefeat.sae import SAEOptions
from sparsefeat.store import ActivationStore, StoreWriter, split_rows
from sparsefeat.train import Sweep, SweepConfig


class Bare:
    """ReLU + L1 SAE in plain PyTorch, the harness's reference maths."""

    def __init__(self, d: int, m: int, l1: float, lr: float, seed: int, unit: bool = False, bf16: bool = False):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(m, d, generator=g)
        w = w / w.norm(dim=1, keepdim=True) * 0.1
        self.enc = w.clone().requires_grad_()
        self.dec = (w.t() / (0.1 if unit else 1.0)).contiguous().requires_grad_()
        self.unit, self.bf16 = unit, bf16
        self.b_enc = torch.zeros(m, requires_grad=True)
        self.b_dec = torch.zeros(d, requires_grad=True)
        self.opt = torch.optim.Adam([self.enc, self.dec, self.b_enc, self.b_dec], lr=lr)
        self.l1 = l1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.relu(F.linear(x - self.b_dec, self.enc, self.b_enc))
        return F.linear(c, self.dec, self.b_dec), c

    def step(self, x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            x_hat, c = self.forward(x)
        loss = (x_hat.float() - x).pow(2).sum(-1).mean() + self.l1 * c.float().sum(-1).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.unit:
            with torch.no_grad():
                self.dec /= self.dec.norm(dim=0, keepdim=True).clamp_min(1e-12)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[0]

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[1]


class Ours:
    """sparsefeat's trainer step (`Sweep.step_on`) on the caller's batches."""

    def __init__(self, data: torch.Tensor, m: int, l1: float, lr: float, seed: int, batch: int, scale: float,
                 tmp: Path, bf16: bool = False):
        cfg = SweepConfig(sizes=[str(m)], arch="relu-l1", l1=[l1], seeds=[seed], lr=lr, batch_size=batch,
                          normalise=False, log_every=10**9, checkpoint_every=0, test_curve_points=0, device="cpu",
                          bf16=bf16, model=SAEOptions(pre_bias="none", encoder_scale=scale))
        head = data[: 2 * batch].numpy()
        path = tmp / f"head-{scale:g}-{bf16}.h5"
        with StoreWriter(path, sites={"x": data.shape[1]}, provenance={"bench": "quality"}) as w:
            w.append({"x": head}, test=split_rows(len(head), 0.1, 0))
        with ActivationStore(path) as store:
            self.sweep = Sweep(store, cfg, tmp / f"unused-{scale:g}-{bf16}.h5", force=True, progress=False)

    def step(self, x: torch.Tensor) -> None:
        self.sweep.step_on(x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.sweep.stacks[0](x)[0][0]

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.sweep.stacks[0](x)[1][0]


@torch.no_grad()
def fvu(reconstruct, held: torch.Tensor, chunk: int = 4096) -> float:
    sse = sum(float((reconstruct(held[s:s + chunk]) - held[s:s + chunk]).pow(2).sum())
              for s in range(0, len(held), chunk))
    return sse / float((held - held.mean(0)).pow(2).sum())


@torch.no_grad()
def l0(codes, held: torch.Tensor, chunk: int = 4096) -> float:
    """Mean number of non-zero codes per held-out row."""
    return sum(float((codes(held[s:s + chunk]) != 0).sum()) for s in range(0, len(held), chunk)) / len(held)


def crossing(curve: list[tuple[int, float, float]], level: float) -> tuple[float, float] | None:
    """(step, seconds) where a curve of (step, seconds, fvu), starting at step 0, first reaches `level`,
    linear between points; None if it never does."""
    prev = curve[0]
    for point in curve:
        if point[2] <= level:
            if point is curve[0]:
                return point[0], point[1]
            f = (prev[2] - level) / (prev[2] - point[2])
            return prev[0] + f * (point[0] - prev[0]), prev[1] + f * (point[1] - prev[1])
        prev = point
    return None


def matmul_gflops(b: int, d: int, m: int, reps: int = 10, product=F.linear) -> float:
    """The measured ceiling: GFLOP/s of the step's encoder product [b, d] × [d, m], best of `reps`
    (`product`: torch's own, which the bare loops use, or sparsefeat's oneDNN one, products.py)."""
    x, w = torch.randn(b, d), torch.randn(m, d)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        product(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * b * d * m / best / 1e9


def toy_data(n: int, d: int, seed: int = 0) -> np.ndarray:
    """make_data.py's distribution at a small size: sparse non-negative sums of random unit directions."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((4 * d, d)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    coef = rng.random((n, 4 * d), dtype=np.float32) * (rng.random((n, 4 * d), dtype=np.float32) < 1 / 16)
    return coef @ dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"{os.environ.get('TMPDIR', '/tmp')}/peers-data/acts_d384.npy")
    ap.add_argument("--m", type=int, default=1536)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=1000, help="the reference's steps; its held-out FVU then is the level")
    ap.add_argument("--reference", default="bare PyTorch", choices=["bare PyTorch", "bare PyTorch, unit decoder"],
                    help="the method whose FVU after --steps steps is the level")
    ap.add_argument("--bf16", action="store_true",
                    help="also run the unit-decoder bare loop and each sparsefeat scale under bfloat16 autocast "
                         "(the held-out FVU is always computed in float32)")
    ap.add_argument("--max-factor", type=float, default=3.0, help="others stop at this × --steps at the latest")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--heldout", type=int, default=8192, help="last rows of the data, never trained on")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.1], help="sparsefeat encoder_scale values")
    ap.add_argument("--l1", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append each method's curve as a JSON line")
    ap.add_argument("--quick", action="store_true", help="smoke run on in-process toy data (d=32, m=64)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        array = toy_data(8192, 32)
        args.m, args.batch, args.heldout, args.steps, args.eval_every = 64, 256, 1024, 40, 5
    else:
        array = np.load(args.data)
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    train, held = data[: -args.heldout], data[-args.heldout:]
    n_batches = len(train) // args.batch
    print(f"data {tuple(data.shape)} (held out {len(held)}), m={args.m}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}")

    with tempfile.TemporaryDirectory() as tmp:
        methods = {"bare PyTorch": Bare(data.shape[1], args.m, args.l1, args.lr, args.seed),
                   "bare PyTorch, unit decoder": Bare(data.shape[1], args.m, args.l1, args.lr, args.seed, unit=True)}
        if args.bf16:
            methods["bare PyTorch, unit decoder, bf16"] = Bare(data.shape[1], args.m, args.l1, args.lr, args.seed,
                                                               unit=True, bf16=True)
        for s in args.scales:
            methods[f"sparsefeat enc {s:g}"] = Ours(train, args.m, args.l1, args.lr, args.seed, args.batch, s, Path(tmp))
            if args.bf16:
                methods[f"sparsefeat enc {s:g}, bf16"] = Ours(train, args.m, args.l1, args.lr, args.seed, args.batch, s,
                                                              Path(tmp), bf16=True)
    steps = {name: 0 for name in methods}
    seconds = {name: 0.0 for name in methods}
    def point(name, method):
        return steps[name], seconds[name], fvu(method.reconstruct, held), l0(method.codes, held)

    curves = {name: [point(name, method)] for name, method in methods.items()}
    active, level, cap = set(methods), None, int(args.max_factor * args.steps)
    while active:
        for name, method in methods.items():
            if name not in active:
                continue
            i = steps[name]
            x = train[(i % n_batches) * args.batch:(i % n_batches + 1) * args.batch]
            t0 = time.perf_counter()
            method.step(x)
            seconds[name] += time.perf_counter() - t0
            steps[name] = i + 1
            if steps[name] % args.eval_every == 0 or steps[name] in (args.steps, cap):
                curves[name].append(point(name, method))
        if level is None and steps[args.reference] == args.steps:
            level = curves[args.reference][-1][2]
            active.discard(args.reference)
        if level is not None:
            active = {n for n in active if steps[n] < cap and curves[n][-1][2] > level}

    print(f"level: {args.reference}'s held-out FVU after {args.steps} steps = {level:.4f}; "
          f"load {os.getloadavg()[0]:.1f}; matmul ceiling {matmul_gflops(args.batch, data.shape[1], args.m):.0f} "
          f"GFLOP/s with torch's BLAS"
          + (f", {matmul_gflops(args.batch, data.shape[1], args.m, product=products._onednn):.0f} with oneDNN (products.py)"
             if products.ONEDNN else "")
          + f" (a dense step is 6 such products: {12 * args.batch * data.shape[1] * args.m / 1e9:.2f} GFLOP)")
    reached = {name: crossing(curves[name], level) for name in methods}
    best = min(r[1] for r in reached.values() if r)
    print("| method | steps to level | s to level | vs fastest | ms/step | FVU at 1/4, 1/2, 1× steps | last FVU | "
          "L0 at 1× steps, last |")
    print("|---|---|---|---|---|---|---|---|")
    for name, curve in curves.items():
        at = [next((f for s, _, f, _ in curve if s >= q * args.steps), float("nan")) for q in (0.25, 0.5, 1.0)]
        l0_at = next((n for s, _, _, n in curve if s >= args.steps), float("nan"))
        r = reached[name]
        when = f"{r[0]:.0f} | {r[1]:.2f} | {r[1] / best:.2f}" if r else f"not in {steps[name]} | – | –"
        print(f"| {name} | {when} | {1e3 * seconds[name] / steps[name]:.1f} | "
              f"{', '.join(f'{f:.4f}' for f in at)} | {curve[-1][2]:.4f} (step {curve[-1][0]}) | "
              f"{l0_at:.1f}, {curve[-1][3]:.1f} |")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(dict(method=name, m=args.m, batch=args.batch, level=level, reached=r,
                                        curve=curve)) + "\n")


if __name__ == "__main__":
    main()

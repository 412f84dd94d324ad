"""Dense vs sparse training step (kernels.py): where the sparse path pays, and the machine's ceilings.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_sparse.py [--threads 2] [--reps 3] [--batch 4096]

For topk at m in {1536, 6144} × k in {8, 32, 128}, and relu-l1 at m in {1536, 6144} with the encoder
bias set so that a given fraction of the codes is positive (L0/m), it times one full training step
(training_loss, backward, Adam, the unit-norm constraint) on the dense and on the sparse path, the two
interleaved over the repetitions so that load from other processes hits both alike, and prints the
ratio dense/sparse of the best times (> 1: the sparse path is faster). The same run measures a plain
[B, d] × [d, m] matmul's FLOP rate and a large copy's memory bandwidth, the ceilings the step times
are read against. d = 384.
"""

from __future__ import annotations

import argparse
import time

import torch

from sparsefeat import products
from sparsefeat.sae import ReluL1, SAEOptions, TopK

D = 384


def ceilings(batch: int, m: int, reps: int) -> tuple[float, float, float]:
    """(GFLOP/s of a [B, d] × [d, m] matmul with torch's BLAS, the same with oneDNN as the dense path runs
    it (products.py; the BLAS rate where there is none), GB/s of a 256 MB copy), best of reps."""
    a, w = torch.randn(batch, D), torch.randn(m, D)
    src, dst = torch.empty(64 * 2**20), torch.empty(64 * 2**20)
    onednn = products._onednn if products.ONEDNN else (lambda x, y: x @ y.t())
    t_mm = t_dnn = t_cp = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        a @ w.t()
        t1 = time.perf_counter()
        onednn(a, w)
        t2 = time.perf_counter()
        dst.copy_(src)
        t3 = time.perf_counter()
        t_mm, t_dnn, t_cp = min(t_mm, t1 - t0), min(t_dnn, t2 - t1), min(t_cp, t3 - t2)
    flop = 2 * batch * m * D
    return flop / t_mm / 1e9, flop / t_dnn / 1e9, 2 * src.numel() * 4 / t_cp / 1e9  # copy: read + write


def make(arch: str, m: int, setting: float) -> torch.nn.Module:
    if arch == "topk":
        return TopK(D, m, [int(setting)], [0], SAEOptions(pre_bias="none"))
    return ReluL1(D, m, [0.05], [0], SAEOptions(pre_bias="none"))


def step_time(sae, opt, x: torch.Tensor, kernel: str, bf16: bool = False) -> float:
    sae.kernel = kernel
    t0 = time.perf_counter()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        total, _ = sae.training_loss(x)
    total.backward()
    sae.after_backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.after_step()
    return time.perf_counter() - t0


@torch.no_grad()
def bias_for_density(sae, x: torch.Tensor, density: float) -> None:
    """Set each member's encoder bias to the value that leaves `density` of its codes positive on x."""
    sae.encoder_bias.zero_()
    pre = sae.pre_activations(x).flatten(1)
    sae.encoder_bias.copy_(-pre.kthvalue(int((1 - density) * pre.shape[1]), dim=1).values[:, None])


def compare(arch: str, m: int, setting: float, x: torch.Tensor, reps: int,
            bf16: bool = False) -> tuple[float, float, float]:
    """(best dense s, best sparse s, measured L0/m) of one training step, dense and sparse interleaved."""
    pair = []
    for _ in range(2):
        torch.manual_seed(0)
        sae = make(arch, m, setting)
        if arch == "relu-l1":
            bias_for_density(sae, x, setting)
        pair.append((sae, torch.optim.Adam(sae.parameters(), lr=1e-5)))  # tiny lr: the density stays put
    best = {"dense": float("inf"), "sparse": float("inf")}
    for r in range(reps + 1):  # the first round warms up
        for kernel, (sae, opt) in zip(("dense", "sparse"), pair):
            t = step_time(sae, opt, x, kernel, bf16)
            if r:
                best[kernel] = min(best[kernel], t)
    with torch.no_grad():
        density = float((pair[0][0].encode(x) > 0).float().mean())
    return best["dense"], best["sparse"], density


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--sizes", default="1536,6144")
    ap.add_argument("--ks", default="8,32,128")
    ap.add_argument("--densities", default="0.01,0.03,0.06,0.12,0.25")
    ap.add_argument("--bf16", action="store_true", help="both paths under bfloat16 autocast (as sweep --bf16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch, D, generator=torch.Generator().manual_seed(0))
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, d={D}, batch {args.batch}, "
          f"{'bf16 autocast' if args.bf16 else 'float32'}; "
          f"best of {args.reps} interleaved steps; ratio = dense / sparse time (> 1: sparse faster)")
    for m in sizes:
        blas, gflops, gbs = ceilings(args.batch, m, args.reps)
        dense_flops = 6 * 2 * args.batch * m * D  # six [B, m] x [m, d]-sized products per dense step
        print(f"\nm={m}: matmul {blas:.0f} GFLOP/s with torch's BLAS, {gflops:.0f} as the dense path runs it "
              f"(products.py), copy {gbs:.1f} GB/s; a dense step's products need {dense_flops / 1e9:.1f} GFLOP = "
              f"{dense_flops / gflops / 1e9 * 1e3:.0f} ms at the second rate")
        print(f"  {'arch':8} {'k or L0/m':>10} {'L0/m':>7} {'dense ms':>9} {'sparse ms':>9} {'ratio':>6}")
        rows = [("topk", float(k)) for k in args.ks.split(",") if k]
        rows += [("relu-l1", float(f)) for f in args.densities.split(",") if f]
        for arch, setting in rows:
            dense, sparse, density = compare(arch, m, setting, x, args.reps, args.bf16)
            label = f"k={int(setting)}" if arch == "topk" else f"{setting:.2f}"
            print(f"  {arch:8} {label:>10} {density:7.3f} {dense * 1e3:9.0f} {sparse * 1e3:9.0f} "
                  f"{dense / sparse:6.2f}", flush=True)


if __name__ == "__main__":
    main()

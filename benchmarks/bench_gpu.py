"""GPU rates: the device's bf16 matmul rate, the trainer's FLOP rate beside it, the store stream beside
host-to-device bandwidth (issue 11).

    python benchmarks/bench_gpu.py             # CUDA, full size (expected under a minute on an H200; not yet run)
    python benchmarks/bench_gpu.py --device cpu --d 64 --m 256 --batch 256 --steps 3 --rows 2048   # smoke, seconds

1. bf16 matmul: one n×n×n bf16 matmul (n=8192), timed with CUDA events after warm-up; TFLOP/s = 2·n³/s.
   The reference for 2. (no target: it is what the device reaches).
2. SAE training FLOP rate: one member (d=768, m=24576, batch 8192), relu-l1 (α=0.3) and topk (k=64),
   bf16 autocast, through the real trainer: a `Sweep` on a synthetic `gaussian` store, its `step_on`
   fed device-resident batches (as bench_peer_sparsefeat.py does), so no data movement is timed.
   FLOPs counted per step: 12·B·d·m, the dense matmuls of the encoder (x·W_eᵀ) and the decoder (c·W_d),
   each 2·B·d·m forward plus 2·B·d·m for its weight gradient and 2·B·d·m for its input gradient.
   Not counted: biases, ReLU / top-k, the loss, Adam over the 2·m·d weights, the decoder's
   renormalisation. (relu-l1 needs no gradient of its input x, so its true dense matmul work is
   10·B·d·m; both rows use 12 so that they compare.) Target: the dense path at >= 0.5 of (1).
   The dense path is forced for that row (`kernel = "dense"`); where the trainer's own choice
   (`kernel = "auto"`, sae.py: under bf16 autocast topk with k <= m/32, relu-l1 below L0/m 1/48; both
   thresholds measured on a CPU, not yet on a GPU) takes the sparse path,
   its steps/s are timed separately and shown as a dense-equivalent rate (same 12·B·d·m per step)
   and a speed-up over dense. The line says which path ran.
3. Store to GPU: pinned host-to-device copy GB/s of one batch (CUDA events), then the rate at which
   the trainer's own stream (`Sweep._stream`: `ActivationStore.batches` with pinned memory and the
   prefetch thread) delivers shuffled batches to the device, as a fraction of that copy rate; target
   >= 0.7. Wall time to the last batch on the device, on a fresh reader: the first epoch (each block's
   checksum is checked on its first read) and later epochs apart. The store was just written, so it is
   read from the page cache, not the disk. Also: the same stream without prefetch, and the trainer end
   to end (`Sweep.train` on the stream) beside `step_on` on resident batches (target >= 0.95: the
   stream keeps up with the step). Then the device-cached stream (`SweepConfig.device_cache`: the train
   split loaded onto the device once, batches gathered there): its load time and its batch rate.
On CPU the CUDA-only measurements print "skipped: no CUDA"; the rest runs in float32 (smoke mode).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from sparsefeat.store import ActivationStore
from sparsefeat.toys import write_toy
from sparsefeat.train import Sweep, SweepConfig


def sae_flops(batch: int, d: int, m: int) -> float:
    """Dense matmul FLOPs of one training step of one member (see the module docstring)."""
    return 12.0 * batch * d * m


def timed(fn, n: int, device: torch.device) -> float:
    """Seconds for `n` calls of `fn` after the device has finished them (CUDA events on CUDA)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def wall(fn, device: torch.device) -> float:
    """Wall seconds of `fn` until the device has finished its work (for host-bound work like the stream)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


# -- 1. ----------------------------------------------------------------------------------------------

def matmul_rate(n: int, device: torch.device, reps: int) -> float:
    """bf16 TFLOP/s of an n×n×n matmul."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    timed(lambda: torch.mm(a, b, out=out), 10, device)  # warm-up: cuBLAS handle, heuristics, clocks
    return 2.0 * n ** 3 * reps / timed(lambda: torch.mm(a, b, out=out), reps, device) / 1e12


# -- 2. ----------------------------------------------------------------------------------------------

def build_sweep(store: ActivationStore, arch: str, args, device: torch.device, out: Path) -> Sweep:
    cfg = SweepConfig(sizes=[str(args.m)], arch=arch, l1=[args.l1], k=[args.k], seeds=[0], steps=10**9,
                      batch_size=args.batch, log_every=10**9, checkpoint_every=0, test_curve_points=0,
                      test_curve_rows=1, device=str(device), bf16=device.type == "cuda",
                      device_cache="off")  # the store stream, unless a part says otherwise
    return Sweep(store, cfg, out, force=True, progress=False)


def step_rate(sweep: Sweep, batches: list[torch.Tensor], kernel: str, steps: int, warmup: int) -> tuple[float, str]:
    """(steps/s of `step_on` on resident batches with the stack's kernel set to `kernel`, the path that ran)."""
    st = sweep.stacks[0]
    st.kernel = kernel
    i = iter(range(10**12))

    def one():
        sweep.step_on(batches[next(i) % len(batches)])

    timed(one, warmup, sweep.device)
    path = "sparse" if st.use_sparse() else "dense"
    secs = timed(one, steps, sweep.device)
    st.on_log()  # where the trainer reads the codes' density (relu-l1 chooses its path by it)
    return steps / secs, path


def sae_rates(store: ActivationStore, args, device: torch.device, tmp: Path, ref_tflops: float | None) -> None:
    """Part 2."""
    batches = []
    for b in store.batches("x", "train", args.batch, seed=1, epochs=1, drop_last=True):
        batches.append(b.to(device))
        if len(batches) == 4:
            break
    flops = sae_flops(args.batch, args.d, args.m)
    precision = "bf16 autocast" if device.type == "cuda" else "float32"
    print(f"\n2. SAE training, one member, d={args.d}, m={args.m}, batch {args.batch}, {precision}, "
          f"{args.steps} timed steps; {flops / 1e9:,.1f} GFLOP per step (12·B·d·m)")
    for arch, setting in (("relu-l1", f"α={args.l1}"), ("topk", f"k={args.k}")):
        sweep = build_sweep(store, arch, args, device, tmp / f"{arch}.h5")
        dense, _ = step_rate(sweep, batches, "dense", args.steps, args.warmup)
        tflops = dense * flops / 1e12
        frac = f"{tflops / ref_tflops:.3f} of the bf16 rate" if ref_tflops else "fraction: n/a (no bf16 reference)"
        print(f"   {arch:7s} ({setting}) dense path: {dense:8.2f} steps/s  {tflops:8.3f} TFLOP/s  {frac}  "
              "target >= 0.5")
        st = sweep.stacks[0]
        st.kernel = "auto"
        if st.use_sparse():
            sparse, path = step_rate(sweep, batches, "auto", args.steps, args.warmup)
            print(f"   {arch:7s} ({setting}) auto path ran {path}: {sparse:8.2f} steps/s  "
                  f"{sparse * flops / 1e12:8.3f} dense-equivalent TFLOP/s  {sparse / dense:.2f}x dense  "
                  "target >= 1 (the switch should not lose)")
        else:
            why = (f"L0/m {st.density:.3f} > {st.SPARSE_MAX_DENSITY_BF16:.4f}" if arch == "relu-l1"
                   else f"k {args.k} > m/{round(1 / st.SPARSE_MAX_FRACTION_BF16)}")
            print(f"   {arch:7s} ({setting}) auto path: dense ({why}), as timed above")
        del sweep, st  # free the device memory before the next


# -- 3. ----------------------------------------------------------------------------------------------

def copy_rate(nbytes: int, device: torch.device, reps: int) -> float:
    """GB/s of a pinned host-to-device copy of `nbytes`."""
    host = torch.empty(nbytes // 4, dtype=torch.float32).pin_memory()
    dev = torch.empty_like(host, device=device)
    timed(lambda: dev.copy_(host, non_blocking=True), 3, device)
    return nbytes * reps / timed(lambda: dev.copy_(host, non_blocking=True), reps, device) / 1e9


def stream_rate(stream, n: int, nbytes: int, device: torch.device) -> float:
    """GB/s at which `stream` delivers its next `n` batches (of `nbytes` each) to `device`."""
    def take():
        for _ in range(n):
            next(stream)

    return n * nbytes / wall(take, device) / 1e9


def stream_rates(path: Path, args, device: torch.device, tmp: Path) -> None:
    """Part 3, on a fresh reader of the store (one that has checked no block yet, as at a run's start)."""
    nbytes = args.batch * args.d * 4
    cuda = device.type == "cuda"
    with ActivationStore(path) as store:
        sweep = build_sweep(store, "topk", args, device, tmp / "stream.h5")
    with ActivationStore(path) as store:
        sweep.store = store  # `Sweep._stream` reads from it
        epoch = store.n_rows("train") // args.batch
        print(f"\n3. store to {device.type}: batches of {args.batch} x {args.d} float32 ({nbytes / 1e6:.1f} MB), "
              f"{epoch} batches per epoch, store just written (in the page cache)")
        ref = None
        if cuda:
            ref = copy_rate(nbytes, device, args.copy_reps)
            big = copy_rate(1 << 28, device, max(3, args.copy_reps // 4))
            print(f"   pinned host->device copy: {ref:6.2f} GB/s one batch, {big:6.2f} GB/s 256 MB  (reference)")
        else:
            print("   pinned host->device copy: skipped: no CUDA")

        def show(what: str, rate: float, target: str = "target >= 0.7") -> None:
            frac = f"{rate / ref:.3f} of the copy rate" if ref else "fraction: n/a (no CUDA)"
            print(f"   {what}: {rate:6.2f} GB/s  {rate * 1e9 / nbytes:7.1f} batches/s  {frac}  {target}")

        prefetch = sweep.config.prefetch if cuda else 0
        how = f"pinned, prefetch {prefetch}" if cuda else "no pinning or prefetch on CPU"
        stream = sweep._stream()  # the trainer's stream: pinned memory and prefetch on CUDA
        for _ in range(2):  # starts the prefetch thread; the mixing buffer's first fill
            next(stream)
        first = epoch - 2 - prefetch
        if first >= 2:  # each block's checksum is checked on its first read
            show(f"trainer stream ({how}), first epoch, {first} batches",
                 stream_rate(stream, first, nbytes, device))
        for _ in range(prefetch + 1):
            next(stream)  # into the second epoch: every block checked
        rate = stream_rate(stream, args.stream_batches, nbytes, device)
        show(f"trainer stream ({how}), later epochs, {args.stream_batches} batches", rate)
        if cuda:
            sweep.config.prefetch = 0
            inline = sweep._stream()
            next(inline)
            show("the same without prefetch", stream_rate(inline, args.stream_batches, nbytes, device), "(no target)")
            sweep.config.prefetch = prefetch
        need = store.n_rows("train") * args.d * 4
        sweep.device_cache, sweep.cached_rows = True, None  # --device-cache on: the split held on the device
        cached = sweep._stream()
        secs = wall(lambda: next(cached), device)  # loads the train split (its first read: blocks checked)
        print(f"   device cache (--device-cache, auto picks it when the split fits): train split "
              f"{need / 1e9:.2f} GB loaded in {secs:.2f} s ({need / secs / 1e9:.2f} GB/s)")
        show(f"device-cached stream, {args.stream_batches} batches",
             stream_rate(cached, args.stream_batches, nbytes, device), "target >= 0.7 (no host data moves)")
        sweep.device_cache, sweep.cached_rows = False, None

        # the trainer end to end: does the stream keep up with the step? (topk, the trainer's own path)
        batches = [next(stream) for _ in range(2)]
        resident, path_ran = step_rate(sweep, batches, "auto", args.steps, args.warmup)
        sweep.stream = sweep._stream()  # (skips the batches of the steps taken so far, as a resume does)
        sweep.train(until=sweep.step + args.warmup)
        secs = wall(lambda: sweep.train(until=sweep.step + args.steps), device)
        print(f"   topk k={args.k} ({path_ran} path): Sweep.train from the store {args.steps / secs:8.2f} steps/s, "
              f"step_on on resident batches {resident:8.2f} steps/s: ratio {args.steps / secs / resident:.3f}  "
              "target >= 0.95 (the stream keeps up)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--m", type=int, default=24576)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--k", type=int, default=64, help="topk: active latents per row")
    ap.add_argument("--l1", type=float, default=0.3, help="relu-l1: L1 coefficient")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps per measurement")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (and stream batches) before each")
    ap.add_argument("--matmul-n", type=int, default=8192, help="size of the square bf16 matmul")
    ap.add_argument("--matmul-reps", type=int, default=100)
    ap.add_argument("--copy-reps", type=int, default=40, help="host-to-device copies timed")
    ap.add_argument("--stream-batches", type=int, default=60, help="stream batches timed")
    ap.add_argument("--rows", type=int, default=196_608, help="rows of the synthetic store (10%% test)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} torch threads")

    failed = False

    def attempt(part) -> None:
        """Run one part; a failure is printed and the next part still runs (one GPU session, every number)."""
        nonlocal failed
        try:
            part()
        except Exception:
            traceback.print_exc(file=sys.stdout)
            print("   FAILED (above)")
            failed = True

    ref = None

    def bf16_matmul() -> None:
        nonlocal ref
        print(f"\n1. bf16 matmul {args.matmul_n}^3:", end="")
        if cuda:
            ref = matmul_rate(args.matmul_n, device, args.matmul_reps)
            print(f" {ref:8.1f} TFLOP/s  (reference; no target)")
        else:
            print(" skipped: no CUDA")

    attempt(bf16_matmul)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = write_toy("gaussian", tmp / "toy.h5", n_samples=args.rows, seed=0, d=args.d, progress=False)

        def training() -> None:
            with ActivationStore(path) as store:
                sae_rates(store, args, device, tmp, ref)

        attempt(training)
        attempt(lambda: stream_rates(path, args, device, tmp))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

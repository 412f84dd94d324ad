#!/usr/bin/env python3
"""sparsefeat in the peers harness (/work/shared/peers, see its README): our training step on its batches.

Our trainer streams batches from an HDF5 store, while the harness feeds batch i = rows [i·B, (i+1)·B)
of an in-memory tensor. So a small store of the first rows sets the sweep up (split, test rows), and
`Sweep.step_on(batch)` (the step `train_sweep` runs for every batch) trains on the harness's batches.
Matched to the harness: Adam at its lr without warm-up, its L1 coefficient on the mean row L1
(our "sum" reduction), its k; inputs not rescaled (normalise off) and a zero initial decoder bias, so
final_mse is in the harness's units. Run through run_all.sh with EXTRA_JOBS (README).
`--encoder-scale` sets `SAEOptions.encoder_scale` (the initial encoder rows = decoderᵀ × this; 1.0 is the
package default, the study's toy sweeps use 0.1); `--bf16` trains under bfloat16 autocast (`sweep --bf16`;
on a CPU with native bf16 the matmuls run ~4.5x the float32 rate). Both are recorded in the JSON line.
"""
import tempfile
from pathlib import Path

import bench_common as bc

from sparsefeat import __version__
from sparsefeat.sae import SAEOptions
from sparsefeat.store import ActivationStore, StoreWriter, split_rows
from sparsefeat.train import Sweep, SweepConfig


def main():
    ap = bc.build_parser("sparsefeat", ["standard", "topk"])
    ap.add_argument("--encoder-scale", type=float, default=SAEOptions.encoder_scale,
                    help="SAEOptions.encoder_scale: initial encoder = decoderᵀ × this (default %(default)s)")
    ap.add_argument("--bf16", action="store_true", help="SweepConfig.bf16: bfloat16 autocast for the matmuls")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated dictionary sizes trained together in one sweep (--m is then ignored; "
                         "final_mse is the largest's): benchmarks/bench_peers_sizes.py")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    if sizes:
        args.m = max(sizes)
    data = bc.setup(args)
    cfg = SweepConfig(sizes=[str(m) for m in sizes or [args.m]], arch="relu-l1" if args.arch == "standard" else "topk", l1=[args.l1],
                      k=[args.k], seeds=[args.seed], lr=args.lr, batch_size=args.batch, normalise=False,
                      log_every=10**9, checkpoint_every=0, test_curve_points=0, device="cpu", bf16=args.bf16,
                      model=SAEOptions(pre_bias="none", encoder_scale=args.encoder_scale))
    with tempfile.TemporaryDirectory() as tmp:
        head = data[: 2 * args.batch].numpy()
        with StoreWriter(Path(tmp) / "head.h5", sites={"x": args.d}, provenance={"bench": "peers"}) as w:
            w.append({"x": head}, test=split_rows(len(head), 0.1, 0))
        with ActivationStore(Path(tmp) / "head.h5") as store:
            sweep = Sweep(store, cfg, Path(tmp) / "unused.h5", force=True, progress=False)
    secs = bc.run_loop(lambda i, x: sweep.step_on(x), data, args)
    sae = max(sweep.stacks, key=lambda stack: stack.size)
    mse = bc.eval_mse(lambda x: sae(x)[0][0], data, args.eval_rows)
    bc.emit(args, "sparsefeat", args.arch, secs, mse, lib_version=__version__,
            api="Sweep(store, SweepConfig); Sweep.step_on(batch)",
            k=args.k if args.arch == "topk" else None, encoder_scale=args.encoder_scale,
            bf16=args.bf16, sizes=sizes)


if __name__ == "__main__":
    main()

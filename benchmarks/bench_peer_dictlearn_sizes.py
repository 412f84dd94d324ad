#!/usr/bin/env python3
"""dictionary_learning training several dictionary sizes together, in the peers harness's terms.

Run under the harness's dictionary_learning venv with the harness folder on PYTHONPATH (for
bench_common), as `benchmarks/bench_peers_sizes.py` does. dictionary_learning's `trainSAE` takes a list
of trainer configs and updates every trainer on each batch it pulls, which is how it trains a sweep of
sizes in one pass; this gives it the same configs as the harness's own one-size script (StandardTrainer
or TopKTrainer, Adam at the harness's lr, no warm-ups, no resampling), one per size, and times the
`--steps` batches after `--warmup` as the harness does (`TimedBatches`). `--m` is ignored; `--sizes`
lists the sizes. final_mse is the largest size's.
"""
import os
import tempfile
import time

import bench_common as bc
import torch


def main():
    ap = bc.build_parser("dictionary-learning", ["standard", "topk"])
    ap.add_argument("--sizes", required=True, help="comma-separated dictionary sizes, trained together")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    args.m = max(sizes)
    data = bc.setup(args)

    from dictionary_learning.dictionary import AutoEncoder
    from dictionary_learning.trainers import StandardTrainer, TopKTrainer
    from dictionary_learning.trainers.top_k import AutoEncoderTopK
    from dictionary_learning.training import trainSAE

    total = args.warmup + args.steps
    configs = []
    for m in sizes:
        cfg = dict(steps=total, activation_dim=args.d, dict_size=m, layer=0, lm_name="none", lr=args.lr,
                   warmup_steps=0, seed=args.seed, device="cpu")
        if args.arch == "standard":
            cfg.update(trainer=StandardTrainer, l1_penalty=args.l1, sparsity_warmup_steps=None, resample_steps=None)
        else:
            cfg.update(trainer=TopKTrainer, k=args.k)
        configs.append(cfg)

    provider = bc.TimedBatches(data, args.batch, args.warmup, args.steps)
    save_dir = tempfile.mkdtemp(prefix="dictlearn-sizes-bench-")
    trainSAE(data=provider, trainer_configs=configs, steps=total, use_wandb=False, save_dir=save_dir,
             device="cpu", autocast_dtype=torch.float32)
    if provider.t_end is None:  # the trainer did not ask for one more batch after the last step
        provider.t_end = time.perf_counter()

    largest = sizes.index(args.m)
    ae = AutoEncoder(args.d, args.m) if args.arch == "standard" else AutoEncoderTopK(args.d, args.m, args.k)
    ae.load_state_dict(torch.load(os.path.join(save_dir, f"trainer_{largest}", "ae.pt"), weights_only=True))
    ae.eval()
    mse = bc.eval_mse(lambda x: ae(x), data, args.eval_rows)
    bc.emit(args, "dictionary-learning", args.arch, provider.elapsed(), mse,
            lib_version=bc.pkg_version("dictionary-learning"), sizes=sizes,
            api=f"trainSAE(iterator, [{len(sizes)} trainer cfgs])", k=args.k if args.arch == "topk" else None)


if __name__ == "__main__":
    main()

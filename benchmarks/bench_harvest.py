"""Harvest throughput beside bare forward passes on the same batches, in the same process.

    .venv/bin/python benchmarks/bench_harvest.py [--tokens 12000] [--repeats 3]

Three timings per repeat, interleaved so that load from other processes hits all of them alike:
- bare: only `model(...)` (hidden states on) on exactly the batches the harvest builds (same blocks,
  same padding, tokenized beforehand): the baseline;
- harvest: `harvest()` end to end (corpus, model load, weight hash, tokenizing, forward passes,
  gathering rows, HDF5 writes);
- set-up: `harvest()` of a single document: its fixed cost, subtracted to get the steady state.
Reported: input tokens/s of each and the harvest's overhead over bare, per repeat and from the best
(shortest) time of each over the repeats, the estimate least hurt by other processes on shared cores.
Target: steady-state overhead <= 10%.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from sparsefeat.harvest import (HarvestConfig, _forward, batch_windows, harvest, iter_blocks, load_corpus,
                                load_model, pad_batch)
from sparsefeat.store import ActivationStore


def harvest_batches(loaded, corpus, config, n_docs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The padded batches a harvest of the first n_docs documents feeds the model."""
    pad_id = loaded.tokenizer.pad_token_id or 0
    batches = []
    for block in iter_blocks(corpus, loaded.tokenizer, start=0, stop=n_docs, max_length=config.max_length,
                             block_tokens=config.block_tokens):
        for batch in batch_windows(block.windows, config.batch_size):
            ids, mask, _ = pad_batch([block.windows[i] for i in batch], pad_id)
            batches.append((ids, mask))
    return batches


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=12000, help="max_tokens of the harvest")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", default="0,3,6")
    ap.add_argument("--dtype", default="float32", choices=("float16", "float32"))
    args = ap.parse_args()
    config = HarvestConfig(layers=[int(x) for x in args.layers.split(",")], max_tokens=args.tokens,
                           dtype=args.dtype, device="cpu")
    print(f"MiniLM-L6 on the pydoc corpus, CPU, {torch.get_num_threads()} torch threads; layers {config.layers}, "
          f"max_tokens {args.tokens}, dtype {args.dtype}, batch {config.batch_size}, "
          f"max_length {config.max_length}, block_tokens {config.block_tokens}")
    corpus = load_corpus(config.corpus)
    loaded = load_model(config.model, device="cpu")
    one_doc = dataclasses.replace(config, max_documents=1, max_tokens=None)
    times: dict[str, list[float]] = {"bare": [], "harvest": [], "setup": []}
    tokens = 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "h.h5"
        harvest(one_doc, out, force=True, progress=False)  # warm-up: imports, file cache
        for r in range(args.repeats):
            t_harvest = timed(lambda: harvest(config, out, force=True, progress=False))
            with ActivationStore(out) as s:
                rows, n_docs = s.n_rows(), len(s.documents_test())
            batches = harvest_batches(loaded, corpus, config, n_docs)
            tokens = sum(int(m.sum()) for _, m in batches)
            t_bare = timed(lambda: [_forward(loaded, ids, mask, hidden_states=True) for ids, mask in batches])
            t_setup = timed(lambda: harvest(one_doc, Path(tmp) / "one.h5", force=True, progress=False))
            steady = t_harvest - t_setup
            for key, t in (("bare", t_bare), ("harvest", t_harvest), ("setup", t_setup)):
                times[key].append(t)
            print(f"repeat {r}: {n_docs} docs, {tokens} input tokens, {rows} rows | bare {tokens / t_bare:6.0f} tok/s"
                  f" | harvest {tokens / t_harvest:6.0f} tok/s end to end ({t_harvest / t_bare - 1:+.1%}),"
                  f" {tokens / steady:6.0f} tok/s steady ({steady / t_bare - 1:+.1%}; set-up {t_setup:.2f} s)")
    bare, total, setup = (min(times[k]) for k in ("bare", "harvest", "setup"))
    print(f"best of {args.repeats}: bare {tokens / bare:.0f} tok/s, harvest {tokens / (total - setup):.0f} tok/s "
          f"steady (overhead {(total - setup) / bare - 1:+.1%}; target <= +10%), {tokens / total:.0f} tok/s end to "
          f"end (overhead {total / bare - 1:+.1%}, set-up {setup:.2f} s)")


if __name__ == "__main__":
    main()

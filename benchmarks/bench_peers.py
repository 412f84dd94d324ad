"""Our row in the peers harness, beside every peer, in one run: the table of issue 11 with ratios.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_peers.py --m 1536 --m 6144 [--reps 3] [--steps 50]
        [--peers /work/shared/peers] [--data ACTS.npy] [--only "ref saelens sparsify dictlearn"]
        [--out results.jsonl]

Runs the harness's `run_all.sh` (each library × architecture a fresh process, repetitions
interleaved) once per --m, with sparsefeat's row added through EXTRA_JOBS
(`benchmarks/bench_peer_sparsefeat.py` under this interpreter), then prints, per m and architecture,
each library's median samples/s, its final MSE, and the ratio of sparsefeat to the fastest peer (the
bare PyTorch loop `ref` counts as a peer). The peers' venvs come from the harness's setup_venvs.sh
(VENVS, default ${TMPDIR:-/tmp}/peers-venvs); the data from its make_data.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = {"ref-pytorch": "bare PyTorch", "saelens": "SAELens", "sae-lens": "SAELens", "eai-sparsify": "sparsify",
         "dictionary_learning": "dictionary_learning", "dictionary-learning": "dictionary_learning",
         "sparsefeat": "sparsefeat"}


def run(args, m: int) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE.parent) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["EXTRA_JOBS"] = f"sparsefeat|{sys.executable}|{HERE / 'bench_peer_sparsefeat.py'}|standard topk"
    cmd = ["bash", str(Path(args.peers) / "run_all.sh"), "--m", str(m), "--reps", str(args.reps),
           "--steps", str(args.steps), "--threads", str(args.threads), "--out", args.out, "--only", args.only]
    if args.data:
        cmd += ["--data", args.data]
    subprocess.run(cmd, env=env, check=True)


def table(path: str) -> None:
    rows: dict[tuple, list[dict]] = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        rows.setdefault((r["m"], r["arch"], NAMES.get(r["lib"], r["lib"])), []).append(r)
    print("\n| m | arch | library | samples/s (median) | reps | final MSE | vs sparsefeat |")
    print("|---|---|---|---|---|---|---|")
    for m, arch in sorted({(k[0], k[1]) for k in rows}):
        libs = {k[2]: v for k, v in rows.items() if k[:2] == (m, arch)}
        speed = {lib: statistics.median(r["samples_per_s"] for r in v) for lib, v in libs.items()}
        for lib in sorted(libs, key=lambda n: -speed[n]):
            mse = statistics.median(r["final_mse"] for r in libs[lib])
            ratio = f"{speed['sparsefeat'] / speed[lib]:.2f}x" if "sparsefeat" in speed and lib != "sparsefeat" else ""
            print(f"| {m} | {arch} | {lib} | {speed[lib]:,.0f} | {len(libs[lib])} | {mse:.4f} | {ratio} |")
        peers = {lib: s for lib, s in speed.items() if lib != "sparsefeat"}
        if "sparsefeat" in speed and peers:
            best = max(peers, key=peers.get)
            print(f"| {m} | {arch} | **sparsefeat / fastest peer ({best})** | | | | "
                  f"**{speed['sparsefeat'] / peers[best]:.2f}x** |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, action="append", help="dictionary size (repeatable); default 1536")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", default="/work/shared/peers", help="the harness folder")
    ap.add_argument("--data", default=None, help="activations .npy (default: the harness's)")
    ap.add_argument("--only", default="ref saelens sparsify dictlearn sparsefeat", help="libraries to run")
    ap.add_argument("--out", default="peers_results.jsonl", help="JSON lines (appended)")
    ap.add_argument("--table-only", action="store_true", help="print the table of --out without running")
    args = ap.parse_args()
    if not args.table_only:
        for m in args.m or [1536]:
            run(args, m)
    table(args.out)


if __name__ == "__main__":
    main()

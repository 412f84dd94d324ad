"""Our row in the peers harness, beside every peer, in one run: the table of issue 11 with ratios.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_peers.py --m 1536 --m 6144 [--reps 3] [--steps 50]
        [--peers /work/shared/peers] [--data ACTS.npy] [--only "ref saelens sparsify dictlearn"]
        [--out results.jsonl] [--encoder-scale 1.0 --encoder-scale 0.1] [--bf16]

Runs the harness's `run_all.sh` (each library × architecture a fresh process, repetitions
interleaved) once per --m, with sparsefeat's row added through EXTRA_JOBS
(`benchmarks/bench_peer_sparsefeat.py` under this interpreter), then prints, per m and architecture,
each library's median samples/s, its final MSE, its median peak RSS, the ratio of sparsefeat's speed to
the fastest peer's (the bare PyTorch loop `ref` counts as a peer) and of sparsefeat's peak RSS to the
leanest peer's. Each --encoder-scale adds one sparsefeat row (`SAEOptions.encoder_scale`, default 1.0
only), labelled "sparsefeat (enc S)" unless S is the package default; ratios use the default's row.
`--bf16` adds, for each of them, a row trained under bfloat16 autocast ("sparsefeat (bf16)", `sweep --bf16`),
with its own ratio line: the peers run float32 as the harness has them. The peers' venvs come from the
harness's setup_venvs.sh (VENVS, default ${TMPDIR:-/tmp}/peers-venvs); the data from its make_data.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sparsefeat.sae import SAEOptions  # noqa: E402

DEFAULT_SCALE = SAEOptions.encoder_scale
NAMES = {"ref-pytorch": "bare PyTorch", "saelens": "SAELens", "sae-lens": "SAELens", "eai-sparsify": "sparsify",
         "dictionary_learning": "dictionary_learning", "dictionary-learning": "dictionary_learning",
         "sparsefeat": "sparsefeat"}


def launcher(folder: Path, scale: float, bf16: bool) -> Path:
    """run_all.sh starts each job as `PY SCRIPT --flags...` with no room for extra flags, so a job's
    PY is this two-line script that runs our interpreter and appends --encoder-scale (and --bf16)."""
    path = folder / f"python-enc{scale:g}{'-bf16' if bf16 else ''}"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@" --encoder-scale {scale!r}{" --bf16" if bf16 else ""}\n')
    path.chmod(0o755)
    return path


def run(args, m: int) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE.parent) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    variants = [(s, bf16) for s in args.encoder_scale or [DEFAULT_SCALE] for bf16 in [False] + [True] * args.bf16]
    # run_all.sh adds EXTRA_JOBS' names to its --only list one per line, which its space-delimited match
    # misses when there are several, so the names go into --only here
    only = " ".join([args.only] + [job_name(*v) for v in variants])
    with tempfile.TemporaryDirectory() as tmp:
        env["EXTRA_JOBS"] = ";".join(
            f"{job_name(*v)}|{launcher(Path(tmp), *v)}|{HERE / 'bench_peer_sparsefeat.py'}|standard topk"
            for v in variants)
        run_all(args, m, env, only)


def job_name(scale: float, bf16: bool = False) -> str:
    return "sparsefeat" + ("" if scale == DEFAULT_SCALE else f"-enc{scale:g}") + ("-bf16" if bf16 else "")


def label(row: dict) -> str:
    name = NAMES.get(row["lib"], row["lib"])
    if name != "sparsefeat":
        return name
    scale, bf16 = row.get("encoder_scale", DEFAULT_SCALE), row.get("bf16", False)
    notes = ([] if scale == DEFAULT_SCALE else [f"enc {scale:g}"]) + (["bf16"] if bf16 else [])
    return name + (f" ({', '.join(notes)})" if notes else "")


def run_all(args, m: int, env: dict, only: str) -> None:
    cmd = ["bash", str(Path(args.peers) / "run_all.sh"), "--m", str(m), "--reps", str(args.reps),
           "--steps", str(args.steps), "--threads", str(args.threads), "--out", args.out, "--only", only]
    if args.data:
        cmd += ["--data", args.data]
    subprocess.run(cmd, env=env, check=True)


def table(path: str, stat: str = "median") -> None:
    rows: dict[tuple, list[dict]] = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        rows.setdefault((r["m"], r["arch"], label(r)), []).append(r)
    pick = statistics.median if stat == "median" else max
    print(f"\n| m | arch | library | samples/s ({stat}) | reps | final MSE | peak RSS MB | vs sparsefeat |")
    print("|---|---|---|---|---|---|---|---|")
    for m, arch in sorted({(k[0], k[1]) for k in rows}):
        libs = {k[2]: v for k, v in rows.items() if k[:2] == (m, arch)}
        speed = {lib: pick(r["samples_per_s"] for r in v) for lib, v in libs.items()}
        rss = {lib: statistics.median(r["peak_rss_mb"] for r in v) for lib, v in libs.items()}
        for lib in sorted(libs, key=lambda n: -speed[n]):
            mse = statistics.median(r["final_mse"] for r in libs[lib])
            ratio = f"{speed['sparsefeat'] / speed[lib]:.2f}x" if "sparsefeat" in speed and not lib.startswith("sparsefeat") else ""
            print(f"| {m} | {arch} | {lib} | {speed[lib]:,.0f} | {len(libs[lib])} | {mse:.4f} | {rss[lib]:,.0f} | {ratio} |")
        peers = [lib for lib in speed if not lib.startswith("sparsefeat")]
        if "sparsefeat" in speed and peers:
            best = max(peers, key=speed.get)
            print(f"| {m} | {arch} | **sparsefeat / fastest peer ({best})** | | | | | "
                  f"**{speed['sparsefeat'] / speed[best]:.2f}x** |")
            if "sparsefeat (bf16)" in speed:
                print(f"| {m} | {arch} | **sparsefeat (bf16) / fastest peer ({best})** | | | | | "
                      f"**{speed['sparsefeat (bf16)'] / speed[best]:.2f}x** |")
            lean = min(peers, key=rss.get)
            print(f"| {m} | {arch} | **sparsefeat peak RSS / leanest peer's ({lean})** | | | | | "
                  f"**{rss['sparsefeat'] / rss[lean]:.2f}x** |")


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
    ap.add_argument("--encoder-scale", type=float, action="append",
                    help="one sparsefeat row per value (repeatable); default: the package default only")
    ap.add_argument("--bf16", action="store_true", help="also a sparsefeat row under bfloat16 autocast per scale")
    ap.add_argument("--table-only", action="store_true", help="print the table of --out without running")
    ap.add_argument("--stat", choices=("median", "best"), default="median",
                    help="samples/s of a library's repetitions: median, or best (on shared cores load only slows)")
    args = ap.parse_args()
    if not args.table_only:
        for m in args.m or [1536]:
            run(args, m)
    table(args.out, args.stat)


if __name__ == "__main__":
    main()

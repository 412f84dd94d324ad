"""Six dictionary sizes (0.5x … 16x of d) trained by each peer and by sparsefeat, on the peers harness.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_peers_sizes.py [--reps 2] [--steps 20] [--threads 2]
        [--sizes 192,384,768,1536,3072,6144] [--archs "standard topk"] [--bf16]
        [--only "ref sparsify dictlearn sparsefeat sparsefeat-each"] [--peers /work/shared/peers]
        [--data ACTS.npy] [--out sizes.jsonl] [--table-only]

A counting study trains whole sweeps of sizes, so this is the issue's "6-size sweep" target: seconds to
train all six for `--steps` steps on the harness's batches (after `--warmup` untimed ones), each
library the way it trains several sizes:

- sparsefeat: one sweep of the six (`Sweep.step_on`, bench_peer_sparsefeat.py --sizes), and, for the
  fused-vs-separate check, the six one after another ("sparsefeat-each"), and with --bf16 the one pass
  under bfloat16 autocast;
- dictionary_learning: `trainSAE` with six trainer configs, updated together on each batch
  (bench_peer_dictlearn_sizes.py, in its venv);
- the bare PyTorch loop, sparsify (topk only) and SAELens (not by default: the slowest at m=1536 and
  6144 in every table of RESULTS.md): the harness's own script once per size, one after another.

Each run is a fresh process per library (per size where the library trains one at a time), repetitions
interleaved; a library's time is the sum over its processes of timed steps × batch / samples per s
(data loading and start-up excluded for everyone). Prints, per architecture, each library's median
seconds for the six and the fastest peer's time over sparsefeat's. The peers' venvs and data come from
the harness (setup_venvs.sh, make_data.py), as for bench_peers.py.
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
NAMES = {"ref": "bare PyTorch, one after another", "sparsify": "sparsify, one after another",
         "saelens": "SAELens, one after another", "dictlearn": "dictionary_learning, together",
         "sparsefeat": "sparsefeat, one sweep", "sparsefeat-each": "sparsefeat, one after another",
         "sparsefeat-bf16": "sparsefeat --bf16, one sweep"}


def jobs(peers: Path, venvs: Path) -> dict:
    """name: (python, script, extra args, one process per size?, archs)."""
    ours = [sys.executable, str(HERE / "bench_peer_sparsefeat.py")]
    return {
        "ref": ([str(venvs / "ref/bin/python"), str(peers / "bench_ref.py")], [], True, ("standard", "topk")),
        "sparsify": ([str(venvs / "sparsify/bin/python"), str(peers / "bench_sparsify.py")], [], True, ("topk",)),
        "saelens": ([str(venvs / "saelens/bin/python"), str(peers / "bench_saelens.py")], [], True, ("standard", "topk")),
        "dictlearn": ([str(venvs / "dictlearn/bin/python"), str(HERE / "bench_peer_dictlearn_sizes.py")], [], False,
                      ("standard", "topk")),
        "sparsefeat": (ours, [], False, ("standard", "topk")),
        "sparsefeat-each": (ours, [], True, ("standard", "topk")),
        "sparsefeat-bf16": (ours, ["--bf16"], False, ("standard", "topk")),
    }


def run_job(name, job, arch, args, env, rep) -> dict | None:
    command, extra, each, _ = job
    common = ["--data", args.data, "--d", str(args.d), "--batch", str(args.batch), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--threads", str(args.threads), "--arch", arch]
    runs = [["--m", str(m)] for m in args.sizes] if each else [["--sizes", ",".join(map(str, args.sizes))]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size_args in runs:
            out = Path(tmp) / "row.jsonl"
            proc = subprocess.run(command + common + size_args + extra + ["--out", str(out)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0 or not out.exists():
                print(f"!! {name} {arch} {' '.join(size_args)} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                return None
            rows.append(json.loads(out.read_text().splitlines()[-1]))
            out.unlink()
    seconds = [args.steps * args.batch / r["samples_per_s"] for r in rows]
    return {"job": name, "arch": arch, "rep": rep, "threads": args.threads, "sizes": args.sizes,
            "steps": args.steps, "batch": args.batch, "seconds": sum(seconds),
            "seconds_per_process": [round(s, 3) for s in seconds], "final_mse": rows[-1]["final_mse"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows)}


def table(path: str) -> None:
    rows: dict[tuple, list[dict]] = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        rows.setdefault((r["threads"], r["arch"], r["job"]), []).append(r)
    for threads, arch in sorted({k[:2] for k in rows}):
        done = {k[2]: v for k, v in rows.items() if k[:2] == (threads, arch)}
        secs = {job: statistics.median(r["seconds"] for r in v) for job, v in done.items()}
        some = next(iter(done.values()))[0]
        print(f"\n{arch}, {threads} thread(s), sizes {','.join(map(str, some['sizes']))}, {some['steps']} steps "
              f"of batch {some['batch']}:")
        print("| library | seconds for the six (median) | all runs | final MSE, largest size | peak RSS MB | "
              "fastest peer / it |")
        print("|---|---|---|---|---|---|")
        peers = [j for j in secs if not j.startswith("sparsefeat")]
        fastest = min(peers, key=secs.get) if peers else None
        for job in sorted(secs, key=secs.get):
            runs = " / ".join(f"{r['seconds']:.1f}" for r in done[job])
            mse = statistics.median(r["final_mse"] for r in done[job])
            rss = statistics.median(r["peak_rss_mb"] for r in done[job])
            ratio = f"{secs[fastest] / secs[job]:.2f}x" if fastest else ""
            print(f"| {NAMES.get(job, job)} | {secs[job]:.1f} | {runs} | {mse:.4f} | {rss:,.0f} | {ratio} |")
        if "sparsefeat" in secs and "sparsefeat-each" in secs:
            print(f"sparsefeat one sweep vs one after another: {secs['sparsefeat-each'] / secs['sparsefeat']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="192,384,768,1536,3072,6144")
    ap.add_argument("--archs", default="standard topk")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", default="/work/shared/peers", help="the harness folder")
    ap.add_argument("--venvs", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "peers-venvs"))
    ap.add_argument("--data", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "peers-data", "acts_d384.npy"))
    ap.add_argument("--only", default="ref sparsify dictlearn sparsefeat sparsefeat-each",
                    help="jobs to run, of: " + " ".join(NAMES))
    ap.add_argument("--bf16", action="store_true", help="add sparsefeat-bf16 (one sweep under bf16 autocast)")
    ap.add_argument("--out", default="peers_sizes.jsonl", help="JSON lines (appended)")
    ap.add_argument("--table-only", action="store_true", help="print the table of --out without running")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if not args.table_only:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   TQDM_DISABLE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join([args.peers, str(HERE.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
        todo = jobs(Path(args.peers), Path(args.venvs))
        names = args.only.split() + (["sparsefeat-bf16"] if args.bf16 else [])
        unknown = [n for n in names if n not in todo]
        if unknown:
            raise SystemExit(f"unknown job(s) {', '.join(unknown)}; known: {', '.join(todo)}")
        for rep in range(1, args.reps + 1):
            for name in names:
                for arch in args.archs.split():
                    if arch not in todo[name][3]:
                        continue
                    print(f"== rep {rep} {name} {arch}", file=sys.stderr, flush=True)
                    row = run_job(name, todo[name], arch, args, env, rep)
                    if row:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(f"   {row['seconds']:.1f} s", file=sys.stderr, flush=True)
    table(args.out)


if __name__ == "__main__":
    main()

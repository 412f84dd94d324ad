"""The answer on a real model: how many features do MiniLM-L6's hidden states hold, beyond what token
embeddings (layer 0), random weights and a covariance-matched Gaussian already give?

MiniLM-L6 (d = 384) layers 0, 3 and 6 (any with --layers) and the same layers of the model with random
weights, harvested on the whole default corpus (pydoc topics + standard-library docstrings, ~525k tokens,
split per document) in float16; a matched-Gaussian null beside each trained layer. Every site sweeps
dictionary sizes 0.25x..8x the width (96..3072), two seeds, three sparsity settings from a calibration
run, each size trained until its held-out loss stops improving (steps=auto, at most --max-steps). The
count (one headline per site by the held-out knee rule), the scaling fit of the held-out loss and the
figures come from `sparsefeat run`'s stages; this script adds `results.md` in the study folder: per site,
the headline or the honest lower bound, the held-out stop, the fit, the excess over the null, over layer 0
and over the random-init model, and the per-size table of the chosen setting.

On 2 CPU cores with the defaults it takes about 1-1.5 hours (measured: see docs/results.md); --quick is a
CI-sized run of the same study (minutes). A killed run resumes where it stopped with the same command.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from sparsefeat.errors import SparsefeatError
from sparsefeat.files import write_text
from sparsefeat.results import load_results
from sparsefeat.run import make_config, run_study

NAME = "minilm_count"
SIZES = ["0.25x", "0.5x", "1x", "2x", "4x", "8x"]


def overrides(args) -> dict:
    """The study config: no toys, MiniLM at the chosen layers on the whole corpus, the model sweep wider
    and longer than the demo's. Budget (2 cores, 2 threads, measured): one site's fused sweep of 96..3072
    x 2 seeds x 3 settings costs 0.18 s per step of 256 rows, so 9 sites x 2000 steps is about 55 minutes."""
    toys = {name: {"enabled": False} for name in ("sparse", "gmm", "square", "circle", "sphere")}
    table = {"toys": toys, "study": {"threads": args.threads},
             "model": {"layers": args.layers, "corpus": ["pydoc", "stdlib"], "dtype": "float16", "max_length": 256}}
    if args.quick:  # the quick profile sets the model's sizes and budget; a few thousand tokens
        table["model"]["max_tokens"] = args.max_tokens or 6_000
        return table
    table["model"]["max_tokens"] = args.max_tokens  # None: the whole corpus
    table["sweep"] = {"model": {"sizes": SIZES, "min_steps": 500, "max_steps": args.max_steps,
                                "converge_every": 250, "converge_window": 500, "checkpoint_every": 500}}
    return table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"experiments/{NAME}.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 3, 6],
                   help="hidden states to study, comma-separated (0 = token embeddings; default 0,3,6)")
    p.add_argument("--max-steps", type=int, default=2000, help="the most steps any size trains (default 2000)")
    p.add_argument("--max-tokens", type=int, default=None, help="harvest only this many tokens (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--quick", action="store_true", help="CI-sized settings (minutes on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=Path("results") / NAME, help=f"study folder (default results/{NAME})")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = p.parse_args(argv)
    if 0 not in args.layers:
        p.error("--layers must include 0: the token embeddings are the baseline every layer is read against")
    return args


# --------------------------------------------------------------------------------------------
# results.md
# --------------------------------------------------------------------------------------------


def _num(v, spec=".3f", none="–") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _estimate(e: dict | None, spec: str) -> str:
    if not e or e.get("value") is None:
        return "–"
    lo, hi = e.get("low"), e.get("high")
    interval = f" [{_num(lo, spec)}, {_num(hi, spec)}]" if lo is not None and hi is not None else ""
    return f"{_num(e['value'], spec)}{interval}"


def headline_cell(h: dict) -> str:
    if h.get("estimate") is not None:
        u = h.get("uncertainty")
        return f"**{h['estimate']:.0f}**" + (f" ± {u:.0f}" if u else "") + f" (plateau from m={h['size']})"
    bound = h.get("lower_bound")
    return (f"no estimate; N(m) ≥ {bound:.0f}" if bound is not None else "no estimate") + f" ({h.get('reason')})"


def comparison_cell(h: dict, role: str) -> str:
    c = (h.get("comparisons") or {}).get(role)
    if not c:
        return "–"
    at = c.get("excess_at_common_size")
    common = "" if at is None else f"; {at:+.0f} at m={c['common_size']}"
    return f"{c['text']}{common}"


def fit_cell(h: dict) -> str:
    f = h.get("fit") or {}
    if not f.get("ok"):
        return f"no fit ({f.get('reason')})" if f else "–"
    within = (f.get("size_within_5pct_of_floor") or {}).get("value")
    text = (f"b {_estimate(f.get('exponent'), '.2f')}, floor {_estimate(f.get('floor'), '.3f')}, "
            f"within 5% of the floor at m≈{_num(within, '.0f')}")
    null = f.get("null")
    if null and null.get("ok"):
        text += f"; null: b {_estimate(null.get('exponent'), '.2f')}, floor {_estimate(null.get('floor'), '.3f')}"
    return text


def size_table(entry: dict) -> list[str]:
    """Per size of the chosen setting: test FVU, L0, dead share, N(m), and how training ended."""
    training = {}
    try:
        with load_results(entry["results_path"]) as r:
            for m in r.members:
                if m.sparsity == entry["sparsity"]:
                    training.setdefault(m.dictionary_size, []).append(m)
    except SparsefeatError:
        pass
    lines = ["| m | test FVU | train FVU | L0 | dead | N(m) | steps | converged |", "|---|---|---|---|---|---|---|---|"]
    for s in entry["sizes"]:
        members = training.get(s["size"], [])
        steps = "/".join(str(m.steps_trained) for m in members) or "–"
        conv = sum(bool(m.converged) for m in members)
        lines.append(f"| {s['size']} | {s['test_fvu']:.3f} | {s['train_fvu']:.3f} | {s['l0']:.1f} | "
                     f"{s['dead_fraction']:.2f} | {_num(s['reproduced'], '.0f')} | {steps} | {conv}/{len(members)} |")
    return lines


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record_start(out: Path) -> dict:
    """The commit and time the study started at (kept across resumed runs: the stores and sweeps are theirs)."""
    path = out / "started.json"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"commit": git_commit(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
    return json.loads(path.read_text())


def write_results_md(out: Path, result, seconds: float, started: dict) -> Path:
    entries = json.loads((out / "count.json").read_text())
    chosen = {}  # per site: the entry of its chosen setting (every entry of a site carries the headline)
    for e in entries:
        if e.get("headline") and (e.get("chosen") or e["label"] not in chosen):
            chosen[e["label"]] = e
    lines = [f"# {NAME}: MiniLM-L6", "",
             f"Started {started['started']} at commit {started['commit']}; this table written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} at commit {git_commit()}. Study folder `{out}`; stage "
             "times of the last invocation (wall, s): " + ", ".join(f"{k} {v:.0f}" for k, v in result.timings.items())
             + f"; this invocation {seconds:.0f} s.", "",
             "| site | headline (chosen setting) | held-out stop | vs null | vs layer 0 | vs random init | fit of test FVU |",
             "|---|---|---|---|---|---|---|"]
    for label, e in chosen.items():
        h = e["headline"]
        lines.append(f"| {label} | {headline_cell(h)} at {h.get('setting') or '–'} | {e['held_out_text']} | "
                     f"{comparison_cell(h, 'null')} | {comparison_cell(h, 'layer 0')} | "
                     f"{comparison_cell(h, 'random init')} | {fit_cell(h)} |")
    for label, e in chosen.items():
        shown = f"{e['arch']} {e['sparsity_name']}={e['sparsity']:g}"
        heading = (f"{label} at {e['headline']['setting']}" if e.get("chosen") else
                   f"{label} at {shown} (no setting chosen: {e['headline'].get('reason')}; the first is shown)")
        lines += ["", f"## {heading}", ""] + size_table(e)
        if e["headline"].get("warnings"):
            lines += [""] + [f"- {w}" for w in e["headline"]["warnings"]]
    lines += ["", "## Sensitivity: every setting", "", "```", result.summary(), "```", ""]
    return write_text(out / "results.md", "\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        config = make_config(overrides(args), quick=args.quick, source=f"experiments/{NAME}.py")
        if args.force and (args.out / "started.json").exists():
            (args.out / "started.json").unlink()
        started = record_start(args.out)
        result = run_study(config, args.out, force=args.force, progress=args.progress)
        path = write_results_md(args.out, result, time.perf_counter() - t0, started)
    except SparsefeatError as e:
        print(f"{NAME}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(result.summary())
    print(f"results: {path}")


if __name__ == "__main__":
    main()

"""What every experiment script shares: its command line and running its study (sparsefeat.run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparsefeat.errors import SparsefeatError
from sparsefeat.run import make_config, run_study


def parse_args(name: str, doc: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized settings (minutes on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=Path("results") / name, help=f"study folder (default results/{name})")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p.parse_args(argv)


def run(name: str, doc: str, full: dict, quick: dict, argv=None):
    """Build the study config (the quick profile under the quick overrides, or the full ones), run it,
    print the count table; returns (args, StudyResult). Errors a user can cause: one line, exit 2."""
    args = parse_args(name, doc, argv)
    try:
        config = make_config(quick if args.quick else full, quick=args.quick, source=f"experiments/{name}.py")
        result = run_study(config, args.out, force=args.force, progress=args.progress)
    except SparsefeatError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(result.summary())
    return args, result


def no_default_toys(*keep: str) -> dict:
    """A `toys` override that leaves out the study's default toys except `keep`."""
    return {name: {"enabled": False} for name in ("sparse", "gmm", "square", "circle", "sphere") if name not in keep}


def check(claim: str, ok: bool) -> bool:
    print(f"[{'yes' if ok else 'NO '}] {claim}")
    return ok


def ground_truth(result, label: str) -> "np.ndarray":
    """The ground-truth features [n, d] of the study's toy store `label`."""
    from sparsefeat.store import ActivationStore
    path = next(d.store for d in result.datasets if d.label == label)
    with ActivationStore(path) as store:
        return store.ground_truth["features"]

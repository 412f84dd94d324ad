"""Dead-latent resampling (issue 10.2), measured before it may become a default: the same study twice,
without and with `resample_steps`, on sparse toys with known n (64 in d = 32, and 128 in d = 48; --quick:
32 in d = 16), the few-feature controls (gmm, square), the toys' matched nulls, and MiniLM-L6 layers 0
and 6 with their random-init twins and nulls.

Resampling (Anthropic 2023) restarts latents that stopped firing toward the rows the dictionary
reconstructs worst. It can only help the count if those latents then find real directions; the
danger is that it revives latents past m = n that the data has no use for, and that a count of
"reproduced directions" then grows with them (dead latents past m = n are a signal: science.md,
reference result 2). Printed: per dataset/site, the headline and, at the headline's setting, dead
fraction and N(m) by size, without and with resampling; then the checks."""

from __future__ import annotations

import math
import sys

from common import check, no_default_toys, parse_args
from sparsefeat.errors import SparsefeatError
from sparsefeat.run import make_config, run_study

# A second sparse toy of another n and d (keyed by --quick): sizes must reach past n for a plateau
# (the study's toy sizes: 16..256, quick 16..128).
SECOND = {False: {"sparse-n128": {"kind": "sparse", "n_features": 128, "d": 48, "mean_active": 4.0}},
          True: {"sparse-n32": {"kind": "sparse", "n_features": 32, "d": 16, "mean_active": 2.0}}}
# Steps at which dead latents restart (keyed by --quick) and the window without firing that makes a latent
# dead. Early: steps=auto judges convergence only a whole window after the last resampling, so each one
# delays a size's first possible stop by that much (quick: from 300 to 500 steps at most).
RESAMPLE = {False: {"resample_steps": [300, 600], "resample_window": 250},
            True: {"resample_steps": [150, 300], "resample_window": 100}}


def headline_text(h) -> str:
    if h.estimate is not None:
        return f"{h.estimate:.0f}±{h.uncertainty or 0:.0f}"
    return f">{h.lower_bound:.0f}" if h.lower_bound is not None and not math.isnan(h.lower_bound) else "-"


def main(argv=None):
    args = parse_args("resampling", __doc__, argv)
    results = {}
    try:
        for resample in (False, True):
            sweep = {kind: RESAMPLE[args.quick] for kind in ("toy", "model")} if resample else {}
            toys = {**no_default_toys("sparse", "gmm", "square"), **SECOND[args.quick]}
            overrides = dict(toys=toys, sweep=sweep)
            config = make_config(overrides, quick=args.quick, source="experiments/resampling.py")
            out = args.out / ("with" if resample else "without")
            results[resample] = run_study(config, out, force=args.force, progress=args.progress)
    except SparsefeatError as e:
        print(f"resampling: error: {e}", file=sys.stderr)
        sys.exit(2)
    off, on = results[False], results[True]
    print(f"\nresample steps: {RESAMPLE[args.quick]}")
    print(f"{'dataset/site':26s} {'expected':>8s}  {'without':>10s} {'with':>10s}   by size at each one's headline "
          "setting: dead fraction, N(m) (without | with)")
    rows = {}
    for h_off in off.headlines:
        h_on = on.headline(h_off.label)
        rows[h_off.label] = (h_off, h_on)
        cells = []
        for h, result in ((h_off, off), (h_on, on)):
            if h.sparsity is None:
                cells.append("no usable setting")
                continue
            c = result.count(h.label)
            cells.append(" ".join(f"{s.size}:{s.dead_fraction:.2f},{s.reproduced:.0f}" for s in c.sizes))
        expected = "" if h_off.expected is None else str(h_off.expected)
        print(f"{h_off.label:26s} {expected:>8s}  {headline_text(h_off):>10s} {headline_text(h_on):>10s}   "
              f"{cells[0]} | {cells[1]}")
    ok = True
    for label, (h_off, h_on) in rows.items():
        if h_off.expected is not None and h_off.role == "toy":
            for name, h in (("without", h_off), ("with", h_on)):
                ok &= check(f"{label} {name} resampling: headline within 10% of n = {h.expected}",
                            h.estimate is not None and abs(h.estimate - h.expected) <= 0.1 * h.expected)
        elif h_off.role in ("control", "null"):
            def top(h):
                return h.estimate if h.estimate is not None else (h.lower_bound or 0.0)
            ok &= check(f"{label}: resampling does not inflate the count ({headline_text(h_on)} vs "
                        f"{headline_text(h_off)}, within 3 + both uncertainties)",
                        top(h_on) <= top(h_off) + 3 + (h_on.uncertainty or 0) + (h_off.uncertainty or 0))
    print(f"\nreports: {off.report} and {on.report}")
    return ok


if __name__ == "__main__":
    main()

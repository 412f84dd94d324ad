"""Figures of a count: every function takes the count table (`count.count_results`) and returns a
matplotlib Figure whose lines are exactly the table's numbers, so tests can read the data back.

Small multiples, not one crowded axis: one panel per dataset/site at its headline sparsity setting, with
its own controls drawn in it (matched null grey and dotted, layer 0, random-init twin), at most MAX_LINES
lines a panel, shared log axes with plain tick labels, one legend outside the panels. `summary` answers
the question at a glance (N(m) beside the controls, the held-out loss with its scaling fit); `sensitivity`
keeps every sparsity setting. Figures take optional headlines (`hs`) so a caller that has counted once
does not repeat the fits' bootstrap.

Figures are built with `matplotlib.figure.Figure` (the Agg canvas; no pyplot state, no display), and
`save_figures` writes PNG and PDF atomically, all figures or none. Sizes are on a log axis; the caption names the package
version and the results files, so a figure found alone says where it came from.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import __version__
from .count import (CountConfig, Headline, SweepCount, _sparsity_of, chosen_sweep, estimate_text, headline,
                    headlines)
from .errors import SparsefeatError
from .files import OutputError, atomic_path, check_folder_writable

SIZE_LABEL = "dictionary size m (latents, log scale)"
LOSS_LABELS = {
    "fvu": "FVU (fraction of variance unexplained)",
    "mse": "MSE per row (normalised units: E|x|² = 1)",
}


def caption(fig: Figure, counts: list[SweepCount], note: str = "") -> None:
    files = sorted({Path(c.results_path).name for c in counts})
    shown = ", ".join(files[:6]) + (f" (+{len(files) - 6} more)" if len(files) > 6 else "")
    text = f"sparsefeat {__version__}; results: {shown}; means over seeds"
    fig.text(0.01, 0.005, text + (f"; {note}" if note else ""), fontsize=6, color="0.35", va="bottom")
    height = fig.get_size_inches()[1]
    fig.get_layout_engine().set(rect=(0, 0.16 / height, 1, 1 - 0.16 / height))  # room for the caption


def _new(ncols: int = 1, width: float = 9.0, height: float = 4.6) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols if ncols > 1 else width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _values(c: SweepCount, key: str) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([s.size for s in c.sizes], dtype=float),
            np.array([getattr(s, key) for s in c.sizes], dtype=float))


# --------------------------------------------------------------------------------------------
# Panels: one dataset/site each, at its headline setting, with its own controls
# --------------------------------------------------------------------------------------------

# One colour and one style per role inside a panel: the legend (outside the panels, shared by all of
# them) names roles, the panel title names the datasets. The matched null is grey and dotted.
ROLE_STYLE = {
    "data": dict(color="C0", linewidth=1.8, marker="o"),
    "matched null": dict(color="0.45", linewidth=1.4, marker="s", linestyle=":"),
    "layer 0": dict(color="C2", linewidth=1.2, marker="^"),
    "random init": dict(color="C3", linewidth=1.2, marker="v"),
}
CONTROL_RELATIONS = (("matched null", "null"), ("layer 0", "layer 0"), ("random init", "random init"))
MAX_LINES = 8  # per panel: more than this and a reader can no longer follow one line
MAX_COLUMNS = 4
MIN_WIDTH = 8.0  # inches: room for the title of a single panel
LEGEND_WIDTH = 2.2  # inches beside the panels for the shared legend


@dataclass
class Panel:
    """One dataset/site at its headline setting, and its controls (role -> sweep) as drawn beside it."""
    headline: Headline
    main: SweepCount
    controls: dict[str, SweepCount]

    @property
    def title(self) -> str:
        return f"{self.main.label} [{self.main.role}], {self.main.setting}"

    def series(self) -> list[tuple[str, SweepCount]]:
        return [("data", self.main), *self.controls.items()]


def _headlines(counts: list[SweepCount], hs: list[Headline] | None, fits: bool = False) -> list[Headline]:
    """The headlines of the count (computed with the default rule when not given; the scaling fits only
    when asked, as they cost a bootstrap)."""
    if hs is not None:
        return hs
    if fits:
        return headlines(counts)
    groups: dict[str, list[SweepCount]] = {}
    for c in counts:
        groups.setdefault(c.label, []).append(c)
    return [headline(g, CountConfig()) for g in groups.values()]


def _at_setting(counts: list[SweepCount], label: str, like: dict | None, hs: dict[str, Headline]):
    """`label`'s sweep at setting `like` when it was trained there, else at its own headline setting."""
    mine = [c for c in counts if c.label == label]
    same = [c for c in mine if like is not None and _sparsity_of(c) == like]
    return same[0] if same else (chosen_sweep(hs[label], counts) if label in hs else None)


def panels(counts: list[SweepCount], hs: list[Headline] | None = None) -> list[Panel]:
    """One panel per dataset/site that has a headline setting, in the order of the count, except the
    matched nulls and random-init twins drawn inside another's panel. A null is drawn at its dataset's
    setting when it was trained there (the same penalty on matched data), else at its own headline
    setting; layer 0 and the random-init twin at their own headline settings."""
    hs = _headlines(counts, hs)
    by_label = {h.label: h for h in hs}
    relations = {c.label: c.relations for c in counts}
    out = []
    for h in hs:
        main = chosen_sweep(h, counts)
        if main is None:
            continue
        controls = {}
        for role, key in CONTROL_RELATIONS:
            other = relations.get(h.label, {}).get(key)
            like = h.sparsity if role == "matched null" else None
            sweep = _at_setting(counts, other, like, by_label) if other else None
            if sweep is not None:
                controls[role] = sweep
        out.append(Panel(h, main, controls))
    drawn = {c.label for p in out for role, c in p.controls.items() if role in ("matched null", "random init")}
    return [p for p in out if p.main.label not in drawn]


def _grid(n: int, rows_per_panel: int = 1, width: float = 3.4, height: float = 2.9, sharey="all"):
    """A figure of `n` panel blocks, `rows_per_panel` axes high, at most MAX_COLUMNS blocks a row.
    Returns (figure, blocks), blocks[k][r] the r-th axes of block k. Sizes share one log axis."""
    cols = max(1, min(n, MAX_COLUMNS))
    block_rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(max(width * cols, MIN_WIDTH - LEGEND_WIDTH) + LEGEND_WIDTH,
                          height * rows_per_panel * block_rows + 1.0),
                 layout="constrained")
    axes = fig.subplots(block_rows * rows_per_panel, cols, squeeze=False, sharex=True,
                        sharey=sharey if rows_per_panel == 1 else False)
    blocks = [[axes[(k // cols) * rows_per_panel + r, k % cols] for r in range(rows_per_panel)] for k in range(n)]
    for k in range(n, block_rows * cols):
        for r in range(rows_per_panel):
            axes[(k // cols) * rows_per_panel + r, k % cols].set_visible(False)
        if k - cols >= 0:  # the panel above an empty slot is the bottom of its column: it keeps its x ticks
            blocks[k - cols][-1].xaxis.set_tick_params(labelbottom=True)
    return fig, blocks


def _plain_ticks(values, max_ticks: int = 6) -> list[float]:
    """Ticks at 1-2-5 (or finer) multiples of powers of ten within [lo, hi], written plainly: a narrow
    log range never gets the overlapping 2×10⁻¹…6×10⁻¹ minor labels of matplotlib's default. A range
    too narrow for three of those (less than about a factor 2) gets evenly spaced round numbers."""
    from matplotlib.ticker import MaxNLocator
    lo, hi = float(np.min(values)), float(np.max(values))
    if not (lo > 0 and hi > lo):
        return []
    for subs in ((1,), (1, 2, 5), (1, 2, 3, 5), (1, 1.5, 2, 3, 4, 5, 6, 8)):
        ticks = [float(f"{s * 10.0 ** k:.6g}") for k in range(math.floor(math.log10(lo)) - 1,
                                                              math.ceil(math.log10(hi)) + 1)
                 for s in subs if lo <= s * 10.0 ** k <= hi]
        if len(ticks) >= 3:
            return ticks[::math.ceil(len(ticks) / max_ticks)]
    return [float(f"{t:.6g}") for t in MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
            if lo <= t <= hi]


def _fix_log_ticks(ax, which: str = "y") -> None:
    """Plain major ticks on a log axis from its current limits; no minor labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    axis = ax.yaxis if which == "y" else ax.xaxis
    lim = ax.get_ylim() if which == "y" else ax.get_xlim()
    ticks = _plain_ticks(lim)
    if ticks:
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _size_ticks(ax, sizes) -> None:
    """Log-2 size axis with a plain label at the trained sizes (every other one when there are many)."""
    ax.set_xscale("log", base=2)
    _size_ticks_on(ax.xaxis, sizes)
    ax.grid(True, which="major", alpha=0.3)


def _size_ticks_on(axis, sizes) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator
    sizes = sorted({int(s) for s in sizes})
    step = math.ceil(len(sizes) / 7)
    axis.set_major_locator(FixedLocator(sizes[::-1][::step][::-1]))  # the largest size always labelled
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def _shared_legend(fig: Figure, entries: dict[str, dict]) -> None:
    """One legend for every panel, to their right, outside the data: role and line style, once each."""
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], **style) for style in entries.values()]
    fig.legend(handles, list(entries), loc="outside right center", fontsize=7, frameon=False)


def _role_entries(ps: list[Panel], train: bool = False) -> dict[str, dict]:
    roles = list(dict.fromkeys(role for p in ps for role, _ in p.series()))
    entries = {}
    for role in roles:
        style = ROLE_STYLE[role]
        test_style = {**style, "linestyle": style.get("linestyle", "-")}
        entries[f"{role}, test" if train else role] = test_style
        if train and role != "matched null":
            entries[f"{role}, train"] = {**style, "linestyle": "--", "marker": None}
    return entries


def _empty(counts: list[SweepCount], what: str) -> Figure:
    fig, (ax,) = _new(height=2.5)
    ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center")
    ax.set_axis_off()
    caption(fig, counts)
    return fig


# --------------------------------------------------------------------------------------------
# The figures
# --------------------------------------------------------------------------------------------


def loss_vs_size(counts: list[SweepCount], metric: str = "fvu", hs: list[Headline] | None = None) -> Figure:
    """Train (dashed) and test (solid) loss vs m: one panel per dataset/site at its headline setting,
    with its controls (matched null dotted, test only; layer 0 and random-init twin); shared log axes."""
    if metric not in LOSS_LABELS:
        raise SparsefeatError(f"unknown loss metric {metric!r} (one of {', '.join(LOSS_LABELS)})")
    ps = panels(counts, hs)
    if not ps:
        return _empty(counts, "no dataset/site with a usable sparsity setting")
    fig, blocks = _grid(len(ps))
    for p, (ax,) in zip(ps, blocks):
        for role, c in p.series():
            style = ROLE_STYLE[role]
            x, y = _values(c, f"test_{metric}")
            ax.plot(x, y, **{"linestyle": "-", **style, "markersize": 3}, label=f"{role}: {c.label} test")
            if role != "matched null":  # the null's train curve repeats its test curve; it would only crowd
                x, y = _values(c, f"train_{metric}")
                ax.plot(x, y, **{**style, "linestyle": "--", "marker": None}, label=f"{role}: {c.label} train")
        ax.set_title(p.title + _controls_note(p), fontsize=8)
        ax.set_yscale("log")
    _finish_size_panels(fig, _sizes(c for p in ps for _, c in p.series()), blocks, LOSS_LABELS[metric])
    _shared_legend(fig, _role_entries(ps, train=True))
    fig.suptitle(f"Held-out (solid) and train (dashed) {metric.upper()} by dictionary size, each at its "
                 "headline sparsity setting", fontsize=10)
    caption(fig, counts)
    return fig


def _controls_note(p: Panel) -> str:
    if not p.controls:
        return ""
    return "".join(f"\n{role}: {c.label}" + ("" if c.setting == p.main.setting else f" ({c.setting})")
                   for role, c in p.controls.items())  # one line each: long site names never run into a neighbour


def _sizes(cs) -> list[int]:
    return [s.size for c in cs for s in c.sizes]


def _finish_size_panels(fig, sizes, blocks, ylabel: str, rows=(0,), log_y: bool = True) -> None:
    """Plain size ticks on the shared log-2 axis, plain log ticks, labels on the outer panels only."""
    for k, block in enumerate(blocks):
        for r in rows:
            ax = block[r]
            _size_ticks(ax, sizes)
            if log_y:
                _fix_log_ticks(ax)
            if k % MAX_COLUMNS == 0:
                ax.set_ylabel(ylabel, fontsize=8)
    for block in blocks:
        block[-1].set_xlabel("dictionary size m (latents, log scale)", fontsize=8)
        block[-1].xaxis.set_tick_params(labelbottom=True)
    for block in blocks:
        for ax in block:
            ax.tick_params(labelsize=7)


def dead_vs_size(counts: list[SweepCount], hs: list[Headline] | None = None) -> Figure:
    """Share of latents that never fire on the test split vs m, per dataset/site with its controls."""
    ps = panels(counts, hs)
    if not ps:
        return _empty(counts, "no dataset/site with a usable sparsity setting")
    fig, blocks = _grid(len(ps))
    for p, (ax,) in zip(ps, blocks):
        for role, c in p.series():
            x, y = _values(c, "dead_fraction")
            ax.plot(x, y, **{"linestyle": "-", **ROLE_STYLE[role], "markersize": 3}, label=f"{role}: {c.label}")
        ax.set_title(p.title + _controls_note(p), fontsize=8)
        ax.set_ylim(-0.03, 1.03)
    _finish_size_panels(fig, _sizes(c for p in ps for _, c in p.series()), blocks,
                        "dead fraction (share of latents\nnever firing on test rows)", log_y=False)
    _shared_legend(fig, _role_entries(ps))
    fig.suptitle("Dead latents by dictionary size, each at its headline sparsity setting", fontsize=10)
    caption(fig, counts)
    return fig


AGREEMENT = (("mmcs_next", "MMCS with next larger\ndictionary (cosine)", (0, 1.03)),
             ("shared_seed", "cross-seed shared\nfraction of latents", (-0.03, 1.03)),
             ("reproduced", "reproduced directions\nN(m) (latents)", None))


def agreement_vs_size(counts: list[SweepCount], hs: list[Headline] | None = None) -> Figure:
    """Per dataset/site (a column of three panels): MMCS with the next larger dictionary, the cross-seed
    shared fraction, and the count rule's reproduced directions N(m), beside its controls."""
    ps = panels(counts, hs)
    if not ps:
        return _empty(counts, "no dataset/site with a usable sparsity setting")
    fig, blocks = _grid(len(ps), rows_per_panel=3, height=2.2)
    for p, block in zip(ps, blocks):
        for ax, (key, ylabel, ylim) in zip(block, AGREEMENT):
            for role, c in p.series():
                x, y = _values(c, key)
                ax.plot(x, y, **{"linestyle": "-", **ROLE_STYLE[role], "markersize": 3}, label=f"{role}: {c.label}")
            if ylim:
                ax.set_ylim(*ylim)
            else:
                _count_axis(ax)
        block[0].set_title(p.title + _controls_note(p), fontsize=8)
        for ax, (_, ylabel, _) in zip(block, AGREEMENT):
            ax.set_ylabel(ylabel, fontsize=7)
    _finish_size_panels(fig, _sizes(c for p in ps for _, c in p.series()), blocks, "", rows=(0, 1, 2), log_y=False)
    for block in blocks:
        for ax, (_, ylabel, _) in zip(block, AGREEMENT):
            ax.set_ylabel(ylabel, fontsize=7)
    _shared_legend(fig, _role_entries(ps))
    fig.suptitle("Agreement between dictionaries: across sizes, across seeds, and the count rule's N(m)",
                 fontsize=10)
    caption(fig, counts)
    return fig


def _count_axis(ax) -> None:
    """A y axis of counts: from 0, whole-number ticks, at least 0..1 (a count of 0 at every size would
    otherwise get matplotlib's ±0.05 range and ticks at 0.006, 0.012, ... latents)."""
    ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _by_setting(counts: list[SweepCount], hs: list[Headline] | None, key: str, ylabel: str, title: str,
                keep=lambda c: True, ylim=None, expected: bool = True) -> Figure:
    """One panel per dataset/site, one line per sparsity setting (the headline setting thick and
    labelled), at most MAX_LINES lines: the sensitivity of `key` to the setting."""
    hs = _headlines(counts, hs)
    chosen = {h.label: h.sparsity for h in hs}
    excluded = [(h.label, e["sparsity"]) for h in hs for e in h.excluded]
    labels = [label for label in dict.fromkeys(c.label for c in counts)
              if any(keep(c) for c in counts if c.label == label)]
    if not labels:
        return _empty(counts, f"nothing to show: {title.lower()}")
    fig, blocks = _grid(len(labels), sharey=False)
    from matplotlib import colormaps
    for label, (ax,) in zip(labels, blocks):
        mine = sorted((c for c in counts if c.label == label), key=lambda c: c.sparsity)[:MAX_LINES]
        cmap = colormaps["plasma"]
        for i, c in enumerate(mine):
            head = _sparsity_of(c) == chosen.get(label)
            out = (label, _sparsity_of(c)) in excluded  # collapsed: dashed, and says so
            x, y = _values(c, key)
            ax.plot(x, y, color=cmap(0.85 * i / max(len(mine) - 1, 1)), linewidth=2.6 if head else 1.0,
                    marker="o", markersize=3.5 if head else 2.5, alpha=1.0 if head else 0.8,
                    linestyle="--" if out else "-",
                    label=f"{c.sparsity_name}={c.sparsity:g}" + (" (headline)" if head else "")
                    + (" (excluded)" if out else ""))
        n = mine[0].expected
        if expected and n:
            ax.axhline(n, color="k", linewidth=0.8, linestyle="-.", label=f"known n = {n}")
        ax.set_title(f"{label} [{mine[0].role}], {mine[0].arch}", fontsize=8)
        if ylim:
            ax.set_ylim(*ylim)
        else:
            _count_axis(ax)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    _finish_size_panels(fig, _sizes(counts), blocks, ylabel, log_y=False)
    fig.suptitle(title, fontsize=10)
    caption(fig, counts)
    return fig


def sensitivity(counts: list[SweepCount], hs: list[Headline] | None = None) -> Figure:
    """N(m) per sparsity setting, one panel per dataset/site, the headline setting thick: how much the
    count depends on the setting the rule chose."""
    return _by_setting(counts, hs, "reproduced", "reproduced directions N(m) (latents)",
                       "Sensitivity: N(m) at every sparsity setting (thick: the headline setting; dashed: "
                       "excluded as collapsed)")


def ground_truth_vs_size(counts: list[SweepCount], hs: list[Headline] | None = None) -> Figure:
    """Toy data: MMCS of the ground-truth features with the decoder vs m, one line per setting."""
    return _by_setting(counts, hs, "mmcs_gt", "MMCS with ground truth\n(mean best cosine of true features)",
                       "Recovery of the ground-truth features (toys; thick: the headline setting)",
                       keep=lambda c: any(not math.isnan(s.mmcs_gt) for s in c.sizes), ylim=(0, 1.03),
                       expected=False)


def summary(counts: list[SweepCount], hs: list[Headline] | None = None) -> Figure:
    """The answer at a glance. Per dataset/site, at its headline setting: top, N(m) beside its controls
    with the estimate (and the known n of a toy); bottom, the held-out FVU with its fitted a·m^-b + c
    (solid) and the matched null's with its fit (dotted), exponent and floor in the panel's title."""
    hs = _headlines(counts, hs, fits=True)
    ps = panels(counts, hs)
    if not ps:
        return _empty(counts, "no dataset/site with a usable sparsity setting")
    fig, blocks = _grid(len(ps), rows_per_panel=2, height=2.7)
    for p, (top, bottom) in zip(ps, blocks):
        for role, c in p.series():
            x, y = _values(c, "reproduced")
            top.plot(x, y, **{"linestyle": "-", **ROLE_STYLE[role], "markersize": 3}, label=f"{role}: {c.label}")
        h = p.headline
        if p.main.expected:
            top.axhline(p.main.expected, color="k", linewidth=0.8, linestyle="-.", label=f"known n = {p.main.expected}")
        if h.estimate is not None:
            top.axhspan(h.estimate - h.uncertainty, h.estimate + h.uncertainty, color="C0", alpha=0.12, linewidth=0,
                        label="estimate ± uncertainty")
        _count_axis(top)
        number = (f"{h.estimate:.0f}±{h.uncertainty:.0f} features" if h.estimate is not None
                  else f"no estimate ({h.reason})")
        top.set_title(f"{p.title}\n{number}", fontsize=8)
        _fit_panel(bottom, p)
    _finish_size_panels(fig, _sizes(c for p in ps for _, c in p.series()), blocks, "", rows=(0, 1), log_y=False)
    for p, (top, bottom) in zip(ps, blocks):
        _fix_log_ticks(bottom)
        top.set_ylabel("reproduced directions N(m)", fontsize=7)
        bottom.set_ylabel("test FVU (log)", fontsize=7)
    entries = _role_entries(ps)
    entries["fit a·m^-b + c (null's dotted)"] = dict(color="C0", linewidth=1.2, linestyle="-", alpha=0.6)
    if any(p.main.expected for p in ps):
        entries["known n (toys)"] = dict(color="k", linewidth=0.8, linestyle="-.")
    entries["estimate ± uncertainty"] = dict(color="C0", alpha=0.25, linewidth=6)
    _shared_legend(fig, entries)
    fig.suptitle("How many features? N(m) beside its controls (top) and the held-out loss with its "
                 "scaling fit (bottom)", fontsize=10)
    caption(fig, counts, "fit intervals: 95% bootstrap over test rows")
    return fig


def _fit_panel(ax, p: Panel) -> None:
    """Test FVU points (markers only) and the fitted curve of the data and of its matched null."""
    h = p.headline
    lines = [("data", p.main, h.fit)]
    if "matched null" in p.controls:
        null_fit = h.fit_vs_null.null if h.fit_vs_null is not None else None
        lines.append(("matched null", p.controls["matched null"], null_fit))
    for role, c, fit in lines:
        style = ROLE_STYLE[role]
        x, y = _values(c, "test_fvu")
        ax.plot(x, y, linestyle="none", marker=style["marker"], color=style["color"], markersize=3.5,
                label=f"{role}: {c.label} test FVU")
        if fit is not None and fit.ok:
            grid = np.geomspace(min(x), max(x), 60)
            ax.plot(grid, fit.predict(grid), color=style["color"], linewidth=1.2, alpha=0.7,
                    linestyle=style.get("linestyle", "-"), label=f"{role}: fit")
    ax.set_yscale("log")
    ax.set_title(_fit_title(h), fontsize=7)


def _fit_title(h: Headline) -> str:
    f = h.fit
    if f is None or not f.ok:
        import textwrap  # a reason is a sentence: wrap it to the panel instead of cutting it off
        return textwrap.fill(f"fit: none ({'no setting chosen' if f is None else f.reason})", 60,
                             max_lines=2, placeholder="…)")
    flag = " (poor fit)" if f.warnings else ""
    text = f"fit b={estimate_text(f.exponent, '.2f')}, c={estimate_text(f.floor, '.3f')}{flag}"
    v = h.fit_vs_null
    if v is not None and v.null.ok:
        flag = " (poor fit)" if v.null.warnings else ""
        text += f"\nnull b={estimate_text(v.null.exponent, '.2f')}, c={estimate_text(v.null.floor, '.3f')}{flag}"
    return text


def loss_vs_l0(counts: list[SweepCount], metric: str = "fvu", hs: list[Headline] | None = None) -> Figure:
    """The held-out frontier the headline rule reads: test loss vs L0 across sparsity settings, one line
    per dictionary size (colour: m), one panel per dataset/site; the matched null's largest size dotted;
    a star on each setting's frontier point, filled for the headline setting."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    hs = _headlines(counts, hs)
    ps = panels(counts, hs)
    if not ps:
        return _empty(counts, "no dataset/site with a usable sparsity setting")
    fig, blocks = _grid(len(ps))
    all_sizes = sorted({s.size for c in counts for s in c.sizes})
    norm = LogNorm(min(all_sizes), max(all_sizes) * 1.0001)
    cmap = colormaps["viridis"]
    key = f"test_{metric}"
    for p, (ax,) in zip(ps, blocks):
        mine = [c for c in counts if c.label == p.main.label]
        sizes = sorted({s.size for c in mine for s in c.sizes})
        shown = sizes[::-1][::math.ceil(len(sizes) / (MAX_LINES - 1))][::-1]  # the largest size always
        for size in shown:
            pts = sorted((s.l0, getattr(s, key)) for c in mine for s in c.sizes if s.size == size)
            ax.plot(*zip(*pts), color=cmap(norm(size) * 0.9), marker="o", markersize=2.5, linewidth=1.2,
                    label=f"m={size}")
        null = p.controls.get("matched null")
        if null is not None:
            theirs = [c for c in counts if c.label == null.label]
            top = max(s.size for c in theirs for s in c.sizes)
            pts = sorted((s.l0, getattr(s, key)) for c in theirs for s in c.sizes if s.size == top)
            ax.plot(*zip(*pts), color="0.45", linestyle=":", marker="s", markersize=2.5, linewidth=1.4,
                    label=f"null m={top}")
        for score in p.headline.scores:
            if score.status == "excluded":
                continue
            c = next(c for c in mine if _sparsity_of(c) == score.sparsity)
            s = next(s for s in c.sizes if s.size == score.size)
            ax.plot([s.l0], [getattr(s, key)], linestyle="none", marker="*", markersize=9,
                    markerfacecolor="gold" if score.status == "chosen" else "white", markeredgecolor="k",
                    label=f"frontier point {score.sparsity['value']:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(p.title.rsplit(",", 1)[0] + f", headline {p.main.setting}", fontsize=8)
    for k, (ax,) in enumerate(blocks):
        _fix_log_ticks(ax, "x")
        _fix_log_ticks(ax, "y")
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("L0 (active latents per row, test)", fontsize=8)
        if k % MAX_COLUMNS == 0:
            ax.set_ylabel(f"test {LOSS_LABELS[metric]}", fontsize=8)
    from matplotlib.cm import ScalarMappable
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=[b[0] for b in blocks], label="dictionary size m",
                       shrink=0.8, pad=0.01)
    _size_ticks_on(bar.ax.yaxis, all_sizes)
    _shared_legend(fig, {"data: one line per size m, one point per setting": dict(color=cmap(0.5), marker="o"),
                         "matched null, largest m": dict(color="0.45", linestyle=":", marker="s"),
                         "frontier point of a setting (filled: headline)": dict(
                             linestyle="none", marker="*", markersize=9, markerfacecolor="gold",
                             markeredgecolor="k")})
    fig.suptitle(f"Held-out frontier: test {metric.upper()} vs L0 across sparsity settings", fontsize=10)
    caption(fig, counts)
    return fig


def count_by_layer(counts: list[SweepCount]) -> Figure:
    """Model sites: reproduced directions N(m) at each sweep's largest size vs layer, for the trained
    model (solid), the random-init model (dashed) and the matched nulls (dotted). Not in FIGURES: a
    study without model sites has nothing to show here."""
    from .count import layer_of_site
    fig, (ax,) = _new()
    by_label = {c.label: c for c in counts}
    series = {"trained": [], "random init": [], "matched null": []}
    for c in counts:
        layer = layer_of_site(c.site)
        if layer is None or c.role not in ("model", "random-init"):
            continue
        series["trained" if c.role == "model" else "random init"].append((layer, c.sizes[-1].reproduced, c.sizes[-1].size))
        null = by_label.get(c.comparisons["null"].against) if "null" in c.comparisons else None
        if null is not None:  # the null of a site is found through provenance, not by its name
            series["matched null"].append((layer, null.sizes[-1].reproduced, null.sizes[-1].size))
    for (name, points), dash in zip(series.items(), ("-", "--", ":")):
        points.sort()
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], linestyle=dash, marker="o",
                    label=f"{name} (N at m={points[0][2]})")
    ax.set_xlabel("layer (hidden state index; 0 = token embeddings)")
    ax.set_ylabel("reproduced distinct directions N(m) (latents)")
    ax.set_title("Reproduced directions by layer, at the largest dictionary size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    caption(fig, counts)
    return fig


FIGURES = {
    "summary": summary,
    "loss_vs_size": loss_vs_size,
    "sensitivity": sensitivity,
    "loss_vs_l0": loss_vs_l0,
    "dead_vs_size": dead_vs_size,
    "agreement_vs_size": agreement_vs_size,
    "ground_truth_vs_size": ground_truth_vs_size,
}


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


FORMATS = ("png", "pdf")


def figure_paths(out_dir: str | os.PathLike, names) -> list[Path]:
    return [Path(out_dir) / f"{name}.{ext}" for name in names for ext in FORMATS]


def check_figures(out_dir: str | os.PathLike, names, *, force: bool = False) -> list[Path]:
    """Refuse, before any work, a folder that is a file or cannot be written, and existing figures
    without `force`; returns the paths the figures will have."""
    check_folder_writable(out_dir)
    paths = figure_paths(out_dir, names)
    for path in paths:
        if path.is_dir():
            raise OutputError(f"{path}: is a folder; remove it or choose another --out")
        if path.exists() and not force:
            raise OutputError(f"{path}: already exists; pass --force to overwrite it")
    return paths


def save_figures(figures: dict[str, Figure], out_dir: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """Write each figure as `name`.png and `name`.pdf into `out_dir`, all or nothing: every file is
    written to a temporary file first and renamed only when all of them are complete, so a full disk
    or a failure half way leaves the folder as it was (no half set of figures)."""
    paths = check_figures(out_dir, figures, force=force)
    with contextlib.ExitStack() as all_or_nothing:  # renames happen on exit, only without an error
        for path in paths:
            tmp = all_or_nothing.enter_context(atomic_path(path))
            figures[path.stem].savefig(tmp, format=path.suffix[1:], dpi=150)
    return paths


def save_figure(fig: Figure, out_dir: str | os.PathLike, name: str, *, force: bool = False) -> list[Path]:
    """Write `name`.png and `name`.pdf into `out_dir` (atomically, both or neither)."""
    return save_figures({name: fig}, out_dir, force=force)


def plot_all(counts: list[SweepCount], out_dir: str | os.PathLike, *, force: bool = False,
             headlines: list[Headline] | None = None) -> list[Path]:
    """Every figure of FIGURES into `out_dir` as PNG and PDF (all or nothing); returns the written paths.
    `headlines` (with their fits) from a count already made saves counting again for every figure."""
    if not counts:
        raise SparsefeatError("nothing to plot: no sweeps in the given results files")
    check_figures(out_dir, FIGURES, force=force)  # before drawing: a refusal costs nothing
    hs = _headlines(counts, headlines, fits=True)
    return save_figures({name: make(counts, hs=hs) for name, make in FIGURES.items()}, out_dir, force=force)

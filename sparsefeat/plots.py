"""Figures of a count: every function takes the count table (`count.count_results`) and returns a
matplotlib Figure whose lines are exactly the table's numbers, so tests can read the data back.

Figures are built with `matplotlib.figure.Figure` (the Agg canvas; no pyplot state, no display), and
`save_figures` writes PNG and PDF atomically, all figures or none. Sizes are on a log axis; the caption names the package
version and the results files, so a figure found alone says where it came from.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from . import __version__
from .count import SweepCount
from .errors import SparsefeatError
from .files import OutputError, atomic_path, check_folder_writable

SIZE_LABEL = "dictionary size m (latents, log scale)"
LOSS_LABELS = {
    "fvu": "FVU (fraction of variance unexplained)",
    "mse": "MSE per row (normalised units: E|x|² = 1)",
}
CONTROL_ROLES = ("control", "null", "random-init")


def series_name(c: SweepCount, counts: list[SweepCount]) -> str:
    """The label, with the sparsity setting when the label has more than one."""
    many = sum(1 for o in counts if o.label == c.label) > 1
    return f"{c.label} ({c.setting})" if many else c.label


def _colours(counts: list[SweepCount]) -> dict[str, tuple]:
    from matplotlib import colormaps
    labels = list(dict.fromkeys(c.label for c in counts))
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


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


def _size_axis(ax) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel(SIZE_LABEL)
    ax.grid(True, which="major", alpha=0.3)


def _values(c: SweepCount, key: str) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([s.size for s in c.sizes], dtype=float),
            np.array([getattr(s, key) for s in c.sizes], dtype=float))


MARKERS = "osD^vP*X"


def _style(c: SweepCount, counts: list[SweepCount]) -> dict:
    """Controls are drawn thinner so the data stand out; colour names the dataset/site, the marker its
    sparsity setting."""
    settings = list(dict.fromkeys(o.sparsity for o in counts if o.label == c.label))
    marker = MARKERS[settings.index(c.sparsity) % len(MARKERS)]
    return dict(linewidth=1.0 if c.role in CONTROL_ROLES else 1.8, marker=marker, markersize=3)


def _legend(ax, fontsize: float = 6) -> None:
    """Beside the axes when there are many entries, so no data hide behind it."""
    n = len(ax.get_legend_handles_labels()[1])
    if n > 6:
        ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif n:
        ax.legend(fontsize=fontsize)


# --------------------------------------------------------------------------------------------
# The figures
# --------------------------------------------------------------------------------------------


def loss_vs_size(counts: list[SweepCount], metric: str = "fvu") -> Figure:
    """1. Train (dashed) and test (solid) loss vs m, one colour per dataset/site, controls included."""
    if metric not in LOSS_LABELS:
        raise SparsefeatError(f"unknown loss metric {metric!r} (one of {', '.join(LOSS_LABELS)})")
    fig, (ax,) = _new()
    colour = _colours(counts)
    for c in counts:
        name = series_name(c, counts)
        for split, dash in (("train", "--"), ("test", "-")):
            x, y = _values(c, f"{split}_{metric}")
            hidden = "_" if split == "train" else ""  # one legend entry per series: the title names the styles
            ax.plot(x, y, linestyle=dash, color=colour[c.label], label=f"{hidden}{name} [{c.role}] {split}",
                    **_style(c, counts))
    _size_axis(ax)
    ax.set_yscale("log")
    ax.set_ylabel(LOSS_LABELS[metric])
    ax.set_title(f"Train (dashed) and test (solid) {metric.upper()} by dictionary size")
    _legend(ax)
    caption(fig, counts)
    return fig


def dead_vs_size(counts: list[SweepCount]) -> Figure:
    """2. Share of latents that never fire on the test split, vs m."""
    fig, (ax,) = _new()
    colour = _colours(counts)
    for c in counts:
        x, y = _values(c, "dead_fraction")
        ax.plot(x, y, color=colour[c.label], label=f"{series_name(c, counts)} [{c.role}]", **_style(c, counts))
    _size_axis(ax)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("dead fraction (share of latents never firing on test rows)")
    ax.set_title("Dead latents by dictionary size")
    _legend(ax)
    caption(fig, counts)
    return fig


def agreement_vs_size(counts: list[SweepCount]) -> Figure:
    """3. MMCS with the next larger dictionary (left), the cross-seed shared fraction (middle) and the
    reproduced distinct directions N(m) of the count rule (right, with N = m for reference)."""
    fig, axes = _new(3, width=4.6)
    colour = _colours(counts)
    panels = (("mmcs_next", "MMCS with the next larger dictionary (cosine)", (0, 1.02)),
              ("shared_seed", "cross-seed shared fraction (share of latents)", (-0.02, 1.02)),
              ("reproduced", "reproduced distinct directions N(m) (latents)", None))
    for ax, (key, ylabel, ylim) in zip(axes, panels):
        for c in counts:
            x, y = _values(c, key)
            ax.plot(x, y, color=colour[c.label], label=f"{series_name(c, counts)} [{c.role}]", **_style(c, counts))
        _size_axis(ax)
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
    sizes = sorted({s.size for c in counts for s in c.sizes})
    if sizes:
        axes[2].plot(sizes, sizes, color="0.6", linestyle=":", linewidth=1, label="N = m")
        axes[2].set_xscale("log", base=2)
        axes[2].set_yscale("symlog", linthresh=1)
    _legend(axes[2])
    fig.suptitle("Agreement between dictionaries: across sizes, across seeds, and the count rule's N(m)")
    caption(fig, counts)
    return fig


def ground_truth_vs_size(counts: list[SweepCount]) -> Figure:
    """4. Toy data: MMCS of the ground-truth features with the decoder vs m (true n marked)."""
    fig, (ax,) = _new()
    colour = _colours(counts)
    toys = [c for c in counts if any(not math.isnan(s.mmcs_gt) for s in c.sizes)]
    for c in toys:
        x, y = _values(c, "mmcs_gt")
        ax.plot(x, y, color=colour[c.label], label=series_name(c, counts), **_style(c, counts))
        if c.expected:
            ax.axvline(c.expected, color=colour[c.label], linestyle=":", linewidth=1)
    _size_axis(ax)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("MMCS with ground truth (mean best cosine of true features)")
    ax.set_title("Recovery of the ground-truth features (dotted: true number of features)")
    if toys:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data with ground truth", transform=ax.transAxes, ha="center")
    caption(fig, counts)
    return fig


def loss_vs_l0(counts: list[SweepCount], metric: str = "fvu") -> Figure:
    """5. Test loss vs L0 across sparsity settings, one line per dictionary size; each data set in its
    own panel beside its matched null (dotted)."""
    panels = [c.label for c in counts if c.role not in ("null",)]
    panels = list(dict.fromkeys(panels)) or list(dict.fromkeys(c.label for c in counts))
    nulls = {c.label: c.comparisons["null"].against for c in counts if "null" in c.comparisons}
    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(max(4.2 * ncols, 7.0), 3.6 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax, label in zip(axes, panels):
        for who, dash in ((label, "-"), (nulls.get(label), ":")):
            if who is None:
                continue
            mine = [c for c in counts if c.label == who]
            sizes = sorted({s.size for c in mine for s in c.sizes})
            for i, size in enumerate(sizes):
                points = sorted((s.l0, getattr(s, f"test_{metric}")) for c in mine for s in c.sizes if s.size == size)
                ax.plot([p[0] for p in points], [p[1] for p in points], linestyle=dash, marker="o", markersize=3,
                        color=_size_colour(i, len(sizes)),
                        label=f"m={size}" + (" (null)" if who != label else ""))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("L0 (active latents per row, test)")
        ax.set_ylabel(f"test {LOSS_LABELS[metric]}")
        ax.set_title(label + (f"\nvs null {nulls[label]} (dotted)" if label in nulls else ""), fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=5)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Test loss vs L0 across sparsity settings (data solid, matched null dotted)", fontsize=10)
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


def _size_colour(i: int, n: int):
    from matplotlib import colormaps
    return colormaps["viridis"](i / max(n - 1, 1) * 0.9)


FIGURES = {
    "loss_vs_size": loss_vs_size,
    "dead_vs_size": dead_vs_size,
    "agreement_vs_size": agreement_vs_size,
    "ground_truth_vs_size": ground_truth_vs_size,
    "loss_vs_l0": loss_vs_l0,
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


def plot_all(counts: list[SweepCount], out_dir: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """Every figure of FIGURES into `out_dir` as PNG and PDF (all or nothing); returns the written paths."""
    if not counts:
        raise SparsefeatError("nothing to plot: no sweeps in the given results files")
    check_figures(out_dir, FIGURES, force=force)  # before drawing: a refusal costs nothing
    return save_figures({name: make(counts) for name, make in FIGURES.items()}, out_dir, force=force)

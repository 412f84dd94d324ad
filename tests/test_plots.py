"""Figures: the plotted lines are the results' numbers (line data, not pixels), PNG and PDF written
atomically, never over an existing figure without force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparsefeat import count as C
from sparsefeat import plots
from sparsefeat.errors import SparsefeatError
from sparsefeat.results import load_results
from test_count import study_files, write_sweep  # noqa: F401  (the fixture is used by name)


@pytest.fixture
def counts(study_files):  # noqa: F811
    return C.count_results(study_files, C.CountConfig(bootstrap=50))


def seed_mean(path, split, key):
    """{size: mean over seeds of metrics[split][key]} read straight from a results file."""
    r = load_results(path)
    sizes = sorted({m.dictionary_size for m in r.members})
    return {s: np.mean([m.metrics[split][key] for m in r.members if m.dictionary_size == s]) for s in sizes}


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def axes_of(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def panel(fig, label):
    """The axes whose title starts with the dataset/site `label`."""
    (ax,) = [ax for ax in axes_of(fig) if ax.get_title().startswith(f"{label} [")]
    return ax


def assert_readable(fig):
    """No two tick labels of one axis overlap once drawn, no minor tick labels, legends outside the data,
    at most MAX_LINES lines in any panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    for ax in axes_of(fig):
        assert len(ax.get_lines()) <= plots.MAX_LINES + 2, ax.get_title()  # + the known-n and fit lines
        for axis in (ax.xaxis, ax.yaxis):
            assert not [t.get_text() for t in axis.get_minorticklabels() if t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in axis.get_majorticklabels()
                     if t.get_visible() and t.get_text()]
            for i, one in enumerate(boxes):
                for other in boxes[i + 1:]:
                    assert not one.overlaps(other), (ax.get_title(), [t.get_text() for t in axis.get_majorticklabels()])
        legend = ax.get_legend()
        if legend is not None:
            assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    lowest = {}  # column -> the lowest visible panel: its x axis must be labelled (no panel below carries it)
    for ax in axes_of(fig):
        spec = ax.get_subplotspec()
        if spec is not None and (spec.colspan.start not in lowest or spec.rowspan.start > lowest[spec.colspan.start][0]):
            lowest[spec.colspan.start] = (spec.rowspan.start, ax)
    for _, ax in lowest.values():
        assert [t for t in ax.xaxis.get_majorticklabels() if t.get_visible() and t.get_text()], ax.get_title()


@pytest.fixture
def study(study_files):  # noqa: F811
    return C.count_study(study_files, C.CountConfig(bootstrap=30))


def test_loss_figure_has_one_panel_per_dataset_with_its_own_controls(counts, study_files):  # noqa: F811
    fig = plots.loss_vs_size(counts)
    titles = [ax.get_title().split(" [")[0] for ax in axes_of(fig)]
    assert titles == ["sparse", "gmm", "m/resid_0", "m/resid_3"]  # the null and the random-init twin sit inside
    by_path = {c.label: path for c, path in zip(counts, study_files)}
    layer = lines_by_label(panel(fig, "m/resid_3"))
    assert set(layer) == {f"{role}: {label} {split}" for role, label in
                          (("data", "m/resid_3"), ("layer 0", "m/resid_0"), ("random init", "r/resid_3"))
                          for split in ("train", "test")}
    toy = lines_by_label(panel(fig, "sparse"))
    assert set(toy) == {"data: sparse test", "data: sparse train", "matched null: sparse-null test"}
    assert toy["matched null: sparse-null test"].get_linestyle() == ":"
    for ax in axes_of(fig):
        for name, line in lines_by_label(ax).items():
            role_label, split = name.rsplit(" ", 1)
            label = role_label.split(": ", 1)[1]
            want = seed_mean(by_path[label], split, "fvu")
            if role_label.startswith("data") or role_label.startswith("layer") or role_label.startswith("random"):
                assert line.get_linestyle() == {"train": "--", "test": "-"}[split]
            np.testing.assert_array_equal(line.get_xdata(), list(want))
            np.testing.assert_allclose(line.get_ydata(), list(want.values()), rtol=1e-6)
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    first = axes_of(fig)[0]
    assert all(first.get_shared_y_axes().joined(first, ax) and first.get_shared_x_axes().joined(first, ax)
               for ax in axes_of(fig))  # one scale for every panel
    assert fig.legends and "data, test" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("sparsefeat" in t.get_text() and "toy.h5" in t.get_text() for t in fig.texts)
    assert_readable(fig)


def test_dead_and_agreement_figures_plot_the_table(counts):
    by = {c.label: c for c in counts}
    dead = plots.dead_vs_size(counts)
    agree = plots.agreement_vs_size(counts)
    for label in ("sparse", "gmm", "m/resid_3"):
        lines = lines_by_label(panel(dead, label))
        np.testing.assert_allclose(lines[f"data: {label}"].get_ydata(), [s.dead_fraction for s in by[label].sizes])
    column = [ax for ax in axes_of(agree) if ax.get_title().startswith("m/resid_3 [")]
    top = column[0]
    rows = [ax for ax in axes_of(agree) if ax.get_position().x0 == pytest.approx(top.get_position().x0)]
    assert len(rows) == 3
    for ax, key in zip(sorted(rows, key=lambda a: -a.get_position().y0), ("mmcs_next", "shared_seed", "reproduced")):
        lines = lines_by_label(ax)
        for role, label in (("data", "m/resid_3"), ("random init", "r/resid_3"), ("layer 0", "m/resid_0")):
            np.testing.assert_allclose(lines[f"{role}: {label}"].get_ydata(), [getattr(s, key) for s in by[label].sizes])
    assert_readable(dead)
    assert_readable(agree)


def test_summary_shows_the_count_beside_its_controls_and_the_held_out_fit(study):
    fig = plots.summary(study.sweeps, study.headlines)
    heads = {h.label: h for h in study.headlines}
    by = {c.label: c for c in study.sweeps}
    top = panel(fig, "sparse")
    assert "12±1 features" in top.get_title()
    lines = lines_by_label(top)
    np.testing.assert_allclose(lines["data: sparse"].get_ydata(), [s.reproduced for s in by["sparse"].sizes])
    np.testing.assert_allclose(lines["matched null: sparse-null"].get_ydata(),
                               [s.reproduced for s in by["sparse-null"].sizes])
    (below,) = [ax for ax in axes_of(fig) if ax is not top and ax.get_position().x0 == pytest.approx(top.get_position().x0)
                and ax.get_position().y0 < top.get_position().y0]
    fit_lines = lines_by_label(below)
    np.testing.assert_allclose(fit_lines["data: sparse test FVU"].get_ydata(), [s.test_fvu for s in by["sparse"].sizes])
    curve = fit_lines["data: fit"]
    np.testing.assert_allclose(curve.get_ydata(), heads["sparse"].fit.predict(curve.get_xdata()))
    null_curve = fit_lines["matched null: fit"]
    np.testing.assert_allclose(null_curve.get_ydata(), heads["sparse"].fit_vs_null.null.predict(null_curve.get_xdata()))
    assert f"b={heads['sparse'].fit.exponent.value:.2f}" in below.get_title() and "null b=" in below.get_title()
    assert below.get_yscale() == "log"
    assert_readable(fig)


def test_sensitivity_has_one_line_per_setting_with_the_headline_thick(tmp_path):
    toy = write_sweep(tmp_path / "toy.h5", label="toy", sparsities=(0.1, 0.5, 1.0), store_path=tmp_path / "t.h5",
                      provenance=dict(generator="sparse", params=dict(n_features=12)), ground_truth=True)
    counts = C.count_results([toy], C.CountConfig(bootstrap=20))
    (h,) = C.headlines(counts, C.CountConfig(bootstrap=20))
    fig = plots.sensitivity(counts, [h])
    lines = {k: v for k, v in lines_by_label(panel(fig, "toy")).items() if k.startswith("l1=")}
    assert len(lines) == 3
    chosen = f"l1={h.sparsity['value']:g} (headline)"
    assert lines[chosen].get_linewidth() > max(v.get_linewidth() for k, v in lines.items() if k != chosen)
    for c in counts:
        key = next(k for k in lines if k.split(" ")[0] == f"l1={c.sparsity:g}")
        np.testing.assert_allclose(lines[key].get_ydata(), [s.reproduced for s in c.sizes])
    assert_readable(fig)


def test_ground_truth_figure_shows_only_toys(counts):
    fig = plots.ground_truth_vs_size(counts)
    (ax,) = axes_of(fig)
    toy = next(c for c in counts if c.label == "sparse")
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), [s.mmcs_gt for s in toy.sizes])
    assert_readable(fig)


def test_frontier_figure_puts_each_data_set_beside_its_null(tmp_path):
    toy = write_sweep(tmp_path / "toy.h5", label="toy", sparsities=(0.1, 1.0), store_path=tmp_path / "t.h5",
                      provenance=dict(generator="sparse", params=dict(n_features=12)), ground_truth=True)
    null = write_sweep(tmp_path / "null.h5", label="toy-null", n_true=0, sparsities=(0.1, 1.0),
                       store_path=tmp_path / "n.h5",
                       provenance=dict(generator="matched", source=dict(path=str(tmp_path / "t.h5"), site="x")))
    counts = C.count_results([toy, null], C.CountConfig(bootstrap=50))
    fig = plots.loss_vs_l0(counts)
    (ax,) = axes_of(fig)
    assert ax.get_title().startswith("toy [toy]")
    lines = lines_by_label(ax)
    data, nul = lines["m=16"], lines["null m=64"]
    assert nul.get_linestyle() == ":" and data.get_linestyle() == "-"
    want = sorted((s.l0, s.test_fvu) for c in counts if c.label == "toy" for s in c.sizes if s.size == 16)
    np.testing.assert_allclose(np.c_[data.get_xdata(), data.get_ydata()], want)
    assert len(data.get_xdata()) == 2  # one point per sparsity setting
    assert_readable(fig)


def test_a_panel_above_an_empty_slot_keeps_its_x_tick_labels():
    fig, blocks = plots._grid(plots.MAX_COLUMNS + 1)  # one full row, then one panel alone below the first
    for block in blocks:
        block[0].set_xscale("log")
        block[0].plot([1, 100], [1, 2])
    assert_readable(fig)


def test_a_count_of_zero_at_every_size_gets_whole_number_ticks():
    from matplotlib.figure import Figure
    ax = Figure().subplots()
    ax.plot([16, 32, 64], [0, 0, 0])
    plots._count_axis(ax)
    ticks = [t for t in ax.get_yticks() if 0 <= t <= ax.get_ylim()[1]]
    assert ax.get_ylim() == (0, 1) and ticks and all(float(t).is_integer() for t in ticks)


def test_narrow_log_ranges_get_plain_ticks_that_do_not_overlap():
    assert plots._plain_ticks((0.2, 0.65)) == [0.2, 0.3, 0.5]
    assert plots._plain_ticks((0.012, 2.0)) == [0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0][::2]
    assert plots._plain_ticks((0.086, 0.119)) == [0.09, 0.1, 0.11]  # too narrow for 1-2-5: round steps
    assert plots._plain_ticks((0.31, 0.39)) == [0.325, 0.35, 0.375]
    ticks = plots._plain_ticks((1e-3, 10))
    assert ticks == [0.001, 0.01, 0.1, 1.0, 10.0]


@pytest.mark.slow
def test_every_figure_is_readable_on_the_study(counts):
    for name, make in plots.FIGURES.items():
        assert_readable(make(counts))


@pytest.mark.slow  # every figure twice, PNG and PDF, and the summary's bootstrap fits: ~15 s
def test_plot_all_writes_png_and_pdf_and_refuses_to_overwrite(counts, tmp_path):
    written = plots.plot_all(counts, tmp_path / "fig")
    assert sorted(p.name for p in written) == sorted(f"{n}.{e}" for n in plots.FIGURES for e in ("png", "pdf"))
    assert all(p.stat().st_size > 1000 for p in written)
    assert written[0].read_bytes()[:4] == b"\x89PNG" and written[1].read_bytes()[:4] == b"%PDF"
    with pytest.raises(SparsefeatError, match="already exists"):
        plots.plot_all(counts, tmp_path / "fig")
    plots.plot_all(counts, tmp_path / "fig", force=True)
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == sorted(p.name for p in written)  # no temp files


def test_count_by_layer_plots_trained_random_and_null_by_layer(counts):
    fig = plots.count_by_layer(counts)
    lines = {line.get_label().split(" (")[0]: line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"trained", "random init"}  # the fixture's model sites have no null
    np.testing.assert_array_equal(lines["trained"].get_xdata(), [0, 3])
    by = {c.label: c for c in counts}
    np.testing.assert_allclose(lines["trained"].get_ydata(), [by["m/resid_0"].sizes[-1].reproduced,
                                                              by["m/resid_3"].sizes[-1].reproduced])
    np.testing.assert_allclose(lines["random init"].get_ydata(), [by["r/resid_3"].sizes[-1].reproduced])


@pytest.mark.slow  # ~10 s, as above
def test_plot_command_writes_the_figures(study_files, tmp_path, capsys):  # noqa: F811
    from sparsefeat import cli
    assert cli.main(["plot", *map(str, study_files), "--out", str(tmp_path / "figs"), "--bootstrap", "20"]) == 0
    printed = capsys.readouterr().out.split()
    want = {f"{name}.{ext}" for name in plots.FIGURES for ext in ("png", "pdf")}
    assert len(printed) == len(want) and {Path(p).name for p in printed} == want
    assert all(Path(p).parent == tmp_path / "figs" and Path(p).stat().st_size > 0 for p in printed)
    assert cli.main(["plot", *map(str, study_files), "--out", str(tmp_path / "figs")]) == 2
    assert "already exists" in capsys.readouterr().err

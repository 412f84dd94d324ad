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


def test_loss_figure_plots_train_dashed_and_test_solid_for_every_sweep(counts, study_files):  # noqa: F811
    fig = plots.loss_vs_size(counts)
    ax = fig.axes[0]
    lines = lines_by_label(ax)
    assert len(lines) == 2 * len(counts)
    assert len(ax.get_legend_handles_labels()[1]) == len(counts)  # one entry per series (train lines hidden)
    for c, path in zip(counts, study_files):
        for split, dash in (("train", "--"), ("test", "-")):
            line = lines[f"{'_' if split == 'train' else ''}{c.label} [{c.role}] {split}"]
            want = seed_mean(path, split, "fvu")
            assert line.get_linestyle() == dash
            np.testing.assert_array_equal(line.get_xdata(), list(want))
            np.testing.assert_allclose(line.get_ydata(), list(want.values()), rtol=1e-6)
        assert lines[f"_{c.label} [{c.role}] train"].get_color() == lines[f"{c.label} [{c.role}] test"].get_color()
    assert ax.get_xscale() == "log" and "dictionary size" in ax.get_xlabel() and "FVU" in ax.get_ylabel()
    assert "sparsefeat" in fig.texts[0].get_text() and "toy.h5" in fig.texts[0].get_text()


def test_dead_and_agreement_figures_plot_the_table(counts):
    dead = lines_by_label(plots.dead_vs_size(counts).axes[0])
    agree = plots.agreement_vs_size(counts)
    for c in counts:
        name = f"{c.label} [{c.role}]"
        np.testing.assert_allclose(dead[name].get_ydata(), [s.dead_fraction for s in c.sizes])
        for ax, key in zip(agree.axes, ("mmcs_next", "shared_seed", "reproduced")):
            np.testing.assert_allclose(lines_by_label(ax)[name].get_ydata(), [getattr(s, key) for s in c.sizes])
            assert ax.get_xscale() == "log" and ax.get_ylabel()


def test_ground_truth_figure_shows_only_toys_with_their_true_count(counts):
    fig = plots.ground_truth_vs_size(counts)
    ax = fig.axes[0]
    toy = next(c for c in counts if c.label == "sparse")
    line = lines_by_label(ax)["sparse"]
    np.testing.assert_allclose(line.get_ydata(), [s.mmcs_gt for s in toy.sizes])
    marks = [x for x in ax.get_lines() if x.get_linestyle() == ":"]
    assert [m.get_xdata()[0] for m in marks] == [12]  # the true number of features
    assert len([x for x in ax.get_lines() if x.get_linestyle() == "-"]) == 1


def test_frontier_figure_puts_each_data_set_beside_its_null(tmp_path):
    toy = write_sweep(tmp_path / "toy.h5", label="toy", sparsities=(0.1, 1.0), store_path=tmp_path / "t.h5",
                      provenance=dict(generator="sparse", params=dict(n_features=12)), ground_truth=True)
    null = write_sweep(tmp_path / "null.h5", label="toy-null", n_true=0, sparsities=(0.1, 1.0),
                       store_path=tmp_path / "n.h5",
                       provenance=dict(generator="matched", source=dict(path=str(tmp_path / "t.h5"), site="x")))
    counts = C.count_results([toy, null], C.CountConfig(bootstrap=50))
    fig = plots.loss_vs_l0(counts)
    ax = fig.axes[0]
    assert "toy-null" in ax.get_title()
    lines = lines_by_label(ax)
    data, nul = lines["m=16"], lines["m=16 (null)"]
    assert nul.get_linestyle() == ":" and data.get_linestyle() == "-"
    want = sorted((s.l0, s.test_fvu) for c in counts if c.label == "toy" for s in c.sizes if s.size == 16)
    np.testing.assert_allclose(np.c_[data.get_xdata(), data.get_ydata()], want)
    assert len(data.get_xdata()) == 2  # one point per sparsity setting


@pytest.mark.slow
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


def test_plot_command_writes_the_figures(study_files, tmp_path, capsys):  # noqa: F811
    from sparsefeat import cli
    assert cli.main(["plot", *map(str, study_files), "--out", str(tmp_path / "figs"), "--bootstrap", "20"]) == 0
    printed = capsys.readouterr().out.split()
    want = {f"{name}.{ext}" for name in plots.FIGURES for ext in ("png", "pdf")}
    assert len(printed) == len(want) and {Path(p).name for p in printed} == want
    assert all(Path(p).parent == tmp_path / "figs" and Path(p).stat().st_size > 0 for p in printed)
    assert cli.main(["plot", *map(str, study_files), "--out", str(tmp_path / "figs")]) == 2
    assert "already exists" in capsys.readouterr().err

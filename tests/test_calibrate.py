"""The sparsity calibration of `run` (calibrate.py): a short real run finds an l1 whose test L0 is inside
the target band, the grid spreads around it, topk needs no run, and a fixed grid in a study file wins."""

from __future__ import annotations

import math

import pytest

from sparsefeat import calibrate as cal
from sparsefeat import run as study
from sparsefeat.errors import ConfigError
from sparsefeat.toys import write_toy
from sparsefeat.train import SweepConfig


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    return write_toy("sparse", tmp_path_factory.mktemp("cal") / "toy.h5", n_samples=6000, n_features=32, d=16,
                     mean_active=2.0, progress=False)


@pytest.mark.parametrize("target", [pytest.param(1.6, marks=pytest.mark.slow), 6.0])  # 1.6 takes 2-3 runs
def test_calibration_finds_an_l1_whose_test_l0_is_inside_the_band(toy_store, target):
    config = cal.CalibrationConfig(target_l0=target, steps=200, size="1x")
    sweep = SweepConfig(sizes=[16, 32], seeds=[0, 1], lr=1e-2)
    c = cal.calibrate(toy_store, sweep, config, label="toy")
    reached = next(t["l0"] for t in c.tried if t["value"] == c.value)
    assert c.reached and target / config.band <= reached <= target * config.band
    assert c.size == 16 and c.steps == 200 and c.sparsity_name == "l1"
    assert [t["value"] for t in c.tried if t["round"] == 1] == config.scan  # the scan is recorded as trained
    assert c.grid == pytest.approx([c.value / 3, c.value, c.value * 3], rel=1e-2)
    # L0 falls as the penalty grows, which the secant relies on
    scan = sorted((t["value"], t["l0"]) for t in c.tried if t["round"] == 1)
    assert scan[0][1] > scan[-1][1]


def test_the_sweeps_resampling_does_not_reach_its_calibration(toy_store):
    """Calibration measures where a penalty puts L0; a sweep that resamples dead latents (here at the
    calibration run's last step) must calibrate to the same grid as one that does not."""
    config = cal.CalibrationConfig(target_l0=6.0, steps=200, size="1x")
    plain = cal.calibrate(toy_store, SweepConfig(sizes=[16], seeds=[0], lr=1e-2), config, label="toy")
    # a latent silent for 20 steps is dead: the strongest penalties of the scan have some by step 200
    resampling = cal.calibrate(toy_store, SweepConfig(sizes=[16], seeds=[0], lr=1e-2, resample_steps=[200],
                                                      resample_window=20), config, label="toy")
    assert resampling.tried == plain.tried and resampling.grid == plain.grid


@pytest.mark.slow
def test_a_denser_target_gets_a_weaker_penalty(toy_store):
    sweep = SweepConfig(sizes=[16], seeds=[0], lr=1e-2)
    sparse = cal.calibrate(toy_store, sweep, cal.CalibrationConfig(target_l0=1.6, steps=200), label="toy")
    dense = cal.calibrate(toy_store, sweep, cal.CalibrationConfig(target_l0=6.0, steps=200), label="toy")
    assert dense.value < sparse.value


def test_the_secant_interpolates_inside_a_bracket_and_extends_the_scan_outside_one():
    # L0 = 10 at l1 = 0.1 and 1 at l1 = 1: log-log linear, so L0 = 3 sits at l1 = 10^(-log10 3)
    values = cal.next_values([(0.1, 10.0), (1.0, 1.0)], target=3.0, spacing=3.0)
    assert values[0] == pytest.approx(1 / 3, rel=1e-9) and values[1] == pytest.approx(math.sqrt(0.1))
    assert cal.next_values([(0.1, 10.0), (1.0, 5.0)], target=3.0, spacing=3.0) == pytest.approx([9.0, 81.0])
    assert cal.next_values([(0.1, 2.0), (1.0, 0.0)], target=3.0, spacing=3.0) == pytest.approx([0.1 / 9, 0.1 / 81])
    assert cal.closest([(0.1, 10.0), (0.3, 2.5), (1.0, 0.0)], 3.0) == (0.3, 2.5)


def test_topk_needs_no_run_and_keeps_k_below_the_smallest_size(toy_store):
    sweep = SweepConfig(arch="topk", sizes=[8, 32], seeds=[0, 1])
    c = cal.calibrate(toy_store, sweep, cal.CalibrationConfig(target_l0=4, settings=3, spacing=3.0), label="toy")
    assert c.tried == [] and c.sparsity_name == "k" and c.value == 4.0
    assert c.grid == [1.0, 4.0, 7.0]  # 12 would keep every latent of the 8-latent dictionary


def test_a_fixed_grid_in_the_study_file_overrides_the_calibration(tmp_path):
    config = study.make_config({"sweep": {"toy": {"l1": [0.2, 0.4]}}})
    assert config.calibrating("toy") is False and config.calibrating("model") is True
    runner = study.Study(config, tmp_path)
    ds = study.Dataset("sparse", tmp_path / "sparse.h5", "x", "toy", "toy", "sparse")
    assert runner.sweep_config(ds).l1 == [0.2, 0.4]
    # the effective config keeps the fixed grid and loads back to the same study
    table = study.to_table(config)
    assert table["sweep"]["toy"]["l1"] == [0.2, 0.4] and "l1" not in table["sweep"]["model"]
    assert study.from_table(table, "study.toml") == config


def test_a_calibrated_grid_replaces_the_default(tmp_path):
    config = study.make_config()
    runner = study.Study(config, tmp_path)
    ds = study.Dataset("gmm", tmp_path / "gmm.h5", "x", "toy", "control", "gmm")
    runner.calibrations["gmm"] = cal.Calibration(
        label="gmm", arch="relu-l1", sparsity_name="l1", d=32, size=16, steps=300, target_l0=3.2, band=1.5,
        tried=[dict(round=1, value=0.1, l0=3.0, fvu=0.1, dead_fraction=0.0)], value=0.1, reached=True,
        grid=[0.0333, 0.1, 0.3])
    assert runner.sweep_config(ds).l1 == [0.0333, 0.1, 0.3]
    assert "l1 values in 1 run of 300 steps" in runner.calibrations["gmm"].text()


@pytest.mark.parametrize("toml,message", [
    ("[sweep.toy]\nl1 = [0.3]\n\n[calibration]\ntoy = true\n", "l1 is a fixed sparsity grid"),
    ("[calibration]\nband = 1.0\n", "band must be above 1"),
    ("[calibration]\nsize = \"wide\"\n", "neither a whole number nor a ratio"),
    ("[calibration]\nscan = [0.1, -1.0]\n", "scan must be positive numbers"),
    ("[calibration]\nstepz = 3\n", "[calibration]: unknown key 'stepz'"),
])
def test_a_bad_calibration_table_is_one_line(tmp_path, toml, message):
    path = tmp_path / "study.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        study.load_config(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)

"""`sparsefeat run`: a whole study end to end (--quick, real MiniLM, real sweeps), its folder and report,
re-runs that keep finished work, and a study config that fails in one line on a typo."""

from __future__ import annotations

import json
import re
import tomllib

import pytest

from sparsefeat import cli, plots
from sparsefeat import run as study


@pytest.fixture(scope="session")
def quick_study(tmp_path_factory):
    """The whole quick study, run once per test session (about 50 s on 2 cores): its tests are slow."""
    out = tmp_path_factory.mktemp("study") / "quick"
    code = cli.main(["run", "--quick", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


@pytest.mark.slow
def test_quick_study_writes_the_whole_folder(quick_study):
    out = quick_study
    assert {p.name for p in out.iterdir()} >= {"stores", "sweeps", "figures", "count.json", "report.md", "study.toml"}
    stores = {p.name for p in (out / "stores").iterdir()}
    assert stores == {"sparse.h5", "gmm.h5", "square.h5", "minilm.h5", "minilm-random.h5", "null-sparse.h5",
                      "null-minilm-resid_0.h5", "null-minilm-resid_6.h5"}
    assert len(list((out / "sweeps").glob("*.h5"))) == 10
    n = len(plots.FIGURES)
    assert len(list((out / "figures").glob("*.png"))) == n and len(list((out / "figures").glob("*.pdf"))) == n
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp")) and not list(out.rglob("*.ckpt"))
    # the effective config is complete and valid: it loads back to the same study
    again = study.from_table(tomllib.loads((out / "study.toml").read_text()), "study.toml")
    assert study.to_toml(study.to_table(again)) == (out / "study.toml").read_text()
    assert again == study.load_config(quick=True)


@pytest.mark.slow
def test_quick_study_count_places_every_site_beside_its_controls(quick_study):
    rows = json.loads((quick_study / "count.json").read_text())
    by = {(r["label"], r["sparsity"]): r for r in rows}
    toy = by[("sparse", 0.3)]
    assert toy["role"] == "toy" and toy["expected"] == 64
    assert toy["saturation"]["estimate"] == pytest.approx(64, rel=0.2)
    assert toy["comparisons"]["null"]["against"] == "null:sparse" and toy["comparisons"]["null"]["within_noise"] is False
    assert {"control gmm", "control square"} <= set(toy["comparisons"])
    layer = by[("minilm/resid_6", 0.05)]
    assert layer["comparisons"]["null"]["against"] == "null:minilm/resid_0".replace("0", "6")
    assert layer["comparisons"]["layer 0"]["against"] == "minilm/resid_0"
    assert layer["comparisons"]["random init"]["against"] == "minilm-random/resid_6"
    assert by[("gmm", 0.3)]["role"] == "control" and by[("null:sparse", 0.3)]["role"] == "null"


@pytest.mark.slow
def test_quick_study_report_answers_the_three_questions_with_numbers(quick_study):
    report = (quick_study / "report.md").read_text()
    sections = re.split(r"^## ", report, flags=re.M)
    titled = {s.splitlines()[0]: s for s in sections[1:]}
    train_test = titled["1. Train or test loss?"]
    assert re.search(r"\*\*minilm/resid_6\*\*: .*test − train MSE [+-]\d\.\d{4} at m=48, [+-]\d\.\d{4} at m=192",
                     train_test)
    assert re.search(r"^(No dataset here shows|Train loss alone would overstate)", train_test, flags=re.M)
    false_pos = titled["2. False positives on controls"]
    assert re.search(r"\*\*gmm \(relu-l1 l1=0\.3\)\*\* \(control; it has 12 components\): \d+±\d+", false_pos)
    assert re.search(r"over null:sparse, beyond noise", false_pos)
    layer0 = titled["3. Layer 0 as a baseline"]
    assert "over minilm/resid_0" in layer0 and "over minilm-random/resid_6" in layer0
    assert "```" in titled["The count"] and "minilm-random/resid_0" in titled["The count"]


@pytest.mark.slow
def test_a_rerun_keeps_finished_stores_and_sweeps(quick_study):
    sweeps = sorted((quick_study / "sweeps").glob("*.h5"))
    before = {p: p.stat().st_mtime_ns for p in sweeps + sorted((quick_study / "stores").glob("*.h5"))}
    assert cli.main(["run", "--quick", "--out", str(quick_study), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (quick_study / "report.md").exists()


@pytest.mark.slow
def test_a_folder_refuses_a_study_with_another_config(quick_study, tmp_path, capsys):
    cfg = tmp_path / "other.toml"
    cfg.write_text("[study]\ntoy_samples = 9000\n")
    assert cli.main(["run", "--quick", "--config", str(cfg), "--out", str(quick_study), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another config" in err and "--force" in err


@pytest.mark.parametrize("toml,message", [
    ("[study]\ntoy_smaples = 10\n", "[study]: unknown key 'toy_smaples'"),
    ("[sweep.toy]\nsizes = [8]\nstepz = 3\n", "[sweep.toy]: unknown key 'stepz'"),
    ("[toys.sparse]\nkind = \"sparse\"\nn_feature = 10\n", "toy 'sparse' has no parameter n_feature"),
    ("[toys.blob]\nkind = \"blob\"\n", "unknown toy 'blob'"),
    ("[model]\nlayerz = [1]\n", "[model]: unknown key 'layerz'"),
    ("[count]\nmatch_floor = 2.0\n", "match_floor must be in (0, 1]"),
    ("[study\n", "not valid TOML"),
    ("[extra]\nx = 1\n", "unknown key 'extra'"),
    ("[sweep.toy]\nsteps = \"abc\"\n", "[sweep.toy]: steps = 'abc' should be an integer"),
    ("[study]\nnulls = 1\n", "[study]: nulls = 1 should be true or false"),
    ("[model]\nlayers = [\"a\"]\n", "[model]: layers = ['a'] should be a list of an integer"),
    ("[count]\nbootstrap = 2.5\n", "[count]: bootstrap = 2.5 should be an integer"),
    ("study = 3\n", "study must be a table"),
])
def test_a_bad_study_config_is_one_line_naming_file_and_key(tmp_path, capsys, toml, message):
    cfg = tmp_path / "study.toml"
    cfg.write_text(toml)
    assert cli.main(["run", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(cfg) in err and message in err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_config_file_overrides_on_top_of_the_quick_profile(tmp_path):
    cfg = tmp_path / "study.toml"
    cfg.write_text("[model]\nenabled = false\n\n[toys.blobs]\nkind = \"gmm\"\nk = 5\n\n[sweep.toy]\nsteps = 7\n")
    config = study.load_config(cfg, quick=True)
    assert config.model.enabled is False and config.model.harvest.max_tokens == study.QUICK["model"]["max_tokens"]
    blobs = config.toys["blobs"]
    assert blobs.kind == "gmm" and blobs.params.k == 5 and blobs.params.d == config.study.toy_width
    assert "sparse" in config.toys
    assert config.sweep.toy.steps == 7 and config.sweep.toy.sizes == study.QUICK["sweep"]["toy"]["sizes"]
    assert config.sweep.toy.lr == 1e-2  # the study's own default, kept under the file's override


def test_the_model_table_is_one_flat_table_of_two_configs():
    table = study.to_table(study.make_config())
    harvest = study.load_config().model.harvest
    assert table["model"]["enabled"] is True and table["model"]["layers"] == harvest.layers == [0, 3, 6]
    from sparsefeat.harvest import HarvestConfig
    assert harvest.batch_size == HarvestConfig().batch_size  # not restated by the study


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert cli.main(["run", "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.toml: no such file" in capsys.readouterr().err


def test_threads_are_pinned_for_a_study_and_restored_after():
    import torch
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # a count other than the study's, so pinning and restoring both show
        with study.torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with study.torch_threads(0):  # 0 leaves torch's own setting alone
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

"""`sparsefeat run`: a whole study end to end (--quick, real MiniLM, real sweeps), its folder and report,
re-runs that keep finished work, and a study config that fails in one line on a typo."""

from __future__ import annotations

import json
import re
import tomllib

import pytest

from sparsefeat import cli, plots
from sparsefeat import run as study


TOYS = ("sparse", "gmm", "square", "circle", "sphere")
NULLS = ("null:sparse", "null:circle", "null:sphere", "null:minilm/resid_0", "null:minilm/resid_6")
MODEL = ("minilm/resid_0", "minilm/resid_6", "minilm-random/resid_0", "minilm-random/resid_6")
LABELS = TOYS + MODEL + NULLS


@pytest.fixture(scope="session")
def quick_study(tmp_path_factory):
    """The whole quick study, run once per test session (about 100 s of CPU): its tests are slow."""
    out = tmp_path_factory.mktemp("study") / "quick"
    code = cli.main(["run", "--quick", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


@pytest.mark.slow
def test_quick_study_writes_the_whole_folder(quick_study):
    out = quick_study
    assert {p.name for p in out.iterdir()} >= {"stores", "sweeps", "figures", "count.json", "report.md", "study.toml"}
    stores = {p.name for p in (out / "stores").iterdir()}
    assert stores == {"sparse.h5", "gmm.h5", "square.h5", "circle.h5", "sphere.h5", "minilm.h5", "minilm-random.h5",
                      "null-sparse.h5", "null-circle.h5", "null-sphere.h5", "null-minilm-resid_0.h5",
                      "null-minilm-resid_6.h5"}
    assert len(list((out / "sweeps").glob("*.h5"))) == len(LABELS) == 14
    assert len(list((out / "calibration").glob("*.json"))) == len(LABELS)  # every grid calibrated
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
    heads = {r["label"]: r["headline"] for r in rows}
    assert set(heads) == set(LABELS)
    # three calibrated settings per dataset, each its own grid, one of them the headline's
    for label in LABELS:
        settings = sorted(r["sparsity"] for r in rows if r["label"] == label)
        grid = json.loads((quick_study / "calibration" / f"{study._file_stem(label)}.json").read_text())["grid"]
        assert settings == sorted(grid) and len(grid) == 3
        assert sum(r["chosen"] for r in rows if r["label"] == label) == 1
    toy = heads["sparse"]
    assert toy["role"] == "toy" and toy["expected"] == 64
    # the quick budget lets the toys converge (each member judged on its own held-out curve), so the count
    # gives estimates, not lower bounds: the truth within 10% on the sparse toy, the 12 components of gmm
    for label, value, tol in (("sparse", 64, dict(rel=0.1)), ("gmm", 12, dict(abs=1))):
        assert heads[label]["estimate"] == pytest.approx(value, **tol), heads[label]
    for label in ("square", "null:sparse", "null:minilm/resid_0", "null:minilm/resid_6"):  # no false positives
        h = heads[label]
        assert (h["estimate"] if h["estimate"] is not None else h["lower_bound"]) <= 3, (label, h)
    for r in rows:  # no member of a headline's setting has every latent dead
        assert not r["chosen"] or all(size["all_dead"] == 0 for size in r["sizes"]), r["label"]
    null = toy["comparisons"]["null"]
    assert null["against"] == "null:sparse"
    assert null["within_noise"] is False or (null["bound"] == ">" and null["excess"] > 0.8 * 64)  # beyond the null
    assert {"control gmm", "control square", "control circle", "control sphere"} <= set(toy["comparisons"])
    for manifold in ("circle", "sphere"):  # read against their own matched nulls
        assert heads[manifold]["role"] == "control"
        assert heads[manifold]["comparisons"]["null"]["against"] == f"null:{manifold}"
    layer = heads["minilm/resid_6"]
    assert layer["comparisons"]["null"]["against"] == "null:minilm/resid_6"
    assert layer["comparisons"]["layer 0"]["against"] == "minilm/resid_0"
    assert layer["comparisons"]["random init"]["against"] == "minilm-random/resid_6"
    assert heads["null:sparse"]["role"] == "null"


@pytest.mark.slow
def test_quick_study_report_leads_with_one_headline_per_dataset(quick_study):
    report = (quick_study / "report.md").read_text()
    sections = re.split(r"^## ", report, flags=re.M)
    assert sections[1].startswith("Headlines\n")
    lines = [line for line in sections[1].splitlines() if line.startswith("- **")]
    assert [re.match(r"- \*\*(.+?)\*\*", line).group(1) for line in lines] == list(LABELS)
    sparse = lines[0]
    assert re.fullmatch(r"- \*\*sparse\*\* \(toy, expected 64\): (\*\*\d+±\d+\*\* features \(plateau from m=\d+\)|"
                        r"\*\*>\d+\*\* reproduced directions, no estimate \(no plateau up to m=128; m=\d+.* did not converge "
                        r"within the step budget\)) at relu-l1 l1=[\d.]+ \[held-out knee\]; [+>-]+\d+(±\d+)? over null "
                        r"`null:sparse`(, beyond noise)?\.", sparse)
    layer = lines[LABELS.index("minilm/resid_6")]
    assert "over null `null:minilm/resid_6`" in layer and "over layer 0 `minilm/resid_0`" in layer
    assert "over random init `minilm-random/resid_6`" in layer and "[held-out knee]" in layer
    calibration = next(s for s in sections if s.startswith("Sparsity calibration"))
    assert len(re.findall(r"^- \*\*.+\*\*: target L0 [\d.]+ \(×/÷1\.5\): l1=", calibration, flags=re.M)) == len(LABELS)
    checks = next(s for s in sections if s.startswith("Training checks"))
    assert "every latent dead" in checks and "training objective" in checks.lower()
    sensitivity = next(s for s in sections if s.startswith("Sensitivity"))
    assert len(re.findall(r"  chosen$", sensitivity, flags=re.M)) == len(LABELS)  # one chosen setting each


@pytest.mark.slow
def test_quick_study_report_answers_the_three_questions_with_numbers(quick_study):
    report = (quick_study / "report.md").read_text()
    sections = re.split(r"^## ", report, flags=re.M)
    titled = {s.splitlines()[0]: s for s in sections[1:]}
    train_test = titled["1. Train or test loss?"]
    assert re.search(r"\*\*minilm/resid_6 \(relu-l1 l1=[\d.]+\)\*\*: .*test − train MSE [+-]\d\.\d{4} at m=24, "
                     r"[+-]\d\.\d{4} at m=96", train_test)
    assert re.search(r"^(No dataset here shows|Train loss alone would overstate)", train_test, flags=re.M)
    false_pos = titled["2. False positives on controls"]
    assert re.search(r"\*\*gmm\*\* \(control; it has 12 components\): \*\*>?\d+(±\d+)?\*\*", false_pos)
    assert re.search(r"over null `null:sparse`", false_pos)
    for manifold in ("circle", "sphere"):  # the tiles are not reported as features, or the report says it cannot tell
        assert re.search(rf"\*\*{manifold}\*\* is a manifold .*(does not report the tiles|cannot tell)", false_pos)
    layer0 = titled["3. Layer 0 as a baseline"]
    assert "over layer 0 `minilm/resid_0`" in layer0 and "over random init `minilm-random/resid_6`" in layer0


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
    ("[sweep.toy]\nsteps = \"abc\"\n", "[sweep.toy]: steps must be a whole number or 'auto', got 'abc'"),
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
    assert table["model"]["enabled"] is True and table["model"]["layers"] == harvest.layers == [0, 6]
    assert harvest.corpus == ["pydoc"]  # the demo's 24k tokens are all pydoc (README: What make demo shows)
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


def _headline(**changes):
    from sparsefeat.count import RULE_KNEE, Comparison, Headline
    base = dict(label="sparse", role="toy", d=32, expected=64, estimate=63.0, uncertainty=2.0, lower_bound=65.0,
                size=64, sparsity={"arch": "relu-l1", "name": "l1", "value": 0.3}, rule=RULE_KNEE, reason=None,
                excluded=[], scores=[])
    h = Headline(**{**base, **changes})
    h.comparisons["null"] = Comparison(against="null:sparse", role="null", control_estimate=1.0,
                                       control_lower_bound=1.0, excess=62.0, uncertainty=3.0, bound="=",
                                       common_size=128, excess_at_common_size=60.0)
    return h


def test_a_headline_line_gives_the_number_the_setting_the_rule_and_the_excess():
    line = study.headline_line(_headline())
    assert line == ("- **sparse** (toy, expected 64): **63±2** features (plateau from m=64) at relu-l1 l1=0.3 "
                    "[held-out knee]; +62±3 over null `null:sparse`, beyond noise.")
    bound = study.headline_line(_headline(estimate=None, uncertainty=None, size=None, reason="no plateau up to m=128"))
    assert "**>65** reproduced directions, no estimate (no plateau up to m=128) at relu-l1 l1=0.3" in bound
    unconverged = _headline(estimate=None, uncertainty=None, size=None, reason="no plateau up to m=128",
                            warnings=["m=128 did not converge in 1000 steps; not read as a plateau"])
    assert "(no plateau up to m=128; m=128 did not converge within the step budget)" in study.headline_line(unconverged)


def test_a_folder_accepts_the_same_study_when_a_key_is_none(tmp_path):
    """TOML has no null: max_tokens = None (the whole corpus) is left out of study.toml, and loading the
    file back gives the study's default instead; rerunning the same study must still be allowed."""
    config = study.make_config({"model": {"max_tokens": None}})
    assert config.model.harvest.max_tokens is None
    (tmp_path / "study.toml").write_text(study.to_toml(study.to_table(config)))
    study.check_folder(tmp_path, config, force=False)  # the same study: no error
    other = study.make_config({"model": {"max_tokens": 1000}})
    with pytest.raises(study.SparsefeatError, match="another config"):
        study.check_folder(tmp_path, other, force=False)

"""experiments/minilm_count.py end to end at its CI size: real MiniLM activations, real sweeps, the count,
and the results.md table that docs/results.md is written from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "minilm_count.py"
SITES = ("minilm/resid_0", "minilm/resid_6", "minilm-random/resid_0", "minilm-random/resid_6",
         "null:minilm/resid_0", "null:minilm/resid_6")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def minilm_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "study"
    done = run_script("--quick", "--layers", "0,6", "--threads", "1", "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done


@pytest.mark.slow
def test_minilm_study_writes_one_row_per_site_with_headline_fit_and_controls(minilm_quick):
    out, done = minilm_quick
    table = (out / "results.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "/resid_" in line}
    assert set(rows) == set(SITES)
    # a trained layer is read against its null, layer 0 (beyond layer 0 itself) and its random-init twin
    assert ">+" in rows["minilm/resid_0"].split("|")[4] or "±" in rows["minilm/resid_0"].split("|")[4]
    assert rows["minilm/resid_6"].split("|")[5].strip() != "–"
    assert rows["minilm/resid_6"].split("|")[6].strip() != "–"
    entries = [e for e in json.loads((out / "count.json").read_text()) if e.get("headline")]
    assert {e["label"] for e in entries} == set(SITES)
    for e in entries:
        assert "fit" in e["headline"] and "exponent" in e["headline"]["fit"]
        assert f"## {e['label']} at " in table  # its per-size table
        if e.get("chosen"):  # the per-size table is the chosen setting's (every entry carries the headline)
            assert f"## {e['label']} at {e['headline']['setting']}\n" in table
            first = e["sizes"][0]
            assert f"| {first['size']} | {first['test_fvu']:.3f} | {first['train_fvu']:.3f} |" in table
    assert "results:" in done.stdout


@pytest.mark.slow
def test_minilm_study_rerun_keeps_its_sweeps_and_start_commit(minilm_quick):
    out, _ = minilm_quick
    started = (out / "started.json").read_text()
    sweeps = {p.name: p.stat().st_mtime_ns for p in (out / "sweeps").glob("*.h5")}
    again = run_script("--quick", "--layers", "0,6", "--threads", "1", "--out", str(out), "--no-progress")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "started.json").read_text() == started
    assert {p.name: p.stat().st_mtime_ns for p in (out / "sweeps").glob("*.h5")} == sweeps


def test_minilm_study_without_layer_zero_is_refused_in_one_line(tmp_path):
    done = run_script("--layers", "3,6", "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert "--layers must include 0" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()

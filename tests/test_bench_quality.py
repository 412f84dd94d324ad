"""benchmarks/bench_quality.py: the crossing it reads time to quality from, and its smoke run end to end.
(No timing is asserted: speed is read from the benchmark's output, never tested.)"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_quality.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = load_bench()
CURVE = [(0, 0.0, 1.0), (10, 2.0, 0.6), (20, 4.0, 0.4), (30, 6.0, 0.5), (40, 8.0, 0.2)]


def test_crossing_is_linear_between_the_evaluations_around_it():
    assert bench.crossing(CURVE, 0.5) == pytest.approx((15, 3.0))
    assert bench.crossing(CURVE, 0.6) == pytest.approx((10, 2.0))  # reaching the level exactly counts


def test_crossing_is_the_first_one_and_none_when_never_reached():
    assert bench.crossing(CURVE, 0.3) == pytest.approx((110 / 3, 22 / 3))  # after the rise at step 30
    assert bench.crossing(CURVE, 0.1) is None
    assert bench.crossing(CURVE, 1.0) == (0, 0.0)


def test_l0_counts_the_non_zero_codes_per_row():
    held = bench.torch.randn(300, 8)
    assert bench.l0(lambda x: bench.torch.relu(x), held, chunk=128) == pytest.approx(
        float((held > 0).sum()) / 300)


def test_fvu_of_perfect_and_mean_reconstructions():
    held = bench.torch.randn(300, 8)
    assert bench.fvu(lambda x: x, held, chunk=128) == 0.0
    assert bench.fvu(lambda x: held.mean(0).expand_as(x), held, chunk=128) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.slow  # ~6 s: a subprocess that trains three tiny SAEs in turn
def test_quick_run_prints_a_row_per_method_and_the_bare_loop_reaches_its_own_level():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1"], capture_output=True,
                         text=True, env=env, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^\| (bare PyTorch(?:, unit decoder)?|sparsefeat enc [\d.]+) \| (\S+) \|", out.stdout, flags=re.M)
    assert [name for name, _ in rows] == ["bare PyTorch", "bare PyTorch, unit decoder", "sparsefeat enc 1",
                                          "sparsefeat enc 0.1"]
    assert rows[0][1] == "40"  # the level is bare's FVU at its last step, so it reaches it exactly there

"""benchmarks/bench_whole.py: its size list matches the sweep CLI's reading, and its smoke run goes end to end
(the sweep CLI and the bare script as subprocesses). No timing is asserted."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_whole.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_whole", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sizes_are_absolute_or_ratios_of_the_width():
    bench = load_bench()
    assert bench.sizes_of("1536", 384) == [1536]
    assert bench.sizes_of("0.5x,1x,2x,4x,8x,16x", 384) == [192, 384, 768, 1536, 3072, 6144]


@pytest.mark.slow  # ~8 s: writes a toy store, runs `sparsefeat sweep` and the bare script once each
def test_quick_run_times_both_processes():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1"], capture_output=True,
                         text=True, env=env, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "sizes [32, 64]" in out.stdout
    assert re.search(r"^rep 1: sparsefeat +[\d.]+ s +bare +[\d.]+ s +bare / sparsefeat [\d.]+", out.stdout, re.M)
    assert re.search(r"^median: sparsefeat [\d.]+ s, bare [\d.]+ s, bare / sparsefeat [\d.]+$", out.stdout, re.M)

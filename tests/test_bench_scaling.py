"""benchmarks/bench_scaling.py: its fit recovers known exponents, and its smoke size runs end to end.
(No timing is asserted here: speed is read from the benchmark's output, never tested.)"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_scaling.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load_bench()


@pytest.mark.parametrize("b", [1.0, 0.8, 2.0, -0.5])
def test_fit_recovers_an_exact_power_law(b):
    sizes = [384, 768, 1536, 3072, 6144]
    a, fitted = bench.fit_exponent(sizes, [3e-4 * m ** b for m in sizes])
    assert fitted == pytest.approx(b, abs=1e-9)
    assert a == pytest.approx(np.log(3e-4), abs=1e-9)
    assert bench.local_exponents(sizes, [3e-4 * m ** b for m in sizes]) == pytest.approx([b] * 4, abs=1e-9)


def test_fit_of_noisy_timings_with_overhead():
    sizes = np.array([384, 768, 1536, 3072, 6144])
    noise = np.exp(np.random.default_rng(0).normal(0, 0.02, sizes.size))  # ±2% multiplicative jitter
    _, b = bench.fit_exponent(sizes, 1e-5 * sizes * noise)
    assert b == pytest.approx(1.0, abs=0.05)
    # a fixed overhead the size of the smallest size's work pulls the fitted exponent below 1
    _, b_overhead = bench.fit_exponent(sizes, 1e-5 * (sizes + 384) * noise)
    assert 0.6 < b_overhead < 0.9


@pytest.mark.parametrize("x, y", [([384], [1.0]), ([384, 384], [1.0, 2.0]), ([384, 768], [1.0, 0.0]),
                                  ([0, 768], [1.0, 2.0]), ([384, 768], [1.0]), ([384, 768], [1.0, float("nan")])])
def test_fit_refuses_what_has_no_log_line(x, y):
    with pytest.raises(ValueError):
        bench.fit_exponent(x, y)


@pytest.mark.slow  # ~10 s: a subprocess that writes stores, trains and streams at tiny sizes
def test_quick_run_prints_three_exponents():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, env=env,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = re.findall(r"^(.*): exponent b=(-?\d+\.\d+) \(expected ~1: .+\)$", out.stdout, flags=re.M)
    assert [label for label, _ in lines] == ["step time vs m", "sweep time vs members", "stream time vs rows"]
    # the memory table: a row per store; streaming touches every page of the file through its map, so the
    # file-backed growth is at least the file, while the process's own (anonymous) memory stays small
    table = re.compile(r"^\s+(\d+)\s+(\d+)\s+[\d.]+\s+\d+\s+[\d.]*\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)\s+([\d.]+)$",
                       re.M)
    rows = [[float(v) for v in r] for r in table.findall(out.stdout)]
    assert [r[0] for r in rows] == [4000, 8000, 16000]
    n, file_mb, total, anon, anon_low, file_backed = rows[-1]
    # the peak holds the file-backed peak, less what anonymous memory fell below its start; 0.1 MB for the
    # printed rounding (a CI run had total 6.8 MB under file-backed 6.9 when the total was the kernel's
    # lazily updated high-water mark alone)
    assert anon_low <= 0 and file_backed >= 0.9 * file_mb and total >= file_backed + anon_low - 0.1
    assert anon < 0.5 * file_mb

"""benchmarks/bench_products.py: its smoke run prints both tables, and the oneDNN and BLAS products it
times agree (the ratio column is read only if they compute the same thing). No timing is asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sparsefeat import products

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not products.ONEDNN, reason="this torch has no oneDNN linear kernel")
def test_quick_run_prints_products_that_agree_and_whole_steps():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_products.py"), "--quick", "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    product_rows = [line for line in out.splitlines() if re.match(r"^(encoder|decoder|∂)", line)]
    assert len(product_rows) == 5
    assert all(float(line.split()[-1]) < 1e-5 for line in product_rows)  # max relative difference
    step_rows = [line.split() for line in out.splitlines() if re.match(r"^(relu-l1|topk) ", line)]
    # the path each step took, as the trainer picks it: d=32, m=64 is under the sparse floor; topk k/m = 1/16
    assert [(row[0], row[6]) for row in step_rows] == [("relu-l1", "dense"), ("topk", "sparse")]

"""benchmarks/bench_gpu.py in its CPU smoke mode: every part runs through the real trainer and store, and
prints its lines (the GPU numbers themselves come from benchmarks/gpu_check.sh on a CUDA machine)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
B, D, M, K = 256, 64, 256, 16  # k <= m/8: topk's auto path is the sparse one


def test_cpu_smoke_run_prints_every_rate():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu",
                           "--d", str(D), "--m", str(M), "--batch", str(B), "--k", str(K), "--steps", "3",
                           "--warmup", "1", "--rows", "4096", "--stream-batches", "3", "--threads", "1"],
                          capture_output=True, text=True, timeout=60, env=env)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "FAILED" not in out
    assert "1. bf16 matmul 8192^3: skipped: no CUDA" in out
    assert "pinned host->device copy: skipped: no CUDA" in out
    for arch in ("relu-l1", "topk"):
        line = re.search(rf"{arch} +\(.*\) dense path: +([\d.]+) steps/s +([\d.]+) TFLOP/s .*target >= 0\.5", out)
        assert line, out
        steps, tflops = float(line[1]), float(line[2])
        assert steps > 0
        # the rate is steps/s × 12·B·d·m (printed to 3 decimals)
        assert abs(tflops - steps * 12 * B * D * M / 1e12) <= 6e-4
    assert re.search(r"topk +\(k=16\) auto path ran sparse: .* steps/s .*x dense", out), out
    assert re.search(r"relu-l1 .* auto path: dense \(L0/m", out), out
    assert re.search(r"trainer stream .*later epochs.*: +[\d.]+ GB/s .*target >= 0\.7", out), out
    assert re.search(r"device cache .*train split [\d.]+ GB loaded in [\d.]+ s", out), out
    assert re.search(r"device-cached stream, 3 batches: +[\d.]+ GB/s .*target >= 0\.7", out), out
    assert re.search(r"Sweep\.train from the store +[\d.]+ steps/s.*ratio [\d.]+", out), out

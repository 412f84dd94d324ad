#!/usr/bin/env bash
# GPU check of the sweep trainer, for a session lent a CUDA machine (one H200). Under 5 minutes.
#
#   bash benchmarks/gpu_check.sh          # from anywhere; PYTHON=... to choose the interpreter
#
# It uses the machine's own python and torch (there is no venv and no network there) and imports
# sparsefeat from this tree (PYTHONPATH), so nothing is installed. It needs numpy, scipy, h5py, tqdm
# and pytest beside a CUDA torch; if some are missing it installs them from wheels carried in
# .gpu-wheels/ (prepare them here with: pip download --only-binary=:all: --python-version <the GPU
# machine's X.Y> -d .gpu-wheels h5py scipy tqdm pytest), into .gpu-site/, else it stops and says so.
#
# Steps: versions; the trainer's CUDA tests (CUDA vs CPU, bf16 autocast + pinned prefetch +
# torch.compile, no host synchronisation in the step loop); bench_gpu.py (bf16 matmul TFLOP/s, the
# trainer's FLOP rate at d=768 m=24576 batch 8192 against it, the store stream against host-to-device
# bandwidth; expected under a minute, not yet run on a GPU); the CPU-equivalence tests on this
# machine; a torchrun/NCCL sweep against one process; bench_train.py on cuda. Each step has its own
# time limit and prints its numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
status=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda",
torch.version.cuda, "| available", torch.cuda.is_available())' || exit 1

missing=$("$PY" -c 'import importlib.util as u
print(" ".join(m for m in ("numpy", "scipy", "h5py", "tqdm", "pytest") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
  if [ -d .gpu-wheels ]; then
    echo "== installing $missing from .gpu-wheels into .gpu-site"
    "$PY" -m pip install -q --no-index --find-links .gpu-wheels --target .gpu-site $missing || exit 1
    export PYTHONPATH="$PWD/.gpu-site:$PYTHONPATH"
  else
    echo "missing python packages: $missing; carry wheels in .gpu-wheels/ (see the top of this script)"
    exit 1
  fi
fi
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to check")' || exit 1

echo "== trainer tests on CUDA"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_train.py -k cuda --durations=5 || status=1

echo "== bench_gpu.py: bf16 matmul rate, SAE training FLOP rate against it, store stream against H2D copy"
timeout 120 "$PY" benchmarks/bench_gpu.py --device cuda || status=1

echo "== sweep = solo and resume = uninterrupted (CPU code path, this machine)"
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_train.py -k "alone or resume_after" || status=1

echo "== torchrun with NCCL: members across ranks on every GPU here, against one process"
# One rank per GPU; with a single GPU the one rank is told to take the distributed path anyway
# (SPARSEFEAT_DISTRIBUTED=1), so NCCL init, set_device and the object gathers still run.
ngpu=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
nccl_dir=$(mktemp -d)
sweep_args="--sizes 0.5x,1x,2x,4x --seeds 0,1 --steps 200 --batch-size 256 --device auto --no-progress"
if timeout 60 "$PY" -m sparsefeat toy sparse --out "$nccl_dir/toy.h5" --n-samples 20000 --n-features 64 --d 32 --no-progress &&
   timeout 90 "$PY" -m sparsefeat sweep "$nccl_dir/toy.h5" --out "$nccl_dir/one.h5" $sweep_args >/dev/null &&
   SPARSEFEAT_DISTRIBUTED=1 timeout 120 "$PY" -m torch.distributed.run --nproc-per-node "$ngpu" -m sparsefeat sweep \
       "$nccl_dir/toy.h5" --out "$nccl_dir/nccl.h5" $sweep_args >/dev/null; then
  "$PY" - "$nccl_dir/one.h5" "$nccl_dir/nccl.h5" <<'EOF' || status=1
import sys
import numpy as np
from sparsefeat.results import load_results
with load_results(sys.argv[1]) as a, load_results(sys.argv[2]) as b:
    assert [m.id for m in a.members] == [m.id for m in b.members]
    worst = max(float(np.abs(a.decoder(m.id) - b.decoder(m.id)).max()) for m in a.members)
    print(f"{len(b.members)} members over NCCL ranks; largest decoder difference vs one process {worst:.2e}")
    assert worst < 1e-3, "the distributed sweep differs from the single-process one"
EOF
else
  echo "NCCL sweep failed"; status=1
fi
rm -rf "$nccl_dir"

echo "== bench_train.py on cuda"
timeout 100 "$PY" benchmarks/bench_train.py --device cuda --rounds 20 --per-round 10 --repeats 2 --sweep-steps 300 || status=1

exit $status

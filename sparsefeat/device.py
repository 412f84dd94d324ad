"""Where tensors go: one rule for every module that runs torch (trainer, harvest)."""

from __future__ import annotations

import torch

from .errors import SparsefeatError


def resolve_device(name: str) -> torch.device:
    """`auto` means CUDA when torch sees one, else CPU; anything else must name a usable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SparsefeatError(f"unknown device {name!r} (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparsefeatError(f"device {name!r} asked for, but torch sees no CUDA device here")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there a bf16 matmul ran 4.5x
    the float32 rate (benchmarks/RESULTS.md); elsewhere oneDNN emulates it, slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

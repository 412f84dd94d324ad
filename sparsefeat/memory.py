"""What a sweep needs in memory and on disk, estimated from its shapes before anything is allocated,
and what the device has free (a sweep that cannot fit is refused with one line: the kernel's OOM
killer says nothing)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SparsefeatError
from .files import human_bytes
from .sweep_config import MemberSpec

STACK_ELEMENTS = 1 << 26  # most code entries (members × batch × m) one stack holds at once (~256 MB)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a sweep needs at its peak, by part (an estimate from shapes, within tens of percent)."""

    weights: int  # parameters, gradients and Adam's two moments of every member
    codes: int  # the largest stack's activations and their gradients for one batch
    evaluation: int  # per-row errors of every member, the statistics sample, exported weights
    checkpoint: int  # size of one checkpoint file

    @property
    def total(self) -> int:
        return self.weights + self.codes + self.evaluation

    def describe(self) -> str:
        return (f"about {human_bytes(self.total)} (weights and Adam state {human_bytes(self.weights)}, codes per "
                f"batch {human_bytes(self.codes)}, evaluation {human_bytes(self.evaluation)})")


def memory_estimate(specs: list[MemberSpec], d: int, batch_size: int, test_rows: int, sample_rows: int,
                    latent_shards: int = 1) -> MemoryEstimate:
    """The memory of a sweep from its shapes (float32 everywhere, 4 bytes), before anything is allocated.
    With `latent_shards` processes each holding a slice of every dictionary (--distribute-latents), the
    weights, Adam state and codes are this process's share (m / latent_shards latents); the evaluation
    and the checkpoint still hold whole dictionaries (rank 0 joins the slices)."""
    params = [2 * s.size * d + s.size + d for s in specs]
    share = [-(-s.size // latent_shards) for s in specs]  # latents one process holds, rounded up
    by_size: dict[int, int] = {}
    for m in share:
        by_size[m] = by_size.get(m, 0) + 1
    # per stack: pre-activations, codes and their gradients [G, B, m]; x̂ and its gradient [G, B, d];
    # a stack holds at most STACK_ELEMENTS codes, so a size's members may be split over several stacks
    codes = max(4 * min(g * batch_size * m, max(STACK_ELEMENTS, batch_size * m)) + 2 * g * batch_size * d
                for m, g in by_size.items()) * 4
    evaluation = (2 * len(specs) * test_rows + sum(params)) * 4 + 3 * sample_rows * d * 8
    return MemoryEstimate(weights=16 * sum(2 * m * d + m + d for m in share), codes=codes, evaluation=evaluation,
                          checkpoint=12 * sum(params) + 8 * sum(s.size for s in specs))


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process on `device`: CUDA's free memory, or the kernel's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(estimate: MemoryEstimate, device: torch.device, out: Path) -> None:
    """Refuse a sweep that cannot fit, before allocating (the kernel's OOM killer says nothing)."""
    free = available_memory(device)
    if free is not None and estimate.total > free:
        raise SparsefeatError(f"{out}: this sweep needs {estimate.describe()} but {device} has "
                            f"{human_bytes(free)} available; use smaller --sizes, fewer members or a smaller "
                            "--batch-size")

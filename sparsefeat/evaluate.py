"""Evaluating the stacks of a sweep on a stream of rows: `metrics.RunningMetrics` per stack (the same
formulas as the metric functions, accumulated over batches), plus the training objective and, when
asked, every row's squared error."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from . import metrics
from .sae import SAE


@dataclass
class StackEvaluation:
    """One stack's numbers on the evaluated rows (arrays with a leading member axis G)."""

    rows: int
    metrics: dict[str, np.ndarray]  # metric name -> [G]: mse, fvu, l1, l0, dead_fraction, shrinkage, loss
    frequency: np.ndarray  # [G, m] share of rows on which each latent fired
    row_sse: np.ndarray | None  # [G, rows] ‖x − x̂‖² per row, in the order of the stream


@torch.no_grad()
def evaluate_stacks(stacks: list[SAE], batches: Iterable[torch.Tensor], scale: float,
                    autocast: Callable = nullcontext, keep_rows: bool = True) -> list[StackEvaluation]:
    """Stream raw batches [B, d] (scaled here by `scale`) through every stack, in one pass.

    The objective ("loss") is the row-weighted mean of each batch's mse + penalty (exact: both are
    means over rows)."""
    running = [metrics.RunningMetrics() for _ in stacks]
    loss = [torch.zeros(st.members, dtype=torch.float64) for st in stacks]
    row_sse: list[list[torch.Tensor]] = [[] for _ in stacks]
    for x in batches:
        x = x * scale
        for i, st in enumerate(stacks):
            with autocast():
                x_hat, codes = st(x)
            x_hat, codes = x_hat.float(), codes.float()
            err = running[i].add(x, x_hat, codes)
            loss[i] = loss[i] + ((err.mean(1) + st.penalty(codes)).double() * x.shape[0]).cpu()
            if keep_rows:
                row_sse[i].append(err)
    out = []
    for i, r in enumerate(running):
        values = r.result()
        values["loss"] = loss[i].numpy() / r.rows
        rows = torch.cat(row_sse[i], dim=1).cpu().numpy().astype(np.float32) if row_sse[i] else None
        out.append(StackEvaluation(rows=r.rows, metrics=values, frequency=r.frequency(), row_sse=rows))
    return out


def take_rows(stream: Iterable[torch.Tensor], n: int):
    """The first n rows of a stream of batches."""
    left = n
    for b in stream:
        if left <= 0:
            return
        yield b[:left]
        left -= b.shape[0]

"""Metrics: small pure functions, arrays in, numbers out.

Every function accepts torch tensors or numpy arrays (anything `torch.as_tensor` takes) and does not
modify its inputs. Shapes: `x`, `x_hat` are [rows, d]; `codes` are [rows, m]; dictionaries (`a`, `b`,
`decoder`, `ground_truth`) are [atoms, d] with one atom per row (the layout of every decoder in sparsefeat).
The trainer uses them at evaluation, the analysis on results files, so both compute the same thing.

Matching limit: one-to-one (Hungarian) matching costs O(n^3) time and an [n_a, n_b] matrix, so it is
done only when both dictionaries have at most `HUNGARIAN_MAX_ROWS` (8192) rows. `hungarian_match`
raises `ValueError` above that; the functions that return a single number return NaN instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch

HUNGARIAN_MAX_ROWS = 8192
_CHUNK_ROWS = 2048  # rows of `a` per block when a full cosine matrix would be too large


def _t(a) -> torch.Tensor:
    """A float tensor view of an array or tensor (float64 for float64 input, else float32)."""
    t = torch.as_tensor(a)
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t


# ---- reconstruction ------------------------------------------------------------------------


def row_sse(x, x_hat) -> torch.Tensor:
    """Per-row squared error ‖x_r − x̂_r‖², shape [rows] (the only metric that returns a tensor)."""
    x, x_hat = _t(x), _t(x_hat)
    return (x - x_hat).pow(2).sum(-1)


def mse(x, x_hat) -> float:
    """MSE = (1/N) Σ_r ‖x_r − x̂_r‖²: squared error summed over dimensions, averaged over rows.

    With inputs scaled to unit mean squared norm this is the share of E‖x‖² left unexplained.
    """
    return float(row_sse(x, x_hat).mean())


def fvu(x, x_hat) -> float:
    """Fraction of variance unexplained: FVU = Σ_r ‖x_r − x̂_r‖² / Σ_r ‖x_r − x̄‖², x̄ the mean row."""
    x, x_hat = _t(x).double(), _t(x_hat).double()
    total = (x - x.mean(0)).pow(2).sum()
    return float((x - x_hat).pow(2).sum() / total) if total > 0 else math.nan


def explained_variance(x, x_hat) -> float:
    """Explained variance = 1 − FVU."""
    return 1.0 - fvu(x, x_hat)


def shrinkage(x, x_hat) -> float:
    """Shrinkage = E‖x̂‖ / E‖x‖ (mean norms over rows); below 1 when the L1 penalty shrinks codes."""
    x, x_hat = _t(x), _t(x_hat)
    denom = x.norm(dim=-1).mean()
    return float(x_hat.norm(dim=-1).mean() / denom) if denom > 0 else math.nan


# ---- sparsity ------------------------------------------------------------------------------


def l0(codes) -> float:
    """L0 = (1/N) Σ_r #{j : c_rj ≠ 0}: the mean number of non-zero latents per row."""
    return float((_t(codes) != 0).sum(-1).double().mean())


def l1(codes) -> float:
    """L1 = (1/N) Σ_r Σ_j |c_rj|: the mean L1 norm of a row's code (not divided by m)."""
    return float(_t(codes).abs().sum(-1).double().mean())


def firing_counts(codes) -> torch.Tensor:
    """Per-latent count of rows on which it is non-zero, shape [m]."""
    return (_t(codes) != 0).sum(0)


def dead_fraction(counts_or_codes) -> float:
    """Dead fraction = #{j : latent j never fires} / m.

    Takes either per-latent firing counts or frequencies [m], or the codes [rows, m] themselves.
    """
    t = _t(counts_or_codes)
    counts = firing_counts(t) if t.ndim == 2 else t
    return float((counts == 0).double().mean())


# ---- the same metrics over a stream of batches ------------------------------------------------


class RunningMetrics:
    """MSE, FVU, L1, L0, shrinkage and dead fraction accumulated over batches of rows, for G
    dictionaries at once, equal (to float rounding) to the functions above on the concatenated rows.

    `add(x [B, d], x_hat [G, B, d], codes [G, B, m])` adds a batch (float64 sums, so nothing depends on
    how the rows were batched) and returns the batch's `row_sse` [G, B]; `result()` gives one dict of
    numpy arrays [G] per metric. FVU uses Σ‖x − x̄‖² = Σ‖x‖² − ‖Σx‖²/N, which needs no second pass.
    """

    def __init__(self):
        self.rows = 0
        self.x_sum = self.x_sq = self.x_norm = 0.0  # of the data
        self.sse = self.l1 = self.norm_hat = 0.0  # per dictionary [G]
        self.fired = 0  # per dictionary and latent [G, m]

    @torch.no_grad()
    def add(self, x, x_hat, codes) -> torch.Tensor:
        x, x_hat, codes = _t(x), _t(x_hat), _t(codes)
        xd = x.double()
        self.rows += x.shape[0]
        self.x_sum = self.x_sum + xd.sum(0)
        self.x_sq = self.x_sq + xd.pow(2).sum()
        self.x_norm = self.x_norm + torch.linalg.vector_norm(xd, dim=-1).sum()
        err = row_sse(x, x_hat)  # [G, B]
        self.sse = self.sse + err.sum(-1, dtype=torch.float64)
        self.l1 = self.l1 + codes.abs().sum((-2, -1), dtype=torch.float64)
        self.norm_hat = self.norm_hat + torch.linalg.vector_norm(x_hat, dim=-1).sum(-1, dtype=torch.float64)
        self.fired = self.fired + firing_counts_per_member(codes)
        return err

    def frequency(self) -> np.ndarray:
        """[G, m]: share of the rows on which each latent fired."""
        return (_numpy(self.fired) / self.rows).astype(np.float32)

    def result(self) -> dict[str, np.ndarray]:
        n = self.rows
        total_var = float(_numpy(self.x_sq - (self.x_sum ** 2).sum() / n))
        sse, fired = _numpy(self.sse), _numpy(self.fired)
        return dict(mse=sse / n, fvu=sse / total_var if total_var > 0 else np.full_like(sse, math.nan),
                    l1=_numpy(self.l1) / n, l0=fired.sum(-1) / n,
                    dead_fraction=np.array([dead_fraction(f) for f in fired]),
                    shrinkage=_numpy(self.norm_hat) / float(_numpy(self.x_norm)))


def firing_counts_per_member(codes) -> torch.Tensor:
    """[G, B, m] codes -> [G, m]: per dictionary, the rows on which each latent is non-zero."""
    return torch.count_nonzero(_t(codes), dim=-2)


def _numpy(v) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


# ---- comparing dictionaries -----------------------------------------------------------------


def _unit_rows(a) -> torch.Tensor:
    a = _t(a)
    return a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # a zero row has cosine 0 with all


def cosine_matrix(a, b) -> torch.Tensor:
    """cos(a_i, b_j) for every pair of rows, shape [n_a, n_b]."""
    return _unit_rows(a) @ _unit_rows(b).T


def max_cosines(a, b) -> torch.Tensor:
    """For each row of `a`, its largest cosine with any row of `b`, shape [n_a] (computed in blocks)."""
    ua, ub = _unit_rows(a), _unit_rows(b)
    out = torch.empty(ua.shape[0], dtype=ua.dtype)
    for s in range(0, ua.shape[0], _CHUNK_ROWS):
        out[s:s + _CHUNK_ROWS] = (ua[s:s + _CHUNK_ROWS] @ ub.T).amax(dim=1)
    return out


def mmcs(a, b) -> float:
    """Mean max cosine similarity: MMCS(a, b) = (1/n_a) Σ_i max_j cos(a_i, b_j). Not symmetric.

    With ground truth: mmcs(ground_truth, decoder) (how well every true feature is found); between
    dictionaries: mmcs(smaller, larger).
    """
    return float(max_cosines(a, b).double().mean())


def hungarian_match(a, b, max_rows: int = HUNGARIAN_MAX_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of rows of `a` to rows of `b` maximising the total cosine.

    Returns (pairs [p, 2] of (row of a, row of b), cosines [p]) with p = min(n_a, n_b), sorted by
    row of a. Raises ValueError when either side has more than `max_rows` rows.
    """
    return _assign(cosine_matrix(a, b).double().numpy(), max_rows)


def _assign(score: np.ndarray, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """linear_sum_assignment maximising `score`: (pairs [p, 2], score of each pair)."""
    n_a, n_b = score.shape
    if max(n_a, n_b) > max_rows:
        raise ValueError(f"Hungarian matching is limited to {max_rows} rows per side, got {n_a} x {n_b}")
    # imported here: scipy.optimize adds ~50 MB and 0.6 s to every process that trains (RESULTS.md)
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(score, maximize=True)
    return np.stack([rows, cols], axis=1).astype(np.int64), score[rows, cols]


def shared_fraction(decoder_a, decoder_b, encoder_a=None, encoder_b=None, threshold: float = 0.7,
                    max_rows: int = HUNGARIAN_MAX_ROWS) -> float:
    """Share of the latents of `a` that have a one-to-one partner in `b`.

    Latents are matched one-to-one (Hungarian) maximising cos_dec + cos_enc (decoder cosine only when
    encoders are not given); a matched pair counts as shared when cos_dec ≥ threshold and, with
    encoders, cos_enc ≥ threshold. shared = #shared pairs / n_a. NaN above `max_rows`.
    (Paulo & Belrose 2025 use this with threshold 0.7 to compare seeds.)
    """
    n_a, n_b = _t(decoder_a).shape[0], _t(decoder_b).shape[0]
    if max(n_a, n_b) > max_rows:
        return math.nan
    cos_dec = cosine_matrix(decoder_a, decoder_b).double().numpy()
    if encoder_a is None or encoder_b is None:
        _, dec = _assign(cos_dec, max_rows)
        return float((dec >= threshold).sum() / n_a)
    cos_enc = cosine_matrix(encoder_a, encoder_b).double().numpy()
    pairs, _ = _assign(cos_dec + cos_enc, max_rows)
    ok = (cos_dec[pairs[:, 0], pairs[:, 1]] >= threshold) & (cos_enc[pairs[:, 0], pairs[:, 1]] >= threshold)
    return float(ok.sum() / n_a)


def recovered_fraction(ground_truth, decoder, threshold: float = 0.9) -> float:
    """Share of ground-truth features g with some decoder atom at cos(g, atom) ≥ threshold."""
    return float((max_cosines(ground_truth, decoder) >= threshold).double().mean())


def hungarian_summary(a, b, threshold: float = 0.9, max_rows: int = HUNGARIAN_MAX_ROWS) -> tuple[float, float]:
    """(mean cosine of the one-to-one matched pairs, share of rows of `a` whose pair has cos ≥ threshold).

    The one-to-one variant of MMCS between a dictionary and the next larger one. (NaN, NaN) above
    `max_rows`.
    """
    n_a = _t(a).shape[0]
    try:
        _, cos = hungarian_match(a, b, max_rows)
    except ValueError:
        return math.nan, math.nan
    return float(cos.mean()), float((cos >= threshold).sum() / n_a)

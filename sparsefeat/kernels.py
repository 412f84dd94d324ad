"""Sparse decode and sparse gradients for stacks of SAEs whose codes have few non-zeros per row.

A stack's codes are held as `SparseCodes`: the non-zeros in row-major order, each with its row
(member g, batch row b: row g·B + b) and its latent (member g's latent i: g·m + i, a row of the
[G·m, d] weight view), so one call serves the whole stack. Topk keeps k per row; relu-l1 whatever
its ReLU lets through.

The dense path spends 2·B·m·d FLOPs on each of: the encoder matmul, the decoder matmul, the decoder's
weight gradient, the gradient of the codes, the encoder's weight gradient (and, for topk, the gradient
of the centred input). With n non-zeros per row all of these but the encoder matmul cost 2·B·n·d:

- `sparse_decode`: x̂ = Σ values · W_d[latent] + b (`embedding_bag`); its backward gives the values'
  gradient by gathered dot products and the decoder gradient Cᵀ·ĝ as one sparse CSR × dense product;
- `gather_linear`: the pre-activations at the non-zeros, read from the dense forward matmul, with a
  backward that touches only those latents: encoder weight gradient Sᵀ·x (sparse CSR × dense), bias
  gradient by index_add, input gradient by `embedding_bag`.

Both weight gradients group the entries by latent: one stable sort per step, shared (`by_latent`).
Against `embedding_bag`'s own weight backward and a COO product, a relu-l1 sparse step at L0/m = 0.12
(m=1536, 2 cores) went from 139 to 130 ms in float32 (RESULTS.md, 2026-12-02). Values and their gradients
stay float32 under bf16 autocast: gathers and sparse products in bf16 were slower on CPU, not faster
(with both changes that step under autocast went from 177 to 109 ms).

Same numbers as the dense path to float tolerance (tests/test_sae.py); where the sparse path pays is
measured by benchmarks/bench_sparse.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SparseCodes:
    """Where a [G, B, m] code tensor is non-zero: `rows` and `latents` [N] (flat, see the module
    docstring), `offsets` [G·B] (where each row's entries start), and the shape."""

    rows: torch.Tensor
    latents: torch.Tensor
    offsets: torch.Tensor
    G: int
    B: int
    m: int
    _by_latent: tuple | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_top(cls, index: torch.Tensor, m: int) -> "SparseCodes":
        """The k latents [G, B, k] each row keeps (topk)."""
        G, B, k = index.shape
        member = torch.arange(G, device=index.device).mul_(m).view(G, 1, 1)
        rows = torch.arange(G * B, device=index.device)
        return cls(rows.repeat_interleave(k), (index + member).reshape(-1), rows * k, G, B, m)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "SparseCodes":
        """The True entries of a [G, B, m] mask (relu-l1: where the pre-activation is positive)."""
        G, B, m = mask.shape
        flat = mask.reshape(G * B, m)
        rows, latent = flat.nonzero(as_tuple=True)  # row-major: each row's entries together, in order
        member = torch.div(rows, B, rounding_mode="floor")
        counts = flat.sum(-1)
        offsets = torch.zeros_like(counts)
        offsets[1:] = counts.cumsum(0)[:-1]
        return cls(rows, latent + member * m, offsets, G, B, m)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """The entries [N] of a [G, B, m] tensor at the non-zeros."""
        return dense.reshape(-1)[self.rows * self.m + self.latents % self.m]

    def fired(self, values: torch.Tensor) -> torch.Tensor:
        """[G, m] bool: latents with a positive value in some row."""
        hits = torch.zeros(self.G * self.m, device=values.device)
        hits.index_add_(0, self.latents, (values > 0).to(hits.dtype))
        return hits.view(self.G, self.m) > 0

    def per_member_sum(self, values: torch.Tensor) -> torch.Tensor:
        """[G]: Σ of values over each member's rows."""
        out = torch.zeros(self.G, device=values.device, dtype=values.dtype)
        return out.index_add_(0, torch.div(self.rows, self.B, rounding_mode="floor"), values)

    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order [N], starts [G·m + 1]): the entries sorted by latent (stable, so rows ascend within
        each), and where each latent's entries start in that order; computed once."""
        if self._by_latent is None:
            _, order = torch.sort(self.latents, stable=True)
            starts = torch.zeros(self.G * self.m + 1, dtype=torch.long, device=self.latents.device)
            starts[1:] = torch.bincount(self.latents, minlength=self.G * self.m).cumsum(0)
            self._by_latent = (order, starts)
        return self._by_latent

    def transposed_mm(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """[G·m, d] = Sᵀ · dense: for each latent, Σ over its entries of value · dense[row]; S is the
        [G·B, G·m] matrix of `values` [N] at the entries, dense [G·B, d]."""
        order, starts = self.by_latent()
        with warnings.catch_warnings():  # "CSR support is in beta": a CSR × dense product is all we ask of it
            warnings.simplefilter("ignore", UserWarning)
            s_t = torch.sparse_csr_tensor(starts, self.rows[order], values.float()[order],
                                          (self.G * self.m, self.G * self.B), check_invariants=False)
        return s_t @ dense.float()

    def bag(self, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """[G·B, d]: each row's Σ values · weight[latent] (weight [G·m, d])."""
        return F.embedding_bag(self.latents, weight, self.offsets, per_sample_weights=values.to(weight.dtype),
                               mode="sum")


class SparseDecode(torch.autograd.Function):
    """[G·B, d] = Σ over each row's entries of value · weight[latent] (weight [G·m, d]); the backward
    touches only the entries' latents."""

    @staticmethod
    def forward(ctx, values, weight, codes):
        ctx.save_for_backward(values, weight)
        ctx.codes = codes
        return codes.bag(values, weight)

    @staticmethod
    def backward(ctx, grad_out):
        values, weight = ctx.saved_tensors
        c = ctx.codes
        grad_out = grad_out.contiguous()
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:  # each entry's ⟨grad_out[row], weight[latent]⟩ (embedding_bag's own kernel)
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_out, weight.detach().to(grad_out.dtype), c.latents, c.offsets, c.rows, 0).to(values.dtype)
        if ctx.needs_input_grad[1]:  # Cᵀ · grad_out
            grad_weight = c.transposed_mm(values.detach(), grad_out).to(weight.dtype)
        return grad_values, grad_weight, None


def sparse_decode(values: torch.Tensor, codes: SparseCodes, decoder: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Values [N] at codes, decoder [G, m, d] -> [G, B, d] = Σ values · W_d[latent] (+ bias [G, d])."""
    G, m, d = decoder.shape
    out = SparseDecode.apply(values, decoder.reshape(G * m, d), codes).view(G, codes.B, d)
    return out if bias is None else out + bias[:, None, :]


class GatherLinear(torch.autograd.Function):
    """The pre-activations x[g, b] · W[g, i] + bias[g, i] at the non-zeros, read from `pre` (the same
    product, computed densely without autograd by the caller); the backward touches only those latents."""

    @staticmethod
    def forward(ctx, x, weight, bias, pre, codes):
        ctx.save_for_backward(x, weight)
        ctx.codes = codes
        return codes.gather(pre).float()

    @staticmethod
    def backward(ctx, grad_values):
        x, weight = ctx.saved_tensors
        c = ctx.codes
        G, m, d = weight.shape
        grad_values = grad_values.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # Σ over the row's non-zeros of g · W[latent]
            grad_x = c.bag(grad_values, weight.detach().reshape(G * m, d)).view(G, c.B, d)
            if x.shape[0] == 1 and G > 1:  # x was broadcast over members
                grad_x = grad_x.sum(0, keepdim=True)
        if ctx.needs_input_grad[1]:  # Sᵀ x, S the [G·B, G·m] sparse matrix of upstream gradients
            xs = x.expand(G, c.B, d).reshape(G * c.B, d)
            grad_weight = c.transposed_mm(grad_values, xs).view(G, m, d).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(G * m, device=grad_values.device, dtype=grad_values.dtype)
            grad_bias = grad_bias.index_add_(0, c.latents, grad_values).view(G, m)
        return grad_x, grad_weight, grad_bias, None, None


def gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pre: torch.Tensor,
                  codes: SparseCodes) -> torch.Tensor:
    """x [G or 1, B, d], weight [G, m, d], bias [G, m], pre [G, B, m] = x·Wᵀ + bias (no autograd)
    -> the pre-activations at the non-zeros [N], differentiable in x, weight and bias."""
    return GatherLinear.apply(x, weight, bias, pre, codes)

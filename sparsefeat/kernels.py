"""Sparse decode and sparse gradients for stacks of SAEs whose codes have few non-zeros per row.

A stack's codes are held as (values, latents): member g, row b keeps `values[g, b, j]` at latent
`latents[g, b, j]`. Members are laid side by side in one flat index space (member g's latent i is row
g·m + i of the [G·m, d] weight view), so one call serves the whole stack.

The dense path spends 2·B·m·d FLOPs on each of: the encoder matmul, the decoder matmul, the decoder's
weight gradient, the gradient of the codes, the encoder's weight gradient (and, for topk, the gradient
of the centred input). With n non-zeros per row all of these but the encoder matmul cost 2·B·n·d:

- `sparse_decode`: x̂ = Σ_j values_j · W_d[latents_j] + b (`embedding_bag`, whose backward gives the
  decoder gradient only on the touched rows and the values' gradient by gathered dot products);
- `gather_linear`: the pre-activations at the kept latents, taken from the dense forward matmul,
  with a backward that touches only the kept latents: encoder weight gradient S^T·x as one sparse
  COO × dense product, bias gradient by index_add, input gradient by `embedding_bag`.

Same numbers as the dense path to float tolerance (tests/test_sae.py); which path pays is measured in
benchmarks/bench_sparse.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flat_latents(latents: torch.Tensor, size: int) -> torch.Tensor:
    """[G, B, n] member-local latents -> [G·B, n] indices into the [G·m, d] weight view."""
    G = latents.shape[0]
    offsets = torch.arange(G, device=latents.device).mul_(size).view(G, 1, 1)
    return (latents + offsets).reshape(-1, latents.shape[-1])


def sparse_decode(values: torch.Tensor, latents: torch.Tensor, decoder: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """[G, B, n] values at latents, decoder [G, m, d] -> [G, B, d] = Σ_j values·W_d[latents] (+ bias)."""
    G, m, d = decoder.shape
    B, n = values.shape[1], values.shape[2]
    out = F.embedding_bag(flat_latents(latents, m), decoder.reshape(G * m, d),
                          per_sample_weights=values.reshape(G * B, n).to(decoder.dtype), mode="sum")
    out = out.view(G, B, d)
    return out if bias is None else out + bias[:, None, :]


class GatherLinear(torch.autograd.Function):
    """values[g, b, j] = x[g, b] · W[g, i] + bias[g, i] at i = latents[g, b, j], read from `pre` (the
    same product, computed densely without autograd by the caller); the backward touches only the
    gathered latents."""

    @staticmethod
    def forward(ctx, x, weight, bias, pre, latents):
        ctx.save_for_backward(x, weight, latents)
        ctx.bias_shape = bias.shape
        return pre.gather(-1, latents)

    @staticmethod
    def backward(ctx, grad_values):
        x, weight, latents = ctx.saved_tensors
        G, m, d = weight.shape
        B, n = latents.shape[1], latents.shape[2]
        grad_values = grad_values.contiguous()
        flat = flat_latents(latents, m)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # Σ_j g_j · W[latent_j]
            grad_x = F.embedding_bag(flat, weight.detach().reshape(G * m, d),
                                     per_sample_weights=grad_values.reshape(G * B, n).to(weight.dtype),
                                     mode="sum").view(G, B, d)
            if x.shape[0] == 1 and G > 1:  # x was broadcast over members
                grad_x = grad_x.sum(0, keepdim=True)
        if ctx.needs_input_grad[1]:  # S^T x, S the [G·B, G·m] sparse matrix of upstream gradients
            rows = torch.arange(G * B, device=flat.device).repeat_interleave(n)
            s_t = torch.sparse_coo_tensor(torch.stack([flat.reshape(-1), rows]), grad_values.reshape(-1),
                                          (G * m, G * B), check_invariants=False)
            xs = x.expand(G, B, d).reshape(G * B, d).to(grad_values.dtype)
            grad_weight = torch.sparse.mm(s_t, xs).view(G, m, d).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(G * m, device=grad_values.device, dtype=grad_values.dtype)
            grad_bias.index_add_(0, flat.reshape(-1), grad_values.reshape(-1))
            grad_bias = grad_bias.view(ctx.bias_shape)
        return grad_x, grad_weight, grad_bias, None, None


def gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pre: torch.Tensor,
                  latents: torch.Tensor) -> torch.Tensor:
    """x [G or 1, B, d], weight [G, m, d], bias [G, m], pre [G, B, m] = x·Wᵀ + bias (no autograd),
    latents [G, B, n] -> the pre-activations at latents [G, B, n], differentiable in x, weight, bias."""
    return GatherLinear.apply(x, weight, bias, pre, latents)

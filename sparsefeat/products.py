"""The dense products of a stack of SAEs, y[g] = a[g] · W[g]ᵀ + b[g], on the fastest CPU kernel.

On the CPU, `torch.baddbmm` and autograd's float32 products run on the BLAS torch links (MKL). On this
project's AMD EPYC (Zen 5) MKL's sgemm ran at 145-190 GFLOP/s on 2 cores while oneDNN's float32
matmul (`torch.ops.mkldnn._linear_pointwise`, the kernel torch's own inductor uses for linear layers)
ran the same shapes at 250-440, with float32 accuracy (max relative error 1e-6 against float64, as
MKL's 5e-7): each of a step's five products ([4096, 384] × [384, 1536] and the backward shapes) took
11-18 ms instead of 26-32 (RESULTS.md, 2026-12-02). `stacked_linear` runs those products, forward
and backward, one oneDNN call per member, where that applies (`use_onednn`); elsewhere (CUDA, bf16
autocast, which already runs oneDNN's bf16 kernels, torch.compile, products too small to gain) it is
one `baddbmm`, as before. One call per member also keeps each member's numbers independent of the
stack it is in (a sweep's member equals the same SAE trained alone, bit for bit).
"""

from __future__ import annotations

import torch

# below this many multiply-adds per member (rows × in × out) one baddbmm over the stack beats a call per
# member (the per-call overhead of oneDNN; measured in benchmarks/bench_products.py)
ONEDNN_MIN_WORK = 2**23

# False sends every product to baddbmm (for A/B measurements: benchmarks/bench_products.py)
ONEDNN = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()


def _onednn(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [B, in] · weightᵀ ([out, in], any strides) + bias [out] -> [B, out], by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, weight, bias, "none", [], "")


def use_onednn(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `stacked_linear` runs a call per member on oneDNN (float32 on the CPU, large enough)."""
    return (ONEDNN and a.device.type == "cpu" and a.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and a.shape[-2] * weight.shape[-1] * weight.shape[-2] >= ONEDNN_MIN_WORK)


def _outer(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """uᵀ · v [P, Q] for u [B, P], v [B, Q]: oneDNN is up to 2x faster with the wider side as the output's
    columns (at m = 6144, d = 384: 70 against 148 ms), so that side is put there, then transposed back."""
    if v.shape[1] >= u.shape[1]:
        return _onednn(u.t(), v.t())
    return _onednn(v.t(), u.t()).t()


def _member(a: torch.Tensor, g: int) -> torch.Tensor:
    return a if a.dim() == 2 else a[g]


class StackedLinear(torch.autograd.Function):
    """y[g] = a[g] · w[g] + b[g] per member, each product a oneDNN call. `a` [B, in] (shared by every
    member) or [G, B, in]; `weight` [G, out, in] (`transposed` False) or [G, in, out] (True); `bias`
    [G, out] or None. Backward: ∂a[g] = ∂y[g] · w[g], ∂w[g] = ∂y[g]ᵀ · a[g] (or its transpose),
    ∂b[g] = Σ_rows ∂y[g]."""

    @staticmethod
    def forward(ctx, a, weight, bias, transposed):
        ctx.save_for_backward(a, weight)
        ctx.transposed = transposed
        ctx.has_bias = bias is not None
        outs = [_onednn(_member(a, g), weight[g].t() if transposed else weight[g],
                        None if bias is None else bias[g]) for g in range(weight.shape[0])]
        return outs[0][None] if len(outs) == 1 else torch.stack(outs)

    @staticmethod
    def backward(ctx, grad):
        a, weight = ctx.saved_tensors
        grad = grad.contiguous()  # oneDNN takes any strides, but not the zero strides of an expanded grad
        G = weight.shape[0]
        grad_a = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # ∂a[g] = ∂y[g] · w_lin[g], with w_lin[g] = weight[g] ([out, in]) or its transpose
            parts = [_onednn(grad[g], weight[g] if ctx.transposed else weight[g].t()) for g in range(G)]
            grad_a = sum(parts) if a.dim() == 2 else torch.stack(parts)
        if ctx.needs_input_grad[1]:
            # ∂w_lin[g] = ∂y[g]ᵀ · a[g]; the parameter is w_lin or (transposed) its transpose
            parts = [_outer(_member(a, g), grad[g]) if ctx.transposed else _outer(grad[g], _member(a, g))
                     for g in range(G)]
            grad_w = torch.stack(parts)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(1)
        return grad_a, grad_w, grad_b, None


def stacked_linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   transposed: bool = False) -> torch.Tensor:
    """[G, B, out]: a[g] · weight[g]ᵀ + bias[g] (`transposed`: a[g] · weight[g] + bias[g]) for every
    member g; `a` is [B, in] (shared) or [G, B, in], `bias` [G, out] or None."""
    if use_onednn(a, weight):
        return StackedLinear.apply(a, weight, bias, transposed)
    G = weight.shape[0]
    a3 = a.expand(G, -1, -1) if a.dim() == 2 else a
    w = weight if transposed else weight.transpose(1, 2)
    if bias is None:
        return torch.bmm(a3, w)
    return torch.baddbmm(bias[:, None, :], a3, w)

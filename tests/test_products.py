"""The stack's dense products (products.py): oneDNN per member gives baddbmm's numbers and gradients."""

import pytest
import torch

from sparsefeat import products
from sparsefeat.products import stacked_linear, use_onednn
from sparsefeat.sae import ReluL1, SAEOptions, TopK

needs_onednn = pytest.mark.skipif(not products.ONEDNN, reason="this torch has no oneDNN linear kernel")


def _blas(a, weight, bias, transposed):
    G = weight.shape[0]
    a3 = a.expand(G, -1, -1) if a.dim() == 2 else a
    w = weight if transposed else weight.transpose(1, 2)
    out = torch.bmm(a3, w)
    return out if bias is None else out + bias[:, None, :]


def _value_and_grads(fn, a, weight, bias, transposed):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (a, weight, bias)]
    y = fn(*leaves, transposed)
    # a loss whose gradient is not all ones (and, through .sum(), arrives expanded)
    (y.pow(2).sum() + y.sum()).backward()
    return y.detach(), [t.grad for t in leaves if t is not None]


@needs_onednn
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("members,with_bias", [(1, True), (3, True), (2, False)])
@pytest.mark.parametrize("inner,outer", [(24, 40), (40, 24)])  # both orientations of the weight gradient
def test_onednn_gives_the_blas_values_and_gradients(monkeypatch, shared, transposed, members, with_bias, inner, outer):
    monkeypatch.setattr(products, "ONEDNN_MIN_WORK", 0)
    g = torch.Generator().manual_seed(0)
    B = 33
    a = torch.randn(B, inner, generator=g) if shared else torch.randn(members, B, inner, generator=g)
    weight = torch.randn(members, *((inner, outer) if transposed else (outer, inner)), generator=g)
    bias = torch.randn(members, outer, generator=g) if with_bias else None
    assert use_onednn(a, weight)
    y, grads = _value_and_grads(stacked_linear, a, weight, bias, transposed)
    y_ref, grads_ref = _value_and_grads(_blas, a, weight, bias, transposed)
    assert y.shape == (members, B, outer)
    torch.testing.assert_close(y, y_ref)
    assert len(grads) == len(grads_ref)
    for got, want in zip(grads, grads_ref):
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want)


@needs_onednn
def test_a_member_gets_the_same_bits_in_a_stack_as_alone(monkeypatch):
    monkeypatch.setattr(products, "ONEDNN_MIN_WORK", 0)
    g = torch.Generator().manual_seed(1)
    a, weight, bias = torch.randn(50, 16, generator=g), torch.randn(4, 70, 16, generator=g), torch.randn(4, 70, generator=g)
    stack = stacked_linear(a, weight, bias)
    for m in range(4):
        assert torch.equal(stack[m], stacked_linear(a, weight[m:m + 1], bias[m:m + 1])[0])


def test_products_leave_onednn_where_it_does_not_pay_or_apply(monkeypatch):
    a, weight = torch.randn(256, 32), torch.randn(6, 64, 32)
    assert not use_onednn(a, weight)  # 256 · 64 · 32 = 0.5M multiply-adds: the per-call cost loses
    big = torch.randn(6, 1024, 64)
    assert use_onednn(torch.randn(256, 64), big) == products.ONEDNN  # 16.8M
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's own bf16 kernels
        assert not use_onednn(torch.randn(256, 64), big)
    assert not use_onednn(torch.randn(256, 64, dtype=torch.float64), big.double())
    monkeypatch.setattr(products, "ONEDNN", False)
    assert not use_onednn(torch.randn(256, 64), big)
    torch.testing.assert_close(stacked_linear(a, weight), _blas(a, weight, None, False))


@needs_onednn
@pytest.mark.parametrize("cls,sparsity", [(ReluL1, 0.1), (TopK, 160)])
def test_a_training_step_gives_the_same_numbers_on_onednn_and_blas(monkeypatch, cls, sparsity):
    """The dense path's loss and every parameter's gradient, products on oneDNN or on BLAS."""
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(2))
    results = []
    for onednn in (True, False):
        monkeypatch.setattr(products, "ONEDNN", onednn)
        torch.manual_seed(0)
        sae = cls(64, 512, [sparsity, sparsity], [0, 1], SAEOptions(), x.mean(0))
        sae.kernel = "dense"
        assert use_onednn(x, sae.encoder) == onednn  # 512 · 512 · 64 = 16.8M
        total, per = sae.training_loss(x)
        total.backward()
        results.append((per, {n: p.grad for n, p in sae.named_parameters()}))
    (per, grads), (per_ref, grads_ref) = results
    torch.testing.assert_close(per, per_ref)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)
        assert grad.abs().sum() > 0, name

"""The architectures: registry, initialisation, the unit-norm constraint, losses, TopK and AuxK, stacking."""

import pytest
import torch

from sparsefeat.errors import ConfigError
from sparsefeat.sae import (ARCHITECTURES, SAE, ReluL1, ReluL1Options, SAEOptions, TopK, TopKOptions, architecture,
                            geometric_median, initial_weights, pre_bias)

D = 6


def stack(cls=ReluL1, size=10, sparsities=(0.1, 0.5), seeds=(0, 1), **options):
    return cls(D, size, list(sparsities), list(seeds), options)


def test_registry_knows_both_and_a_new_architecture_is_one_class():
    assert architecture("relu-l1") is ReluL1 and architecture("topk") is TopK
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        architecture("nope")

    class Identity(SAE):
        name = "test-linear"
        sparsity_name = "l1"

        def activation(self, pre):
            return pre

    try:
        sae = Identity(D, 4, [0.0], [0])
        x_hat, codes = sae(torch.randn(3, D))
        assert x_hat.shape == (1, 3, D) and codes.shape == (1, 3, 4)
        assert ARCHITECTURES["test-linear"] is Identity
    finally:
        del ARCHITECTURES["test-linear"]


def test_initial_weights_depend_on_seed_size_and_width_only():
    a = initial_weights(D, 10, 3, SAEOptions())
    assert torch.equal(a["decoder"], initial_weights(D, 10, 3, SAEOptions())["decoder"])
    assert not torch.equal(a["decoder"], initial_weights(D, 10, 4, SAEOptions())["decoder"])
    torch.testing.assert_close(a["decoder"].norm(dim=1), torch.ones(10))
    assert torch.equal(a["encoder"], a["decoder"])  # "transpose": W_e = W_dᵀ in the [m, d] layout
    torch.testing.assert_close(initial_weights(D, 10, 3, SAEOptions(encoder_scale=0.1))["encoder"], 0.1 * a["decoder"])
    with pytest.raises(ConfigError, match="encoder_scale"):
        SAEOptions(encoder_scale=0.0)
    # A member's weights do not depend on the other members of its stack, nor on its sparsity.
    s = stack(sparsities=(0.1, 0.5, 0.9), seeds=(7, 3, 5))
    alone = stack(sparsities=(0.2,), seeds=(3,))
    assert torch.equal(s.decoder[1], alone.decoder[0]) and torch.equal(s.encoder[1], alone.encoder[0])


def test_orthogonal_and_random_initialisations():
    w = initial_weights(D, 4, 0, SAEOptions(decoder_init="orthogonal", encoder_init="random"))
    torch.testing.assert_close(w["decoder"] @ w["decoder"].T, torch.eye(4), atol=1e-5, rtol=0)
    assert w["encoder"].abs().max() <= 1 / D ** 0.5 and not torch.equal(w["encoder"], w["decoder"])
    big = initial_weights(D, 3 * D, 0, SAEOptions(decoder_init="orthogonal"))["decoder"]
    torch.testing.assert_close(big.norm(dim=1), torch.ones(3 * D))


def test_options_are_checked():
    with pytest.raises(ValueError, match="pre_bias must be one of"):
        SAEOptions(pre_bias="mode")
    with pytest.raises(ValueError, match="auxk_dead_rows"):
        TopKOptions(auxk_dead_rows=0)
    with pytest.raises(ConfigError, match="l1_reduction must be one of"):
        ReluL1Options(l1_reduction="max")


def test_each_architecture_owns_its_options_and_refuses_another_ones():
    assert ReluL1.Options is ReluL1Options and TopK.Options is TopKOptions
    assert isinstance(stack().options, ReluL1Options) and isinstance(stack(TopK, sparsities=(2, 3)).options, TopKOptions)
    assert stack(TopK, sparsities=(2, 3), auxk_k=3).options.auxk_k == 3  # a dict of its own fields
    shared = TopK.build_options(SAEOptions(pre_bias="none"))  # the shared fields, the rest at defaults
    assert shared.pre_bias == "none" and shared.auxk_dead_rows == TopKOptions().auxk_dead_rows
    with pytest.raises(ConfigError, match="relu-l1 has no option 'auxk_k'"):
        stack(auxk_k=3)
    with pytest.raises(ConfigError, match="topk has no option 'l1_reduction'"):
        TopK.build_options({"l1_reduction": "mean"})


def test_the_registry_refuses_a_second_architecture_of_the_same_name():
    with pytest.raises(ConfigError, match="architecture 'topk' is already registered"):
        class Impostor(SAE):
            name = "topk"
            sparsity_name = "k"
    assert ARCHITECTURES["topk"] is TopK


def test_relu_l1_forward_and_loss_by_hand():
    sae = stack(sparsities=(0.5,), seeds=(0,))
    with torch.no_grad():
        sae.encoder.copy_(torch.eye(10, D)[None])
        sae.encoder_bias.fill_(-0.5)
        sae.decoder.copy_(torch.eye(10, D)[None])
        sae.decoder_bias.fill_(0.25)
    x = torch.tensor([[2.0, 0.0, 0.2, 0, 0, 0], [0.0, 1.0, 0, 0, 0, 0]])
    x_hat, codes = sae(x)
    assert codes[0].tolist()[0][:3] == [1.5, 0.0, 0.0] and codes[0].tolist()[1][:3] == [0.0, 0.5, 0.0]
    parts = sae.losses(x, x_hat, codes)
    # x̂ = c + 0.25 everywhere: row 1 errors (−0.25, 0.25, 0.05, 0.25, 0.25, 0.25), row 2 (0.25, −0.25, 0.25 ×4)
    mse = ((0.25 ** 2 * 5 + 0.05 ** 2) + 0.25 ** 2 * 6) / 2
    assert parts["mse"].item() == pytest.approx(mse)
    assert parts["penalty"].item() == pytest.approx(0.5 * (1.5 + 0.5) / 2)  # α · mean_b ‖c_b‖₁
    mean = stack(sparsities=(0.5,), seeds=(0,), l1_reduction="mean")
    mean.load_state_dict(sae.state_dict())
    assert mean.losses(x, x_hat, codes)["penalty"].item() == pytest.approx(0.5 * 1.0 / 10)  # ÷ m
    no_bias = stack(sparsities=(0.5,), seeds=(0,), decoder_bias=False)
    assert "decoder_bias" not in dict(no_bias.named_parameters())
    assert no_bias(x)[0].shape == (1, 2, D)


def test_decoder_rows_stay_unit_norm_and_lose_their_parallel_gradient():
    torch.manual_seed(0)
    sae = stack()
    opt = torch.optim.Adam(sae.parameters(), lr=0.1)
    for _ in range(5):
        total, per_member = sae.training_loss(torch.randn(32, D))
        assert per_member.shape == (2,) and not per_member.requires_grad
        total.backward()
        sae.after_backward()
        parallel = (sae.decoder.grad * sae.decoder).sum(-1)
        torch.testing.assert_close(parallel, torch.zeros_like(parallel), atol=1e-6, rtol=0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.after_step()
        torch.testing.assert_close(sae.decoder.norm(dim=-1), torch.ones(2, 10))


@pytest.mark.parametrize("cls,sparsities", [(ReluL1, (0.1, 0.5, 0.9)), (TopK, (1, 2, 3))])
def test_a_stacked_member_computes_what_it_computes_alone(cls, sparsities):
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    bias = x.mean(0)
    many = cls(D, 10, list(sparsities), [0, 1, 2], SAEOptions(), bias)
    alone = cls(D, 10, [sparsities[2]], [2], SAEOptions(), bias)
    x_hat, codes = many(x)
    x_hat1, codes1 = alone(x)
    torch.testing.assert_close(x_hat[2], x_hat1[0])  # bit-identical on CPU so far; float tolerance is the promise
    torch.testing.assert_close(codes[2], codes1[0])
    loss, per = many.training_loss(x)
    loss1, per1 = alone.training_loss(x)
    torch.testing.assert_close(per[2], per1[0])


def test_topk_keeps_the_k_largest_per_member():
    sae = stack(TopK, size=10, sparsities=(1, 3), seeds=(0, 1))
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(0))
    pre = sae.pre_activations(x).relu()
    codes = sae.encode(x)
    assert (codes >= 0).all()
    for g, k in enumerate((1, 3)):
        nz = (codes[g] != 0).sum(-1)
        assert (nz <= k).all() and (nz == torch.clamp((pre[g] > 0).sum(-1), max=k)).all()
        kth = pre[g].topk(k, dim=-1).values[:, -1:]
        kept = codes[g] != 0
        assert (pre[g][kept] >= kth.expand_as(pre[g])[kept]).all()
        torch.testing.assert_close(codes[g][kept], pre[g][kept])
    assert stack(TopK, size=4, sparsities=(9,), seeds=(0,)).ks == [4]  # k ≥ m keeps everything
    with pytest.raises(ValueError, match="positive whole k"):
        stack(TopK, sparsities=(1.5,), seeds=(0,))


def test_auxk_trains_dead_latents_only_once_some_are_dead():
    sae = stack(TopK, size=12, sparsities=(2,), seeds=(0,), auxk_dead_rows=100, auxk_k=3)
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(0))
    total, loss = sae.training_loss(x)
    assert torch.equal(total, loss.sum())  # nothing dead yet: objective only
    fired = (sae.encode(x)[0] != 0).any(0)
    assert ((sae.rows_since_fired[0] == 0) == fired).all() and (sae.rows_since_fired[0][~fired] == 40).all()
    with torch.no_grad():
        sae.rows_since_fired[0, :6] = 0
        sae.rows_since_fired[0, 6:] = 1000  # latents 6.. are dead
    sae.on_log()
    assert sae.auxk_active and sae.get_extra_state() == {"auxk_active": True}
    total, loss = sae.training_loss(x)
    assert total > loss.sum()
    total.backward()
    dead_rows = sae.decoder.grad[0, 6:].abs().sum(-1)
    assert (dead_rows > 0).any()


def test_geometric_median_and_pre_bias():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    med = geometric_median(pts)
    assert med.norm() < 1.5  # the outlier drags the mean to (20.4, 20.4), not the median
    torch.testing.assert_close(geometric_median(pts[:4]), torch.tensor([0.5, 0.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(pre_bias(pts, "mean"), torch.tensor([20.4, 20.4]))
    assert pre_bias(pts, "none").tolist() == [0.0, 0.0]
    topk = TopK(2, 4, [1], [0], SAEOptions(), pre_bias(pts, "median"))
    torch.testing.assert_close(topk.decoder_bias[0], med)


def _step(sae, x, kernel):
    """One training loss + backward on the given path; (total, per-member loss, grads, bookkeeping)."""
    sae.kernel = kernel
    sae.zero_grad(set_to_none=True)
    total, per = sae.training_loss(x)
    total.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    state = {n: b.clone() for n, b in sae.named_buffers()}
    return total.detach(), per, grads, state


def _paths_agree(make, x, prepare=lambda sae: None):
    dense, sparse = make(), make()
    sparse.load_state_dict(dense.state_dict())
    prepare(dense)
    prepare(sparse)
    a, b = _step(dense, x, "dense"), _step(sparse, x, "sparse")
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], atol=1e-5, rtol=1e-4, msg=name)
        assert a[2][name].abs().sum() > 0, name  # every parameter is trained, on both paths
    for name in a[3]:
        torch.testing.assert_close(a[3][name], b[3][name], msg=name)


@pytest.mark.parametrize("ks", [(4,), (2, 5, 5)])
def test_topk_sparse_path_gives_the_dense_loss_and_gradients(ks):
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(3)) + 0.5
    _paths_agree(lambda: TopK(32, 96, list(ks), list(range(len(ks))), SAEOptions(), x.mean(0)), x)


def test_topk_sparse_path_gives_the_dense_auxk_loss_and_gradients():
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(4))

    def some_dead(sae):
        with torch.no_grad():
            sae.rows_since_fired[:, ::3] = 10**6
        sae.on_log()
        assert sae.auxk_active

    make = lambda: TopK(32, 96, [4, 6], [0, 1], TopKOptions(auxk_dead_rows=1000, auxk_k=8), x.mean(0))  # noqa: E731
    _paths_agree(make, x, some_dead)


def test_topk_switches_to_the_sparse_path_where_it_pays():
    assert TopK(32, 1536, [32], [0], SAEOptions()).use_sparse()
    assert not TopK(32, 64, [32], [0], SAEOptions()).use_sparse()
    assert not ReluL1(32, 64, [0.1], [0], SAEOptions()).use_sparse()


@pytest.mark.parametrize("options", [{}, {"decoder_bias": False, "l1_reduction": "mean"}])
def test_relu_l1_sparse_path_gives_the_dense_loss_and_gradients(options):
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(5))

    def fewer_active(sae):  # a negative encoder bias: about a tenth of the codes positive
        with torch.no_grad():
            sae.encoder_bias.fill_(-1.3)

    _paths_agree(lambda: ReluL1(32, 96, [0.1, 0.4], [0, 1], ReluL1Options(**options)), x, fewer_active)


def test_relu_l1_takes_the_sparse_path_once_its_codes_are_sparse():
    sae = ReluL1(32, 96, [0.1], [0], SAEOptions())
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(6))
    assert not sae.use_sparse()  # nothing measured yet
    sae.training_loss(x)
    assert sae.density == pytest.approx(float((sae.encode(x) > 0).float().mean()))
    assert sae.density > 0.3 and not sae.use_sparse()  # about half the latents on at initialisation
    with torch.no_grad():
        sae.encoder_bias.fill_(-2.5)
    sae.training_loss(x)
    assert 0 < sae.density < ReluL1.SPARSE_MAX_DENSITY and sae.use_sparse()
    sae.training_loss(x)  # the sparse path measures the density too
    assert sae.density == pytest.approx(float((sae.encode(x) > 0).float().mean()))
    # under bf16 autocast the dense matmuls are faster, so the sparse path waits for sparser codes
    sae.density = (ReluL1.SPARSE_MAX_DENSITY + ReluL1.SPARSE_MAX_DENSITY_BF16) / 2
    assert sae.use_sparse()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not sae.use_sparse()
        sae.density = ReluL1.SPARSE_MAX_DENSITY_BF16 / 2
        assert sae.use_sparse()


def test_topk_takes_the_sparse_path_at_small_k_over_m():
    assert TopK(32, 256, [8], [0], SAEOptions()).use_sparse()  # k/m = 1/32
    assert not TopK(32, 256, [64], [0], SAEOptions()).use_sparse()  # 1/4
    sae = TopK(32, 512, [32], [0], SAEOptions())  # 1/16: sparse in float32, dense under bf16
    assert sae.use_sparse()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not sae.use_sparse()


def test_steps_too_small_for_the_sparse_path_stay_dense(monkeypatch):
    # B·m·d under SPARSE_MIN_WORK: the sparse path's fixed costs lose (RESULTS.md), whatever the density
    small = ReluL1(32, 64, [0.1], [0], SAEOptions())
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        small.encoder_bias.fill_(-2.5)  # almost every code zero
    small.density = 0.01
    assert small.use_sparse() and not small.use_sparse(rows=256)  # 256 · 64 · 32 = 0.5M
    big = ReluL1(64, 1024, [0.1], [0], SAEOptions())
    big.density = 0.01
    assert big.use_sparse(rows=256)  # 256 · 1024 · 64 = 16.8M
    monkeypatch.setattr(ReluL1, "sparse_training_loss", lambda *a: pytest.fail("took the sparse path"))
    small.training_loss(x)
    assert small.density < ReluL1.SPARSE_MAX_DENSITY_BF16  # measured, yet dense

"""Metric functions against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from sparsefeat import metrics as M

X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 2.0]])      # mean row (4/3, 4/3)
X_HAT = torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, 0.0]])  # errors 1, 0, 4


def test_row_sse_and_mse():
    assert M.row_sse(X, X_HAT).tolist() == [1.0, 0.0, 4.0]
    assert M.mse(X, X_HAT) == pytest.approx(5 / 3)


def test_fvu_and_explained_variance():
    # Σ‖x − x̄‖² = (1/9 + 16/9) + (16/9 + 4/9) + (25/9 + 4/9) = 66/9
    assert M.fvu(X, X_HAT) == pytest.approx(5 / (66 / 9))
    assert M.explained_variance(X, X_HAT) == pytest.approx(1 - 45 / 66)
    assert M.fvu(X, X) == 0.0
    assert math.isnan(M.fvu(torch.ones(3, 2), torch.zeros(3, 2)))  # no variance: undefined


def test_shrinkage():
    # E‖x̂‖ = (√2 + 2 + 3)/3, E‖x‖ = (1 + 2 + √13)/3
    assert M.shrinkage(X, X_HAT) == pytest.approx((math.sqrt(2) + 5) / (3 + math.sqrt(13)))
    assert M.shrinkage(X, 0.5 * X) == pytest.approx(0.5)


def test_l0_l1_firing_and_dead_fraction():
    codes = np.array([[0.0, 2.0, 0.0, 0.0], [1.0, -3.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0]])
    assert M.l0(codes) == pytest.approx(4 / 3)
    assert M.l1(codes) == pytest.approx((2 + 4 + 0.5) / 3)
    assert M.firing_counts(codes).tolist() == [1, 3, 0, 0]
    assert M.dead_fraction(codes) == 0.5
    assert M.dead_fraction(np.array([0.0, 0.1, 0.0, 0.2, 0.3])) == pytest.approx(0.4)  # frequencies


def test_cosines_and_mmcs():
    a = np.array([[1.0, 0.0], [0.0, 3.0]])
    b = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]])  # a zero row has cosine 0 with everything
    cos = M.cosine_matrix(a, b)
    s = 1 / math.sqrt(2)
    assert cos.numpy() == pytest.approx(np.array([[1.0, s, 0.0], [0.0, s, 0.0]]))
    assert M.max_cosines(a, b).numpy() == pytest.approx([1.0, s])
    assert M.mmcs(a, b) == pytest.approx((1 + s) / 2)
    assert M.mmcs(b[:2], a) == pytest.approx((1 + s) / 2)


def test_mmcs_in_blocks_matches_full_matrix():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5000, 8, generator=g), torch.randn(300, 8, generator=g)
    full = M.cosine_matrix(a, b).amax(1).mean()
    assert M.mmcs(a, b) == pytest.approx(float(full), abs=1e-6)


def test_hungarian_is_one_to_one_where_max_cosine_is_not():
    # Both rows of a are closest to b[0]; one-to-one, one of them must take b[1].
    a = np.array([[1.0, 0.0], [0.8, 0.6]])
    b = np.array([[1.0, 0.0], [0.0, 1.0]])
    pairs, cos = M.hungarian_match(a, b)
    assert pairs.tolist() == [[0, 0], [1, 1]]
    assert cos == pytest.approx([1.0, 0.6])
    assert M.mmcs(a, b) == pytest.approx(0.9)
    mean_cos, share = M.hungarian_summary(a, b, threshold=0.9)
    assert (mean_cos, share) == (pytest.approx(0.8), 0.5)


def test_hungarian_rectangular_and_limit():
    a = np.eye(3)
    b = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    pairs, cos = M.hungarian_match(a, b)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 1), (2, 0)]
    assert cos == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="limited to 2 rows"):
        M.hungarian_match(a, b, max_rows=2)
    assert all(math.isnan(v) for v in M.hungarian_summary(a, b, max_rows=2))
    assert math.isnan(M.shared_fraction(a, a, max_rows=2))


def test_shared_fraction_needs_decoder_and_encoder_to_agree():
    dec_a = np.eye(3)
    dec_b = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8]])  # third atom: cos 0.8
    assert M.shared_fraction(dec_a, dec_b, threshold=0.7) == pytest.approx(1.0)
    assert M.shared_fraction(dec_a, dec_b, threshold=0.9) == pytest.approx(2 / 3)
    enc_b = dec_b.copy()
    enc_b[1] = [0.0, 0.5, 0.0]  # same direction, other norm: still cosine 1
    enc_b[0] = [0.5, 0.5, 0.0]  # cos 0.707 with e0: shared at 0.7, not at 0.75
    assert M.shared_fraction(dec_a, dec_b, dec_a, enc_b, threshold=0.7) == pytest.approx(1.0)
    assert M.shared_fraction(dec_a, dec_b, dec_a, enc_b, threshold=0.75) == pytest.approx(2 / 3)


def test_recovered_fraction():
    gt = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    dec = np.array([[0.95, 0.05], [0.6, 0.8]])
    # gt0: cos 0.9986 (found); gt1: cos 0.8 (no); gt2: negative (no)
    assert M.recovered_fraction(gt, dec) == pytest.approx(1 / 3)
    assert M.recovered_fraction(gt, dec, threshold=0.8 - 1e-9) == pytest.approx(2 / 3)


def test_inputs_are_not_modified_and_torch_or_numpy_agree():
    a = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32)
    a0 = a.copy()
    assert M.mmcs(a, b) == pytest.approx(M.mmcs(torch.from_numpy(a), torch.from_numpy(b)))
    assert np.array_equal(a, a0)


def test_running_metrics_over_batches_equal_the_functions_on_all_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g)
    codes = torch.relu(torch.randn(2, 50, 9, generator=g))  # two dictionaries of 9 latents
    codes[:, :, 8] = 0  # one dead latent in each
    x_hat = codes @ torch.randn(2, 9, 6, generator=g)
    run = M.RunningMetrics()
    sse = torch.cat([run.add(x[i:i + 16], x_hat[:, i:i + 16], codes[:, i:i + 16]) for i in range(0, 50, 16)], dim=1)
    got = run.result()
    for k in range(2):
        assert got["mse"][k] == pytest.approx(M.mse(x, x_hat[k]), rel=1e-6)
        assert got["fvu"][k] == pytest.approx(M.fvu(x, x_hat[k]), rel=1e-6)
        assert got["l1"][k] == pytest.approx(M.l1(codes[k]), rel=1e-6)
        assert got["l0"][k] == pytest.approx(M.l0(codes[k]), rel=1e-6)
        assert got["shrinkage"][k] == pytest.approx(M.shrinkage(x, x_hat[k]), rel=1e-6)
        assert got["dead_fraction"][k] == pytest.approx(M.dead_fraction(codes[k])) == pytest.approx(1 / 9)
        torch.testing.assert_close(sse[k], M.row_sse(x, x_hat[k]))
        np.testing.assert_allclose(run.frequency()[k], M.firing_counts(codes[k]).numpy() / 50)

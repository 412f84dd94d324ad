"""The manifold controls `circle` and `sphere`: points on the embedded manifold up to the requested
noise, spread uniformly over it, scaled, seeded, registered and reachable from the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sparsefeat import cli
from sparsefeat.errors import SparsefeatError
from sparsefeat.store import ActivationStore
from sparsefeat.toys import TOYS, Circle, Sphere, write_toy

FRAME = {"circle": 2, "sphere": 3}


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows and the ground-truth embedding (rows: the frame times the radius)."""
    with ActivationStore(path) as s:
        return s.load("x").double().numpy(), s.ground_truth["embedding"].astype(np.float64)


def manifold_distance(x: np.ndarray, embedding: np.ndarray) -> np.ndarray:
    """Distance of each row to the round manifold spanned by `embedding` (sphere of radius r in the
    frame): sqrt(|off-frame part|^2 + (|in-frame part| − r)^2)."""
    r = np.linalg.norm(embedding[0])
    frame = embedding / r
    inside = x @ frame.T
    off = x - inside @ frame
    return np.sqrt((off ** 2).sum(1) + (np.linalg.norm(inside, axis=1) - r) ** 2)


def test_registered_with_their_params():
    assert TOYS["circle"] is Circle and TOYS["sphere"] is Sphere
    assert Circle.Params.frame == 2 and Sphere.Params.frame == 3


@pytest.mark.parametrize("kind", ["circle", "sphere"])
def test_rows_lie_near_the_manifold_at_the_requested_noise(tmp_path, kind):
    d, noise = 24, 0.05
    x, emb = load(write_toy(kind, tmp_path / "t.h5", n_samples=4000, d=d, noise=noise, progress=False))
    assert x.shape == (4000, d) and emb.shape == (FRAME[kind], d)
    np.testing.assert_allclose(emb @ emb.T, np.eye(FRAME[kind]), atol=1e-6)  # orthonormal frame, radius 1
    dist = manifold_distance(x, emb)
    # noise RMS norm = noise · r; all of it but the component along the manifold moves a row off it
    rms = math.sqrt(np.mean(dist ** 2))
    along = FRAME[kind] - 1  # tangent directions
    assert rms == pytest.approx(noise * math.sqrt((d - along) / d), rel=0.05)
    # and far nearer the manifold than to the centre: these are points on a circle/sphere, not a blob
    assert dist.max() < 0.3 and np.linalg.norm(x, axis=1).min() > 0.7


@pytest.mark.parametrize("kind", ["circle", "sphere"])
def test_points_spread_uniformly_over_the_manifold(tmp_path, kind):
    x, emb = load(write_toy(kind, tmp_path / "t.h5", n_samples=6000, d=16, noise=0.0, progress=False))
    u = x @ emb.T  # frame coordinates on the unit circle / sphere
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-5)
    assert np.abs(u.mean(0)).max() < 0.05
    np.testing.assert_allclose(np.cov(u.T, bias=True), np.eye(FRAME[kind]) / FRAME[kind], atol=0.03)
    if kind == "circle":  # the angle is uniform: equal counts in 8 sectors
        sectors = np.histogram(np.arctan2(u[:, 1], u[:, 0]), bins=8, range=(-np.pi, np.pi))[0]
        assert sectors.min() > 0.85 * 6000 / 8


@pytest.mark.parametrize("kind", ["circle", "sphere"])
def test_scale_sets_the_mean_squared_norm_and_the_radius(tmp_path, kind):
    x, emb = load(write_toy(kind, tmp_path / "t.h5", n_samples=5000, d=16, noise=0.1, scale=9.0, progress=False))
    norms = (x ** 2).sum(1)
    assert abs(norms.mean() - 9.0) < 4 * norms.std() / math.sqrt(len(norms)) + 1e-4
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), math.sqrt(9.0 / 1.01), rtol=1e-6)


@pytest.mark.parametrize("kind", ["circle", "sphere"])
def test_deterministic_by_seed_and_recorded(tmp_path, kind):
    def make(name, seed):
        return write_toy(kind, tmp_path / name, n_samples=600, d=10, seed=seed, block_rows=256, progress=False)

    a, b, c = load(make("a.h5", 3)), load(make("b.h5", 3)), load(make("c.h5", 4))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.allclose(a[1], c[1])  # other rows, another frame
    with ActivationStore(tmp_path / "a.h5") as s:
        p = s.provenance
    assert p["generator"] == kind and p["params"] == dict(d=10, noise=0.05, scale=None) and p["seed"] == 3


def test_like_takes_width_and_scale_from_a_store(tmp_path, sparse_toy):
    with ActivationStore(sparse_toy) as s:
        d, scale = s.width("x"), s.mean_squared_norm("x", "train")
    x, _ = load(write_toy("circle", tmp_path / "c.h5", n_samples=4000, like=(sparse_toy, "x"), progress=False))
    assert x.shape[1] == d and abs((x ** 2).sum(1).mean() - scale) < 0.02 * scale


@pytest.mark.parametrize("params, message", [
    (dict(d=1), "at least 2"),
    (dict(d=0), "d must be positive"),
    (dict(noise=-0.1), "noise must be non-negative"),
    (dict(scale=0.0), "scale must be positive"),
])
def test_bad_parameters_are_one_line_errors(tmp_path, params, message):
    with pytest.raises(SparsefeatError, match=message) as e:
        write_toy("circle", tmp_path / "t.h5", n_samples=10, progress=False, **params)
    assert "\n" not in str(e.value) and not (tmp_path / "t.h5").exists()
    with pytest.raises(SparsefeatError, match="at least 3"):
        write_toy("sphere", tmp_path / "s.h5", n_samples=10, d=2, progress=False)


def test_cli_writes_a_circle_store(tmp_path, capsys):
    out = tmp_path / "c.h5"
    assert cli.main(["toy", "circle", "--out", str(out), "--d", "12", "--noise", "0.02", "--n-samples", "500",
                     "--seed", "2", "--no-progress"]) == 0
    assert str(out) in capsys.readouterr().out
    x, emb = load(out)
    assert x.shape == (500, 12) and manifold_distance(x, emb).max() < 0.1
    assert cli.main(["toy", "sphere", "--out", str(tmp_path / "s.h5"), "--d", "2", "--no-progress"]) == 2
    assert "at least 3" in capsys.readouterr().err

"""Toy generators: determinism, scale, the statistics each promises, resume, bad parameters, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from sparsefeat import cli
from sparsefeat.errors import ConfigError, SparsefeatError
from sparsefeat.store import ActivationStore, StoreWriter, partial_path
from sparsefeat.toys import TOYS, Sparse, SparseParams, ToyConfig, feature_probabilities, write_toy

SMALL = {"sparse": dict(n_features=24, d=12), "gmm": dict(k=5, d=12), "square": dict(d=12),
         "hypercube": dict(q=3, d=12), "gaussian": dict(d=12)}


def rows_of(path: Path, split: str = "all") -> np.ndarray:
    with ActivationStore(path) as s:
        return s.load("x", split).double().numpy()


def test_every_generator_is_registered_deterministic_and_records_provenance(tmp_path):
    assert set(TOYS) == {"sparse", "gmm", "square", "hypercube", "gaussian", "matched", "circle", "sphere"}
    for kind, params in SMALL.items():
        a = write_toy(kind, tmp_path / f"{kind}-a.h5", n_samples=700, seed=3, block_rows=256, progress=False, **params)
        b = write_toy(kind, tmp_path / f"{kind}-b.h5", n_samples=700, seed=3, block_rows=256, progress=False, **params)
        c = write_toy(kind, tmp_path / f"{kind}-c.h5", n_samples=700, seed=4, block_rows=256, progress=False, **params)
        np.testing.assert_array_equal(rows_of(a), rows_of(b))
        assert not np.array_equal(rows_of(a), rows_of(c))
        with ActivationStore(a) as s:
            assert s.sites == ["x"] and s.kind == "toy" and s.complete and s.width("x") == 12
            assert s.n_rows() == 700 and 0 < s.n_rows("test") < 200
            p = s.provenance
            assert p["generator"] == kind and p["seed"] == 3 and p["n_samples"] == 700
            assert p["block_rows"] == 256 and p["package_version"]
            assert all(p["params"][k] == v for k, v in params.items())
            assert s.attrs["generator"] == kind


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_scale_sets_the_mean_squared_norm(tmp_path, kind):
    path = write_toy(kind, tmp_path / "t.h5", n_samples=20_000, scale=7.0, progress=False, **SMALL[kind])
    norms = (rows_of(path) ** 2).sum(1)
    # the factor makes E|x|^2 = scale exactly; the sample mean meets it up to its standard error
    assert abs(norms.mean() - 7.0) < 4 * norms.std() / np.sqrt(len(norms))


def test_like_takes_width_and_scale_from_a_store(tmp_path, sparse_toy):
    with ActivationStore(sparse_toy) as s:
        d, scale = s.width("x"), s.mean_squared_norm("x", "train")
    path = write_toy("gaussian", tmp_path / "g.h5", n_samples=20_000, like=(sparse_toy, "x"), progress=False)
    x = rows_of(path)
    assert x.shape[1] == d == 32
    assert abs((x ** 2).sum(1).mean() - scale) < 0.02 * scale
    with ActivationStore(path) as s:
        assert s.provenance["like"] == dict(path=str(sparse_toy.resolve()), site="x", d=d, scale=scale)
    with pytest.raises(SparsefeatError, match="--like .* sets d=32, which conflicts with d=5"):
        write_toy("gaussian", tmp_path / "g2.h5", d=5, like=(sparse_toy, None), progress=False)


# --------------------------------------------------------------------------------------------
# What each generator promises
# --------------------------------------------------------------------------------------------


def test_feature_probabilities_sum_to_the_target_and_decay():
    p = feature_probabilities(100, 5.0, 0.95)
    assert p.sum() == pytest.approx(5.0) and np.all(np.diff(p) < 0) and p.max() <= 1
    clipped = feature_probabilities(10, 8.0, 0.5)  # the first features saturate at 1
    assert clipped.sum() == pytest.approx(8.0) and clipped.max() == 1.0 and np.all(clipped <= 1)
    assert np.allclose(feature_probabilities(10, 2.0, 1.0), 0.2)


@pytest.mark.parametrize("correlated", [False, True])
def test_sparse_rows_are_sparse_combinations_of_the_ground_truth(tmp_path, correlated):
    n_features, d, n = 32, 64, 20_000  # n_features <= d: coefficients recoverable exactly
    path = write_toy("sparse", tmp_path / "s.h5", n_samples=n, n_features=n_features, d=d, mean_active=4.0,
                     decay=0.97, correlated=correlated, progress=False)
    with ActivationStore(path) as s:
        features, probabilities = s.ground_truth["features"], s.ground_truth["probabilities"]
        x = s.load("x", "all").double().numpy()
    assert features.shape == (n_features, d)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-6)
    coefficients = x @ np.linalg.pinv(features.astype(np.float64))
    np.testing.assert_allclose(coefficients @ features, x, atol=1e-4)  # no part outside the span
    active = coefficients > 1e-4
    assert (coefficients > -1e-4).all() and (coefficients < 1 + 1e-4).all()  # U[0, 1) coefficients
    count = active.sum(1)
    assert abs(count.mean() - 4.0) < 4 * count.std() / np.sqrt(n)
    frequency = active.mean(0)
    assert np.all(np.abs(frequency - probabilities) < 5 * np.sqrt(probabilities * (1 - probabilities) / n) + 1e-3)
    corr = np.corrcoef(active.T)
    off_diagonal = np.abs(corr[~np.eye(n_features, dtype=bool)]).mean()
    # Independent features leave only sampling noise: mean |phi| ≈ 0.8/sqrt(n) ≈ 0.006 here.
    if correlated:
        assert off_diagonal > 0.03  # features fire together (rare events attenuate phi, so not far above)
    else:
        assert off_diagonal < 0.012


def test_sparse_noise_is_the_requested_share_of_the_signal():
    params = SparseParams(n_features=20, d=40, noise=0.3)
    clean, noisy = Sparse(SparseParams(n_features=20, d=40), 1), Sparse(params, 1)
    signal = clean.draw(20_000, np.random.default_rng(5))
    x = noisy.draw(20_000, np.random.default_rng(5))
    noise = x - signal  # same stream: the same signal, plus noise drawn after it
    ratio = np.sqrt((noise ** 2).sum(1).mean() / (signal ** 2).sum(1).mean())
    assert ratio == pytest.approx(0.3, rel=0.03)


def test_gmm_rows_cluster_around_k_means_with_the_given_weights(tmp_path):
    k, d, n, spread = 6, 40, 12_000, 0.1
    path = write_toy("gmm", tmp_path / "g.h5", n_samples=n, k=k, d=d, spread=spread, weight_concentration=2.0,
                     progress=False)
    with ActivationStore(path) as s:
        means, weights = s.ground_truth["means"], s.ground_truth["weights"]
        x = s.load("x", "all").double().numpy()
    assert means.shape == (k, d) and weights.sum() == pytest.approx(1.0)
    distance = np.linalg.norm(x[:, None, :] - means[None], axis=2)  # [n, k]
    nearest = distance.argmin(1)
    closest = distance.min(1)
    gap = np.min([np.linalg.norm(means[i] - means[j]) for i in range(k) for j in range(i)])
    assert closest.max() < gap / 2  # every row lies nearer its own mean than half the closest gap
    assert np.sqrt((closest ** 2).mean()) == pytest.approx(spread, rel=0.05)
    share = np.bincount(nearest, minlength=k) / n
    assert np.all(np.abs(share - weights) < 5 * np.sqrt(weights * (1 - weights) / n))


@pytest.mark.parametrize("kind,q", [("square", 2), ("hypercube", 3)])
def test_cube_points_map_back_inside_the_unit_cube(tmp_path, kind, q):
    path = write_toy(kind, tmp_path / "c.h5", n_samples=5000, d=20, scale=4.0, progress=False,
                     **({"q": q} if kind == "hypercube" else {}))
    with ActivationStore(path) as s:
        embedding = s.ground_truth["embedding"]
        x = s.load("x", "all").double().numpy()
    assert embedding.shape == (q, 20)
    u = x @ np.linalg.pinv(embedding)
    np.testing.assert_allclose(u @ embedding, x, atol=1e-5)  # all of x lies in the embedded cube's span
    assert u.min() > -1e-5 and u.max() < 1 + 1e-5
    assert u.min() < 0.01 and u.max() > 0.99  # and it fills the cube
    noisy = write_toy(kind, tmp_path / "n.h5", n_samples=2000, d=20, noise=0.05, progress=False)
    with ActivationStore(noisy) as s:
        m = s.ground_truth["embedding"]
        x = s.load("x", "all").double().numpy()
    residual = x - (x @ np.linalg.pinv(m)) @ m
    assert np.sqrt((residual ** 2).sum(1).mean()) == pytest.approx(0.05 * np.sqrt(20 - q), rel=0.05)


def test_gaussian_is_isotropic_and_centred(tmp_path):
    d, n = 8, 40_000
    x = rows_of(write_toy("gaussian", tmp_path / "g.h5", n_samples=n, d=d, scale=2.0, progress=False))
    assert np.abs(x.mean(0)).max() < 5 * np.sqrt(0.25 / n)
    np.testing.assert_allclose(np.cov(x, rowvar=False), 0.25 * np.eye(d), atol=5 * 0.25 * np.sqrt(2 / n))


def test_matched_reproduces_the_source_moments_even_when_singular(tmp_path):
    # A source of rank 6 in 10 dims, offset from the origin: its covariance is singular.
    source = write_toy("hypercube", tmp_path / "src.h5", q=6, d=10, scale=3.0, n_samples=6000, progress=False)
    n = 40_000
    path = write_toy("matched", tmp_path / "m.h5", source=str(source), n_samples=n, progress=False)
    with ActivationStore(source) as s:
        mean, cov = s.moments("x", "train")
        source_provenance = s.provenance
    x = rows_of(path)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(x.mean(0) - mean) < 5 * sd / np.sqrt(n) + 1e-6)
    tolerance = 5 * np.sqrt((np.outer(sd, sd) ** 2 + cov ** 2) / n) + 1e-6  # std error of a sample covariance
    assert np.all(np.abs(np.cov(x, rowvar=False) - cov) < tolerance)
    w = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    assert w[:4].max() < 1e-6 * w.max()  # the null lives in the source's 6-dim span
    with ActivationStore(path) as s:
        src = s.provenance["source"]
        assert src["path"] == str(source.resolve()) and src["site"] == "x" and src["split"] == "train"
        assert src["provenance"] == source_provenance and src["kind"] == "toy"
        np.testing.assert_allclose(s.ground_truth["covariance"], cov)


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------

PACED_TOY = """
import time
import sparsefeat.store as store
from sparsefeat.toys import write_toy
append = store.StoreWriter.append
def paced(self, *a, **kw):  # slow the writer down so the test can kill it half way
    time.sleep(0.02)
    return append(self, *a, **kw)
store.StoreWriter.append = paced
write_toy("sparse", {out!r}, n_samples=40_000, block_rows=500, n_features=40, d=20, progress=False)
"""


def test_write_toy_killed_then_resumed_equals_an_uninterrupted_run(tmp_path, kill_after_commit):
    out = tmp_path / "k.h5"
    committed = kill_after_commit(PACED_TOY.format(out=str(out)), out, min_rows=5000)
    assert 5000 <= committed < 40_000 and not out.exists()
    write_toy("sparse", out, n_samples=40_000, block_rows=500, n_features=40, d=20, resume=True, progress=False)
    reference = write_toy("sparse", tmp_path / "ref.h5", n_samples=40_000, block_rows=500, n_features=40, d=20,
                          progress=False)
    with ActivationStore(out) as got, ActivationStore(reference) as want:
        np.testing.assert_array_equal(got.load("x", "all").numpy(), want.load("x", "all").numpy())
        np.testing.assert_array_equal(got.split_mask("test"), want.split_mask("test"))
        np.testing.assert_array_equal(got.ground_truth["features"], want.ground_truth["features"])


def test_resume_from_a_prefix_that_ends_inside_a_block(tmp_path):
    kw = dict(n_samples=3000, block_rows=1000, k=4, d=6, seed=2, progress=False)
    reference = write_toy("gmm", tmp_path / "ref.h5", **kw)
    with ActivationStore(reference) as s:
        provenance, x, test = s.provenance, s.load("x", "all").numpy(), s.split_mask("test")
    out = tmp_path / "out.h5"
    w = StoreWriter(out, sites={"x": 6}, provenance=provenance, kind="toy", test_fraction=0.1, split_seed=2)
    w.append({"x": x[:1234]}, test=test[:1234])
    w.close(complete=False)
    write_toy("gmm", out, resume=True, **kw)
    np.testing.assert_array_equal(rows_of(out), rows_of(reference))


def test_resume_refuses_other_parameters(tmp_path):
    out = tmp_path / "r.h5"
    w = StoreWriter(out, sites={"x": 6}, provenance={"generator": "gmm"}, kind="toy")
    w.append({"x": np.zeros((3, 6))}, test=np.zeros(3))
    w.close(complete=False)
    with pytest.raises(SparsefeatError, match="cannot resume: its provenance differs"):
        write_toy("gmm", out, d=6, resume=True, progress=False)


# --------------------------------------------------------------------------------------------
# Bad parameters
# --------------------------------------------------------------------------------------------


def test_bad_parameters_give_one_line_and_write_nothing(tmp_path, sparse_toy, digest):
    out = tmp_path / "t.h5"
    cases = [
        (dict(kind="sparse", bogus=1), "t.h5: toy 'sparse' has no parameter bogus \\(valid: n_features, d, "),
        (dict(kind="tetrahedron"), "unknown toy 'tetrahedron' \\(known: sparse, gmm"),
        (dict(kind="sparse", n_features=4, mean_active=5.0), "mean_active \\(5.0\\) cannot exceed n_features"),
        (dict(kind="sparse", decay=1.5), "decay must be in \\(0, 1\\]"),
        (dict(kind="sparse", coefficients="cauchy"), "coefficients must be one of uniform, exponential"),
        (dict(kind="gmm", k=0), "k must be positive"),
        (dict(kind="square", d=1), "q \\(2\\) cannot exceed d \\(1\\)"),
        (dict(kind="gaussian", scale=-1.0), "scale must be positive"),
        (dict(kind="matched"), "matched needs a source store"),
        (dict(kind="matched", source=str(tmp_path / "none.h5")), "none.h5: no such file"),
        (dict(kind="matched", source=str(sparse_toy), like=(sparse_toy, None)), "takes its width and scale from"),
        (dict(kind="gaussian", n_samples=0), "t.h5: n_samples must be a positive whole number, got 0"),
    ]
    for kw, pattern in cases:
        with pytest.raises(SparsefeatError, match=pattern) as e:
            write_toy(out=out, progress=False, **kw)
        assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_existing_output_is_kept_without_force(sparse_toy, digest):
    before = digest(sparse_toy)
    with pytest.raises(SparsefeatError, match="already exists; pass --force"):
        write_toy("gaussian", sparse_toy, d=3, n_samples=10, progress=False)
    assert digest(sparse_toy) == before and not partial_path(sparse_toy).exists()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_toy_end_to_end(tmp_path, capsys):
    out = tmp_path / "c.h5"
    argv = ["toy", "sparse", "--out", str(out), "--n-samples", "900", "--seed", "5", "--test-fraction", "0.3",
            "--n-features", "16", "--d", "8", "--set", "mean_active=2.5", "--set", "correlated=true",
            "--set", "scale=none", "--dtype", "float16", "--no-progress"]
    assert cli.main(argv) == 0
    assert str(out) in capsys.readouterr().out
    with ActivationStore(out) as s:
        p = s.provenance
        assert p["params"]["mean_active"] == 2.5 and p["params"]["correlated"] is True
        assert p["params"]["n_features"] == 16 and p["seed"] == 5 and p["n_samples"] == 900
        assert s.test_fraction == 0.3 and s.f["activations/x"].dtype == np.float16
    assert cli.main(argv) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert cli.main(argv + ["--force"]) == 0

    matched = tmp_path / "m.h5"
    assert cli.main(["toy", "matched", "--out", str(matched), "--source", str(out), "--site", "x",
                     "--n-samples", "500", "--no-progress"]) == 0
    like = tmp_path / "l.h5"
    assert cli.main(["toy", "square", "--out", str(like), "--like", str(out), "--n-samples", "500",
                     "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", "--json", str(matched)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["provenance"]["source"]["path"] == str(out.resolve())
    with ActivationStore(like) as s:
        assert s.width("x") == 8 and s.provenance["like"]["path"] == str(out.resolve())


@pytest.mark.parametrize("argv,pattern", [
    (["toy", "gmm", "--set", "nope=1"], "has no parameter nope \\(valid: k, d, separation, spread"),
    (["toy", "gmm", "--set", "k=many"], "--set k=many: expected int"),
    (["toy", "sparse", "--set", "correlated=maybe"], "--set correlated=maybe: expected true or false"),
    (["toy", "gmm", "--set", "k"], "expected key=value"),
    (["toy", "gmm", "--k", "0"], "k must be positive"),
    (["toy", "matched", "--source", "/nonexistent/store.h5"], "store.h5: no such file"),
])
def test_cli_toy_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, pattern):
    import re
    assert cli.main(argv + ["--out", str(tmp_path / "o.h5"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparsefeat toy: error:") and re.search(pattern, err)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# Kill tests with default settings (issue 8): SIGKILL anywhere, then --resume == uninterrupted
# --------------------------------------------------------------------------------------------

TOY_DEFAULT = ["toy", "sparse", "--no-progress"]  # 100,000 rows x 256, 13 blocks of 8,192 rows

# A toy run that SIGKILLs itself at one point of closing the store (`when`): before the ground
# truth is written, just before the .partial is renamed, or just after.
SELF_KILLED_AT_CLOSE = """
import os, signal, sys
import sparsefeat.store.writer as writer
when = sys.argv[1]
finish, replace = writer.StoreWriter._finish, os.replace
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def killed_finish(self, *a, **kw):
    if when == "finish":
        die()
    return finish(self, *a, **kw)
def killed_replace(src, dst):
    if when == "before-rename":
        die()
    replace(src, dst)
    if when == "after-rename":
        die()
writer.StoreWriter._finish = killed_finish
writer.os.replace = killed_replace
from sparsefeat import cli
cli.main(sys.argv[2:])
"""


def _contents(path: Path) -> dict:
    """Every dataset's bytes and every attribute of a store, except the timestamps."""
    import h5py
    out = {}
    with h5py.File(path, "r") as f:
        out["/"] = {k: v for k, v in f.attrs.items() if k not in ("created", "completed")}

        def visit(name, obj):
            attrs = dict(obj.attrs)
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.dtype.str, obj.shape, obj[()].tobytes(), attrs)
            else:
                out[name] = attrs
        f.visititems(visit)
    return out


def _same_store(got: Path, want: Path) -> None:
    a, b = _contents(got), _contents(want)
    assert sorted(a) == sorted(b)
    for key in a:
        assert repr(a[key]) == repr(b[key]), key


@pytest.fixture(scope="module")
def default_toy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default") / "reference.h5"
    assert cli.main(TOY_DEFAULT + ["--out", str(out)]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("blocks", sorted(np.random.default_rng(2026).choice(np.arange(1, 13), 3, replace=False)))
def test_default_toy_killed_at_a_random_commit_resumes_bit_identical(tmp_path, kill_after_commit, default_toy,
                                                                     blocks):
    out = tmp_path / "k.h5"
    code = f"from sparsefeat import cli; cli.main({TOY_DEFAULT + ['--out', str(out)]!r})"
    committed = kill_after_commit(code, out, min_rows=int(blocks) * 8192)
    assert committed < 100_000 and not out.exists()
    assert cli.main(TOY_DEFAULT + ["--out", str(out), "--resume"]) == 0
    _same_store(out, default_toy)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["finish", "before-rename", "after-rename"])
def test_default_toy_killed_while_closing_resumes_bit_identical(tmp_path, default_toy, when):
    import os
    import signal
    import subprocess
    import sys
    out = tmp_path / "k.h5"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", SELF_KILLED_AT_CLOSE, when, *TOY_DEFAULT, "--out", str(out)],
                          env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert out.exists() == (when == "after-rename")
    assert cli.main(TOY_DEFAULT + ["--out", str(out), "--resume"]) == 0
    assert not partial_path(out).exists()
    _same_store(out, default_toy)


# --------------------------------------------------------------------------------------------
# ToyConfig: the one source of write_toy's and `sparsefeat toy`'s defaults (issue 9.3)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,pattern", [
    (dict(n_samples=0), "n_samples must be a positive whole number, got 0"),
    (dict(n_samples=2.5), "n_samples must be a positive whole number, got 2.5"),
    (dict(seed=-1), "seed must be a non-negative whole number, got -1"),
    (dict(seed=True), "seed must be a non-negative whole number, got True"),
    (dict(test_fraction=0.0), "test fraction must be in \\(0, 1\\)"),
    (dict(test_fraction="0.1"), "test fraction must be in \\(0, 1\\)"),
    (dict(dtype="int8"), "dtype must be float16 or float32, not 'int8'"),
    (dict(block_rows=0), "block_rows must be a positive whole number, got 0"),
])
def test_toy_config_refuses_bad_values_with_a_config_error(kw, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        ToyConfig(**kw)
    assert "\n" not in str(e.value)


def test_write_toy_takes_a_config_or_its_fields_as_keywords_alike(tmp_path):
    config = ToyConfig(n_samples=700, seed=4, test_fraction=0.25, dtype="float16", block_rows=300)
    a = write_toy("gaussian", tmp_path / "a.h5", config, d=6, progress=False)
    b = write_toy("gaussian", tmp_path / "b.h5", n_samples=700, seed=4, test_fraction=0.25, dtype="float16",
                  block_rows=300, d=6, progress=False)
    c = write_toy("gaussian", tmp_path / "c.h5", ToyConfig(n_samples=700, seed=4), test_fraction=0.25,
                  dtype="float16", block_rows=300, d=6, progress=False)  # keywords on top of a config
    rows = []
    for path in (a, b, c):
        with ActivationStore(path) as s:
            p = s.provenance
            assert (p["n_samples"], p["seed"], p["block_rows"], s.test_fraction) == (700, 4, 300, 0.25)
            rows.append(s.f["activations/x"][:])
    assert rows[0].dtype == np.float16
    np.testing.assert_array_equal(rows[0], rows[1])
    np.testing.assert_array_equal(rows[0], rows[2])
    with pytest.raises(ConfigError, match="d.h5: n_samples must be a positive whole number"):
        write_toy("gaussian", tmp_path / "d.h5", config, n_samples=0, d=6, progress=False)
    assert not (tmp_path / "d.h5").exists()


def test_cli_toy_options_and_their_defaults_come_from_toy_config(capsys):
    assert cli.main(["toy", "gaussian", "--help"]) == 0  # main returns argparse's exit status instead of raising it
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(ToyConfig):
        assert f"--{f.name.replace('_', '-')}" in text
        assert f"{f.metadata['help']} (default: {f.default})" in text


@pytest.mark.parametrize("argv,pattern", [
    (["--n-samples", "0"], "o.h5: n_samples must be a positive whole number, got 0"),
    (["--block-rows", "-5"], "o.h5: block_rows must be a positive whole number, got -5"),
    (["--seed", "-1"], "o.h5: seed must be a non-negative whole number, got -1"),
])
def test_cli_toy_bad_store_options_exit_2_with_one_line_naming_the_output(tmp_path, capsys, argv, pattern):
    import re
    out = tmp_path / "o.h5"
    assert cli.main(["toy", "gaussian", "--d", "4", "--out", str(out), "--no-progress"] + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparsefeat toy: error:") and re.search(pattern, err), err
    assert not list(tmp_path.iterdir())


def test_the_registries_refuse_a_second_toy_or_command_of_the_same_name():
    from sparsefeat.toys import Toy
    with pytest.raises(ConfigError, match="toy 'gmm' is already registered"):
        class Impostor(Toy):
            name = "gmm"
    with pytest.raises(ConfigError, match="command 'toy' is already registered"):
        class ImpostorCommand(cli.Command):
            name = "toy"
    assert TOYS["gmm"].__name__ == "Gmm" and cli.COMMANDS["toy"] is cli.ToyCommand

"""The sweep trainer end to end: recovery on toy data, train vs test, sweep = solo, resume, bad input,
and the results file it writes."""

import itertools
import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sparsefeat import metrics as M
from sparsefeat.cli import main
from sparsefeat.errors import SparsefeatError
from sparsefeat.results import SIGNAL_KEYS, load_results, describe
from sparsefeat.store import ActivationStore, StoreWriter, split_rows
from sparsefeat.toys import write_toy
from sparsefeat.train import (MemberSpec, SweepConfig, checkpoint_path, cross_member_signals, held_out_converged,
                              learning_rate, parse_size, train_sweep)

N_FEATURES, D = 64, 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matrices are tiny: one thread is faster and does not fight other processes for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    return write_toy("sparse", tmp_path_factory.mktemp("toy") / "sparse.h5", n_samples=20000, seed=0,
                     n_features=N_FEATURES, d=D, mean_active=5.0, progress=False)


@pytest.fixture(scope="module")
def toy_sweep(toy_store, tmp_path_factory):
    """Sizes n/4 .. 4n, two seeds, one α: the reference experiment of science.md at toy scale."""
    cfg = SweepConfig(sizes=["16", "1x", "2x", "128", "8x"], l1=[0.6], seeds=[0, 1], steps=4000,
                      batch_size=256, lr=3e-3, test_curve_points=2)
    out = tmp_path_factory.mktemp("sweep") / "sweep.h5"
    return load_results(train_sweep(toy_store, cfg, out, progress=False))


def by(results, size, seed=0):
    return next(m for m in results.members if m.dictionary_size == size and m.seed == seed)


# ---- the science -----------------------------------------------------------------------------


@pytest.mark.slow
def test_recovers_ground_truth_once_the_dictionary_is_large_enough(toy_sweep):
    n = N_FEATURES
    for seed in (0, 1):
        for size in (n, 2 * n, 4 * n):
            assert by(toy_sweep, size, seed).signals["mmcs_gt"] >= 0.95
        assert by(toy_sweep, n // 4, seed).signals["mmcs_gt"] < 0.8
        assert by(toy_sweep, n // 4, seed).signals["recovered_gt"] < 0.5
        assert by(toy_sweep, n, seed).signals["recovered_gt"] >= 0.9


def test_dead_latents_appear_above_the_true_count_not_below(toy_sweep):
    for seed in (0, 1):
        assert by(toy_sweep, 4 * N_FEATURES, seed).metrics["test"]["dead_fraction"] > 0
        assert by(toy_sweep, N_FEATURES // 2, seed).metrics["test"]["dead_fraction"] == 0
        assert by(toy_sweep, N_FEATURES // 2, seed).metrics["train"]["dead_fraction"] == 0


def test_seeds_agree_at_the_true_size(toy_sweep):
    assert by(toy_sweep, N_FEATURES).signals["shared_seed"] >= 0.85
    assert by(toy_sweep, 4 * N_FEATURES).signals["shared_seed"] < 0.5
    assert by(toy_sweep, N_FEATURES).signals["mmcs_next"] >= 0.95  # every true feature is in the 2n one


@pytest.mark.slow
def test_train_loss_below_test_loss_with_a_gap_growing_with_size(tmp_path):
    store = write_toy("sparse", tmp_path / "noisy.h5", n_samples=2000, seed=1, n_features=N_FEATURES, d=D,
                      mean_active=5.0, noise=0.5, test_fraction=0.5, progress=False)
    cfg = SweepConfig(sizes=["16", "128", "1024"], l1=[0.3], seeds=[0], steps=2000, lr=3e-3, test_curve_points=0)
    r = load_results(train_sweep(store, cfg, tmp_path / "sweep.h5", progress=False))
    gaps = []
    for m in sorted(r.members, key=lambda m: m.dictionary_size):
        train, test = m.metrics["train"], m.metrics["test"]
        assert train["rows"] == test["rows"]  # a train sample as large as the test split
        assert train["loss"] <= test["loss"]
        gaps.append(test["loss"] - train["loss"])
    assert gaps[0] < gaps[1] < gaps[2]


@pytest.mark.slow
def test_topk_keeps_k_latents_and_recovers_features(toy_store, tmp_path):
    cfg = SweepConfig(sizes=["16", "64"], arch="topk", k=[4, 8], seeds=[0], steps=1500, lr=3e-3, test_curve_points=0,
                      model={"auxk_dead_rows": 20000})
    r = load_results(train_sweep(toy_store, cfg, tmp_path / "topk.h5", progress=False))
    for m in r.members:
        assert m.sparsity_name == "k"
        assert m.metrics["test"]["l0"] <= m.sparsity + 1e-9
        assert m.metrics["test"]["loss"] == pytest.approx(m.metrics["test"]["mse"])  # no penalty term
    assert by(r, 64).signals["mmcs_gt"] > by(r, 16).signals["mmcs_gt"] + 0.2


# ---- the results file ------------------------------------------------------------------------


def test_results_file_holds_what_the_analysis_needs(toy_sweep, toy_store):
    r = toy_sweep
    assert r.label == "sparse:x" and r.site == "x" and r.d == D and r.store_kind == "toy"
    assert r.store_provenance["generator"] == "sparse" and len(r.store_hash) == 16
    assert r.ground_truth.shape == (N_FEATURES, D)
    assert len(r.members) == 10 and len(r.table()) == 20
    assert [m.dictionary_size for m in r.members[:5]] == [16, 32, 64, 128, 256]
    n_test = ActivationStore(toy_store).n_rows("test")
    for m in r.members:
        assert set(m.signals) == set(SIGNAL_KEYS)
        assert m.metrics["test"]["rows"] == n_test
        dec = r.decoder(m.id)
        assert dec.shape == (m.dictionary_size, D)
        np.testing.assert_allclose(np.linalg.norm(dec, axis=1), 1.0, atol=1e-5)
        assert r.encoder(m.id).shape == (m.dictionary_size, D)
        for split in ("train", "test"):
            assert r.row_sse(m.id, split).shape == (n_test,)
            freq = r.feature_frequency(m.id, split)
            assert freq.shape == (m.dictionary_size,)
            assert M.dead_fraction(freq) == pytest.approx(m.metrics[split]["dead_fraction"])
        assert m.curves["train"].shape == (4000 // 100, 2) and m.curves["test"].shape == (2, 2)
        assert m.curves["test"][-1, 0] == 4000
    largest = [m for m in r.members if m.dictionary_size == 256]
    assert all(math.isnan(m.signals["mmcs_next"]) for m in largest)
    assert {t["member"] for t in r.signals["next"]} == {m.id for m in r.members if m.dictionary_size < 256}
    assert len(r.signals["seeds"]) == 5
    info = describe(r.path)
    json.dumps(info, allow_nan=False)  # strict JSON: NaN became null
    assert info["members"] == 10 and info["label"] == "sparse:x"


def test_stored_metrics_equal_the_metric_functions_on_the_whole_split(toy_sweep, toy_store):
    from sparsefeat.load import load_sae
    r = toy_sweep
    with ActivationStore(toy_store) as s:
        raw = s.load("x", "test")
    x = raw * r.normalisation_scale  # metrics are in the trainer's normalised units
    for m in r.members[::3]:
        with torch.no_grad():
            x_hat, c = load_sae(r, m.id)(raw)
        x_hat = x_hat * r.normalisation_scale
        got = m.metrics["test"]
        assert got["mse"] == pytest.approx(M.mse(x, x_hat), rel=1e-4)
        assert got["fvu"] == pytest.approx(M.fvu(x, x_hat), rel=1e-4)
        assert got["l0"] == pytest.approx(M.l0(c), rel=1e-4)
        assert got["l1"] == pytest.approx(M.l1(c), rel=1e-4)
        assert got["shrinkage"] == pytest.approx(M.shrinkage(x, x_hat), rel=1e-4)
        assert got["loss"] == pytest.approx(M.mse(x, x_hat) + m.sparsity * M.l1(c), rel=1e-4)
        assert got["dead_fraction"] == pytest.approx(M.dead_fraction(c))
        np.testing.assert_allclose(r.row_sse(m.id, "test"), M.row_sse(x, x_hat).numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["relu-l1", "topk"])
def test_load_sae_reproduces_the_trainers_members_on_raw_rows(small_store, tmp_path, arch):
    from sparsefeat.load import load_sae
    from sparsefeat.train import Sweep
    cfg = small_config(arch=arch, k=[2, 3], steps=80, model={"auxk_dead_rows": 640} if arch == "topk" else {})
    with ActivationStore(small_store) as s:
        sweep = Sweep(s, cfg, tmp_path / "r.h5", progress=False)
        path = sweep.run()
        raw = s.load("x", "test")
    assert sweep.scale != 1.0  # the loaded module must apply the input normalisation itself
    with torch.no_grad(), load_results(path) as r:
        for st, specs in zip(sweep.stacks, sweep.stack_specs):
            x_hat, codes = st(raw * sweep.scale)  # the trainer's own modules, normalised units
            for g, spec in enumerate(specs):
                sae = load_sae(path, spec.id)
                got_hat, got_codes = sae(raw)
                torch.testing.assert_close(got_codes, codes[g])
                torch.testing.assert_close(got_hat * sweep.scale, x_hat[g])
                torch.testing.assert_close(sae.decode(sae.encode(raw)), got_hat)
                stored = r.row_sse(spec.id, "test")
                np.testing.assert_allclose(M.row_sse(raw * sweep.scale, got_hat * sweep.scale).numpy(), stored,
                                           rtol=1e-4, atol=1e-6)
                if arch == "topk":
                    assert ((got_codes != 0).sum(-1) <= spec.sparsity).all()


def test_results_store_the_documents_of_the_test_rows_and_count_needs_no_store(tmp_path):
    from sparsefeat.count import test_documents
    n, d = 1200, 8
    docs = np.repeat(np.arange(n // 40), 40)
    test = np.isin(docs, np.arange(0, n // 40, 5)).astype(np.uint8)  # whole documents held out
    store = tmp_path / "model.h5"
    with StoreWriter(store, sites={"x": d}, provenance={"test": 1}, kind="model", tokens=True,
                     split_unit="document") as w:
        w.append({"x": np.random.default_rng(0).normal(size=(n, d))}, test=test,
                 tokens=dict(doc=docs, pos=np.arange(n) % 40, ids=np.zeros(n, np.int64)))
    r = load_results(train_sweep(store, small_config(steps=20, sizes=["8"], l1=[0.1], seeds=[0]), tmp_path / "r.h5",
                                 progress=False))
    np.testing.assert_array_equal(r.test_documents, docs[test == 1])
    store.unlink()  # the store moved away: the results file still knows the documents
    np.testing.assert_array_equal(test_documents(r, int(test.sum())), docs[test == 1])


def test_version_1_results_files_are_still_read(small_store, tmp_path):
    import h5py
    path = train_sweep(small_store, small_config(steps=20, sizes=["8"], l1=[0.1], seeds=[0]), tmp_path / "v1.h5",
                       progress=False)
    with h5py.File(path, "a") as f:  # what version 1 wrote: no thresholds, no test documents
        f.attrs["format_version"] = 1
        del f.attrs["signal_thresholds"]
    with load_results(path) as r:
        assert r.signal_thresholds == {"match": 0.9, "seed": 0.7} and r.test_documents is None
        assert r.decoder(r.members[0].id).shape == (8, 8)


def test_version_2_results_files_are_read_with_training_unknown(small_store, tmp_path):
    import h5py
    path = train_sweep(small_store, small_config(steps="auto", min_steps=40, max_steps=40, converge_every=20,
                                                 converge_window=20, sizes=["8"], l1=[0.1], seeds=[0]),
                       tmp_path / "v2.h5", progress=False)
    with h5py.File(path, "a") as f:  # what version 2 wrote: no training record
        f.attrs["format_version"] = 2
        del f["members"]["m=8,l1=0.1,seed=0"]["training"]
    with load_results(path) as r:
        assert r.members[0].training == dict.fromkeys(["steps_trained", "stop_reason", "converged", "dead_never_alive",
                                                       "dead_died_later", "resampled", "copied_from",
                                                       "objective_from_scratch"])
        assert r.members[0].converged is None


def test_inputs_are_scaled_to_unit_mean_squared_norm(toy_sweep, toy_store):
    with ActivationStore(toy_store) as s:
        msn = s.mean_squared_norm("x")
    assert toy_sweep.normalisation_scale ** 2 * msn == pytest.approx(1.0, rel=0.02)  # from a sample


# ---- reproducibility ---------------------------------------------------------------------------


def small_config(**kw):
    base = dict(sizes=["8", "16"], l1=[0.1, 0.5], seeds=[0, 1], steps=120, batch_size=64, log_every=20,
                test_curve_points=2, checkpoint_every=40)
    base.update(kw)
    return SweepConfig(**base)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return write_toy("sparse", tmp_path_factory.mktemp("small") / "small.h5", n_samples=3000, seed=3,
                     n_features=16, d=8, mean_active=2.0, progress=False)


def assert_same_member(a, b, ma, mb):
    for split in ("train", "test"):
        for k, v in ma.metrics[split].items():
            assert mb.metrics[split][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (ma.id, split, k)
    for name in ("encoder", "decoder", "encoder_bias", "decoder_bias"):
        np.testing.assert_allclose(getattr(b, name)(mb.id), getattr(a, name)(ma.id), rtol=1e-5, atol=1e-6)
    for k in ("train", "test"):
        np.testing.assert_allclose(mb.curves[k], ma.curves[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["relu-l1", "topk"])
def test_a_member_trained_in_a_sweep_equals_it_trained_alone(small_store, tmp_path, arch):
    kw = dict(arch=arch, k=[2, 4], model={"auxk_dead_rows": 640} if arch == "topk" else {})
    sweep = load_results(train_sweep(small_store, small_config(**kw), tmp_path / "sweep.h5", progress=False))
    member = [m for m in sweep.members if m.dictionary_size == 16 and m.seed == 1][-1]  # the 2nd sparsity
    solo_cfg = small_config(sizes=["16"], seeds=[1], l1=[member.sparsity], k=[int(member.sparsity)], arch=arch,
                            model=kw["model"])
    solo = load_results(train_sweep(small_store, solo_cfg, tmp_path / "solo.h5", progress=False))
    assert [m.id for m in solo.members] == [member.id]
    assert_same_member(sweep, solo, member, solo.members[0])


def test_same_config_same_numbers(small_store, tmp_path):
    a = load_results(train_sweep(small_store, small_config(), tmp_path / "a.h5", progress=False))
    b = load_results(train_sweep(small_store, small_config(), tmp_path / "b.h5", progress=False))
    for ma, mb in zip(a.members, b.members):
        assert_same_member(a, b, ma, mb)


KILLED_RUN = """
import sys, torch
torch.set_num_threads(1)
from sparsefeat.train import SweepConfig, train_sweep
cfg = SweepConfig(**{config!r})
train_sweep(sys.argv[1], cfg, sys.argv[2], resume=True, progress=False)
"""


@pytest.mark.slow
def test_resume_after_sigkill_ends_like_an_uninterrupted_run(small_store, tmp_path):
    cfg = dict(sizes=["8", "16"], l1=[0.1, 0.5], seeds=[0, 1], steps=3000, batch_size=64, log_every=20,
               test_curve_points=3, checkpoint_every=40, arch="topk", k=[2, 3], model={"auxk_dead_rows": 640})
    out, ckpt = tmp_path / "killed.h5", checkpoint_path(tmp_path / "killed.h5")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN.format(config=cfg), str(small_store), str(out)])
    try:
        deadline = time.time() + 60
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert ckpt.exists(), "the run never wrote a checkpoint"
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists(), "the run finished before it could be killed"
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < 3000
    resumed = load_results(train_sweep(small_store, SweepConfig(**cfg), out, resume=True, progress=False))
    assert not ckpt.exists()  # removed once the results are written
    whole = load_results(train_sweep(small_store, SweepConfig(**cfg), tmp_path / "whole.h5", progress=False))
    for ma, mb in zip(whole.members, resumed.members):
        assert_same_member(whole, resumed, ma, mb)


# A sweep with every default setting (test-curve points at steps 600, 1200, ..., checkpoints every 1000
# steps of 3000), killed at one point and resumed. Each hook makes the child SIGKILL itself at an exact
# place, so the test is deterministic; "after-first-checkpoint" is killed from outside instead.
DEFAULT_RUN = """
import os, signal, sys, torch
torch.set_num_threads(1)
import sparsefeat.train as T, sparsefeat.results as R
from sparsefeat.train import SweepConfig, train_sweep
def die():
    os.kill(os.getpid(), signal.SIGKILL)
{hook}
train_sweep(sys.argv[1], SweepConfig(), sys.argv[2], resume=True, progress=False)
"""

KILL_HOOKS = {
    # mid-training, past a test-curve point and a checkpoint (the run that issue 8 could not resume)
    "training-step-1737": """
step_on = T.Sweep.step_on
def hooked(self, batch):
    if self.step == 1737:
        die()
    return step_on(self, batch)
T.Sweep.step_on = hooked
""",
    # half-way through writing the second checkpoint: the first must survive and be used
    "checkpoint-write": """
save, calls = torch.save, []
def hooked(obj, f, *a, **kw):
    calls.append(1)
    save(obj, f, *a, **kw)
    if len(calls) == 2:
        os.truncate(f, os.path.getsize(f) // 2)
        die()
torch.save = hooked
""",
    # while the results file is being written (third member): training must not be lost
    "results-write": """
write_member, calls = R._write_member, []
def hooked(*a, **kw):
    calls.append(1)
    if len(calls) == 3:
        die()
    return write_member(*a, **kw)
R._write_member = hooked
""",
    "after-first-checkpoint": "",
}


@pytest.fixture(scope="module")
def default_store(tmp_path_factory):
    return write_toy("sparse", tmp_path_factory.mktemp("default") / "toy.h5", n_samples=3000, seed=5,
                     n_features=16, d=8, mean_active=2.0, progress=False)


@pytest.fixture(scope="module")
def default_sweep(default_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("default-sweep") / "whole.h5"
    return load_results(train_sweep(default_store, SweepConfig(), out, progress=False))


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_HOOKS))
def test_default_sweep_killed_anywhere_resumes_to_the_uninterrupted_result(default_store, default_sweep, tmp_path,
                                                                           point, kill_when):
    out, ckpt = tmp_path / "killed.h5", checkpoint_path(tmp_path / "killed.h5")
    ready = (lambda: ckpt.exists()) if point == "after-first-checkpoint" else None
    kill_when(DEFAULT_RUN.format(hook=KILL_HOOKS[point]), ready, args=(default_store, out))
    assert not out.exists(), "the run finished before it was killed"
    state = torch.load(ckpt, weights_only=True)  # what the resume will read: plain tensors and values only
    assert state["step"] >= 1000 and len(state["curves"][default_sweep.members[0].id]["test"]) >= 1
    resumed = load_results(train_sweep(default_store, SweepConfig(), out, resume=True, progress=False))
    for ma, mb in zip(default_sweep.members, resumed.members):
        assert_same_member(default_sweep, resumed, ma, mb)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.h5"]  # no checkpoint, lock or temporary left


# ---- bad input: a clear one-line error and nothing lost ---------------------------------------------


def test_bad_sizes_sites_and_splits_give_one_line_errors(small_store, tmp_path):
    with pytest.raises(ValueError, match="must be positive"):
        SweepConfig(sizes=["0"])
    with pytest.raises(ValueError, match="neither a whole number"):
        SweepConfig(sizes=["big"])
    out = tmp_path / "out.h5"
    with pytest.raises(SparsefeatError, match=r"small\.h5.*must be positive.*0\.01x"):
        train_sweep(small_store, small_config(sizes=["0.01x"]), out, progress=False)
    with pytest.raises(SparsefeatError, match=r"small\.h5: no site 'resid'"):
        train_sweep(small_store, small_config(site="resid"), out, progress=False)
    with pytest.raises(SparsefeatError, match=r"no_test\.h5: test fraction must be in \(0, 1\)"):
        write_toy("sparse", tmp_path / "no_test.h5", n_samples=500, n_features=16, d=8, progress=False,
                  test_fraction=0.0)
    no_test = tmp_path / "no_test.h5"  # a store without test rows can still be written by hand (or be old)
    with StoreWriter(no_test, sites={"x": 8}, provenance={"generator": "by hand"}) as w:
        w.append({"x": np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32)}, test=np.zeros(500, bool))
    with pytest.raises(SparsefeatError, match=r"no_test\.h5: has no test split"):
        train_sweep(no_test, small_config(), out, progress=False)
    with pytest.raises(SparsefeatError, match="fewer than one batch"):
        train_sweep(small_store, small_config(batch_size=100_000), out, progress=False)
    assert not out.exists() and not checkpoint_path(out).exists()


def test_existing_results_are_never_overwritten_without_force(small_store, tmp_path):
    out = tmp_path / "out.h5"
    out.write_bytes(b"precious")
    with pytest.raises(SparsefeatError, match="already exists; pass --force"):
        train_sweep(small_store, small_config(), out, progress=False)
    with pytest.raises(SparsefeatError, match="already complete; nothing to resume"):
        train_sweep(small_store, small_config(), out, resume=True, progress=False)
    assert out.read_bytes() == b"precious"


def write_rows(path, x):
    with StoreWriter(path, sites={"x": x.shape[1]}, provenance={"test": path.name}, allow_nonfinite=True) as w:
        w.append({"x": x}, test=split_rows(len(x), 0.1, 0))
    return path


def test_nan_loss_stops_with_member_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = small_config(normalise=False, model={"pre_bias": "none"}, steps=400, log_every=10, checkpoint_every=10)
    # Find a training row that the stream serves at step 21, by streaming a store whose rows carry their
    # own index (the order depends on the split and the seed only), then poison that row.
    x = np.random.default_rng(0).normal(size=(2000, 8)).astype(np.float32)
    x[:, 0] = np.arange(2000)
    with ActivationStore(write_rows(tmp_path / "index.h5", x)) as s:
        stream = s.batches("x", "train", cfg.batch_size, seed=cfg.data_seed, drop_last=True, epochs=None)
        row = int(next(itertools.islice(stream, 20, None))[0, 0])
    x[:, 0] = 0.5
    x[row] = np.nan
    store = write_rows(tmp_path / "nan.h5", x)
    out = tmp_path / "out.h5"
    out.write_bytes(b"old results")
    with pytest.raises(SparsefeatError) as e:
        train_sweep(store, cfg, out, force=True, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "at step 21;" in msg and "member m=8,l1=0.1,seed=0" in msg
    assert "last good checkpoint" in msg and "(step 20)" in msg
    kept = torch.load(checkpoint_path(out), weights_only=True)
    assert kept["step"] == 20
    assert all(torch.isfinite(v).all() for sd in kept["stacks"] for v in sd.values() if v.is_floating_point())
    assert out.read_bytes() == b"old results"
    out.unlink()
    # The kept checkpoint is neither thrown away silently nor resumed with other settings.
    with pytest.raises(SparsefeatError, match="pass --resume to continue it or --force"):
        train_sweep(store, cfg, out, progress=False)
    changed = small_config(normalise=False, model={"pre_bias": "none"}, steps=400, log_every=10,
                           checkpoint_every=10, lr=0.01)
    with pytest.raises(SparsefeatError, match="cannot resume with a different lr"):
        train_sweep(store, changed, out, resume=True, progress=False)
    assert checkpoint_path(out).exists()


FULL_DISK_RUN = """
import contextlib, io, json, os, shutil, sys, torch
torch.set_num_threads(1)
from sparsefeat.cli import main
store, disk, outside = sys.argv[1:4]
out = os.path.join(disk, "sweep.h5")
save, calls = torch.save, []
def hooked(obj, f, *a, **kw):  # fill the disk once the chosen checkpoint is written
    save(obj, f, *a, **kw)
    calls.append(1)
    if len(calls) == {fill_after}:
        st = os.statvfs(disk)
        with open(os.path.join(disk, "filler"), "wb") as fill:
            fill.write(b"x" * max(0, st.f_bavail * st.f_frsize - 2048))
torch.save = hooked
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(["sweep", store, "--out", out, "--no-progress"])
ckpt = os.path.join(disk, "sweep.h5.ckpt")
report = dict(code=code, err=err.getvalue(), files=sorted(os.listdir(disk)),
              step=int(torch.load(ckpt, weights_only=True)["step"]) if os.path.exists(ckpt) else None)
os.remove(os.path.join(disk, "filler"))  # free the space, then resume as the message advises
torch.save = save
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    report["resumed"] = main(["sweep", store, "--out", out, "--no-progress", "--resume"])
shutil.copy(out, os.path.join(outside, "resumed.h5"))
json.dump(report, open(os.path.join(outside, "report.json"), "w"))
"""


def run_on_small_disk(code: str, args, disk, size="4m"):
    """Run `python -c code args` with a tmpfs of `size` mounted on `disk` (its own mount namespace)."""
    import os
    import shlex
    disk.mkdir()
    script = (f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(disk))} || exit 99; exec {sys.executable} "
              f"-c {shlex.quote(code)} " + " ".join(shlex.quote(str(a)) for a in args))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, timeout=300)
    except FileNotFoundError:
        pytest.skip("needs unshare to mount a small tmpfs")
    if proc.returncode == 99 or b"unshare:" in proc.stderr[:200]:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode()[:200]}")
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("fill_after,kept_step,where", [(1, 1000, "sweep.h5.ckpt"), (3, 3000, "sweep.h5")])
def test_full_disk_at_a_checkpoint_or_the_final_write_is_one_line_and_resumes(default_store, default_sweep,
                                                                              tmp_path, fill_after, kept_step, where):
    code = FULL_DISK_RUN.replace("{fill_after}", str(fill_after))
    run_on_small_disk(code, [default_store, tmp_path / "disk", tmp_path], tmp_path / "disk")
    report = json.loads((tmp_path / "report.json").read_text())
    err = report["err"]
    assert report["code"] == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{where}: no space left" in err and "--resume" in err, err
    assert report["step"] == kept_step and "sweep.h5" not in report["files"]  # the last checkpoint is kept
    assert report["resumed"] == 0
    resumed = load_results(tmp_path / "resumed.h5")
    for ma, mb in zip(default_sweep.members, resumed.members):
        assert_same_member(default_sweep, resumed, ma, mb)


def test_a_sweep_too_large_for_memory_is_refused_before_allocating(small_store, tmp_path, capsys):
    out = tmp_path / "huge.h5"
    args = ["sweep", str(small_store), "--sizes", "100000000", "--seeds", "0", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "this sweep needs about" in err and "weights and Adam state" in err
    assert "available; use smaller --sizes" in err
    assert not out.exists() and not checkpoint_path(out).exists()
    assert main(["sweep", str(small_store), "--sizes", "8", "--seeds", "0", "--steps", "20", "--out", str(out)]) == 0
    startup = capsys.readouterr().err.splitlines()[0]  # the start-up line states the estimate
    assert startup.startswith("sweep small:x: 1 members (sizes 8), 20 steps on cpu; memory about ")
    assert "codes per batch" in startup and "evaluation" in startup


def test_the_store_is_never_the_output_even_with_force(small_store, tmp_path, digest):
    before = digest(small_store)
    for extra in ([], ["--force"], ["--resume"]):
        with pytest.raises(SparsefeatError, match="is also an input"):
            train_sweep(small_store, small_config(), small_store, force="--force" in extra,
                        resume="--resume" in extra, progress=False)
    assert digest(small_store) == before


def test_two_sweeps_cannot_write_the_same_results_file(small_store, tmp_path):
    from sparsefeat.files import WriterLock
    out = tmp_path / "locked.h5"
    with WriterLock(out, what="results file"):  # another sweep writing this file right now
        with pytest.raises(SparsefeatError, match="another process is writing this results file"):
            train_sweep(small_store, small_config(), out, force=True, progress=False)
        with pytest.raises(SparsefeatError, match="another process is writing"):
            train_sweep(small_store, small_config(), out, resume=True, progress=False)
    assert not out.exists()
    train_sweep(small_store, small_config(steps=20, sizes=["8"]), out, progress=False)  # free again
    assert out.exists() and not (tmp_path / "locked.h5.lock").exists()


def test_topk_with_k_not_below_the_dictionary_size_is_refused(small_store, tmp_path):
    with pytest.raises(SparsefeatError, match=r"k=16 needs dictionaries larger than k, but one has 8 latents"):
        train_sweep(small_store, small_config(arch="topk", k=[2, 16], sizes=["8", "32"]), tmp_path / "k.h5",
                    progress=False)
    with pytest.raises(SparsefeatError, match=r"k=8 .* one has 8 latents"):
        train_sweep(small_store, small_config(arch="topk", k=[8], sizes=["8"]), tmp_path / "k.h5", progress=False)
    assert not (tmp_path / "k.h5").exists()


def test_an_unfinished_store_is_refused_with_advice_to_resume_it(tmp_path):
    from sparsefeat.store import partial_path
    w = StoreWriter(tmp_path / "cut.h5", sites={"x": 8}, provenance={"test": 1})
    w.append({"x": np.random.default_rng(0).normal(size=(600, 8))}, test=split_rows(600, 0.2, 0))
    w.close(complete=False)
    with pytest.raises(SparsefeatError, match=r"cut\.h5\.partial: is an unfinished store.*resume the store first"):
        train_sweep(partial_path(tmp_path / "cut.h5"), small_config(), tmp_path / "out.h5", progress=False)
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize("damage,message", [
    ("nan-decoder", "decoder holds NaN or Inf values"),
    ("shape-decoder", "decoder has shape (8, 7), expected (8, 8)"),
    ("no-metrics", "has no metrics group"),
])
def test_damaged_results_files_are_one_line_errors_for_count_and_plot(small_store, tmp_path, capsys, damage,
                                                                      message):
    import h5py
    path = train_sweep(small_store, small_config(steps=40, sizes=["8", "16"], l1=[0.1]), tmp_path / "r.h5",
                       progress=False)
    member = "m=8,l1=0.1,seed=0"
    with h5py.File(path, "a") as f:
        g = f["members"][member]
        if damage == "nan-decoder":
            g["decoder"][0, 0] = np.nan
        elif damage == "shape-decoder":
            del g["decoder"]
            g["decoder"] = np.zeros((8, 7), np.float32)
        else:
            del g["metrics"]
    for command in (["count", str(path)], ["plot", str(path), "--out", str(tmp_path / "fig")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "r.h5" in err, err


# ---- small pieces --------------------------------------------------------------------------------


def test_sizes_and_learning_rate_schedule():
    assert parse_size("2x", 384) == 768 and parse_size("0.5x", 384) == 192 and parse_size("100", 384) == 100
    cfg = SweepConfig(sizes=["1x", "32", "2x", "64"])
    assert cfg.resolved_sizes(32) == [32, 64]
    assert learning_rate(0, 100, 1.0, "constant", 10) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, "constant", 10) == pytest.approx(1.0)
    assert learning_rate(55, 100, 1.0, "linear", 10) == pytest.approx(0.5)
    assert learning_rate(55, 100, 1.0, "cosine", 10) == pytest.approx(0.5)
    assert learning_rate(10, 100, 1.0, "cosine", 10) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not both"):
        SweepConfig(steps=10, epochs=1)


def test_epochs_set_the_number_of_steps(small_store, tmp_path):
    r = load_results(train_sweep(small_store, small_config(steps=None, epochs=2, sizes=["8"], l1=[0.1], seeds=[0]),
                                 tmp_path / "e.h5", progress=False))
    run = r.config["run"]
    assert run["total_steps"] == 2 * (run["train_rows"] // 64)
    assert r.members[0].curves["train"][-1, 0] == run["total_steps"]


# ---- the command line ------------------------------------------------------------------------------


def test_cli_sweep_prints_a_table_or_json_and_refuses_to_overwrite(small_store, tmp_path, capsys):
    out = tmp_path / "cli.h5"
    args = ["sweep", str(small_store), "--sizes", "8,16", "--l1", "0.1", "--seeds", "0,1", "--steps", "60",
            "--batch-size", "64", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "test loss" in text and "16" in text
    assert main(args + ["--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
    assert main(args + ["--json", "--force"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["dictionary_size"], r["split"]) for r in rows} == {(8, "train"), (8, "test"), (16, "train"),
                                                                  (16, "test")}
    assert main(["sweep", str(small_store), "--sizes", "0", "--out", str(tmp_path / "x.h5")]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert main(["sweep", str(small_store), "--site", "nope", "--out", str(tmp_path / "x.h5")]) == 2
    assert "no site 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["relu-l1", "topk"])
def test_bf16_autocast_on_cpu_trains_as_float32_does(toy_store, tmp_path, arch):
    # --bf16 on a CPU (fast where it has native bf16; correct on any): the same sweep, losses within a few
    # percent of float32's, the dictionary as good against the truth
    cfg = dict(sizes=["32", "64"], arch=arch, l1=[0.6], k=[5], seeds=[0], steps=400, lr=3e-3, device="cpu",
               test_curve_points=2)
    fp32 = load_results(train_sweep(toy_store, SweepConfig(**cfg), tmp_path / "fp32.h5", progress=False))
    bf16 = load_results(train_sweep(toy_store, SweepConfig(bf16=True, **cfg), tmp_path / "bf16.h5", progress=False))
    assert bf16.config["bf16"] is True and fp32.config["bf16"] is False
    for a, b in zip(fp32.members, bf16.members):
        assert b.metrics["test"]["loss"] == pytest.approx(a.metrics["test"]["loss"], rel=0.05)
        assert b.signals["mmcs_gt"] == pytest.approx(a.signals["mmcs_gt"], abs=0.03)


def test_bf16_on_a_cpu_without_native_bf16_warns_in_one_line(toy_store, tmp_path, monkeypatch, capsys):
    import sparsefeat.train as train_module
    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: False)
    train_sweep(toy_store, SweepConfig(sizes=["8"], seeds=[0], steps=5, device="cpu", bf16=True), tmp_path / "r.h5",
                progress=False)
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "without native bfloat16" in warning[0]


# ---- CUDA (run by benchmarks/gpu_check.sh on a machine with a GPU; skipped elsewhere) ---------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_sweep_matches_cpu(toy_store, tmp_path):
    # the device-cached stream on both: the same batches in the same order (randperm on the host)
    cfg = dict(sizes=["32", "64"], l1=[0.6], seeds=[0, 1], steps=600, lr=3e-3, test_curve_points=2, device_cache="on")
    cpu = load_results(train_sweep(toy_store, SweepConfig(device="cpu", **cfg), tmp_path / "cpu.h5", progress=False))
    gpu = load_results(train_sweep(toy_store, SweepConfig(device="cuda", **cfg), tmp_path / "gpu.h5", progress=False))
    assert gpu.config["run"]["device"].startswith("cuda")
    for a, b in zip(cpu.members, gpu.members):
        for split in ("train", "test"):
            assert b.metrics[split]["loss"] == pytest.approx(a.metrics[split]["loss"], rel=0.02)
        assert b.signals["mmcs_gt"] == pytest.approx(a.signals["mmcs_gt"], abs=0.02)


@cuda
@pytest.mark.parametrize("arch", ["relu-l1", "topk"])
def test_cuda_bf16_autocast_prefetch_and_compile(toy_store, tmp_path, arch):
    cfg = dict(sizes=["64", "128"], arch=arch, l1=[0.6], k=[5], seeds=[0], steps=2000, lr=3e-3, device="cuda",
               prefetch=2, device_cache="off")  # the store stream, pinned and prefetched
    fp32 = load_results(train_sweep(toy_store, SweepConfig(**cfg), tmp_path / "fp32.h5", progress=False))
    fast = load_results(train_sweep(toy_store, SweepConfig(bf16=True, compile=True, **cfg), tmp_path / "bf16.h5",
                                    progress=False))
    for a, b in zip(fp32.members, fast.members):
        assert math.isfinite(b.metrics["test"]["loss"])
        assert b.metrics["test"]["loss"] == pytest.approx(a.metrics["test"]["loss"], rel=0.1)
        assert b.signals["mmcs_gt"] >= 0.9


@cuda
def test_cuda_holds_a_small_train_split_on_the_device(toy_store, tmp_path):
    from sparsefeat.train import Sweep
    with ActivationStore(toy_store) as s:
        sweep = Sweep(s, SweepConfig(sizes=["32"], seeds=[0], steps=10, device="cuda"), tmp_path / "x.h5",
                      progress=False)
        assert sweep.device_cache is True  # auto: a few MB against the device's memory
        batch = next(sweep.stream)
        assert batch.device.type == "cuda" and sweep.cached_rows.device.type == "cuda"
        assert sweep.cached_rows.shape[0] == s.n_rows("train")


@cuda
@pytest.mark.parametrize("arch", ["relu-l1", "topk"])
def test_cuda_step_loop_never_waits_for_the_device(toy_store, tmp_path, arch):
    from sparsefeat.train import Sweep
    cfg = SweepConfig(sizes=["32", "64"], arch=arch, k=[4], seeds=[0, 1], steps=100, device="cuda",
                      model={"auxk_dead_rows": 256})
    with ActivationStore(toy_store) as s:
        sweep = Sweep(s, cfg, tmp_path / "x.h5", force=False, progress=False)
        sweep.train(until=10)  # warm-up, and (topk) a log that switches AuxK on for dead latents
        batches = [b for b, _ in zip(sweep.stream, range(20))]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            losses = [sweep.step_on(b) for b in batches]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(per_member).all() for step in losses for per_member in step)


def test_signal_thresholds_are_the_counts_and_recorded_in_the_file(toy_sweep):
    from sparsefeat.count import CountConfig
    from sparsefeat.signals import SignalThresholds
    assert toy_sweep.signal_thresholds == {"match": CountConfig().match_floor, "seed": 0.7}
    assert SignalThresholds.from_count_config(CountConfig(match_floor=0.5)).match == 0.5
    specs = [MemberSpec("relu-l1", 2, 0.3, 0), MemberSpec("relu-l1", 3, 0.3, 0)]
    a, b = np.eye(4)[:2], np.array([[0.8, 0.6, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])  # cosines 0.8 and 1
    weights = {specs[0].id: {"decoder": a, "encoder": a}, specs[1].id: {"decoder": b, "encoder": b}}
    _, strict = cross_member_signals(specs, weights, None, thresholds=SignalThresholds(match=0.9))
    _, loose = cross_member_signals(specs, weights, None, thresholds=SignalThresholds(match=0.75))
    assert strict[specs[0].id]["share_next_0_9"] == 0.5 and loose[specs[0].id]["share_next_0_9"] == 1.0


def test_results_hold_one_handle_until_closed(toy_sweep):
    with load_results(toy_sweep.path) as r:
        first = r.decoder(r.members[0].id)
        handle = r._file
        r.encoder(r.members[1].id), r.row_sse(r.members[2].id, "test")
        assert r._file is handle and handle.id.valid  # no reopening per array
        np.testing.assert_array_equal(r.decoder(r.members[0].id), first)
    assert r._file is None and not handle.id.valid


def test_mmcs_with_the_next_size_ignores_dead_atoms():
    rng = np.random.default_rng(0)
    big = rng.standard_normal((8, 16))
    big /= np.linalg.norm(big, axis=1, keepdims=True)
    dead = rng.standard_normal((2, 16))
    small = np.concatenate([big[:2], dead / np.linalg.norm(dead, axis=1, keepdims=True)])
    specs = [MemberSpec("relu-l1", 4, 0.3, 0), MemberSpec("relu-l1", 8, 0.3, 0)]
    weights = {specs[0].id: {"decoder": small, "encoder": small}, specs[1].id: {"decoder": big, "encoder": big}}
    alive = {specs[0].id: np.array([True, True, False, False]), specs[1].id: np.ones(8, bool)}
    _, with_alive = cross_member_signals(specs, weights, None, alive)
    _, all_atoms = cross_member_signals(specs, weights, None)
    assert with_alive[specs[0].id]["mmcs_next"] == pytest.approx(1.0)  # the two live atoms are in the big one
    assert all_atoms[specs[0].id]["mmcs_next"] < 0.9  # random dead atoms pull the plain MMCS down
    assert math.isnan(with_alive[specs[1].id]["mmcs_next"])  # the largest size has no next


# ---- steps=auto: each size trains until its held-out loss converges (issue 10.1) ---------------------


def auto_config(**kw):
    base = dict(sizes=["16", "256"], l1=[0.6], seeds=[0, 1], steps="auto", batch_size=256, lr=3e-3,
                min_steps=300, converge_every=100, converge_window=300, converge_tolerance=0.01, max_steps=6000,
                checkpoint_every=0)
    base.update(kw)
    return SweepConfig(**base)


@pytest.mark.slow
def test_auto_steps_train_a_small_dictionary_less_than_a_large_one_and_record_it(toy_store, tmp_path):
    r = load_results(train_sweep(toy_store, auto_config(), tmp_path / "auto.h5", progress=False))
    small, large = by(r, 16), by(r, 256)
    for m in r.members:
        assert (m.training["stop_reason"], m.converged) == ("converged", True)
        assert m.curves["test"][-1, 0] == m.steps_trained  # the check that stopped it is its last test point
        assert m.curves["train"][-1, 0] == m.steps_trained
    assert 300 <= small.steps_trained < large.steps_trained < 6000
    assert by(r, 16, seed=1).steps_trained == small.steps_trained  # members of a size stop together
    assert r.config["run"]["total_steps"] == large.steps_trained
    # the rule, on the stored held-out curve: under 1% better than the best before the last 300 steps
    curve = large.curves["test"]
    t = large.steps_trained
    before, recent = curve[curve[:, 0] <= t - 300, 1], curve[curve[:, 0] > t - 300, 1]
    assert (before.min() - recent.min()) <= 0.01 * before.min()


@pytest.mark.slow
def test_a_process_training_some_members_stops_when_its_own_sizes_have_converged(toy_store, tmp_path):
    """Under torchrun each rank trains some sizes (Sweep(members=...)); with steps=auto it must stop once
    its own sizes converge, not idle on to max_steps waiting for sizes another rank trains."""
    from sparsefeat.train import Sweep
    with ActivationStore(toy_store) as store:
        small_only = Sweep(store, auto_config(), tmp_path / "part.h5", progress=False,
                           members=[s.id for s in Sweep(store, auto_config(), tmp_path / "all.h5",
                                                       progress=False).specs if s.size == 16])
        small_only.train()
    assert small_only.finished and set(small_only.stopped) == {16}
    assert small_only.stopped[16][1] == "converged" and small_only.step < auto_config().max_steps


def test_auto_steps_stop_at_max_steps_unconverged_and_record_it(small_store, tmp_path):
    cfg = small_config(steps="auto", min_steps=40, max_steps=60, converge_every=20, converge_window=40,
                       converge_tolerance=0.0, sizes=["8", "16"], l1=[0.1], lr=1e-4)
    r = load_results(train_sweep(small_store, cfg, tmp_path / "max.h5", progress=False))
    assert [(m.steps_trained, m.training["stop_reason"], m.converged) for m in r.members] == [(60, "max_steps", False)] * 4


def test_fixed_steps_record_no_convergence_and_are_what_auto_trains_in_as_many_steps(small_store, tmp_path):
    fixed = load_results(train_sweep(small_store, small_config(), tmp_path / "fixed.h5", progress=False))
    assert {(m.steps_trained, m.training["stop_reason"], m.converged) for m in fixed.members} == {(120, "fixed", None)}
    auto = load_results(train_sweep(small_store, small_config(steps="auto", min_steps=120, max_steps=120,
                                                              converge_every=40, converge_window=40),
                                    tmp_path / "auto.h5", progress=False))
    for ma, mb in zip(fixed.members, auto.members):
        assert mb.steps_trained == 120 and mb.converged is not None
        for name in ("encoder", "decoder", "encoder_bias", "decoder_bias"):  # the same arithmetic, step by step
            np.testing.assert_array_equal(getattr(auto, name)(mb.id), getattr(fixed, name)(ma.id))


def test_steps_accept_auto_from_the_command_line_and_refuse_other_words():
    from sparsefeat.cli import build_parser, config_from_args
    parser = build_parser()
    args = parser.parse_args(["sweep", "s.h5", "--out", "o.h5", "--steps", "auto", "--max-steps", "1500"])
    cfg = config_from_args(SweepConfig, args)
    assert cfg.steps == "auto" and cfg.auto_steps and cfg.max_steps == 1500
    assert config_from_args(SweepConfig, parser.parse_args(["sweep", "s.h5", "--out", "o.h5", "--steps", "300"])
                            ).steps == 300
    for bad, words in [(dict(steps="often"), "whole number or 'auto'"), (dict(steps="auto", epochs=2), "not both"),
                       (dict(steps="auto", lr_schedule="cosine"), "lr-schedule constant"),
                       (dict(steps="auto", min_steps=5000, max_steps=1000), "above max-steps"),
                       (dict(steps="auto", converge_window=300, converge_every=200), "multiple")]:
        with pytest.raises(SparsefeatError, match=words):
            SweepConfig(**bad)


AUTO_KILLED_RUN = """
import os, signal, sys, torch
torch.set_num_threads(1)
import sparsefeat.train as T
from sparsefeat.train import SweepConfig, train_sweep
step_on = T.Sweep.step_on
def hooked(self, batch):  # die just after the first checkpoint written once a size has stopped
    if self.stopped and self.checkpoint_step and self.checkpoint_step > min(s for s, _ in self.stopped.values()):
        os.kill(os.getpid(), signal.SIGKILL)
    return step_on(self, batch)
T.Sweep.step_on = hooked
train_sweep(sys.argv[1], SweepConfig(**{config!r}), sys.argv[2], resume=True, progress=False)
"""


@pytest.mark.slow
def test_auto_steps_resume_after_sigkill_ends_like_an_uninterrupted_run(small_store, tmp_path, kill_when):
    cfg = dict(sizes=["4", "32"], l1=[0.1, 0.5], seeds=[0, 1], steps="auto", batch_size=64, log_every=20,
               min_steps=100, max_steps=3000, converge_every=20, converge_window=60, checkpoint_every=40)
    out, ckpt = tmp_path / "killed.h5", checkpoint_path(tmp_path / "killed.h5")
    kill_when(AUTO_KILLED_RUN.format(config=cfg), None, args=(small_store, out))
    state = torch.load(ckpt, weights_only=True)
    assert len(state["stopped"]) == 1 and state["stopped"][0][2] == "converged"  # one size stopped, one trains
    resumed = load_results(train_sweep(small_store, SweepConfig(**cfg), out, resume=True, progress=False))
    whole = load_results(train_sweep(small_store, SweepConfig(**cfg), tmp_path / "whole.h5", progress=False))
    assert by(whole, 4).steps_trained < by(whole, 32).steps_trained
    for ma, mb in zip(whole.members, resumed.members):
        assert mb.training == ma.training
        assert_same_member(whole, resumed, ma, mb)


# ---- cool-down: after a size stops, its learning rate falls linearly to 0 -----------------------------


def cooldown_config(**kw):
    base = dict(sizes=["4", "32"], l1=[0.1, 0.5], seeds=[0, 1], steps="auto", batch_size=64, log_every=20,
                min_steps=100, max_steps=3000, converge_every=20, converge_window=60, checkpoint_every=40,
                cooldown_steps=40)
    base.update(kw)
    return SweepConfig(**base)


def test_cooldown_lowers_a_stopped_sizes_learning_rate_to_zero_while_others_train_on(small_store, tmp_path):
    from sparsefeat.train import Sweep
    cfg = cooldown_config()
    with ActivationStore(small_store) as store:
        sweep = Sweep(store, cfg, tmp_path / "cool.h5", progress=False)
        while not sweep.stopped:
            sweep.train(until=sweep.step + 20)
        (size, (stop, reason)), = sweep.stopped.items()
        assert size == 4 and reason == "converged"
        sweep.train(until=stop + 11)  # the step from stop + 10 ran at 1 - 10/40 of the learning rate
        small = next(i for i, specs in enumerate(sweep.stack_specs) if specs[0].size == size)
        lrs = {specs[0].size: g["lr"] for specs, g in zip(sweep.stack_specs, sweep.optimizer.param_groups)}
        assert lrs == {4: pytest.approx(0.75 * cfg.lr), 32: cfg.lr}
        assert sweep.active(small) and not sweep.finished
        sweep.train(until=stop + cfg.cooldown_steps)
        assert not sweep.active(small)  # after the cool-down it stops for good: Adam no longer moves it
        frozen = sweep.stacks[small].decoder.detach().clone()
        sweep.train(until=sweep.step + 20)
        assert torch.equal(sweep.stacks[small].decoder, frozen)
        sweep.train()
        records = {spec.id: sweep.stop_record(spec) for spec in sweep.specs}
    for spec in sweep.specs:
        step, why = sweep.stopped[spec.size]
        assert records[spec.id]["steps_trained"] == step + 40  # judged where it stopped, trained 40 steps more
        assert records[spec.id]["stop_reason"] == why
    assert sweep.step == max(step for step, _ in sweep.stopped.values()) + 40


def test_cooldown_after_max_steps_extends_the_run_by_the_cooldown(small_store, tmp_path):
    cfg = small_config(steps="auto", min_steps=40, max_steps=60, converge_every=20, converge_window=40,
                       converge_tolerance=0.0, sizes=["8", "16"], l1=[0.1], lr=1e-4, cooldown_steps=30)
    r = load_results(train_sweep(small_store, cfg, tmp_path / "max.h5", progress=False))
    assert [(m.steps_trained, m.training["stop_reason"], m.converged) for m in r.members] == [(90, "max_steps", False)] * 4
    assert r.config["run"]["total_steps"] == 90


def test_a_run_resumed_inside_a_cooldown_ends_like_an_uninterrupted_one(small_store, tmp_path):
    from sparsefeat.train import Sweep
    cfg = cooldown_config()
    whole = load_results(train_sweep(small_store, cfg, tmp_path / "whole.h5", progress=False))
    first_stop = min(m.steps_trained for m in whole.members) - 40
    out = tmp_path / "resumed.h5"
    with ActivationStore(small_store) as store:
        sweep = Sweep(store, cfg, out, progress=False)
        sweep.train(until=first_stop + 20)  # half way down the first size's cool-down, a checkpoint step
        assert sweep.checkpoint_step == first_stop + 20 and sweep.lr_factor(0) == pytest.approx(0.5)
    resumed = load_results(train_sweep(small_store, cfg, out, resume=True, progress=False))
    for ma, mb in zip(whole.members, resumed.members):
        assert mb.training == ma.training
        assert_same_member(whole, resumed, ma, mb)


def test_cooldown_is_for_auto_steps_and_whole_numbers(small_store, tmp_path):
    with pytest.raises(SparsefeatError, match="cooldown-steps must be a whole number"):
        SweepConfig(steps="auto", cooldown_steps=-1)
    # with a step count there is no stop to cool down from: the run is the same with or without one
    plain = load_results(train_sweep(small_store, small_config(), tmp_path / "plain.h5", progress=False))
    cooled = load_results(train_sweep(small_store, small_config(cooldown_steps=50), tmp_path / "c.h5", progress=False))
    for ma, mb in zip(plain.members, cooled.members):
        assert mb.steps_trained == ma.steps_trained == 120
        np.testing.assert_array_equal(cooled.decoder(mb.id), plain.decoder(ma.id))


def test_count_reads_no_plateau_from_sizes_that_did_not_converge(toy_sweep):
    from sparsefeat.count import CountConfig, count_sweep
    with load_results(toy_sweep.path) as r:
        key = (r.members[0].arch, r.members[0].sparsity_name, r.members[0].sparsity)
        before = count_sweep(r, "toy", "toy", key, r.members, CountConfig())
        assert before.saturation.estimate is not None
        plateau = before.saturation.size
        for m in r.members:
            if m.dictionary_size >= plateau:
                m.training.update(steps_trained=4000, stop_reason="max_steps", converged=False)
        after = count_sweep(r, "toy", "toy", key, r.members, CountConfig())
    assert after.saturation.estimate is None
    assert after.saturation.lower_bound == before.saturation.estimate
    assert f"m={plateau} did not converge in 4000 steps; not read as a plateau" in after.warnings


# ---- dead latents: never alive or died later; resampling (issue 10.2) --------------------------------


def test_last_firing_separates_latents_never_alive_from_those_that_died(toy_sweep):
    for m in toy_sweep.members:
        last = toy_sweep.last_fired(m.id)
        assert last.shape == (m.dictionary_size,) and 0 <= last.min() and last.max() <= m.steps_trained == 4000
        dead = toy_sweep.feature_frequency(m.id, "test") == 0
        assert m.training["dead_never_alive"] == int((dead & (last == 0)).sum())
        assert m.training["dead_died_later"] + m.training["dead_never_alive"] == \
            round(m.metrics["test"]["dead_fraction"] * m.dictionary_size)
        assert np.median(last[~dead]) >= 3990  # latents alive on the test split fire to the end of training
        assert m.training["resampled"] == 0
    big = by(toy_sweep, 256)
    assert big.training["dead_never_alive"] + big.training["dead_died_later"] > 0  # past m = n latents die


def test_resampling_restarts_dead_relu_latents_and_is_refused_for_topk(small_store, tmp_path):
    def sweep(name, **kw):
        cfg = small_config(sizes=["64"], l1=[2.0], seeds=[0], lr=1e-2, **kw)
        r = load_results(train_sweep(small_store, cfg, tmp_path / f"{name}.h5", progress=False))
        return r, r.members[0]
    (upto, mu), (plain, mp) = sweep("upto", steps=300), sweep("plain", steps=400)
    r, m = sweep("resampled", steps=400, resample_steps=[300], resample_window=100)
    dead_at_300 = int((upto.last_fired(mu.id) <= 200).sum())  # the same run up to step 300: whom it restarts
    assert m.training["resampled"] == dead_at_300 > 0 and mp.training["resampled"] == 0
    assert not np.array_equal(r.decoder(m.id), plain.decoder(mp.id))
    assert (r.last_fired(m.id) > 300).sum() > (plain.last_fired(mp.id) > 300).sum()  # restarted latents fire
    with pytest.raises(SparsefeatError, match="relu-l1"):
        SweepConfig(arch="topk", resample_steps=[100])
    with pytest.raises(SparsefeatError, match="resample step 100 comes before any latent can be dead"):
        SweepConfig(resample_steps=[100, 300], resample_window=250)  # would silently restart nothing at 100


def test_a_member_whose_held_out_loss_converged_is_converged_though_its_size_ran_to_max_steps(small_store, tmp_path):
    """A size trains until all its members converge; a member that had converged while a sibling (here the
    weak setting) kept the size training to max_steps is recorded converged, by its own curve (the count
    reads its plateau), and the sibling is not."""
    cfg = small_config(steps="auto", min_steps=40, max_steps=200, converge_every=20, converge_window=40,
                       converge_tolerance=0.005, sizes=["16"], l1=[0.01, 10.0], seeds=[0], lr=1e-2)
    r = load_results(train_sweep(small_store, cfg, tmp_path / "own.h5", progress=False))
    weak, strong = sorted(r.members, key=lambda m: m.sparsity)
    assert {m.training["stop_reason"] for m in r.members} == {"max_steps"}
    assert (weak.converged, strong.converged) == (False, True)
    for m in (weak, strong):  # the record is the rule applied to the member's stored held-out curve
        assert m.converged == held_out_converged(m.curves["test"].tolist(), 200, 40, 0.005)


# ---- a larger dictionary never ends worse than a smaller one (issue 10) -----------------------------


@pytest.mark.parametrize("copy", [True, False])
def test_a_member_ending_above_a_smaller_one_takes_its_dictionary(small_store, tmp_path, copy):
    """The largest member of one seed and setting is spoiled after training (encoder zeroed: it
    reconstructs only the bias), so it ends far above the smaller members. With copy_smaller_when_worse
    it takes the best smaller member's dictionary, extra latents off, and ends exactly where that one
    does; the file records the copy and the objective from scratch. Other members are untouched."""
    from sparsefeat.train import Sweep
    cfg = small_config(sizes=["4", "8", "16"], l1=[0.1], copy_smaller_when_worse=copy, checkpoint_every=0)
    with ActivationStore(small_store) as store:
        run = Sweep(store, cfg, tmp_path / "r.h5", progress=False)
        run.train()
        big = next(i for i, specs in enumerate(run.stack_specs) if specs[0].size == 16)
        with torch.no_grad():
            run.stacks[big].encoder[1].zero_()  # seed 1's m=16
        r = load_results(run.write_results(run.evaluate()))
    loss = {(m.dictionary_size, m.seed): m.metrics["train"]["loss"] for m in r.members}
    spoiled, untouched = by(r, 16, seed=1), by(r, 16, seed=0)
    assert untouched.training["copied_from"] is None and untouched.training["objective_from_scratch"] is None
    if not copy:
        assert spoiled.training["copied_from"] is None
        assert loss[16, 1] > 1.5 * min(loss[4, 1], loss[8, 1])
        return
    source = min((4, 8), key=lambda m: loss[m, 1])
    assert spoiled.training["copied_from"] == source
    assert spoiled.training["objective_from_scratch"] > 1.5 * loss[source, 1]
    assert loss[16, 1] == pytest.approx(loss[source, 1], rel=1e-6)
    assert spoiled.metrics["test"]["mse"] == pytest.approx(by(r, source, seed=1).metrics["test"]["mse"], rel=1e-6)
    np.testing.assert_array_equal(r.decoder(spoiled.id)[:source], r.decoder(by(r, source, seed=1).id))
    np.testing.assert_array_equal(r.encoder(spoiled.id)[source:], 0.0)
    assert (r.feature_frequency(spoiled.id, "test")[source:] == 0).all()
    assert (r.last_fired(spoiled.id)[source:] == 0).all()  # counted as never alive
    assert spoiled.training["dead_never_alive"] >= 16 - source


def test_the_count_judges_training_failures_by_the_objective_from_scratch():
    """A size whose members took a smaller one's dictionary ends level with it, yet from scratch it failed:
    the undertraining warning (and the collapse rule built on it) still sees the failure."""
    from sparsefeat.count import SizeRow, undertraining_warnings

    def row(size, final, scratch):
        return SizeRow(size=size, seeds=2, train_mse=final, test_mse=final, train_fvu=final, test_fvu=final,
                       train_objective=final, gap=0.0, l0=1.0, dead_fraction=0.0, mmcs_next=math.nan,
                       shared_seed=math.nan, mmcs_gt=math.nan, threshold=0.9, reproduced=3.0,
                       reproduced_spread=0.0, copied=2 if scratch != final else 0, objective_from_scratch=scratch)
    assert undertraining_warnings([row(16, 0.5, 0.5), row(32, 0.5, 0.5)]) == []
    warned = undertraining_warnings([row(16, 0.5, 0.5), row(32, 0.5, 0.6)])
    assert len(warned) == 1 and "m=32" in warned[0] and "+20%" in warned[0]


# ---- the train split held on the device (issue 11) -------------------------------------------------


def test_the_device_cached_stream_covers_the_train_split_once_per_epoch(small_store, tmp_path):
    from sparsefeat.train import Sweep
    cfg = small_config(batch_size=100, device_cache="on")
    with ActivationStore(small_store) as store:
        run = Sweep(store, cfg, tmp_path / "c.h5", progress=False)
        per_epoch = run.batches_per_epoch
        first = torch.cat([next(run.stream) for _ in range(per_epoch)])
        second = torch.cat([next(run.stream) for _ in range(per_epoch)])
        train = store.load(split="train")
        assert Sweep(store, small_config(), tmp_path / "d.h5", progress=False).device_cache is False  # auto on CPU
    assert first.shape == (per_epoch * 100, train.shape[1]) and per_epoch * 100 > train.shape[0] - 100
    from collections import Counter
    drawn, split = Counter(map(tuple, first.tolist())), Counter(map(tuple, train.tolist()))
    assert all(drawn[r] <= split[r] for r in drawn)  # no row twice within an epoch (the toy repeats some rows)
    assert not torch.equal(first, second)  # a new permutation every epoch


def test_a_device_cached_sweep_resumes_to_the_uninterrupted_result(small_store, tmp_path):
    """The cached stream skips to any step, and a resumed run keeps the stream its checkpoint used, even
    when the resuming config says otherwise."""
    from sparsefeat.train import Sweep
    cfg = small_config(device_cache="on", checkpoint_every=0)
    with ActivationStore(small_store) as store:
        whole = load_results(Sweep(store, cfg, tmp_path / "whole.h5", progress=False).run())
        plain = load_results(Sweep(store, small_config(checkpoint_every=0), tmp_path / "plain.h5",
                                   progress=False).run())
        first = Sweep(store, cfg, tmp_path / "part.h5", progress=False)
        first.train(until=60)  # at a logging step, so the logged curves match too
        first.save_checkpoint()
        resumed = Sweep(store, small_config(checkpoint_every=0, device_cache="off"), tmp_path / "part.h5",
                        resume=True, progress=False)
        assert resumed.device_cache is True and resumed.step == 60
        part = load_results(resumed.run())
    for a, b in zip(whole.members, part.members):
        assert_same_member(whole, part, a, b)
    assert not np.allclose(whole.decoder(whole.members[0].id), plain.decoder(plain.members[0].id))  # another order

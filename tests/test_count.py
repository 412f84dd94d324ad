"""The feature count: the estimator's maths on synthetic decoder matrices and loss arrays, then the
whole estimator on real sweeps of toy data with a known number of features."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparsefeat import count as C


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def random_atoms(n, d, seed):
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def near(atoms, cos, seed):
    """Atoms at cosine `cos` from the given ones (a random orthogonal tilt)."""
    noise = np.random.default_rng(seed).standard_normal(atoms.shape)
    noise -= (noise * atoms).sum(1, keepdims=True) * atoms
    return unit(cos * atoms + math.sqrt(1 - cos ** 2) * unit(noise))


# ---- matching -------------------------------------------------------------------------------


@pytest.mark.parametrize("d,m", [(16, 64), (32, 256), (384, 1024)])
def test_random_threshold_is_the_chance_level_of_the_best_cosine(d, m):
    tau = C.random_match_threshold(d, m, 0.99)
    best = np.concatenate([(random_atoms(m, d, 2 * t + 1) @ random_atoms(m, d, 2 * t + 2).T).max(1)
                           for t in range(20_000 // m)])  # fresh draws, not the calibration's
    assert 0.007 <= (best >= tau).mean() <= 0.013  # about 1% of unrelated atoms reach it by chance


def test_threshold_is_at_least_the_floor_and_rises_in_few_dimensions():
    cfg = C.CountConfig(match_floor=0.5)
    assert C.match_threshold(384, 512, cfg) == 0.5  # chance cosines in 384 dims are far below 0.5
    assert C.match_threshold(8, 4096, cfg) > 0.9  # in 8 dims random atoms come close by chance
    assert C.match_threshold(384, 512, C.CountConfig()) == 0.9


def test_span_dimension_is_the_number_of_dimensions_the_atoms_use():
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((32, 3)))[0].T  # 3 orthonormal rows in 32-D
    in_three = random_atoms(200, 3, 1) @ basis
    assert C.span_dimension(in_three) == pytest.approx(3, rel=0.1)
    assert C.span_dimension(random_atoms(2000, 32, 2)) == pytest.approx(32, rel=0.1)
    assert C.span_dimension(in_three, random_atoms(200, 3, 3) @ basis) == pytest.approx(3, rel=0.1)


def test_atoms_tiling_a_low_dimensional_subspace_are_not_reproduced_features():
    """Two seeds that tile a 3-D sphere in 32 dims with 128 atoms each: every atom has a neighbour within
    chance of the other seed. Chance computed at the width d calls most of them reproduced; at the atoms'
    span it calls none (the manifold controls circle and sphere, and their matched nulls)."""
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((32, 3)))[0].T
    a, b = random_atoms(128, 3, 1) @ basis, random_atoms(128, 3, 2) @ basis

    def count(mode):
        cfg = C.CountConfig(chance_dimension=mode)
        width = C.chance_dimension(32, [a, b], cfg)
        return C.reproduced_directions(a, b, C.match_threshold(width, 128, cfg), merge=C.merge_threshold(width, 128, cfg))

    assert count("width") >= 5
    assert count("span") == 0
    # features spread over all 32 dimensions are still found in full
    features = random_atoms(64, 32, 4)
    cfg = C.CountConfig()
    x, y = near(features, 0.98, 5), near(features, 0.98, 6)
    width = C.chance_dimension(32, [x, y], cfg)
    assert C.reproduced_directions(x, y, C.match_threshold(width, 64, cfg), merge=C.merge_threshold(width, 64, cfg)) == 64


def test_near_duplicates_count_once_and_distinct_features_stay_apart():
    features = random_atoms(40, 32, 0)
    twins = near(features[:25], 0.97, 1)  # 25 features split into near-duplicates
    decoder = np.concatenate([features, twins])
    freq = np.concatenate([np.full(40, 0.1), np.full(25, 0.01)])
    reps = C.distinct_directions(decoder, 0.9, freq)
    assert sorted(reps) == list(range(40))  # the more frequent member of each pair represents it


def test_reproduced_directions_counts_only_shared_alive_distinct_atoms():
    rng = np.random.default_rng(0)
    shared = random_atoms(30, 48, 3)
    a = np.concatenate([near(shared, 0.98, 4), random_atoms(20, 48, 5), near(shared[:10], 0.96, 6)])
    b = np.concatenate([near(shared, 0.98, 7), random_atoms(20, 48, 8)])
    freq_a, freq_b = rng.uniform(0.01, 0.1, a.shape[0]), rng.uniform(0.01, 0.1, b.shape[0])
    assert C.reproduced_directions(a, b, 0.9, freq_a, freq_b) == 30
    freq_b[:5] = 0.0  # five of b's copies never fire: dead latents are not features
    assert C.reproduced_directions(a, b, 0.9, freq_a, freq_b) == 25
    assert C.reproduced_directions(random_atoms(50, 48, 9), random_atoms(50, 48, 10), 0.9) == 0


def test_splitting_into_near_duplicates_does_not_creep_into_the_count():
    """science.md's failure of the plateau rule: both seeds split features into near-duplicates as m
    grows, so the raw one-to-one shared count creeps (n, 1.25n, 1.5n); merging duplicates does not."""
    n, d = 64, 32
    features = random_atoms(n, d, 0)
    sizes, raw, merged = [16, 32, 64, 128, 256], [], []
    for m in sizes:
        dicts = []
        for seed in (0, 1):
            if m < n:  # too few latents: blends of features that the two seeds do not share
                dec = random_atoms(m, d, 100 + m + seed)
            else:
                split = features[: min(n, (m - n) // 2)] if m > n else features[:0]
                dec = np.concatenate([near(features, 0.99, seed), near(split, 0.96, 10 + seed),
                                      near(split, 0.96, 20 + seed), random_atoms(m - n - 2 * len(split), d, seed)])
            dicts.append(dec)
        pairs, cos = C.hungarian_match(dicts[0], dicts[1])
        raw.append(int((cos >= 0.9).sum()))
        merged.append(C.reproduced_directions(dicts[0], dicts[1], 0.9))
    assert raw[-1] > 1.3 * n  # the creep
    sat = C.find_saturation(sizes, merged)
    assert sat.estimate == pytest.approx(n, rel=0.05) and sat.size == 64


# ---- saturation ------------------------------------------------------------------------------


def test_saturation_finds_the_first_size_of_the_plateau():
    s = C.find_saturation([8, 16, 32, 64, 128], [7, 15, 30, 31, 32])
    assert (s.size, s.estimate) == (32, 32)
    assert s.uncertainty == 1.0


def test_saturation_tolerates_a_fall_after_the_plateau():
    s = C.find_saturation([16, 32, 64, 128], [10, 40, 62, 50])
    assert (s.size, s.estimate) == (64, 62)


def test_no_saturation_when_the_count_keeps_growing():
    s = C.find_saturation([16, 32, 64, 128], [12, 25, 48, 90])
    assert s.estimate is None and s.size is None and s.lower_bound == 90 and s.largest_size == 128


def test_a_single_size_never_saturates_and_nothing_is_zero():
    assert C.find_saturation([64], [60]).estimate is None
    s = C.find_saturation([16, 32, 64], [0, 0, 1])
    assert (s.estimate, s.size) == (1, 16)


def size_rows(objectives):
    return [C.SizeRow(size=16 * 2 ** i, seeds=2, train_mse=o, test_mse=o, train_fvu=o, test_fvu=o, train_objective=o,
                      gap=0.0, l0=1.0, dead_fraction=0.0, mmcs_next=math.nan, shared_seed=math.nan, mmcs_gt=math.nan,
                      threshold=0.9, reproduced=1.0, reproduced_spread=0.0) for i, o in enumerate(objectives)]


def test_a_larger_dictionary_with_a_higher_training_objective_is_flagged_undertrained():
    assert C.undertraining_warnings(size_rows([0.5, 0.3, 0.2, 0.21, 0.2])) == []
    (warning,) = C.undertraining_warnings(size_rows([0.5, 0.3, 0.2, 0.25, 0.3]))
    assert warning.startswith("undertrained: m=128") and "+25%" in warning and "m=64" in warning


# ---- the held-out stop -----------------------------------------------------------------------


def losses_by_size(means, rows=4000, seed=0, noise=0.3):
    """Per-row squared errors whose means follow `means`; rows share a per-row difficulty, as the
    same test rows do across sizes."""
    rng = np.random.default_rng(seed)
    difficulty = rng.gamma(2.0, 0.5, rows)
    return [np.clip(mu * difficulty + noise * mu * rng.standard_normal(rows) * 0.1, 0, None) for mu in means]


def test_paired_bootstrap_sees_a_small_improvement_that_unpaired_noise_would_hide():
    a, b = losses_by_size([1.0, 0.99])
    mean, boot = C.paired_improvement(a, b, n_boot=400, seed=0)
    assert mean == pytest.approx(np.mean(a - b))
    assert np.quantile(boot, 0.05) > 0  # 1% better on the same rows is real...
    spread_unpaired = math.hypot(a.std(), b.std()) / math.sqrt(a.size)
    assert spread_unpaired > mean / 2  # ...though it is within the noise of the two means taken apart


def test_held_out_stop_is_where_test_loss_stops_improving_while_train_falls():
    sizes = [16, 32, 64, 128, 256]
    test = losses_by_size([1.0, 0.6, 0.4, 0.4, 0.4])
    test[3] = test[2] * 1.0005  # flat within noise from 64 on
    test[4] = test[2] * 1.02    # and worse at the largest size
    train = [0.95, 0.55, 0.35, 0.30, 0.25]
    h = C.held_out_stop(sizes, test, train, n_boot=300)
    assert h.size == 64
    assert h.improving_steps == [True, True, False, False]
    assert h.train_still_falls and h.train_change == pytest.approx(0.25 / 0.35 - 1)
    assert h.test_change == pytest.approx(0.02, abs=1e-3)


def test_held_out_stop_is_none_when_the_largest_step_still_helps():
    sizes = [16, 32, 64]
    h = C.held_out_stop(sizes, losses_by_size([1.0, 0.8, 0.7]), [1.0, 0.8, 0.7], n_boot=200)
    assert h.size is None and h.improving_steps == [True, True]


def test_document_bootstrap_is_wider_than_row_bootstrap_for_correlated_rows():
    rng = np.random.default_rng(0)
    docs = np.repeat(np.arange(40), 100)  # 40 documents of 100 tokens, the improvement varies by document
    diff = rng.normal(0.01, 0.05, 40)[docs] + rng.normal(0, 0.01, docs.size)
    base = np.full(docs.size, 1.0)
    _, by_row = C.paired_improvement(base, base - diff, n_boot=400, seed=1)
    _, by_doc = C.paired_improvement(base, base - diff, n_boot=400, seed=1, groups=docs)
    assert by_doc.std() > 3 * by_row.std()


# ---- the count table over results files --------------------------------------------------------


def write_sweep(path, *, label, n_true=12, d=16, sizes=(4, 8, 16, 32, 64), seeds=(0, 1), sparsities=(0.1,),
                store_path="store.h5", site="x", store_kind="toy", provenance=None, ground_truth=False,
                test_rows=300, seed=0):
    """A results file written by the real writer, from dictionaries with a known structure: each seed
    holds min(m, n_true) copies of the same n_true directions (cos 0.99) and random atoms beyond;
    losses fall with m until n_true and stay flat after. Returns the path."""
    from sparsefeat.results import Member, MemberArrays, Results, write_results
    rng = np.random.default_rng(seed)
    truth = random_atoms(n_true, d, 1000 + seed) if n_true else np.zeros((0, d))
    difficulty = rng.gamma(2.0, 0.5, test_rows)
    members, arrays = [], {}
    for sparsity in sparsities:
        for m in sizes:
            for s in seeds:
                k = min(m, n_true)
                dec = np.concatenate([near(truth[:k], 0.99, 10 * s + m), random_atoms(m - k, d, 7 + 100 * s + m)])
                level = 0.1 + 0.9 * (1 - k / n_true) if n_true else 1.0 / (1 + 0.01 * m)
                test_mse = level * (1 + sparsity)
                mid = f"s{sparsity:g}-m{m}-seed{s}"
                metrics = {split: dict(mse=test_mse * f, fvu=test_mse * f * 1.1, l1=1.0, loss=test_mse * f,
                                       l0=3.0 / (1 + sparsity) + 0.01 * m, dead_fraction=0.5 * (m > 2 * n_true),
                                       shrinkage=0.9, rows=test_rows)
                           for split, f in (("train", 1 - 0.001 * m), ("test", 1.0))}
                signals = dict(mmcs_next=0.5 + 0.005 * m, mmcs_next_hungarian=math.nan, share_next_0_9=math.nan,
                               shared_seed=k / m, mmcs_gt=(0.5 + 0.5 * k / n_true) if ground_truth else math.nan,
                               recovered_gt=math.nan)
                members.append(Member(mid, "relu-l1", m, "l1", sparsity, s, metrics, signals,
                                      {"train": np.array([[0, 1.0], [10, test_mse]]), "test": np.array([[10, test_mse]])}))
                freq = np.full(m, 0.05)
                arrays[mid] = MemberArrays(encoder=dec, encoder_bias=np.zeros(m), decoder=dec,
                                           decoder_bias=np.zeros(d),
                                           row_sse={"test": test_mse * difficulty, "train": test_mse * difficulty},
                                           frequency={"test": freq, "train": freq})
    results = Results(path=path, label=label, site=site, d=d, store_path=str(store_path), store_kind=store_kind,
                      store_provenance=provenance or {}, store_hash="0" * 8, config={}, members=members,
                      ground_truth=truth if ground_truth else None)
    return write_results(path, results, arrays)


@pytest.fixture
def study_files(tmp_path):
    """A toy with ground truth, its matched null, a control, and a model's layers 0 and 3 with a
    random-init twin, all as results files whose relations are only in their provenance."""
    st = tmp_path / "stores"
    minilm = dict(model="m", random_init=False, layers=[0, 3])
    files = [
        write_sweep(tmp_path / "toy.h5", label="sparse", n_true=12, store_path=st / "sparse.h5",
                    provenance=dict(generator="sparse", params=dict(n_features=12, d=16)), ground_truth=True),
        write_sweep(tmp_path / "null.h5", label="sparse-null", n_true=0, store_path=st / "null.h5",
                    provenance=dict(generator="matched", source=dict(path=str(st / "sparse.h5"), site="x"))),
        write_sweep(tmp_path / "gmm.h5", label="gmm", n_true=5, store_path=st / "gmm.h5",
                    provenance=dict(generator="gmm", params=dict(k=5, d=16))),
        write_sweep(tmp_path / "l0.h5", label="m/resid_0", n_true=6, site="resid_0", store_kind="model",
                    store_path=st / "m.h5", provenance=minilm),
        write_sweep(tmp_path / "l3.h5", label="m/resid_3", n_true=20, site="resid_3", store_kind="model",
                    store_path=st / "m.h5", provenance=minilm, sizes=(4, 8, 16, 32, 64, 128)),
        write_sweep(tmp_path / "r3.h5", label="r/resid_3", n_true=9, site="resid_3", store_kind="model",
                    store_path=st / "r.h5", provenance=dict(minilm, random_init=True)),
    ]
    return files


def test_count_table_infers_roles_and_controls_from_provenance(study_files):
    counts = C.count_results(study_files, C.CountConfig(bootstrap=100))
    by = {c.label: c for c in counts}
    assert [by[x].role for x in ("sparse", "sparse-null", "gmm", "m/resid_0", "m/resid_3", "r/resid_3")] == \
        ["toy", "null", "control", "model", "model", "random-init"]
    toy = by["sparse"]
    assert toy.expected == 12 and toy.saturation.estimate == 12 and toy.saturation.size == 16
    assert toy.comparisons["null"].against == "sparse-null" and toy.comparisons["null"].excess == 12
    assert toy.comparisons["control gmm"].excess == 12 - 5
    layer = by["m/resid_3"]
    assert layer.saturation.estimate == 20
    assert layer.comparisons["layer 0"].excess == 20 - 6
    assert layer.comparisons["random init"].excess == 20 - 9
    assert layer.comparisons["random init"].common_size == 64
    assert "layer 0" not in by["m/resid_0"].comparisons and "null" not in by["gmm"].comparisons
    # the held-out stop: test loss is flat beyond the true count while the train loss keeps falling
    assert toy.held_out.size == 16 and toy.held_out.train_still_falls
    # by-size numbers are the seed means of the members' metrics
    row = toy.sizes[1]
    assert row.size == 8 and row.seeds == 2 and row.reproduced == 8
    assert row.gap == pytest.approx(row.test_mse - row.train_mse)
    assert row.mmcs_gt == pytest.approx(0.5 + 0.5 * 8 / 12, abs=1e-6)


def test_count_says_no_saturation_instead_of_inventing_a_number(tmp_path):
    path = write_sweep(tmp_path / "grow.h5", label="grow", n_true=200, sizes=(8, 16, 32, 64))
    (c,) = C.count_results([path], C.CountConfig(bootstrap=100))
    assert c.saturation.estimate is None and c.saturation.lower_bound == 64
    assert c.estimate_text() == "no saturation up to m=64 (>64)"
    assert c.held_out.size is None


def test_a_sweep_of_one_size_says_so_instead_of_a_stop(tmp_path):
    (c,) = C.count_results([write_sweep(tmp_path / "one.h5", label="one", sizes=(16,))], C.CountConfig(bootstrap=20))
    assert c.saturation.estimate is None and c.held_out_text() == "one size (m=16): nothing to compare"


def test_count_json_is_strict_json(study_files):
    import json
    out = C.to_json(C.count_results(study_files, C.CountConfig(bootstrap=100)))
    text = json.dumps(out, allow_nan=False)
    toy = next(x for x in json.loads(text) if x["label"] == "sparse")
    assert toy["comparisons"]["null"]["within_noise"] is False
    assert toy["sizes"][-1]["mmcs_next"] == pytest.approx(0.5 + 0.005 * 64, abs=1e-6)


# ---- the estimator on real sweeps of toy data ----------------------------------------------------

# Settings that converge on 2 CPU cores in seconds: ~2 active features per row, L1 α = 0.3 (per row,
# not divided by m), Adam at 1e-2 for 1000 steps, two seeds.
TOY_SWEEP = dict(l1=[0.3], seeds=[0, 1], steps=1000, lr=1e-2, checkpoint_every=0)


@pytest.fixture
def one_thread():
    """Small dictionaries train as fast on one thread; two OpenMP threads on two shared cores can spin
    against other processes and run 30x slower. Restored afterwards."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sweep(store, out, sizes, **kw):
    from sparsefeat.train import SweepConfig, train_sweep
    return train_sweep(store, SweepConfig(sizes=sizes, **{**TOY_SWEEP, **kw}), out, progress=False)


@pytest.mark.parametrize("n,d", [(32, 16), pytest.param(64, 32, marks=pytest.mark.slow),
                                 pytest.param(128, 64, marks=pytest.mark.slow)])
def test_estimate_recovers_the_true_number_of_features_on_toy_data(n, d, tmp_path, one_thread):
    from sparsefeat.toys import write_toy
    store = write_toy("sparse", tmp_path / "toy.h5", n_samples=20_000, n_features=n, d=d, mean_active=2.0,
                      progress=False)
    results = sweep(store, tmp_path / "sweep.h5", [n // 2, n, 2 * n, 4 * n])  # 4n confirms a plateau at 2n
    (c,) = C.count_results([results])
    assert c.role == "toy" and c.expected == n
    assert c.saturation.estimate == pytest.approx(n, rel=0.2), C.size_table(c)
    assert c.saturation.size in (n, 2 * n) and not c.warnings
    raw = [s.shared_seed for s in c.sizes]  # the trainer's own cross-seed share, for contrast: it falls
    assert raw[-1] < raw[1]                  # as m grows past n, so no plateau of it marks n


@pytest.mark.slow
def test_excess_over_the_matched_null_is_within_noise_without_sparse_structure(tmp_path, one_thread):
    """A matched Gaussian against its own matched null: nothing to count beyond the null. The toy it
    was matched to, against its null: an excess far beyond noise."""
    from sparsefeat.toys import write_toy
    toy = write_toy("sparse", tmp_path / "toy.h5", n_samples=20_000, n_features=64, d=32, mean_active=2.0,
                    progress=False)
    gauss = write_toy("matched", tmp_path / "gauss.h5", n_samples=20_000, source=str(toy), progress=False)
    null = write_toy("matched", tmp_path / "gauss-null.h5", n_samples=20_000, source=str(gauss), seed=1,
                     progress=False)
    files = [sweep(s, tmp_path / f"sweep-{s.stem}.h5", [16, 32, 64, 128], label=s.stem) for s in (toy, gauss, null)]
    by = {c.label: c for c in C.count_results(files)}
    assert by["gauss"].role == "null" and by["gauss"].comparisons["null"].against == "gauss-null"
    assert by["gauss"].comparisons["null"].within_noise is True
    assert abs(by["gauss"].comparisons["null"].excess) <= 3
    toy_vs_null = by["toy"].comparisons["null"]
    assert toy_vs_null.against == "gauss" and toy_vs_null.within_noise is False and toy_vs_null.excess > 40


# ---- the count command ---------------------------------------------------------------------------


HEADLINE_KEYS = {"estimate", "uncertainty", "lower_bound", "sparsity", "rule", "reason", "excluded", "scores"}


def test_count_command_leads_with_headlines_then_one_line_per_setting_and_json(study_files, capsys):
    import json
    from sparsefeat import cli
    assert cli.main(["count", *map(str, study_files), "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("headline")
    lead = out[1:1 + 2 * len(study_files)]  # per dataset/site its headline and its fit line, before the table
    heads, fits = lead[::2], lead[1::2]
    assert all(line.strip().startswith("fit of test FVU") for line in fits)
    toy_fit = fits[[h.strip().split(" ")[0] for h in heads].index("sparse")]
    assert "b " in toy_fit and "floor c " in toy_fit and "null sparse-null" in toy_fit and "data−null b" in toy_fit
    assert any(line.strip().startswith("sparse [toy]: 12±1 features") and "relu-l1 l1=0.1" in line
               and "only setting" in line and "vs null +12±1" in line for line in heads)
    assert any(line.strip().startswith("m/resid_3 [model]: 20±1") and "vs layer 0 +14±1" in line
               and "vs random init +11±1" in line for line in heads)
    table = out[out.index("sensitivity: every sparsity setting") + 1:]
    assert table[0].startswith("dataset/site") and len(table) == 2 + len(study_files)
    assert any(line.startswith("sparse ") and "12±1 (m=16)" in line and "+12±1" in line for line in table)
    assert cli.main(["count", *map(str, study_files), "--bootstrap", "20", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in rows] == ["sparse", "sparse-null", "gmm", "m/resid_0", "m/resid_3", "r/resid_3"]
    for r in rows:
        assert HEADLINE_KEYS <= set(r["headline"]) and r["headline"]["rule"]["name"] == "only setting"
    toy, null, layer = rows[0]["headline"], rows[1]["headline"], rows[4]["headline"]
    assert toy["estimate"] == 12 and toy["lower_bound"] == 12 and toy["reason"] is None and rows[0]["chosen"]
    assert toy["sparsity"] == {"arch": "relu-l1", "name": "l1", "value": 0.1}
    assert toy["comparisons"]["null"]["excess"] == 12 and toy["comparisons"]["null"]["within_noise"] is False
    assert toy["comparisons"]["control gmm"]["excess"] == 12 - 5
    assert null["estimate"] == 0 and null["excluded"] == [] and rows[1]["chosen"]
    assert layer["comparisons"]["random init"]["excess"] == 20 - 9


FIT_KEYS = {"exponent", "floor", "amplitude", "size_within_5pct_of_floor", "warnings", "null"}
ESTIMATE_KEYS = {"value", "low", "high"}


def test_count_json_carries_a_fit_of_the_held_out_curve_beside_the_null(study_files, capsys):
    import json
    from sparsefeat import cli
    from sparsefeat.fit import fit_loss_curve
    assert cli.main(["count", *map(str, study_files), "--bootstrap", "30", "--json"]) == 0
    rows = {r["label"]: r for r in json.loads(capsys.readouterr().out)}
    for r in rows.values():
        fit = r["headline"]["fit"]
        assert FIT_KEYS <= set(fit) and fit["ok"], fit
        for key in ("exponent", "floor", "amplitude", "size_within_5pct_of_floor"):
            assert set(fit[key]) == ESTIMATE_KEYS
        assert fit["interval_method"] == "rows" and fit["n_boot"] == 30
        assert fit["sizes"] == [s["size"] for s in r["sizes"]]
        assert fit["values"] == pytest.approx([s["test_fvu"] for s in r["sizes"]])
    toy, null = rows["sparse"]["headline"]["fit"], rows["sparse-null"]["headline"]["fit"]
    # the fit is fit.py's on the seed-mean test FVU by size
    direct = fit_loss_curve(toy["sizes"], toy["values"], n_boot=10)
    assert toy["exponent"]["value"] == pytest.approx(direct.exponent.value, rel=1e-6)
    assert toy["floor"]["value"] == pytest.approx(direct.floor.value, rel=1e-6, abs=1e-9)
    assert toy["exponent"]["low"] <= toy["exponent"]["value"] <= toy["exponent"]["high"]
    # the null's own fit is carried beside the toy's, with the differences data − null
    beside = toy["null"]
    assert beside["label"] == "sparse-null" and beside["fit"]["exponent"] == null["exponent"]
    diff = beside["exponent_difference"]
    assert diff["value"] == pytest.approx(toy["exponent"]["value"] - null["exponent"]["value"])
    assert diff["low"] <= diff["value"] <= diff["high"]
    assert beside["floor_difference"]["value"] == pytest.approx(toy["floor"]["value"] - null["floor"]["value"])
    assert null["null"] is None and rows["gmm"]["headline"]["fit"]["null"] is None  # no null of their own
    # the synthetic toy stops improving at its 12 features (floor 0.121); its null keeps falling toward 0
    assert toy["floor"]["value"] > 0.05 and null["floor"]["value"] < toy["floor"]["value"]


@pytest.mark.parametrize("make", ["text", "store", "missing"])
def test_count_command_on_a_file_that_is_not_results_is_one_line_exit_2(make, tmp_path, capsys, make_store):
    from sparsefeat import cli
    path = {"text": lambda: (tmp_path / "notes.h5").write_text("not hdf5") and tmp_path / "notes.h5",
            "store": lambda: make_store("acts.h5"),
            "missing": lambda: tmp_path / "nope.h5"}[make]()
    assert cli.main(["count", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sparsefeat count: error: ") and str(path) in err
    assert "Traceback" not in err


def test_count_options_are_validated_in_one_line(study_files, capsys):
    from sparsefeat import cli
    assert cli.main(["count", str(study_files[0]), "--match-floor", "1.5"]) == 2
    assert "match_floor must be in (0, 1]" in capsys.readouterr().err


# ---- the headline: one sparsity setting per dataset, chosen on held-out data ----------------------


def test_knee_is_the_sparsest_setting_from_which_denser_ones_buy_little():
    # (L0, FVU): too strong, good, too weak (a toy's shape: FVU jumps once the penalty kills features)
    points = [(1.3, 0.49), (3.1, 0.10), (7.5, 0.06), (27.0, 0.02)]
    chosen, gains, dominated = C.choose_setting(points, 0.1)
    assert chosen == 1 and not dominated
    assert gains[0] > 0.3 and gains[1] < 0.05 and gains[-1] == 0.0
    assert C.choose_setting(points, 0.01)[0] == 3  # a stricter knee walks to the densest
    # a setting beaten on both L0 and FVU is dominated, never chosen; order of input does not matter
    chosen, _, dominated = C.choose_setting([(27.0, 0.02), (3.1, 0.10), (4.0, 0.2)], 0.1)
    assert dominated == {2} and chosen == 1


def test_collapsed_and_undertrained_settings_are_excluded_with_their_reason():
    def sweep_of(value, fvus, dead=0, objectives=None):
        rows = size_rows(objectives or [1.0 - 0.1 * i for i in range(len(fvus))])
        for row, fvu in zip(rows, fvus):
            row.test_fvu, row.l0, row.all_dead = fvu, 2.0 / value, dead
        sat = C.find_saturation([r.size for r in rows], [10.0] * len(rows))
        return C.SweepCount(label="x", results_path="x.h5", site="x", d=16, role="toy", arch="relu-l1",
                            sparsity_name="l1", sparsity=value, expected=None, sizes=rows, saturation=sat,
                            held_out=C.HeldOutStop(None, [], None, None),
                            warnings=C.undertraining_warnings(rows) if objectives else [])
    cfg = C.CountConfig()
    assert C.collapse_reason(sweep_of(0.3, [0.5, 0.2, 0.1]), cfg) is None
    assert C.collapse_reason(sweep_of(3.0, [0.5, 0.2, 0.1], dead=1), cfg).startswith("every latent dead at m=16")
    assert C.collapse_reason(sweep_of(3.0, [1.0, 0.995, 1.0]), cfg).startswith("held-out FVU >= 0.99 at every size")
    assert C.collapse_reason(sweep_of(1.0, [0.99, 0.5, 0.3]), cfg) is None  # only the smallest explains little
    rising = sweep_of(1.0, [0.5, 0.4, 0.6], objectives=[0.5, 0.4, 0.6])
    assert C.collapse_reason(rising, cfg).startswith("loss rises with size: undertrained: m=64")
    (h,) = C.headlines([sweep_of(3.0, [1.0, 1.0, 1.0]), rising])
    assert h.estimate is None and h.sparsity is None and h.reason == "every setting collapsed"
    assert h.fit is None and C.fit_json(h)["ok"] is False and "every setting collapsed" in C.fit_json(h)["reason"]
    assert [e["sparsity"]["value"] for e in h.excluded] == [3.0, 1.0]
    (h,) = C.headlines([sweep_of(0.3, [0.5, 0.2, 0.1]), sweep_of(3.0, [1.0, 1.0, 1.0])])
    assert h.sparsity["value"] == 0.3 and h.estimate == 10 and h.rule["name"] == "held-out knee"
    assert [s.status for s in h.scores] == ["chosen", "excluded"]
    # no per-row errors in these hand-made sweeps and three sizes: a fit, but no intervals, and it says so
    assert h.fit.ok and h.fit.interval_method is None and "no intervals" in h.fit.reason


THREE_SETTINGS = dict(l1=[0.03, 0.3, 1.0])  # too weak, good, too strong (x3-x10 apart; checked by MMCS below)


@pytest.fixture(scope="module")
def headline_study(tmp_path_factory):
    """Real three-setting sweeps of two sparse toys, gmm, the square and the matched null of the larger
    toy, counted once for the tests below (about a minute on two shared cores)."""
    import torch

    from sparsefeat.toys import write_toy
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("headline")
    try:
        stores = {
            "sparse32": (write_toy("sparse", tmp / "sparse32.h5", n_samples=20_000, n_features=32, d=16,
                                   mean_active=2.0, progress=False), [16, 32, 64, 128]),
            "sparse64": (write_toy("sparse", tmp / "sparse64.h5", n_samples=20_000, n_features=64, d=32,
                                   mean_active=2.0, progress=False), [32, 64, 128, 256]),
            "gmm": (write_toy("gmm", tmp / "gmm.h5", n_samples=20_000, k=12, d=32, progress=False), [16, 32, 64, 128]),
            "square": (write_toy("square", tmp / "square.h5", n_samples=20_000, d=32, progress=False),
                       [16, 32, 64, 128]),
        }
        stores["null"] = (write_toy("matched", tmp / "null.h5", n_samples=20_000, source=str(stores["sparse64"][0]),
                                    progress=False), [16, 32, 64, 128])
        files = [sweep(path, tmp / f"sweep-{name}.h5", sizes, label=name, **THREE_SETTINGS)
                 for name, (path, sizes) in stores.items()]
    finally:
        torch.set_num_threads(before)
    study = C.count_study(files, C.CountConfig(bootstrap=100))
    return {h.label: h for h in study.headlines}, study


@pytest.mark.slow
@pytest.mark.parametrize("name,n", [("sparse32", 32), ("sparse64", 64)])
def test_headline_is_within_ten_percent_of_n_and_never_the_too_strong_setting(headline_study, name, n):
    heads, study = headline_study
    h = heads[name]
    by_value = {c.sparsity: c for c in study.sweeps if c.label == name}
    best_gt = {v: max(s.mmcs_gt for s in c.sizes) for v, c in by_value.items()}
    assert best_gt[0.3] > 0.98 and best_gt[0.03] < 0.95  # which is good and which too weak, by ground truth
    assert h.rule["name"] == "held-out knee" and h.reason is None
    assert h.estimate == pytest.approx(n, rel=0.1), [C.size_table(c) for c in by_value.values()]
    assert h.sparsity == {"arch": "relu-l1", "name": "l1", "value": 0.3}
    assert h.sparsity["value"] != max(by_value)  # never the strongest penalty
    if name == "sparse64":  # here l1=1 is too strong by ground truth, and counts far too few
        assert best_gt[1.0] < 0.95 and by_value[1.0].saturation.estimate < 0.8 * n
        assert h.comparisons["null"].against == "null" and h.comparisons["null"].within_noise is False


@pytest.mark.slow
def test_headlines_of_the_controls_stay_low(headline_study):
    heads, _ = headline_study
    assert heads["gmm"].estimate == pytest.approx(12, abs=1)  # the 12 means
    assert heads["null"].estimate is not None and heads["null"].estimate <= 3
    # the square: its reproduced atoms are its two axes in both signs (a ReLU latent is one-sided);
    # an atom and its opposite are one direction, so at most the two axes (and one stray tile) remain
    assert heads["square"].estimate is not None and heads["square"].estimate <= 3
    assert {e["sparsity"]["value"] for e in heads["square"].excluded} >= {1.0}
    assert all("every latent dead" in e["why"] or "FVU" in e["why"] or "rises" in e["why"]
               for h in heads.values() for e in h.excluded)
    for h in heads.values():  # no headline rests on a member whose latents are all dead
        assert h.sparsity is None or h.sparsity["value"] not in {e["sparsity"]["value"] for e in h.excluded}


def test_an_atom_and_its_opposite_are_one_direction_only_when_asked():
    """A pair of ReLU latents firing on the two sides of one axis (cos = -1) is one signed variable."""
    rng = np.random.default_rng(0)
    axes = np.linalg.qr(rng.normal(size=(16, 3)))[0].T  # three orthonormal directions in 16 dims
    dec_a = np.concatenate([axes, -axes[:2]])             # +e1, +e2, +e3, -e1, -e2
    dec_b = np.concatenate([-axes, axes[2:]])             # the other seed found the other signs first
    assert len(C.distinct_directions(dec_a, 0.9)) == 5
    assert len(C.distinct_directions(dec_a, 0.9, opposite=True)) == 3
    assert C.reproduced_directions(dec_a, dec_b, 0.9) == 3     # +e3 and -e1, -e2 match by sign
    assert C.reproduced_directions(dec_a, dec_b, 0.9, opposite=True) == 3
    assert len(C.reproduced_pairs(axes, -axes, 0.9)) == 0
    assert len(C.reproduced_pairs(axes, -axes, 0.9, opposite=True)) == 3


@pytest.mark.slow
def test_fit_of_a_sparse_toy_differs_from_its_matched_null_at_the_same_setting(headline_study):
    """The 64-feature toy's held-out curve falls steeper and to a lower floor than that of its matched
    Gaussian trained with the same penalty; both fall as power laws, so the difference is the point."""
    heads, study = headline_study
    h = heads["sparse64"]
    assert h.fit.ok and h.fit.interval_method == "rows" and h.fit.n_boot >= 90
    assert h.null_label == "null" and h.null_setting == h.setting == "relu-l1 l1=0.3"
    null_sweep = next(c for c in study.sweeps if c.label == "null" and c.setting == h.setting)
    assert h.fit_vs_null.null.values == pytest.approx([s.test_fvu for s in null_sweep.sizes])
    assert h.fit_vs_null.null.ok and h.fit_vs_null.null.exponent.value > 0.1  # the Gaussian's curve falls too
    diff_b, diff_c = h.fit_vs_null.exponent_difference, h.fit_vs_null.floor_difference
    assert diff_c.high < 0, h.fit_text()  # a lower floor than the null's, beyond the bootstrap noise
    assert diff_b.low > 0, h.fit_text()   # and a steeper fall
    # the toy's own floor is the held-out FVU where it stops improving, within the bootstrap's reach
    chosen = next(c for c in study.sweeps if c.label == "sparse64" and c.setting == h.setting)
    assert h.fit.floor.value <= min(s.test_fvu for s in chosen.sizes) * 1.05

"""The activation store: round trip, crash safety, batch streams, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import indexed_rows, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsefeat import cli
from sparsefeat.store import (FORMAT, FORMAT_VERSION, ActivationStore, CopiedRows, MappedRows, StoreError,
                              StoreWriter, describe, file_format, import_array, partial_path, shuffled_batches, split_documents,
                              split_rows)

# --------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------


def test_round_trip_of_every_field(tmp_path):
    path = tmp_path / "model.h5"
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 8)).astype(np.float32)
    b = rng.standard_normal((500, 4)).astype(np.float32)
    doc = np.repeat(np.arange(10), 50)
    pos = np.tile(np.arange(50), 10)
    ids = rng.integers(0, 1000, 500)
    doc_test = split_documents(np.arange(10), 0.3, seed=1)
    row_test = doc_test[doc]
    gt = rng.standard_normal((3, 8))
    provenance = {"model": "m", "layers": [0, 3], "nested": {"x": 1.5}}
    with StoreWriter(path, sites={"h0": 8, "h3": 4}, provenance=provenance, kind="model", dtype="float16",
                     units="raw residual stream", split_unit="document", test_fraction=0.3, split_seed=1,
                     compression="lzf", tokens=True) as w:
        for lo in (0, 200):  # two blocks, each completing whole documents
            hi = lo + (200 if lo == 0 else 300)
            w.append({"h0": a[lo:hi], "h3": torch.from_numpy(b[lo:hi])}, test=row_test[lo:hi],
                     tokens={"doc": doc[lo:hi], "pos": pos[lo:hi], "ids": ids[lo:hi]},
                     documents_test=doc_test[lo // 50:hi // 50])
        assert (w.committed_rows, w.committed_docs) == (500, 10)
        w.close(ground_truth={"features": gt}, attrs={"note": "hello", "extra": {"k": [1, 2]}})
    assert path.exists() and not partial_path(path).exists()

    with ActivationStore(path) as s:
        assert s.sites == ["h0", "h3"]
        assert (s.width("h0"), s.width("h3")) == (8, 4)
        assert s.kind == "model" and s.complete and s.units == "raw residual stream"
        assert s.provenance == provenance
        assert s.attrs["note"] == "hello" and json.loads(s.attrs["extra"]) == {"k": [1, 2]}
        assert s.attrs["format"] == FORMAT and s.attrs["format_version"] == FORMAT_VERSION
        assert s.attrs["split_unit"] == "document" and s.test_fraction == 0.3
        np.testing.assert_array_equal(s.ground_truth["features"], gt)
        assert s.n_rows() == 500 and s.n_rows("test") == int(row_test.sum())
        assert s.n_rows("train") + s.n_rows("test") == 500
        np.testing.assert_array_equal(s.load("h0", "all").numpy(), a.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(s.load("h3", "test").numpy(),
                                      b[row_test.astype(bool)].astype(np.float16).astype(np.float32))
        assert s.load("h0", "all", dtype=torch.float16).dtype == torch.float16
        t = s.tokens()
        for name, want in (("doc", doc), ("pos", pos), ("ids", ids)):
            np.testing.assert_array_equal(t[name], want)
        np.testing.assert_array_equal(s.documents_test(), doc_test.astype(bool))
        with pytest.raises(StoreError, match="sites.*name one"):
            s.default_site()
        assert "h0" in repr(s)
    info = describe(path)
    assert info["sites"]["h0"]["shape"] == [500, 8] and info["sites"]["h0"]["dtype"] == "float16"
    assert info["documents"] == 10 and info["test_documents"] == int(doc_test.sum())
    assert info["ground_truth"]["features"]["shape"] == [3, 8]
    assert file_format(path) == FORMAT


def test_moments_and_mean_squared_norm_match_numpy(make_store):
    path = make_store(n=2500, d=6, block=700)
    with ActivationStore(path) as s:
        x = s.load("x", "train").double().numpy()
        mean, cov = s.moments("x", "train")
        np.testing.assert_allclose(mean, x.mean(0), rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
        assert s.mean_squared_norm("x") == pytest.approx((x ** 2).sum(1).mean(), rel=1e-9)


def test_describe_statistics_match_numpy(make_store):
    path = make_store(n=1200, d=8, block=500)
    with ActivationStore(path) as s:
        x = s.load("x", "all").double().numpy()
    stats = describe(path, max_rows_for_stats=1000)["sites"]["x"]
    first = x[:1000]
    assert stats["stats_rows"] == 1000
    assert stats["mean"] == pytest.approx(first.mean(), rel=1e-9)
    assert stats["std"] == pytest.approx(first.std(), rel=1e-9)
    assert stats["mean_norm"] == pytest.approx(np.linalg.norm(first, axis=1).mean(), rel=1e-9)
    assert stats["mean_squared_norm"] == pytest.approx((first ** 2).sum(1).mean(), rel=1e-9)


def test_split_rows_is_a_stable_hash_of_the_row_index():
    whole = split_rows(10_000, 0.25, seed=3)
    parts = np.concatenate([split_rows(4000, 0.25, 3, 0), split_rows(6000, 0.25, 3, 4000)])
    np.testing.assert_array_equal(whole, parts)
    assert abs(whole.mean() - 0.25) < 0.02
    assert not np.array_equal(whole, split_rows(10_000, 0.25, seed=4))


# --------------------------------------------------------------------------------------------
# Crash safety: SIGKILL mid-append, then resume
# --------------------------------------------------------------------------------------------

KILL_BLOCK, KILL_D = 2000, 64

WRITER_FOREVER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import indexed_rows
from sparsefeat.store import StoreWriter, split_rows
w = StoreWriter({path!r}, sites={{"x": {d}}}, provenance={{"run": 1}}, test_fraction=0.2, split_seed=5)
lo = 0
while True:  # until killed
    w.append({{"x": indexed_rows(lo, lo + {block}, {d})}}, test=split_rows({block}, 0.2, 5, lo))
    lo += {block}
"""


def _write_blocks(w: StoreWriter, start: int, stop: int) -> None:
    for lo in range(start, stop, KILL_BLOCK):
        w.append({"x": indexed_rows(lo, lo + KILL_BLOCK, KILL_D)}, test=split_rows(KILL_BLOCK, 0.2, 5, lo))


def test_writer_killed_mid_append_resumes_to_exactly_an_uninterrupted_run(tmp_path, kill_after_commit):
    path = tmp_path / "killed.h5"
    code = WRITER_FOREVER.format(tests=str(Path(__file__).parent), path=str(path), d=KILL_D, block=KILL_BLOCK)
    committed = kill_after_commit(code, path, min_rows=10 * KILL_BLOCK)
    assert committed % KILL_BLOCK == 0 and not path.exists()

    # The killed file's committed prefix is readable as it stands ...
    with ActivationStore(partial_path(path)) as s:
        assert s.n_rows() == committed and not s.complete
        np.testing.assert_array_equal(s.load("x", "all").numpy()[:, 0], np.arange(committed))
    with pytest.raises(StoreError, match="only killed.h5.partial exists"):
        ActivationStore(path)

    # ... and resuming continues exactly after it.
    total = committed + 3 * KILL_BLOCK
    with StoreWriter(path, sites={"x": KILL_D}, provenance={"run": 1}, test_fraction=0.2, split_seed=5,
                     resume=True) as w:
        assert w.committed_rows == committed
        _write_blocks(w, committed, total)
    reference = tmp_path / "reference.h5"
    with StoreWriter(reference, sites={"x": KILL_D}, provenance={"run": 1}, test_fraction=0.2,
                     split_seed=5) as w:
        _write_blocks(w, 0, total)
    with ActivationStore(path) as got, ActivationStore(reference) as want:
        assert got.complete and got.n_rows() == total
        np.testing.assert_array_equal(got.load("x", "all").numpy(), want.load("x", "all").numpy())
        np.testing.assert_array_equal(got.split_mask("test"), want.split_mask("test"))


def test_resume_refuses_a_different_run_and_a_complete_store(tmp_path, make_store):
    path = tmp_path / "p.h5"
    w = StoreWriter(path, sites={"x": 4}, provenance={"run": 1})
    w.append({"x": np.ones((10, 4))}, test=np.zeros(10))
    w.close(complete=False)
    with pytest.raises(StoreError, match="cannot resume: its provenance differs"):
        StoreWriter(path, sites={"x": 4}, provenance={"run": 2}, resume=True)
    with pytest.raises(StoreError, match="cannot resume: its sites"):
        StoreWriter(path, sites={"x": 5}, provenance={"run": 1}, resume=True)
    with StoreWriter(path, sites={"x": 4}, provenance={"run": 1}, resume=True) as w:
        assert w.committed_rows == 10
    garbage = tmp_path / "garbage.h5"
    partial_path(garbage).write_text("not hdf5")
    with pytest.raises(StoreError, match="cannot resume: the partial file is unreadable.*--force"):
        StoreWriter(garbage, sites={"x": 4}, provenance={}, resume=True)
    assert partial_path(garbage).read_text() == "not hdf5"
    done = make_store("done.h5")
    with pytest.raises(StoreError, match="already complete; nothing to resume"):
        StoreWriter(done, sites={"x": 16}, provenance={"test": "done.h5"}, resume=True)


def test_force_replaces_an_existing_store_only_once_the_new_one_is_complete(make_store, digest):
    path = make_store("s.h5", n=100, block=100)
    before = digest(path)
    w = StoreWriter(path, sites={"x": 16}, provenance={}, force=True)
    w.append({"x": np.zeros((5, 16))}, test=np.zeros(5))
    assert digest(path) == before  # the old store is intact while the new one is written
    w.close()
    with ActivationStore(path) as s:
        assert s.n_rows() == 5


# --------------------------------------------------------------------------------------------
# Batch streams
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stream_store(tmp_path_factory):
    """10,000 indexed rows of width 256 (1,024-row chunks, so streams cross many chunks)."""
    path = tmp_path_factory.mktemp("stream") / "stream.h5"
    with StoreWriter(path, sites={"x": 256}, provenance={}, test_fraction=0.3, split_seed=2) as w:
        for lo in range(0, 10_000, 2500):
            w.append({"x": indexed_rows(lo, lo + 2500, 256)}, test=split_rows(2500, 0.3, 2, lo))
    return path


def _ids(batches) -> list[np.ndarray]:
    return [b[:, 0].numpy().astype(np.int64) for b in batches]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(split=st.sampled_from(["train", "test", "all"]), batch_size=st.integers(1, 3000),
       buffer_rows=st.integers(1, 6000), seed=st.integers(0, 2 ** 32 - 1), shuffle=st.booleans(),
       drop_last=st.booleans())
def test_batches_partition_the_split_once_per_epoch(stream_store, split, batch_size, buffer_rows, seed,
                                                    shuffle, drop_last):
    with ActivationStore(stream_store) as s:
        want = np.flatnonzero(s.split_mask(split))
        batches = _ids(s.batches("x", split, batch_size, seed=seed, epochs=2, shuffle=shuffle,
                                 drop_last=drop_last, buffer_rows=buffer_rows))
    sizes = [len(b) for b in batches]
    epoch_rows = len(want) // batch_size * batch_size if drop_last else len(want)
    assert sum(sizes) == 2 * epoch_rows
    assert all(n == batch_size for n in (sizes if drop_last else sizes[:-1])) or not drop_last
    got = np.concatenate(batches)
    first, second = got[:epoch_rows], got[epoch_rows:]
    for epoch in (first, second):
        assert len(np.unique(epoch)) == len(epoch)  # no row twice in an epoch
        assert np.isin(epoch, want).all()  # never a row of another split
        if not drop_last:
            np.testing.assert_array_equal(np.sort(epoch), want)  # every row once
    if not shuffle and not drop_last:
        np.testing.assert_array_equal(first, want)


@pytest.mark.parametrize("compression,dtype", [(None, "float16"), ("lzf", "float32"), ("gzip", "float16")])
def test_batches_of_compressed_and_half_precision_stores(make_store, compression, dtype):
    # Unfiltered chunks are read as raw bytes, filtered ones through HDF5's pipeline: same rows.
    # (2,000 rows: the row ids in column 0 stay exact in float16; 1,024- or 512-row chunks)
    path = make_store(n=2000, d=512, block=700, test_fraction=0.25, compression=compression, dtype=dtype)
    with ActivationStore(path) as s:
        want = np.flatnonzero(s.split_mask("train"))
        x = s.load("x", "train").numpy()
        batches = list(s.batches("x", "train", 333, seed=5, buffer_rows=700))
    got = np.concatenate([b.numpy() for b in batches])
    order = np.argsort(got[:, 0])
    np.testing.assert_array_equal(got[order, 0], want)
    np.testing.assert_array_equal(got[order], x)  # whole rows, not just their ids


@pytest.mark.parametrize("split,batch_size,buffer_rows,shuffle,drop_last", [
    ("train", 500, 1 << 16, True, False), ("all", 333, 700, True, False), ("test", 1024, 1, True, True),
    ("train", 777, 3000, False, False), ("all", 10_000, 2048, True, False)])
def test_mapped_and_copied_batch_streams_are_identical(make_store, monkeypatch, split, batch_size, buffer_rows,
                                                       shuffle, drop_last):
    # Unfiltered stores are gathered straight from a memory map of the file, anything else is
    # copied through a buffer: the same seed must give the very same batches (so resume and
    # results do not depend on which path ran), and kept batches must stay intact.
    path = make_store(n=5000, d=96, block=1300, test_fraction=0.3, dtype="float32")
    kw = dict(seed=11, epochs=2, shuffle=shuffle, drop_last=drop_last, buffer_rows=buffer_rows)
    with ActivationStore(path) as s:
        assert s._mapped_rows(s.f["activations/x"]) is not None  # the fast path is taken here
        mapped = [b.numpy() for b in s.batches("x", split, batch_size, **kw)]
    with monkeypatch.context() as m:
        m.setattr(ActivationStore, "_mapped_rows", lambda self, ds: None)
        with ActivationStore(path) as s:
            copied = [b.numpy() for b in s.batches("x", split, batch_size, **kw)]
            x = s.load("x", "all").numpy()
    assert len(mapped) == len(copied) > 1
    for a, b in zip(mapped, copied):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, x[a[:, 0].astype(np.int64)])  # whole rows, as stored


def _in_memory_sources(n: int, d: int, chunk_rows: int):
    """The same rows behind both row sources, without any file: a copied buffer filled from an array,
    and a map over the array's bytes with its blocks stored in reverse order (offsets not monotonic)."""
    x = indexed_rows(0, n, d)
    n_blocks = -(-n // chunk_rows)
    padded = np.zeros((n_blocks * chunk_rows, d), dtype=np.float32)
    padded[:n] = x
    blocks_reversed = padded.reshape(n_blocks, chunk_rows, d)[::-1].copy()
    row_bytes = d * 4
    offsets = (n_blocks - 1 - np.arange(n_blocks)) * chunk_rows * row_bytes

    def read(start, stop, out):
        out[:stop - start] = x[start:stop]

    copied = CopiedRows(read, 0, chunk_rows, d, np.float32)
    mapped = MappedRows(blocks_reversed.tobytes(), offsets, chunk_rows, row_bytes, np.float32, d)
    return x, copied, mapped


@pytest.mark.parametrize("batch_size,buffer_rows,shuffle,drop_last", [
    (64, 300, True, False), (7, 1, True, True), (100, 5000, False, False), (1000, 10, True, False)])
def test_the_one_shuffling_generator_gives_the_same_batches_from_both_row_sources(batch_size, buffer_rows,
                                                                                  shuffle, drop_last):
    n, d, chunk_rows = 1000, 8, 96
    x, copied, mapped = _in_memory_sources(n, d, chunk_rows)
    copied = CopiedRows(copied.read, max(buffer_rows, batch_size), chunk_rows, d, np.float32)
    keep = split_rows(n, 0.3, 1).astype(bool)  # deliver the "train" rows
    blocks = [(s, min(n, s + chunk_rows), np.flatnonzero(keep[s:s + chunk_rows])) for s in range(0, n, chunk_rows)]
    kw = dict(seed=3, epochs=2, shuffle=shuffle, drop_last=drop_last, buffer_rows=buffer_rows)
    a = list(shuffled_batches(copied, blocks, batch_size, **kw))
    b = list(shuffled_batches(mapped, blocks, batch_size, **kw))
    assert len(a) == len(b) > 1
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
        np.testing.assert_array_equal(u, x[u[:, 0].astype(np.int64)])  # whole rows
    ids = np.concatenate([u[:, 0] for u in a]).astype(np.int64)
    want = np.flatnonzero(keep)
    per_epoch = want.shape[0] // batch_size * batch_size if drop_last else want.shape[0]
    assert ids.shape[0] == 2 * per_epoch
    for epoch in (ids[:per_epoch], ids[per_epoch:]):
        assert np.isin(epoch, want).all() and np.unique(epoch).shape[0] == per_epoch
        if shuffle:
            assert not np.array_equal(epoch, np.sort(epoch))
    if not shuffle and not drop_last:
        np.testing.assert_array_equal(ids[:per_epoch], want)
    other = list(shuffled_batches(mapped, blocks, batch_size, **(kw | {"seed": 4})))
    assert not shuffle or not all(np.array_equal(u, v) for u, v in zip(a, other))


def test_mapped_stream_reads_the_file_that_was_opened_even_if_replaced(tmp_path):
    path = tmp_path / "r.h5"

    def write(value, force=False):
        with StoreWriter(path, sites={"x": 64}, provenance={}, force=force) as w:
            w.append({"x": np.full((3000, 64), value)}, test=np.zeros(3000))

    write(1.0)
    with ActivationStore(path) as s:
        write(2.0, force=True)  # --force rewrites the store while this reader holds the old one
        got = np.concatenate([b.numpy() for b in s.batches("x", "all", 512)])
        assert s._mapped_rows(s.f["activations/x"]) is not None
    assert got.shape == (3000, 64) and (got == 1.0).all()


def test_stores_that_cannot_be_mapped_are_read_through_hdf5(make_store, tmp_path):
    with ActivationStore(make_store("z.h5", compression="gzip")) as s:
        assert s._mapped_rows(s.f["activations/x"]) is None  # filtered chunks
    w = StoreWriter(tmp_path / "live.h5", sites={"x": 16}, provenance={})
    try:
        w.append({"x": np.ones((100, 16))}, test=np.zeros(100))
        with ActivationStore(partial_path(tmp_path / "live.h5")) as s:
            assert s.f.swmr_mode and s._mapped_rows(s.f["activations/x"]) is None  # a writer appends
            assert sum(len(b) for b in s.batches("x", "all", 30)) == 100
    finally:
        w.close()


def test_batches_are_deterministic_by_seed_and_differ_across_seeds_and_epochs(stream_store):
    with ActivationStore(stream_store) as s:
        run = lambda seed: np.concatenate(_ids(s.batches("x", "train", 500, seed=seed, epochs=2)))
        a, b, c = run(1), run(1), run(2)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
        half = len(a) // 2
        assert not np.array_equal(a[:half], a[half:])  # each epoch has its own order


def test_batches_never_mix_train_and_test(stream_store):
    with ActivationStore(stream_store) as s:
        test_rows = set(np.flatnonzero(s.split_mask("test")))
        train = np.concatenate(_ids(s.batches("x", "train", 777, seed=3)))
        test = np.concatenate(_ids(s.batches("x", "test", 777, seed=3)))
    assert not test_rows.intersection(train.tolist())
    assert set(test.tolist()) == test_rows


def test_prefetched_batches_equal_direct_ones_and_infinite_stream_keeps_going(stream_store):
    with ActivationStore(stream_store) as s:
        direct = _ids(s.batches("x", "train", 900, seed=4, epochs=2))
        ahead = _ids(s.batches("x", "train", 900, seed=4, epochs=2, prefetch=3))
        assert all(np.array_equal(a, b) for a, b in zip(direct, ahead)) and len(direct) == len(ahead)
        stream = s.batches("x", "train", 4096, seed=0, epochs=None, dtype=torch.float16)
        many = [next(stream) for _ in range(10)]  # more than two epochs' worth
        assert many[0].dtype == torch.float16 and sum(len(b) for b in many) > 2 * s.n_rows("train")


# --------------------------------------------------------------------------------------------
# Bad input: one clear line, files untouched
# --------------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo, path: Path | str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_not_a_store(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("hello\n")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["a"] = np.zeros(3)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["format"] = "sparsefeat.somethingelse"
        f.attrs["format_version"] = 1
    for path, pattern in ((text, "not an HDF5 file"), (plain, "not a sparsefeat file"),
                          (other, "is a 'sparsefeat.somethingelse' file, expected"),
                          (tmp_path / "missing.h5", "no such file")):
        with pytest.raises(StoreError, match=pattern) as e:
            ActivationStore(path)
        _one_line(e, path)


def test_truncated_or_corrupt_store(make_store, tmp_path, digest):
    good = make_store("good.h5", n=3000, d=64)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (cut,):
        before = digest(path)
        with pytest.raises(StoreError, match="truncated|corrupt") as e:
            ActivationStore(path).load("x")
        _one_line(e, path)
        assert digest(path) == before
    lying = tmp_path / "lying.h5"  # a committed counter past the data
    shutil.copy(good, lying)
    with h5py.File(lying, "a") as f:
        f["rows/committed"][0] = 10_000
    with pytest.raises(StoreError, match="truncated or corrupt") as e:
        ActivationStore(lying)
    _one_line(e, lying)


def test_newer_or_unknown_format_version_is_refused(make_store):
    for version in (FORMAT_VERSION + 1, 0):
        path = make_store(f"v{version}.h5", n=10, block=10)
        with h5py.File(path, "a") as f:
            f.attrs["format_version"] = version
        with pytest.raises(StoreError, match=f"format version {version} is not supported") as e:
            ActivationStore(path)
        _one_line(e, path)


def test_missing_site_and_empty_split(make_store):
    path = make_store(n=50, block=50, test_fraction=0.0)
    with ActivationStore(path) as s:
        with pytest.raises(StoreError, match="no site 'y' \\(sites: x\\)") as e:
            s.load("y")
        _one_line(e, path)
        with pytest.raises(StoreError, match="the test split is empty") as e:
            next(iter(s.batches("x", "test", 8)))
        _one_line(e, path)
        with pytest.raises(StoreError, match="unknown split"):
            s.load("x", "validation")


def test_nonfinite_rows_and_width_mismatch_are_refused_with_details(tmp_path):
    path = tmp_path / "bad.h5"
    w = StoreWriter(path, sites={"x": 4}, provenance={})
    block = np.ones((10, 4))
    block[2, 1], block[7, 0], block[7, 3] = np.nan, np.inf, -np.inf
    with pytest.raises(StoreError, match="2 of 10 rows of site 'x' contain NaN or Inf") as e:
        w.append({"x": block}, test=np.zeros(10))
    _one_line(e, path)
    with pytest.raises(StoreError, match="site 'x' has width 4, got a block of shape \\(10, 5\\)") as e:
        w.append({"x": np.ones((10, 5))}, test=np.zeros(10))
    _one_line(e, path)
    with pytest.raises(StoreError, match="split mask has 3 rows, block has 10"):
        w.append({"x": np.ones((10, 4))}, test=np.zeros(3))
    assert w.committed_rows == 0
    w.close(complete=False)
    half = StoreWriter(tmp_path / "half.h5", sites={"x": 2}, provenance={}, dtype="float16")
    with pytest.raises(StoreError, match="1 of 3 rows of site 'x' exceed the float16 range"):
        half.append({"x": np.array([[1.0, 2.0], [7e4, 0.0], [65504.0, -65504.0]])}, test=np.zeros(3))
    half.close(complete=False)


def test_existing_output_is_not_overwritten_without_force(make_store, digest):
    path = make_store("keep.h5", n=20, block=20)
    before = digest(path)
    with pytest.raises(StoreError, match="already exists; pass --force") as e:
        StoreWriter(path, sites={"x": 16}, provenance={})
    _one_line(e, path)
    assert digest(path) == before and not partial_path(path).exists()


def test_bad_writer_arguments(tmp_path):
    for kw, pattern in (({"dtype": "int8"}, "dtype must be"), ({"compression": "zstd"}, "compression must be"),
                        ({"test_fraction": 1.0}, "test fraction must be"), ({"sites": {}}, "at least one site")):
        args = dict(sites={"x": 2}, provenance={}) | kw
        with pytest.raises(StoreError, match=pattern):
            StoreWriter(tmp_path / "w.h5", **args)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# CLI: inspect
# --------------------------------------------------------------------------------------------


def test_cli_inspect_json_and_text(sparse_toy, capsys):
    assert cli.main(["inspect", str(sparse_toy), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == FORMAT and info["kind"] == "toy"
    assert info["sites"]["x"]["shape"] == [4000, 32] and info["sites"]["x"]["dtype"] == "float32"
    assert info["train_rows"] + info["test_rows"] == 4000
    assert info["provenance"]["generator"] == "sparse"
    assert info["ground_truth"]["features"]["shape"] == [64, 32]
    assert cli.main(["inspect", str(sparse_toy)]) == 0
    text = capsys.readouterr().out
    assert "format: sparsefeat.activations" in text and "shape: [4000, 32]" in text


def test_cli_inspect_bad_files_exit_2_with_one_line(tmp_path, capsys):
    text = tmp_path / "x.h5"
    text.write_text("not hdf5")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["a"] = 1
    for path in (text, plain, tmp_path / "missing.h5"):
        assert cli.main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sparsefeat inspect: error:") and str(path) in err


def test_cli_inspect_dispatches_results_files(tmp_path, capsys):
    from sparsefeat import results
    path = tmp_path / "sweep.h5"
    r = results.Results(path=path, label="toy", site="x", d=4, store_path="s.h5", store_kind="toy",
                        store_provenance={}, store_hash="abc", config={}, members=[])
    results.write_results(path, r, {})
    assert cli.main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == json.loads(json.dumps(results.describe(path)))
    assert info["format"] == "sparsefeat.results"


def test_an_unfinished_store_is_never_discarded_without_force_and_has_one_writer(tmp_path):
    path = tmp_path / "u.h5"
    w = StoreWriter(path, sites={"x": 4}, provenance={"run": 1})
    w.append({"x": np.ones((10, 4))}, test=np.zeros(10))
    # a second writer while the first is open: refused at once, the live file untouched
    with pytest.raises(StoreError, match="another process is writing"):
        StoreWriter(path, sites={"x": 4}, provenance={"run": 1}, resume=True)
    w.close(complete=False)
    # forgetting --resume must not throw away the rows already written
    with pytest.raises(StoreError, match="unfinished store.*--resume.*--force"):
        StoreWriter(path, sites={"x": 4}, provenance={"run": 1})
    with StoreWriter(path, sites={"x": 4}, provenance={"run": 1}, resume=True) as w2:
        assert w2.committed_rows == 10
    with StoreWriter(tmp_path / "v.h5", sites={"x": 4}, provenance={}) as w3:
        w3.append({"x": np.ones((3, 4))}, test=np.zeros(3))
    assert not list(tmp_path.glob("*.lock"))


# --------------------------------------------------------------------------------------------
# Reliability (issue 8): resume settings, full disks, checksums, bad paths and attributes
# --------------------------------------------------------------------------------------------

BASE = dict(sites={"x": 4}, provenance={"run": 1}, kind="toy", dtype="float32", units="u", split_unit="row",
            test_fraction=0.2, split_seed=5, compression=None, tokens=False)


@pytest.mark.parametrize("change,pattern", [
    ({"dtype": "float16"}, "its dtype is float32, this run's is float16"),
    ({"compression": "lzf"}, "its compression is none, this run's is lzf"),
    ({"units": "v"}, "its units differs"), ({"split_seed": 6}, "its split_seed differs"),
    ({"test_fraction": 0.3}, "its test_fraction differs"), ({"split_unit": "document"}, "its split_unit differs"),
    ({"kind": "import"}, "its kind differs"), ({"sites": {"x": 4, "y": 4}}, "its sites"),
    ({"tokens": True}, "this run records tokens and it does not"),
])
def test_resume_refuses_every_setting_that_changes_the_bytes_and_leaves_the_partial_untouched(
        tmp_path, digest, change, pattern):
    path = tmp_path / "p.h5"
    w = StoreWriter(path, **BASE)
    w.append({"x": np.ones((10, 4))}, test=np.zeros(10))
    w.close(complete=False)
    before = digest(partial_path(path))
    with pytest.raises(StoreError, match=f"cannot resume: {pattern}") as e:
        StoreWriter(path, **(BASE | change), resume=True)
    _one_line(e, path)
    assert digest(partial_path(path)) == before and not list(tmp_path.glob("*.lock"))


def test_a_refused_resume_of_a_killed_writer_does_not_rebuild_its_partial(tmp_path, kill_after_commit, digest):
    path = tmp_path / "killed.h5"
    code = WRITER_FOREVER.format(tests=str(Path(__file__).parent), path=str(path), d=KILL_D, block=KILL_BLOCK)
    kill_after_commit(code, path, min_rows=2 * KILL_BLOCK)
    before = digest(partial_path(path))
    with pytest.raises(StoreError, match="cannot resume: its dtype is float32, this run's is float16"):
        StoreWriter(path, sites={"x": KILL_D}, provenance={"run": 1}, test_fraction=0.2, split_seed=5,
                    dtype="float16", resume=True)
    assert digest(partial_path(path)) == before


def _big_array(tmp_path, rows=24_000, d=64) -> Path:
    src = tmp_path / "big.npy"
    np.save(src, indexed_rows(0, rows, d))
    return src


def test_import_of_a_file_onto_itself_is_refused_even_with_force(tmp_path, capsys, digest):
    src = tmp_path / "a.npy"
    np.save(src, np.ones((10, 4), np.float32))
    before = digest(src)
    for out in (src, tmp_path / "." / "a.npy"):
        assert cli.main(["import", str(src), "--out", str(out), "--force", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is also an input of this command" in err
    assert digest(src) == before and not partial_path(src).exists()


def _no_traceback(done, *patterns):
    err = done.stderr
    assert done.returncode == 2, (done.returncode, err[-2000:])
    assert err.count("\n") == 1 and "Traceback" not in err, err[-2000:]
    for p in patterns:
        assert p in err, err
    return err


SMALL_BLOCKS = """
import sys
import sparsefeat.store.importer as importer
import sparsefeat.store.writer as writer
importer.COPY_BLOCK_BYTES = 1 << 18  # copy in blocks of 1,024 rows, so a prefix fits on the small disk
if sys.argv[1] == "no-precheck":
    writer.check_free_space = lambda *a, **k: None  # let HDF5 itself meet the full disk
from sparsefeat import cli
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("precheck", [True, False])
def test_a_full_disk_stops_import_with_one_line_keeps_the_prefix_and_resume_finishes(tmp_path, tmpfs, precheck):
    src = _big_array(tmp_path)  # 6 MB of rows
    disk = tmpfs("4m")
    out = disk / "s.h5"
    argv = ["import", src, "--out", out, "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def run(*extra):  # without the check before each block, the write error itself is caught (HDF5
        # used to end the process with SIGSEGV here)
        return subprocess.run([sys.executable, "-c", SMALL_BLOCKS, "precheck" if precheck else "no-precheck",
                               *map(str, argv + list(extra))], env=env, capture_output=True, text=True, timeout=120)

    err = _no_traceback(run(), f"{partial_path(out)}: no space left on the device", "--resume")
    assert "--force" not in err and partial_path(out).exists() and not out.exists()
    with ActivationStore(partial_path(out)) as s:
        kept = s.n_rows()
        assert 0 < kept < 24_000
        np.testing.assert_array_equal(s.load("x").numpy()[:, 0], np.arange(kept))
    still_full = run("--resume")  # resuming before space is freed: the same advice, not --force
    err = _no_traceback(still_full, "no space left", "--resume")
    assert "--force" not in err and partial_path(out).exists()
    tmpfs.resize(disk, "64m")
    done = run("--resume")
    assert done.returncode == 0, done.stderr
    with ActivationStore(out) as s:
        assert s.complete and s.n_rows() == 24_000
        np.testing.assert_array_equal(s.load("x").numpy(), np.load(src))
    assert not partial_path(out).exists()


@pytest.mark.slow
def test_a_full_disk_stops_toy_with_one_line_and_resume_equals_an_uninterrupted_run(tmp_path, tmpfs):
    disk = tmpfs("6m")  # room for two of the three blocks of 2 MB
    argv = ["toy", "gaussian", "--d", "64", "--n-samples", "20000", "--no-progress"]
    out = disk / "g.h5"
    err = _no_traceback(run_cli(*argv, "--out", out), "no space left on the device", "--resume")
    assert "--force" not in err and partial_path(out).exists()
    with ActivationStore(partial_path(out)) as s:
        assert 0 < s.n_rows() < 20_000
    tmpfs.resize(disk, "64m")
    assert run_cli(*argv, "--out", out, "--resume").returncode == 0
    assert run_cli(*argv, "--out", tmp_path / "ref.h5").returncode == 0
    with ActivationStore(out) as got, ActivationStore(tmp_path / "ref.h5") as want:
        np.testing.assert_array_equal(got.load("x").numpy(), want.load("x").numpy())
        np.testing.assert_array_equal(got.split_mask("test"), want.split_mask("test"))


@pytest.mark.parametrize("command", ["toy", "import"])
def test_existing_folder_or_read_only_folder_as_output_is_one_line_and_leaves_nothing(tmp_path, tmpfs, capsys,
                                                                                      command):
    src = tmp_path / "a.npy"
    np.save(src, np.ones((100, 4), np.float32))
    argv = ["toy", "gaussian", "--d", "4", "--n-samples", "100"] if command == "toy" else ["import", str(src)]
    folder = tmp_path / "dir"
    folder.mkdir()
    assert cli.main(argv + ["--out", str(folder), "--force", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{folder}: is a folder" in err
    assert not partial_path(folder).exists() and not list(folder.iterdir())
    read_only = tmpfs("1m", read_only=True)
    assert cli.main(argv + ["--out", str(read_only / "s.h5"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "permission denied (is the folder read-only?)" in err


@pytest.mark.parametrize("site", ["", ".", "..", "a/b", " x", "-x"])
def test_import_refuses_a_bad_site_name_before_creating_anything(tmp_path, capsys, site):
    src = tmp_path / "a.npy"
    np.save(src, np.ones((10, 4), np.float32))
    out = tmp_path / "out" / "s.h5"
    assert cli.main(["import", str(src), "--out", str(out), f"--site={site}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad site name" in err and "--resume" not in err
    assert not out.parent.exists()


@pytest.mark.parametrize("fraction", ["0", "1", "-0.1", "1.5", "nan"])
@pytest.mark.parametrize("command", ["toy", "import"])
def test_toy_and_import_refuse_a_test_fraction_outside_0_1_up_front(tmp_path, capsys, command, fraction):
    src = tmp_path / "a.npy"
    np.save(src, np.ones((10, 4), np.float32))
    argv = ["toy", "gaussian", "--d", "4", "--n-samples", "100"] if command == "toy" else ["import", str(src)]
    out = tmp_path / "out" / "s.h5"
    assert cli.main(argv + ["--out", str(out), "--test-fraction", fraction, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test fraction must be in (0, 1)" in err
    assert not out.parent.exists()


@pytest.mark.parametrize("attr,value,pattern", [
    ("provenance", "{not json", "attribute 'provenance' is not JSON"),
    ("provenance", "[1, 2]", "attribute 'provenance' is not a JSON object"),
    ("test_fraction", "abc", "attribute 'test_fraction' is 'abc', not a number"),
    ("split_seed", "x", "attribute 'split_seed' is 'x', not a number"),
])
def test_damaged_store_attributes_are_one_line_when_opening(make_store, capsys, attr, value, pattern):
    path = make_store(n=20, block=20)
    with h5py.File(path, "a") as f:
        f.attrs[attr] = value
    with pytest.raises(StoreError, match=pattern) as e:
        ActivationStore(path)
    _one_line(e, path)
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and pattern in err


def test_three_dimensional_activations_are_refused_with_one_line(tmp_path, make_store):
    path = make_store(n=20, block=20)
    with h5py.File(path, "a") as f:
        del f["activations/x"]
        f["activations/x"] = np.zeros((20, 4, 4), np.float32)
    with pytest.raises(StoreError, match="site 'x' is not a \\[rows, d\\] dataset") as e:
        ActivationStore(path)
    _one_line(e, path)
    from safetensors.torch import save_file
    torch.save(torch.zeros(5, 3, 2), tmp_path / "cube.pt")
    save_file({"a": torch.zeros(5, 3, 2)}, tmp_path / "cube.safetensors")
    for src in (tmp_path / "cube.pt", tmp_path / "cube.safetensors"):
        with pytest.raises(StoreError, match="expected an array of shape \\[rows, d\\], got shape \\(5, 3, 2\\)"):
            import_array(src, tmp_path / "o.h5", progress=False)
    assert not (tmp_path / "o.h5").exists() and not partial_path(tmp_path / "o.h5").exists()


# -- checksums --------------------------------------------------------------------------------


def _flip_bytes(path: Path, site: str = "x", row: int = 0, count: int = 64) -> None:
    """Flip `count` bytes of the stored rows starting at `row` (in the file, behind HDF5's back)."""
    with h5py.File(path, "r") as f:
        ds = f["activations"][site]
        chunk_rows = ds.chunks[0]
        info = ds.id.get_chunk_info_by_coord((row // chunk_rows * chunk_rows, 0))
        at = info.byte_offset + (row % chunk_rows) * ds.shape[1] * ds.dtype.itemsize
    with open(path, "r+b") as fh:
        fh.seek(at)
        data = bytearray(fh.read(count))
        fh.seek(at)
        fh.write(bytes(b ^ 0x5A for b in data))


def test_checksums_cover_every_block_and_survive_resume(tmp_path, make_store):
    path = make_store(n=5000, d=64, block=1300)  # 4,096-row chunks, blocks cut across them
    with ActivationStore(path) as s:
        assert s.verify() == {"x": 2} and s.format_version == FORMAT_VERSION == 2
        sums = s.f["checksums/x"][:]
        assert s.f["checksums/x"].attrs["algorithm"] == "crc32"
        x = s.f["activations/x"][:]
    assert [zlib.crc32(np.ascontiguousarray(x[lo:lo + 4096])) for lo in (0, 4096)] == list(sums)


def _as_adler32(f: h5py.File, site: str = "x") -> None:
    """Rewrite a store's checksums as the first version 2 stores had them: Adler-32, so named."""
    c, x = f["checksums"][site], f["activations"][site]
    rows = int(c.attrs["chunk_rows"])
    n = int(f["rows/committed"][0])
    c[:] = [zlib.adler32(np.ascontiguousarray(x[lo:min(n, lo + rows)])) for lo in range(0, n, rows)]
    c.attrs["algorithm"] = "adler32"


def test_stores_checksummed_with_adler32_are_verified_and_resumed_in_kind(tmp_path, make_store, capsys):
    path = make_store(n=9000, d=64, block=1000)
    with h5py.File(path, "a") as f:
        _as_adler32(f)
    with ActivationStore(path) as s:
        assert s.verify() == {"x": 3} and sum(len(b) for b in s.batches("x", "all", 500)) == 9000
    _flip_bytes(path, row=100)
    with ActivationStore(path) as s, pytest.raises(StoreError, match="block 0 .* fails its checksum"):
        s.load("x")
    # a partial store from that version resumes with Adler-32, continuing its last, partial block
    part, want = tmp_path / "p.h5", indexed_rows(0, 9000, 64)
    w = StoreWriter(part, sites={"x": 64}, provenance={"run": 1})
    w.append({"x": want[:5000]}, test=np.zeros(5000))
    w.close(complete=False)
    with h5py.File(partial_path(part), "a") as f:
        _as_adler32(f)
    with StoreWriter(part, sites={"x": 64}, provenance={"run": 1}, resume=True) as w:
        w.append({"x": want[5000:]}, test=np.zeros(4000))
    with ActivationStore(part) as s:
        assert s.f["checksums/x"].attrs["algorithm"] == "adler32" and s.verify() == {"x": 3}
        x = s.f["activations/x"][:]
    np.testing.assert_array_equal(x, want)
    with h5py.File(part, "a") as f:
        f["checksums/x"].attrs["algorithm"] = "sha-0"
    assert cli.main(["inspect", "--verify", str(part)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown checksum algorithm 'sha-0'" in err


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_damaged_block_stops_the_stream_before_any_of_its_rows_is_used(make_store, shuffle):
    """A damaged block raises before a batch holds any of its rows; the rows handed out before
    come from sound blocks only."""
    path = make_store(n=9000, d=64, block=1000)  # blocks of 4,096 rows: 0..4095, 4096..8191, 8192..8999
    _flip_bytes(path, row=8500)
    with ActivationStore(path) as s:
        got = []
        with pytest.raises(StoreError, match="block 2 \\(rows 8192..8999\\) fails its checksum"):
            for b in s.batches("x", "all", 512, shuffle=shuffle, buffer_rows=1, seed=5):
                got.append(b[:, 0].numpy().astype(np.int64))
        ids = np.concatenate(got) if got else np.zeros(0, dtype=np.int64)
        assert (ids < 8192).all()
        if not shuffle:  # blocks 0 and 1 come first, whole, and their rows are handed out
            assert ids.shape[0] == 8192


def test_damaged_rows_are_found_by_inspect_verify_and_by_every_reader(make_store, capsys):
    path = make_store(n=9000, d=64, block=1000)  # three blocks of 4,096 rows
    assert cli.main(["inspect", "--verify", str(path)]) == 0
    assert "site x: 3 blocks" in capsys.readouterr().out
    _flip_bytes(path, row=5000)
    assert cli.main(["inspect", "--verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "site 'x' is damaged: block 1 (rows 4096..8191) fails its checksum" in err
    for read in (lambda s: s.load("x"), lambda s: list(s.batches("x", "all", 512)), lambda s: s.moments("x"),
                 lambda s: s.mean_squared_norm("x")):
        with ActivationStore(path) as s:
            with pytest.raises(StoreError, match="block 1 \\(rows 4096..8191\\) fails its checksum") as e:
                read(s)
            _one_line(e, path)
    with pytest.MonkeyPatch.context() as m:  # the copied source checks too
        m.setattr(ActivationStore, "_mapped_rows", lambda self, ds: None)
        with ActivationStore(path) as s, pytest.raises(StoreError, match="fails its checksum"):
            list(s.batches("x", "train", 100, buffer_rows=100))


def test_version_1_stores_without_checksums_are_still_read(make_store, capsys):
    path = make_store(n=3000, d=16)
    with h5py.File(path, "a") as f:
        del f["checksums"]
        f.attrs["format_version"] = 1
    with ActivationStore(path) as s:
        assert s.format_version == 1 and s.load("x").shape == (3000, 16)
        assert sum(len(b) for b in s.batches("x", "all", 256)) == 3000
    assert describe(path)["format_version"] == 1
    assert cli.main(["inspect", "--verify", str(path)]) == 0
    assert "no checksums to verify (a format version 1 store)" in capsys.readouterr().out

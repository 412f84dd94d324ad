"""Bringing your own activations: .npy / .pt / .safetensors into a store, safely and in blocks."""

from __future__ import annotations

import dataclasses
import pickle
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from sparsefeat import cli
from sparsefeat import store as store_module
from sparsefeat.errors import ConfigError
from sparsefeat.store import ActivationStore, ImportConfig, StoreError, import_array, partial_path, split_rows


@pytest.fixture
def array():
    return np.random.default_rng(0).standard_normal((3001, 24)).astype(np.float32)


def stored(path, split="all"):
    with ActivationStore(path) as s:
        return s.load(s.default_site(), split).numpy()


@pytest.mark.parametrize("fmt", ["npy", "pt", "safetensors"])
def test_each_format_round_trips(tmp_path, array, fmt):
    src = tmp_path / f"acts.{fmt}"
    if fmt == "npy":
        np.save(src, array)
    elif fmt == "pt":
        torch.save(torch.from_numpy(array), src)
    else:
        save_numpy({"resid": array}, src)
    out = import_array(src, tmp_path / "s.h5", test_fraction=0.2, seed=9, progress=False)
    np.testing.assert_array_equal(stored(out), array)
    with ActivationStore(out) as s:
        assert s.kind == "import" and s.sites == ["x"] and s.attrs["split_unit"] == "row"
        np.testing.assert_array_equal(s.split_mask("test"), split_rows(3001, 0.2, 9).astype(bool))
        p = s.provenance
        assert p["source"] == str(src.resolve()) and p["format"] == fmt and p["shape"] == [3001, 24]
        assert p["source_dtype"] == "float32" and p["key"] == ("resid" if fmt == "safetensors" else None)


def test_large_arrays_stream_in_blocks_across_chunk_boundaries(tmp_path, array, monkeypatch):
    monkeypatch.setattr(store_module.importer, "COPY_BLOCK_BYTES", 24 * 4 * 700)  # a few hundred rows per block
    np.save(tmp_path / "a.npy", array)
    out = import_array(tmp_path / "a.npy", tmp_path / "s.h5", progress=False)
    np.testing.assert_array_equal(stored(out), array)


def test_dtypes_site_and_key(tmp_path, array):
    half = array.astype(np.float16)
    np.save(tmp_path / "h.npy", half)
    out = import_array(tmp_path / "h.npy", tmp_path / "h.h5", site="resid_3", progress=False)
    with ActivationStore(out) as s:
        assert s.sites == ["resid_3"] and s.f["activations/resid_3"].dtype == np.float16
        np.testing.assert_array_equal(s.load("resid_3").numpy(), half.astype(np.float32))
    ints = np.arange(60).reshape(10, 6)
    np.save(tmp_path / "i.npy", ints)
    np.testing.assert_array_equal(stored(import_array(tmp_path / "i.npy", tmp_path / "i.h5", progress=False)), ints)
    bf16 = torch.from_numpy(array).bfloat16()
    save_torch({"a": bf16, "b": torch.zeros(2, 2)}, tmp_path / "two.safetensors")
    out = import_array(tmp_path / "two.safetensors", tmp_path / "b.h5", key="a", dtype="float16", progress=False)
    with ActivationStore(out) as s:
        assert s.f["activations/x"].dtype == np.float16 and s.provenance["source_dtype"] == "bfloat16"
        np.testing.assert_array_equal(s.load("x").numpy(), bf16.float().half().float().numpy())


class Payload:
    """Something a pickle could carry; a safe loader must refuse it."""


def _bad_files(tmp_path, array):
    """(file, pattern) pairs: each must be refused with one line naming the file."""
    cases = []

    def add(name, write, pattern):
        path = tmp_path / name
        write(path)
        cases.append((path, pattern))

    add("objects.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
        "not a plain .npy array")
    add("text.npy", lambda p: p.write_text("hello"), "not a plain .npy array")
    add("cut.npy", lambda p: (np.save(p, array), p.write_bytes(p.read_bytes()[:5000])), "not a plain .npy array")
    add("vector.npy", lambda p: np.save(p, np.zeros(5)), "expected an array of shape \\[rows, d\\], got shape \\(5,\\)")
    add("cube.npy", lambda p: np.save(p, np.zeros((2, 3, 4))), "got shape \\(2, 3, 4\\)")
    add("empty.npy", lambda p: np.save(p, np.zeros((0, 4))), "got shape \\(0, 4\\)")
    add("complex.npy", lambda p: np.save(p, np.zeros((3, 2), complex)), "expected a numeric array")
    add("dict.pt", lambda p: torch.save({"acts": torch.zeros(3, 2)}, p), "holds a dict, not a single tensor")
    add("pickle.pt", lambda p: torch.save(Payload(), p), "cannot be loaded as plain tensor data")
    add("raw.pt", lambda p: p.write_bytes(pickle.dumps([1, 2])), "cannot be loaded as plain tensor data")
    add("two.safetensors", lambda p: save_numpy({"a": array, "b": array}, p), "holds 2 tensors \\(a, b\\); name one")
    add("bad.safetensors", lambda p: p.write_bytes(b"\x00" * 64), "not a readable .safetensors file")
    add("acts.csv", lambda p: p.write_text("1,2\n"), "unsupported array file")
    cases.append((tmp_path / "missing.npy", "no such file"))
    return cases


def test_bad_arrays_are_refused_with_one_line_and_no_output(tmp_path, array):
    out = tmp_path / "out" / "s.h5"
    for path, pattern in _bad_files(tmp_path, array):
        with pytest.raises(StoreError, match=pattern) as e:
            import_array(path, out, progress=False)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(path)), msg
    assert not out.exists() and not partial_path(out).exists()


def test_nonfinite_rows_are_counted_and_nothing_is_written(tmp_path, array, monkeypatch):
    monkeypatch.setattr(store_module.importer, "COPY_BLOCK_BYTES", 24 * 4 * 500)  # bad rows in several blocks
    array[[3, 1500, 2999], [0, 5, 23]] = [np.nan, np.inf, -np.inf]
    array[1500, 7] = np.nan  # two bad values in one row count once
    np.save(tmp_path / "nan.npy", array)
    out = tmp_path / "s.h5"
    with pytest.raises(StoreError, match="nan.npy: 3 of 3001 rows contain NaN or Inf; nothing was imported"):
        import_array(tmp_path / "nan.npy", out, progress=False)
    assert not out.exists() and not partial_path(out).exists()


def test_key_errors_and_existing_output(tmp_path, array, digest):
    save_numpy({"a": array}, tmp_path / "a.safetensors")
    with pytest.raises(StoreError, match="no tensor 'z' \\(tensors: a\\)"):
        import_array(tmp_path / "a.safetensors", tmp_path / "s.h5", key="z", progress=False)
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(StoreError, match="--key only applies to .safetensors"):
        import_array(tmp_path / "a.npy", tmp_path / "s.h5", key="z", progress=False)
    out = import_array(tmp_path / "a.npy", tmp_path / "s.h5", progress=False)
    before = digest(out)
    with pytest.raises(StoreError, match="s.h5: already exists; pass --force"):
        import_array(tmp_path / "a.npy", out, progress=False)
    assert digest(out) == before
    np.save(tmp_path / "b.npy", array[:10])
    import_array(tmp_path / "b.npy", out, force=True, progress=False)
    assert stored(out).shape == (10, 24)


def test_cli_import_end_to_end_and_errors(tmp_path, array, capsys):
    np.save(tmp_path / "a.npy", array)
    out = tmp_path / "s.h5"
    argv = ["import", str(tmp_path / "a.npy"), "--out", str(out), "--test-fraction", "0.25", "--seed", "4",
            "--site", "h", "--no-progress"]
    assert cli.main(argv) == 0
    assert str(out) in capsys.readouterr().out
    with ActivationStore(out) as s:
        assert s.sites == ["h"] and s.test_fraction == 0.25
        np.testing.assert_array_equal(s.split_mask("test"), split_rows(3001, 0.25, 4).astype(bool))
    assert cli.main(["inspect", str(out), "--json"]) == 0
    assert '"kind": "import"' in capsys.readouterr().out
    for bad in (argv, ["import", str(tmp_path / "nothing.npy"), "--out", str(tmp_path / "n.h5")]):
        assert cli.main(bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.match(r"sparsefeat import: error: \S+: ", err)


# --------------------------------------------------------------------------------------------
# ImportConfig: the one source of import_array's and `sparsefeat import`'s defaults (issue 9.3)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,pattern", [
    (dict(test_fraction=1.0), "test fraction must be in \\(0, 1\\)"),
    (dict(seed=-2), "seed must be a non-negative whole number, got -2"),
    (dict(site="a/b"), "bad site name 'a/b'"),
    (dict(dtype="float64"), "dtype must be float16 or float32, not 'float64'"),
    (dict(key=""), "key must be a tensor name"),
])
def test_import_config_refuses_bad_values_with_a_config_error(kw, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        ImportConfig(**kw)
    assert "\n" not in str(e.value)


def test_import_array_takes_a_config_or_its_fields_as_keywords(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(600 * 4, dtype=np.float32).reshape(600, 4))
    a = import_array(tmp_path / "a.npy", tmp_path / "a.h5", ImportConfig(seed=3, site="h", dtype="float16"),
                     progress=False)
    b = import_array(tmp_path / "a.npy", tmp_path / "b.h5", seed=3, site="h", dtype="float16", progress=False)
    for path in (a, b):
        with ActivationStore(path) as s:
            assert s.sites == ["h"] and s.f["activations/h"].dtype == np.float16 and s.attrs["split_seed"] == 3
    with ActivationStore(a) as s, ActivationStore(b) as t:
        np.testing.assert_array_equal(s.split_mask("test"), t.split_mask("test"))
    with pytest.raises(ConfigError, match="c.h5: import has no option sead \\(valid: test_fraction, seed, site"):
        import_array(tmp_path / "a.npy", tmp_path / "c.h5", sead=3, progress=False)
    assert not (tmp_path / "c.h5").exists()


def test_cli_import_options_and_their_defaults_come_from_import_config(tmp_path, capsys):
    assert cli.main(["import", "--help"]) == 0  # main returns argparse's exit status instead of raising it
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(ImportConfig):
        assert f"--{f.name.replace('_', '-')}" in text and f"{f.metadata['help']} (default: {f.default})" in text
    np.save(tmp_path / "a.npy", np.ones((10, 4), np.float32))
    assert cli.main(["import", str(tmp_path / "a.npy"), "--out", str(tmp_path / "o.h5"), "--seed", "-1",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "o.h5: seed must be a non-negative whole number, got -1" in err
    assert not (tmp_path / "o.h5").exists()

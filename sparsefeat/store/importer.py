"""Bring your own activations: a [rows, d] array in a .npy, .pt or .safetensors file becomes a store
(kind "import"), copied in blocks without loading the file whole."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..errors import ConfigError
from ..files import OutputError, check_output
from .h5 import StoreError, first_line
from .splits import split_rows
from .writer import COPY_BLOCK_BYTES, DTYPES, AlreadyComplete, StoreWriter, check_site_name, chunk_rows_for

ARRAY_SUFFIXES = (".npy", ".pt", ".safetensors")


@dataclass(frozen=True)
class ImportConfig:
    """How an array becomes a store: the one place `import_array` and `sparsefeat import` take
    their defaults from. Bad values raise `ConfigError` when the config is built."""

    test_fraction: float = field(default=0.1, metadata={"help": "share of rows held out for the test split"})
    seed: int = field(default=0, metadata={"help": "seed of the train/test split"})
    site: str = field(default="x", metadata={"help": "site name in the store"})
    dtype: str | None = field(default=None, metadata={
        "help": "stored dtype; unset: float16 for float16 input, else float32", "choices": DTYPES})
    key: str | None = field(default=None, metadata={"help": "tensor name inside a .safetensors file"})

    def __post_init__(self):
        check_test_fraction(self.test_fraction)
        check_int("seed", self.seed)
        try:
            check_site_name(self.site)
        except StoreError as e:
            raise ConfigError(str(e)) from None
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be {' or '.join(DTYPES)}, not {self.dtype!r}")
        if self.key is not None and (not isinstance(self.key, str) or not self.key):
            raise ConfigError(f"key must be a tensor name, not {self.key!r}")


def check_test_fraction(test_fraction, where=None) -> float:
    """Toys and imports need test rows (a sweep measures held-out loss): (0, 1)."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0.0 < test_fraction < 1.0:
        prefix = f"{where}: " if where is not None else ""
        raise ConfigError(f"{prefix}test fraction must be in (0, 1) (a sweep needs test rows), got {test_fraction}")
    return float(test_fraction)


def check_int(name: str, value, minimum: int = 0) -> int:
    """A whole number >= minimum (bools and floats refused: a config field, not a count to round)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = "non-negative" if minimum == 0 else ("positive" if minimum == 1 else f">= {minimum}")
        raise ConfigError(f"{name} must be a {bound} whole number, got {value!r}")
    return value


def import_config(config: ImportConfig | None = None, **options) -> ImportConfig:
    """`config` (default: ImportConfig()) with `options` (its fields) replaced; an unknown option is
    refused with the list of valid ones."""
    valid = [f.name for f in dataclasses.fields(ImportConfig)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"import has no option {', '.join(unknown)} (valid: {', '.join(valid)})")
    return dataclasses.replace(config or ImportConfig(), **options)


class _ArraySource:
    """A [rows, d] array in a .npy, .pt or .safetensors file, read by row ranges without loading
    it whole where the format allows (.npy: mmap; .pt: torch's mmap; .safetensors: slices)."""

    def __init__(self, path: Path, key: str | None):
        self.path, self.key = path, key
        self.format = path.suffix.lower().lstrip(".")
        self._handle = None
        if path.suffix.lower() not in ARRAY_SUFFIXES:
            raise StoreError(f"{path}: unsupported array file (expected {', '.join(ARRAY_SUFFIXES)})")
        if not path.is_file():
            raise StoreError(f"{path}: no such file")
        if key is not None and self.format != "safetensors":
            raise StoreError(f"{path}: --key only applies to .safetensors files")
        getattr(self, f"_open_{self.format}")()
        if len(self.shape) != 2 or self.shape[0] < 1 or self.shape[1] < 1:
            raise StoreError(f"{path}: expected an array of shape [rows, d], got shape {tuple(self.shape)}")

    def _open_npy(self):
        try:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # pickled objects, bad header, truncated file
            raise StoreError(f"{self.path}: not a plain .npy array ({first_line(e)})") from None
        if not isinstance(self._array, np.ndarray):
            raise StoreError(f"{self.path}: holds an archive, not a single array")
        self.shape, self.dtype = tuple(self._array.shape), str(self._array.dtype)
        if self._array.dtype.kind not in "fiub":
            raise StoreError(f"{self.path}: has dtype {self.dtype}; expected a numeric array")

    def _open_pt(self):
        t = None
        for mmap in (True, False):  # mmap needs torch's zip format; old files load whole
            try:
                with warnings.catch_warnings():  # torch warns about foreign pickles we refuse anyway
                    warnings.simplefilter("ignore")
                    t = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
                break
            except Exception as e:
                err = e
        if t is None:
            raise StoreError(f"{self.path}: cannot be loaded as plain tensor data ({first_line(err)})")
        if not isinstance(t, torch.Tensor):
            raise StoreError(f"{self.path}: holds a {type(t).__name__}, not a single tensor")
        self._check_tensor_dtype(t.dtype)
        self._array, self.shape, self.dtype = t, tuple(t.shape), str(t.dtype).replace("torch.", "")

    def _open_safetensors(self):
        from safetensors import safe_open
        try:
            self._handle = safe_open(str(self.path), framework="pt")
            keys = list(self._handle.keys())
        except Exception as e:
            raise StoreError(f"{self.path}: not a readable .safetensors file ({first_line(e)})") from None
        if self.key is None:
            if len(keys) != 1:
                raise StoreError(f"{self.path}: holds {len(keys)} tensors ({', '.join(keys[:10])}); "
                                 "name one with --key")
            self.key = keys[0]
        elif self.key not in keys:
            raise StoreError(f"{self.path}: no tensor {self.key!r} (tensors: {', '.join(keys[:10])})")
        self._array = self._handle.get_slice(self.key)
        self.shape = tuple(self._array.get_shape())
        dtype = self._array.get_dtype()  # safetensors names: F16, BF16, F32, I64, ...
        if dtype[0] not in "FIUB":
            raise StoreError(f"{self.path}: tensor {self.key!r} has dtype {dtype}; expected numbers")
        self.dtype = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}.get(dtype, dtype)

    def _check_tensor_dtype(self, dtype: torch.dtype) -> None:
        if dtype.is_complex or not (dtype.is_floating_point or dtype in (
                torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)):
            raise StoreError(f"{self.path}: has dtype {dtype}; expected a real numeric tensor")

    def rows(self, lo: int, hi: int) -> np.ndarray:
        a = self._array[lo:hi]
        if isinstance(a, torch.Tensor):
            a = (a.float() if a.dtype not in (torch.float16, torch.float32, torch.float64) else a).numpy()
        return np.asarray(a)

    def close(self):
        self._array = None
        self._handle = None  # safe_open has no close(); dropping it releases the file


def import_array(array_path: str | os.PathLike, out: str | os.PathLike, config: ImportConfig | None = None, *,
                 force: bool = False, resume: bool = False, progress: bool = True, **options) -> Path:
    """Turn a [rows, d] array in a .npy / .pt / .safetensors file into a store (kind "import").

    Settings come from `config` (`ImportConfig`), with any of its fields given as keyword `options`
    on top (`import_array(src, out, seed=3)`). Rows are split per row (`split_rows`, so row order
    does not matter). Rows with NaN or Inf are refused with a count; the output is written
    atomically and an existing one is kept unless `force`. A full disk keeps the rows copied so
    far; `resume=True` continues after them.
    """
    array_path, out = Path(array_path), Path(out)
    try:
        config = import_config(config, **options)
    except ConfigError as e:
        raise ConfigError(f"{out}: {e}") from None
    test_fraction, seed, site = config.test_fraction, config.seed, config.site
    try:  # fail before reading anything; the input is never the output, even with --force
        check_output(out, force=True, inputs=[array_path], allow_existing=True)
    except OutputError as e:
        raise StoreError(str(e)) from None
    if out.exists() and not force and not resume:
        raise StoreError(f"{out}: already exists; pass --force to overwrite it")
    src = _ArraySource(array_path, config.key)
    try:
        n, d = src.shape
        dtype = config.dtype or ("float16" if src.dtype == "float16" else "float32")
        provenance = dict(source=str(array_path.resolve()), format=src.format, key=src.key, shape=[n, d],
                          source_dtype=src.dtype, bytes=array_path.stat().st_size, package_version=__version__)
        chunk = chunk_rows_for(d, np.dtype(dtype).itemsize)
        block = max(chunk, COPY_BLOCK_BYTES // (d * 4) // chunk * chunk)  # whole chunks per write
        try:
            writer = StoreWriter(out, sites={site: d}, provenance=provenance, kind="import", dtype=dtype,
                                 units="as imported", split_unit="row", test_fraction=test_fraction,
                                 split_seed=seed, force=force, resume=resume)
        except AlreadyComplete:
            return out
        try:
            bad = _copy_rows(src, writer, site, block, test_fraction, seed, progress)
            if bad:
                raise StoreError(f"{array_path}: {bad} of {n} rows contain NaN or Inf; nothing was imported")
        except OutputError:
            writer.close(complete=False)  # a full disk: keep the rows copied so far for --resume
            raise
        except BaseException:
            writer.close(complete=False)  # an import is quick to redo: leave no partial behind
            writer.tmp.unlink(missing_ok=True)
            raise
        return writer.close()
    finally:
        src.close()


def _copy_rows(src: _ArraySource, writer: StoreWriter, site: str, block: int, test_fraction: float,
               seed: int, progress: bool) -> int:
    """Copy the rows after the writer's committed ones block by block; returns the number of
    non-finite rows (copying stops at the first one, counting goes on so the error can say how many)."""
    n = src.shape[0]
    bad = 0
    start = writer.committed_rows
    with tqdm(total=n, initial=start, unit="row", disable=not progress, desc=f"import {src.path.name}") as bar:
        for lo in range(start, n, block):
            hi = min(n, lo + block)
            a = src.rows(lo, hi)
            if a.dtype.kind == "f":
                bad += int((~np.isfinite(a)).any(axis=1).sum())
            if not bad:
                writer.append({site: a}, test=split_rows(hi - lo, test_fraction, seed, lo))
            bar.update(hi - lo)
    return bad

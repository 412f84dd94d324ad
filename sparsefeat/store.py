"""The activation store: one self-describing, versioned HDF5 file of activations from one source.

Layout (documented in full in docs/format.md):

    /                      attrs: format, format_version, package_version, created, kind,
                                  provenance (JSON), units, split_unit, test_fraction, split_seed,
                                  complete
    activations/<site>     [rows, d] float16|float32, chunked by rows (~1 MiB chunks)
    rows/test              [rows] uint8, 1 = the row belongs to the test split
    rows/committed         [1] int64, rows that are durably written (the crash-safe counter)
    tokens/doc|pos|ids     [rows] int64, model data only: where each row came from
    documents/test         [docs] uint8, model data only: the per-document split
    ground_truth/<name>    toy data only: what the generator knows (e.g. features [n, d])

Writing is crash-safe: rows are appended in blocks; `rows/committed` is raised only after the
block is flushed, so a writer killed at any moment leaves a file whose committed prefix is intact.
A store is written as `<path>.partial` (HDF5 SWMR, so readers can watch it grow) and renamed to
`<path>` once complete, so a finished store is never half-overwritten.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .errors import SparsefeatError

FORMAT = "sparsefeat.activations"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: large enough to stream fast, small enough to shuffle well
BLOCK_ROWS_TOKENS = 1 << 16
COPY_BLOCK_BYTES = 32 << 20  # imports and rebuilds copy rows in blocks of about this size


class StoreError(SparsefeatError):
    """A store is missing, malformed, of another format or version, or was given bad data."""


def partial_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".partial")


def chunk_rows_for(d: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // (d * itemsize))


def _open_h5(path: Path, mode: str = "r", **kw) -> h5py.File:
    """Open an HDF5 file, turning HDF5's tracebacks into one line that names the file."""
    try:
        return h5py.File(path, mode, **kw)
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file") from None
    except OSError as e:
        msg = str(e)
        if "already open for write" in msg or "file locking" in msg.lower():
            raise StoreError(
                f"{path}: the file is held by a writer or its writer was killed; "
                "resume the writer (--resume) or open it read-only while it runs") from None
        if "signature" in msg or "truncated" in msg.lower() or "eof" in msg.lower():
            raise StoreError(f"{path}: not an HDF5 file, or truncated/corrupt ({msg.splitlines()[0]})") from None
        raise StoreError(f"{path}: cannot open ({msg.splitlines()[0]})") from None


def _open_for_reading(path: Path) -> h5py.File:
    """Open a store or results file read-only.

    A finished file opens plainly, so HDF5 checks its end-of-file and a truncated file fails at
    once (an SWMR reader skips that check and retries reads of the missing data for minutes). A
    file whose writer is running or was killed refuses a plain open; it is read as an SWMR reader.
    """
    try:
        return h5py.File(path, "r")
    except OSError as e:
        if "already open for write" not in str(e):
            return _open_h5(path, "r")  # the same failure, as one line
    return _open_h5(path, "r", swmr=True)


def _check_format(f: h5py.File, path: Path, expected: str = FORMAT, version: int = FORMAT_VERSION) -> None:
    fmt = f.attrs.get("format")
    if fmt is None:
        raise StoreError(f"{path}: not a sparsefeat file (no 'format' attribute)")
    fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
    if fmt != expected:
        raise StoreError(f"{path}: is a '{fmt}' file, expected '{expected}'")
    v = int(f.attrs.get("format_version", -1))
    if v < 1 or v > version:
        raise StoreError(f"{path}: format version {v} is not supported by sparsefeat {__version__} "
                         f"(supports 1..{version}); upgrade sparsefeat")


def file_format(path: str | os.PathLike) -> str:
    """The `format` attribute of a sparsefeat file (activations or results), for dispatch."""
    path = Path(path)
    if not path.exists() and partial_path(path).exists():
        raise StoreError(f"{path}: only {partial_path(path).name} exists: it is still being written or its "
                         "writer was killed (resume it with --resume, or inspect the .partial file)")
    with _open_for_reading(path) as f:
        fmt = f.attrs.get("format")
    if fmt is None:
        raise StoreError(f"{path}: not a sparsefeat file (no 'format' attribute)")
    return fmt.decode() if isinstance(fmt, bytes) else str(fmt)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class StoreWriter:
    """Append activations block by block; crash-safe and resumable.

    >>> with StoreWriter("data/x.h5", sites={"x": 32}, provenance={...}) as w:
    ...     w.append({"x": block}, test=is_test_mask)

    `resume=True` continues `<path>.partial` after its committed rows (the provenance must match);
    `committed_rows` / `committed_docs` tell the producer where to continue.
    `force=True` allows replacing an existing complete store (only once the new one is complete).
    """

    def __init__(self, path: str | os.PathLike, *, sites: Mapping[str, int], provenance: Mapping,
                 kind: str = "toy", dtype: str = "float32", units: str = "arbitrary",
                 split_unit: str = "row", test_fraction: float = 0.1, split_seed: int = 0,
                 compression: str | None = None, tokens: bool = False,
                 resume: bool = False, force: bool = False, allow_nonfinite: bool = False):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        if not sites:
            raise StoreError(f"{self.path}: a store needs at least one site")
        if dtype not in ("float16", "float32"):
            raise StoreError(f"{self.path}: dtype must be float16 or float32, not {dtype!r}")
        if compression not in (None, "none", "lzf", "gzip"):
            raise StoreError(f"{self.path}: compression must be none, lzf or gzip, not {compression!r}")
        if not 0.0 <= test_fraction < 1.0:
            raise StoreError(f"{self.path}: test fraction must be in [0, 1), got {test_fraction}")
        self.sites = {str(k): int(v) for k, v in sites.items()}
        self.dtype = np.dtype(dtype)
        self.allow_nonfinite = allow_nonfinite
        self.with_tokens = tokens
        header = dict(kind=kind, provenance=to_json(provenance), units=units, split_unit=split_unit,
                      test_fraction=float(test_fraction), split_seed=int(split_seed))
        if self.path.exists() and not force and not resume:
            raise StoreError(f"{self.path}: already exists; pass --force to overwrite it")
        if self.path.exists() and resume and not self.tmp.exists():
            raise StoreError(f"{self.path}: is already complete; nothing to resume (use --force to rewrite)")
        if self.tmp.exists() and not resume and not force:
            raise StoreError(f"{self.tmp}: an unfinished store is here; pass --resume to continue it "
                             "or --force to start again")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _WriterLock(self.tmp)
        try:
            if resume and self.tmp.exists():
                self._reopen(header)
            else:
                self._create(header, compression)
        except BaseException:
            self._lock.release()
            raise
        self.f.swmr_mode = True
        self._closed = False

    # -- set-up ---------------------------------------------------------------------------

    def _create(self, header: dict, compression: str | None) -> None:
        if self.tmp.exists():
            self.tmp.unlink()  # an abandoned partial and --force: start again
        f = self.f = h5py.File(self.tmp, "w", libver="latest")
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, package_version=__version__,
                       created=datetime.now(timezone.utc).isoformat(timespec="seconds"), complete=False,
                       **header)
        comp = None if compression in (None, "none") else compression
        g = f.create_group("activations")
        for site, d in self.sites.items():
            ds = g.create_dataset(site, shape=(0, d), maxshape=(None, d), dtype=self.dtype,
                                  chunks=(chunk_rows_for(d, self.dtype.itemsize), d), compression=comp)
            ds.attrs.update(units=header["units"], description=f"activations at site {site!r}, one row per sample")
        r = f.create_group("rows")
        r.create_dataset("test", shape=(0,), maxshape=(None,), dtype="u1", chunks=(BLOCK_ROWS_TOKENS,))
        r["test"].attrs["description"] = "1 if the row belongs to the test split, else 0"
        r.create_dataset("committed", data=np.zeros(1, dtype="i8"))
        r["committed"].attrs["description"] = "rows durably written; rows past this are not part of the store"
        if self.with_tokens:
            t = f.create_group("tokens")
            for name, desc in (("doc", "document index of the row"),
                               ("pos", "position id the model saw for this token"),
                               ("ids", "token id")):
                t.create_dataset(name, shape=(0,), maxshape=(None,), dtype="i8", chunks=(BLOCK_ROWS_TOKENS,))
                t[name].attrs["description"] = desc
            dg = f.create_group("documents")
            dg.create_dataset("test", shape=(0,), maxshape=(None,), dtype="u1", chunks=(4096,))
            dg["test"].attrs["description"] = "1 if the document (all its rows) is in the test split"
            dg.create_dataset("committed", data=np.zeros(1, dtype="i8"))
        self.ground_truth_group = f.create_group("ground_truth")
        self.committed_rows = 0
        self.committed_docs = 0

    def _reopen(self, header: dict) -> None:
        try:
            f = h5py.File(self.tmp, "a", libver="latest")
        except OSError:
            # A killed SWMR writer leaves the consistency flags set and plain opens fail; rebuild the
            # file from its committed prefix (readable with swmr=True) and continue from that.
            try:
                _rebuild_committed_prefix(self.tmp)
            except (OSError, KeyError) as e:
                raise StoreError(f"{self.tmp}: cannot resume: the partial file is unreadable "
                                 f"({_first_line(e)}); use --force to start again") from None
            f = h5py.File(self.tmp, "a", libver="latest")
        self.f = f
        try:
            _check_format(f, self.tmp)
            for key in ("kind", "provenance", "split_unit", "test_fraction", "split_seed"):
                old = f.attrs.get(key)
                old = old.decode() if isinstance(old, bytes) else old
                if old != header[key]:
                    raise StoreError(f"{self.path}: cannot resume: its {key} differs from this run's "
                                     f"({old!r} vs {header[key]!r}); use --force to start again")
            have = {k: v.shape[1] for k, v in f["activations"].items()}
            if have != self.sites:
                raise StoreError(f"{self.path}: cannot resume: its sites {have} differ from {self.sites}")
        except Exception:
            f.close()
            raise
        n = int(f["rows/committed"][0])
        for ds in self._row_datasets():
            ds.resize(n, axis=0)
        self.committed_rows = n
        if "documents" in f:
            nd = int(f["documents/committed"][0])
            f["documents/test"].resize((nd,))
            self.committed_docs = nd
        else:
            self.committed_docs = 0
        self.ground_truth_group = f["ground_truth"]
        f.flush()

    def _row_datasets(self):
        yield from self.f["activations"].values()
        yield self.f["rows/test"]
        if "tokens" in self.f:
            yield from self.f["tokens"].values()

    # -- writing --------------------------------------------------------------------------

    def append(self, block: Mapping[str, np.ndarray | torch.Tensor], test: np.ndarray,
               tokens: Mapping[str, np.ndarray] | None = None,
               documents_test: np.ndarray | None = None) -> int:
        """Append one block of rows (the same rows for every site) and commit it durably.

        `test`: per-row 0/1 split; `tokens`: {doc, pos, ids} per row (model data);
        `documents_test`: the split of the documents that this block completes.
        Returns the number of committed rows.
        """
        arrays = {}
        n = None
        for site, a in block.items():
            if site not in self.sites:
                raise StoreError(f"{self.path}: unknown site {site!r} (store has {sorted(self.sites)})")
            if isinstance(a, torch.Tensor):
                a = a.detach().float().cpu().numpy()
            a = np.asarray(a)
            if a.ndim != 2 or a.shape[1] != self.sites[site]:
                raise StoreError(f"{self.path}: site {site!r} has width {self.sites[site]}, "
                                 f"got a block of shape {tuple(a.shape)}")
            if n is not None and a.shape[0] != n:
                raise StoreError(f"{self.path}: sites in one block have different row counts")
            n = a.shape[0]
            if not self.allow_nonfinite:
                bad = int((~np.isfinite(a)).any(axis=1).sum())
                if bad:
                    raise StoreError(f"{self.path}: {bad} of {n} rows of site {site!r} contain NaN or Inf; "
                                     "refusing to store them (allow_nonfinite=True keeps them)")
            with np.errstate(over="ignore"):  # float16 overflow is reported below, with a count
                arrays[site] = a.astype(self.dtype, copy=False)
            if self.dtype == np.float16 and a.dtype.itemsize > 2 and not self.allow_nonfinite:
                over = int((~np.isfinite(arrays[site])).any(axis=1).sum())
                if over:
                    raise StoreError(f"{self.path}: {over} of {n} rows of site {site!r} exceed the float16 range "
                                     "(|x| > 65504); store them as float32")
        if set(arrays) != set(self.sites):
            raise StoreError(f"{self.path}: a block must hold every site {sorted(self.sites)}")
        test = np.asarray(test, dtype="u1").reshape(-1)
        if test.shape[0] != n:
            raise StoreError(f"{self.path}: split mask has {test.shape[0]} rows, block has {n}")
        if self.with_tokens and tokens is None:
            raise StoreError(f"{self.path}: this store records tokens; append() needs tokens=")
        start, stop = self.committed_rows, self.committed_rows + n
        f = self.f
        for site, a in arrays.items():
            ds = f["activations"][site]
            ds.resize(stop, axis=0)
            ds[start:stop] = a
        f["rows/test"].resize((stop,))
        f["rows/test"][start:stop] = test
        if self.with_tokens:
            for name in ("doc", "pos", "ids"):
                ds = f["tokens"][name]
                ds.resize((stop,))
                ds[start:stop] = np.asarray(tokens[name], dtype="i8")
        if documents_test is not None:
            dt = np.asarray(documents_test, dtype="u1").reshape(-1)
            ds = f["documents/test"]
            d0 = self.committed_docs
            ds.resize((d0 + len(dt),))
            ds[d0:] = dt
        f.flush()  # the data first ...
        f["rows/committed"][0] = stop  # ... then the counter that makes it part of the store
        if documents_test is not None:
            self.committed_docs += len(dt)
            f["documents/committed"][0] = self.committed_docs
        f.flush()
        self.committed_rows = stop
        return stop

    def close(self, complete: bool = True, ground_truth: Mapping[str, np.ndarray] | None = None,
              attrs: Mapping | None = None) -> Path:
        """Finish the store: write ground truth and extra attributes, mark it complete and rename
        `<path>.partial` to `<path>`. With complete=False the partial file stays for --resume."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            self.f.close()
            if not complete:
                return self.tmp
            return self._finish(ground_truth, attrs)
        finally:
            self._lock.release()

    def _finish(self, ground_truth, attrs) -> Path:
        with h5py.File(self.tmp, "a", libver="latest") as f:
            if self.committed_rows == 0:
                raise StoreError(f"{self.path}: no rows were written")
            for name, arr in (ground_truth or {}).items():
                if name in f["ground_truth"]:
                    del f["ground_truth"][name]
                f["ground_truth"].create_dataset(name, data=np.asarray(arr))
            for k, v in (attrs or {}).items():
                f.attrs[k] = v if isinstance(v, (int, float, str, bool, np.ndarray)) else to_json(v)
            f.attrs["rows"] = self.committed_rows
            f.attrs["complete"] = True
            f.attrs["completed"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.replace(self.tmp, self.path)
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(complete=exc_type is None)
        return False


class _WriterLock:
    """An exclusive advisory lock (`<file>.lock`, flock) held while a writer has the file open, so
    a second writer, e.g. a `--resume` started while the first still runs, fails at once instead
    of rebuilding the file under the live one."""

    def __init__(self, target: Path):
        import fcntl
        self.path = Path(str(target) + ".lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise StoreError(f"{target}: another process is writing this store right now") from None

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def _rebuild_committed_prefix(tmp: Path) -> None:
    """Copy the committed prefix of a crashed SWMR file into a fresh file and swap it in.
    Row datasets are copied in blocks, so a large store needs little memory."""
    fresh = Path(str(tmp) + ".rebuild")
    try:
        with h5py.File(tmp, "r", swmr=True) as src, h5py.File(fresh, "w", libver="latest") as dst:
            n = int(src["rows/committed"][0])
            nd = int(src["documents/committed"][0]) if "documents" in src else 0
            dst.attrs.update(dict(src.attrs))

            def copy(name, obj):
                if isinstance(obj, h5py.Group):
                    dst.require_group(name).attrs.update(dict(obj.attrs))
                    return
                if obj.maxshape and obj.maxshape[0] is None:  # a row-appended dataset: keep the prefix
                    keep = nd if name.startswith("documents/") else n
                    ds = dst.create_dataset(name, shape=(keep,) + obj.shape[1:], dtype=obj.dtype,
                                            maxshape=obj.maxshape, chunks=obj.chunks, compression=obj.compression)
                    step = max(1, COPY_BLOCK_BYTES // max(1, obj.dtype.itemsize * math.prod(obj.shape[1:])))
                    for lo in range(0, keep, step):
                        ds[lo:min(keep, lo + step)] = obj[lo:min(keep, lo + step)]
                else:
                    ds = dst.create_dataset(name, data=obj[()])
                ds.attrs.update(dict(obj.attrs))

            src.visititems(copy)
    except BaseException:
        fresh.unlink(missing_ok=True)
        raise
    os.replace(fresh, tmp)


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


@dataclass
class SplitInfo:
    rows: int
    fraction: float


class ActivationStore:
    """Read a store: sites, widths, splits, provenance, shuffled batch streams, moments.

    >>> with ActivationStore("data/sparse.h5") as s:
    ...     for batch in s.batches("x", "train", batch_size=256, seed=0):
    ...         ...
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists() and partial_path(self.path).exists():
            raise StoreError(f"{self.path}: only {partial_path(self.path).name} exists: the store is still "
                             "being written or its writer was killed (resume it with --resume)")
        self.f = _open_for_reading(self.path)
        self._mmap = None  # the file mapped read-only, made on the first mapped batch stream
        self._row_maps: dict[str, _MappedRows | None] = {}
        try:
            _check_format(self.f, self.path)
            if "activations" not in self.f or "rows" not in self.f:
                raise StoreError(f"{self.path}: malformed store (no activations or rows group)")
            self.committed = int(self.f["rows/committed"][0])
            test = self.f["rows/test"][: self.committed].astype(bool)
            if test.shape[0] != self.committed:
                raise StoreError(f"{self.path}: truncated or corrupt (split mask shorter than committed rows)")
            self._test_mask = test
            for site, ds in self.f["activations"].items():
                if ds.shape[0] < self.committed:
                    raise StoreError(f"{self.path}: truncated or corrupt (site {site!r} has {ds.shape[0]} "
                                     f"rows, {self.committed} committed)")
        except StoreError:
            self.f.close()
            raise
        except Exception as e:  # corrupt internals: HDF5 errors while reading metadata
            self.f.close()
            raise StoreError(f"{self.path}: truncated or corrupt ({str(e).splitlines()[0]})") from None

    # -- description ----------------------------------------------------------------------

    def _attr(self, key, default=None):
        v = self.f.attrs.get(key, default)
        return v.decode() if isinstance(v, bytes) else v

    @property
    def sites(self) -> list[str]:
        return list(self.f["activations"].keys())

    def width(self, site: str | None = None) -> int:
        return int(self._dataset(site).shape[1])

    @property
    def kind(self) -> str:
        return self._attr("kind")

    @property
    def complete(self) -> bool:
        return bool(self._attr("complete", False))

    @property
    def units(self) -> str:
        return self._attr("units", "")

    @property
    def provenance(self) -> dict:
        return json.loads(self._attr("provenance", "{}"))

    @property
    def attrs(self) -> dict:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.f.attrs.items()}

    @property
    def test_fraction(self) -> float:
        return float(self._attr("test_fraction", 0.0))

    @property
    def ground_truth(self) -> dict[str, np.ndarray]:
        g = self.f.get("ground_truth")
        return {k: g[k][()] for k in g} if g is not None else {}

    def n_rows(self, split: str | None = None) -> int:
        if split is None:
            return self.committed
        return int(self._split_index(split).shape[0])

    def split_mask(self, split: str) -> np.ndarray:
        if split == "train":
            return ~self._test_mask
        if split == "test":
            return self._test_mask
        if split == "all":
            return np.ones_like(self._test_mask)
        raise StoreError(f"{self.path}: unknown split {split!r} (train, test or all)")

    def _split_index(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split_mask(split))

    def _dataset(self, site: str | None) -> h5py.Dataset:
        sites = self.sites
        if site is None:
            if len(sites) != 1:
                raise StoreError(f"{self.path}: has sites {sites}; name one with --site")
            site = sites[0]
        if site not in self.f["activations"]:
            raise StoreError(f"{self.path}: no site {site!r} (sites: {', '.join(sites)})")
        return self.f["activations"][site]

    def default_site(self) -> str:
        return self._dataset(None).name.rsplit("/", 1)[-1]

    def tokens(self) -> dict[str, np.ndarray] | None:
        if "tokens" not in self.f:
            return None
        return {k: self.f["tokens"][k][: self.committed] for k in self.f["tokens"]}

    def documents_test(self) -> np.ndarray | None:
        if "documents" not in self.f:
            return None
        return self.f["documents/test"][: int(self.f["documents/committed"][0])].astype(bool)

    # -- reading --------------------------------------------------------------------------

    def _check_split(self, split: str) -> np.ndarray:
        idx_mask = self.split_mask(split)
        if not idx_mask.any():
            raise StoreError(f"{self.path}: the {split} split is empty")
        return idx_mask

    def load(self, site: str | None = None, split: str = "all", dtype=torch.float32) -> torch.Tensor:
        """The whole split of a site as one tensor (for small stores)."""
        mask = self._check_split(split)
        ds = self._dataset(site)
        a = ds[: self.committed]
        return torch.from_numpy(np.ascontiguousarray(a[mask])).to(dtype)

    def _blocks(self, ds: h5py.Dataset) -> list[tuple[int, int]]:
        rows = ds.chunks[0] if ds.chunks else chunk_rows_for(ds.shape[1], ds.dtype.itemsize)
        return [(s, min(s + rows, self.committed)) for s in range(0, self.committed, rows)]

    def batches(self, site: str | None = None, split: str = "train", batch_size: int = 4096, *,
                seed: int = 0, epochs: int | None = 1, shuffle: bool = True, drop_last: bool = False,
                buffer_rows: int = 1 << 16, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, pin_memory: bool = False,
                prefetch: int = 0) -> Iterator[torch.Tensor]:
        """Shuffled batches of one split, in constant memory.

        Reads whole chunk-aligned blocks in a random order, keeps the rows of the split, and shuffles
        within a buffer of about `buffer_rows` rows. Every row of the split appears exactly once per
        epoch; epoch e uses seed (seed, e), so a stream is reproducible. `epochs=None` repeats forever.
        `prefetch>0` reads ahead in a background thread (useful when a GPU consumes the batches).
        """
        if batch_size <= 0:
            raise StoreError(f"{self.path}: batch size must be positive, got {batch_size}")
        ds = self._dataset(site)
        mask = self._check_split(split)
        gen = self._batch_gen(ds, mask, batch_size, seed, epochs, shuffle, drop_last, buffer_rows)

        def to_tensor(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(a)
            if pin_memory and torch.cuda.is_available():
                t = t.pin_memory()
            return t.to(device=device, dtype=dtype, non_blocking=pin_memory)

        if prefetch <= 0:
            return (to_tensor(a) for a in gen)
        return _prefetched((to_tensor(a) for a in gen), prefetch)

    def _batch_gen(self, ds, mask, batch_size, seed, epochs, shuffle, drop_last, buffer_rows):
        """Take whole blocks in a random order into a shuffle buffer of about `buffer_rows` rows, then
        cut batches from a random permutation of the split's rows in it; rows left over start the
        next fill.

        Two ways to hold the buffer, with the same batches for the same seed (the same random draws,
        the same rows in the same order; `tests/test_store.py` checks it):
        - mapped (unfiltered chunks of a file not open in SWMR mode, see `_mapped_rows`): the buffer
          holds the rows' byte offsets in the file, and each batch is one gather straight from the
          read-only memory map of the file, the only copy of the rows (the map only views the
          page cache, so the memory the stream allocates stays one batch);
        - copied (anything else): blocks are read into one preallocated buffer (`_BlockReader`),
          and each batch is a gather from it (two copies of every row).
        Every batch is a new array, so batches stay valid while later ones are produced."""
        blocks = [b for b in self._blocks(ds) if mask[b[0]:b[1]].any()]
        target = max(buffer_rows, batch_size)  # rows to hold before cutting batches
        mapped = self._mapped_rows(ds)
        if mapped is not None:
            yield from self._batch_gen_mapped(mapped, blocks, mask, batch_size, seed, epochs, shuffle,
                                              drop_last, target)
            return
        reader = _BlockReader(ds)
        buf = np.empty((target + reader.chunk_rows, ds.shape[1]), dtype=ds.dtype)
        epoch = 0
        while epochs is None or epoch < epochs:
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(len(blocks)) if shuffle else np.arange(len(blocks))
            carry = 0  # rows of the split at buf[:carry], left over from the previous fill
            i = 0
            while i < len(order):
                fill, keep = carry, [np.arange(carry)]
                while i < len(order) and fill < target:
                    s, e = blocks[order[i]]
                    reader.read(s, e, buf[fill:])
                    keep.append(np.flatnonzero(mask[s:e]) + fill)
                    fill += e - s
                    i += 1
                idx = np.concatenate(keep)
                if shuffle:
                    idx = idx[rng.permutation(idx.shape[0])]
                full = idx.shape[0] // batch_size * batch_size
                for j in range(0, full, batch_size):
                    yield buf[idx[j:j + batch_size]]  # a new array: the buffer is refilled later
                rest = idx[full:]
                buf[:rest.shape[0]] = buf[rest]  # (the right side is a copy, so no overlap)
                carry = rest.shape[0]
            if carry and not drop_last:
                yield buf[:carry].copy()
            epoch += 1

    @staticmethod
    def _batch_gen_mapped(mapped, blocks, mask, batch_size, seed, epochs, shuffle, drop_last, target):
        """`_batch_gen` over a mapped file: the same steps and random draws, with the rows' byte
        offsets in the file in the buffer instead of the rows (so the batches are identical to the
        copied path's)."""
        epoch = 0
        while epochs is None or epoch < epochs:
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(len(blocks)) if shuffle else np.arange(len(blocks))
            carry = np.zeros(0, dtype=np.int64)  # offsets of rows left over from the previous fill
            i = 0
            while i < len(order):
                fill, keep = carry.shape[0], [carry]
                while i < len(order) and fill < target:
                    s, e = blocks[order[i]]
                    keep.append(mapped.at(s, np.flatnonzero(mask[s:e])))
                    fill += e - s
                    i += 1
                idx = np.concatenate(keep)
                if shuffle:  # in place; the same order as idx[rng.permutation(len(idx))]
                    rng.shuffle(idx)
                full = idx.shape[0] // batch_size * batch_size
                for j in range(0, full, batch_size):
                    yield mapped.take(idx[j:j + batch_size])
                carry = idx[full:]
            if carry.shape[0] and not drop_last:
                yield mapped.take(carry)
            epoch += 1

    def _mapped_rows(self, ds: h5py.Dataset) -> _MappedRows | None:
        """The rows of `ds` read in place from a read-only memory map of the file, or None where that
        is not safe or not possible: filtered (compressed) or non-native or not full-width chunks, a
        file open in SWMR mode (a writer may still be appending to it), a file driver other than
        the plain one or a user block, a missing chunk, or chunk info HDF5 cannot give."""
        name = ds.name
        if name not in self._row_maps:
            self._row_maps[name] = None
            try:
                self._row_maps[name] = self._map_rows(ds)
            except Exception:  # no chunk info, a file that cannot be mapped: read through HDF5
                pass
        return self._row_maps[name]

    def _map_rows(self, ds: h5py.Dataset) -> _MappedRows | None:
        import mmap
        f = self.f
        if (f.swmr_mode or f.driver != "sec2" or f.userblock_size != 0 or not ds.chunks
                or ds.chunks[1] != ds.shape[1] or not ds.dtype.isnative
                or ds.id.get_create_plist().get_nfilters() != 0 or self.committed == 0):
            return None
        chunk_rows = ds.chunks[0]
        row_bytes = ds.shape[1] * ds.dtype.itemsize
        n_chunks = -(-self.committed // chunk_rows)
        offsets = np.full(n_chunks, -1, dtype=np.int64)
        sizes = np.zeros(n_chunks, dtype=np.int64)

        def visit(info):
            c = info.chunk_offset[0] // chunk_rows
            if c < n_chunks and info.byte_offset is not None:
                offsets[c], sizes[c] = info.byte_offset, info.size

        ds.id.chunk_iter(visit)
        if (offsets < 0).any() or (sizes != chunk_rows * row_bytes).any():
            return None  # a chunk is missing or not stored as plain rows
        if self._mmap is None:  # the very file HDF5 has open, even if the path was replaced since
            self._mmap = mmap.mmap(f.id.get_vfd_handle(), 0, access=mmap.ACCESS_READ)
        if int(offsets.max()) + chunk_rows * row_bytes > len(self._mmap):
            return None
        return _MappedRows(self._mmap, offsets, chunk_rows, row_bytes, ds.dtype, ds.shape[1])

    def moments(self, site: str | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Mean [d] and covariance [d, d] (float64, unbiased) of a split, streamed block by block."""
        ds = self._dataset(site)
        mask = self._check_split(split)
        d = ds.shape[1]
        n = 0
        total = np.zeros(d)
        shift = None  # shifted sums keep the covariance accurate when |mean| >> std
        outer = np.zeros((d, d))
        for s, e in self._blocks(ds):
            a = ds[s:e][mask[s:e]].astype(np.float64)
            if not a.shape[0]:
                continue
            if shift is None:
                shift = a[0].copy()
            a -= shift
            total += a.sum(0)
            outer += a.T @ a
            n += a.shape[0]
        mean_shifted = total / n
        cov = (outer - n * np.outer(mean_shifted, mean_shifted)) / max(n - 1, 1)
        return mean_shifted + shift, cov

    def mean_squared_norm(self, site: str | None = None, split: str = "train") -> float:
        """E‖x‖² = (1/n) Σ ‖x_i‖² over a split: the scale that toy data are matched to.
        (Summed directly: trace(cov) + ‖mean‖² would carry the unbiased covariance's n/(n−1).)"""
        ds = self._dataset(site)
        mask = self._check_split(split)
        total, n = 0.0, 0
        for s, e in self._blocks(ds):
            a = ds[s:e][mask[s:e]].astype(np.float64)
            total += float(np.einsum("ij,ij->", a, a))
            n += a.shape[0]
        return total / n

    def close(self) -> None:
        self._row_maps.clear()
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a running batch stream still views it; it is freed with the stream
                pass
            self._mmap = None
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, kind={self.kind!r}, sites={self.sites}, "
                f"rows={self.committed}, test={self.n_rows('test')})")


class _MappedRows:
    """Rows of an unfiltered chunked dataset, gathered straight from a read-only map of its file.

    A chunk holds `chunk_rows` whole rows at its byte offset (the full chunk even at the edge), so
    row r starts at byte offsets[r // chunk_rows] + (r % chunk_rows) * row_bytes. The file is
    viewed as overlapping row-sized records, one starting at every byte, so a batch is a single
    gather of those records by byte offset: one copy of each row, into a new array."""

    def __init__(self, mm, offsets: np.ndarray, chunk_rows: int, row_bytes: int, dtype: np.dtype, d: int):
        self.offsets, self.chunk_rows, self.row_bytes, self.dtype, self.d = offsets, chunk_rows, row_bytes, dtype, d
        self.record = np.dtype((np.void, row_bytes))
        self.records = np.ndarray((len(mm) - row_bytes + 1,), dtype=self.record, buffer=mm, strides=(1,))

    def at(self, start: int, rows: np.ndarray) -> np.ndarray:
        """Byte offsets of `rows` (numbers within the block) of the chunk-aligned block at `start`."""
        return self.offsets[start // self.chunk_rows] + rows * self.row_bytes

    def take(self, at: np.ndarray) -> np.ndarray:
        """The rows at byte offsets `at`, in that order, as a new [len(at), d] array."""
        return self.records[at].view(self.dtype).reshape(at.shape[0], self.d)


class _BlockReader:
    """Reads a chunk-aligned block of rows into the front of a caller's buffer with one copy.

    Unfiltered, full-width, native-endian chunks are read as raw chunk bytes straight into the
    buffer (`read_direct_chunk`: no selection or conversion machinery, several times faster);
    anything else goes through `read_direct`. The buffer needs room for a whole chunk."""

    def __init__(self, ds: h5py.Dataset):
        self.ds = ds
        self.chunk_rows = ds.chunks[0] if ds.chunks else chunk_rows_for(ds.shape[1], ds.dtype.itemsize)
        self.raw = bool(ds.chunks and ds.chunks[1] == ds.shape[1] and ds.dtype.isnative
                        and ds.id.get_create_plist().get_nfilters() == 0)

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        if self.raw and start % self.chunk_rows == 0 and out.shape[0] >= self.chunk_rows:
            self.ds.id.read_direct_chunk((start, 0), out=out[:self.chunk_rows].reshape(-1).view(np.uint8))
        else:
            self.ds.read_direct(out, np.s_[start:stop], np.s_[0:stop - start])


def _prefetched(it: Iterator, depth: int) -> Iterator:
    """Run an iterator in a background thread, `depth` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def worker():
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # hand the error to the consumer
            q.put(e)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def split_rows(n: int, test_fraction: float, seed: int, offset: int = 0) -> np.ndarray:
    """Per-row split for i.i.d. data: row i is test with probability `test_fraction`, decided by
    a hash of (seed, i) so a resumed writer draws exactly the same split."""
    idx = np.arange(offset, offset + n, dtype=np.uint64)
    return (_unit_hash(idx, seed) < test_fraction).astype("u1")


def split_documents(doc_ids: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Per-document split: the same rule on document indices (all tokens of a document together)."""
    return (_unit_hash(np.asarray(doc_ids, dtype=np.uint64), seed) < test_fraction).astype("u1")


def _unit_hash(idx: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic uniform [0, 1) value per index (splitmix64 of index and seed)."""
    with np.errstate(over="ignore"):
        z = idx + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _first_rows_stats(ds: h5py.Dataset, n: int) -> dict:
    """Mean and std of all values, mean norm and mean squared norm of the first n rows (in blocks)."""
    if n == 0:
        return dict(mean=math.nan, std=math.nan, mean_norm=math.nan, mean_squared_norm=math.nan)
    step = max(1, COPY_BLOCK_BYTES // (8 * ds.shape[1]))
    total = total_sq = total_norm = 0.0
    for lo in range(0, n, step):
        a = ds[lo:min(n, lo + step)].astype(np.float64)
        sq = np.einsum("ij,ij->i", a, a)
        total, total_sq, total_norm = total + a.sum(), total_sq + sq.sum(), total_norm + np.sqrt(sq).sum()
    mean = total / (n * ds.shape[1])
    return dict(mean=float(mean), std=float(math.sqrt(max(0.0, total_sq / (n * ds.shape[1]) - mean ** 2))),
                mean_norm=float(total_norm / n), mean_squared_norm=float(total_sq / n))


def describe(path: str | os.PathLike, max_rows_for_stats: int = 100_000) -> dict:
    """Everything `sparsefeat inspect` shows about a store, as a JSON-ready dict."""
    with ActivationStore(path) as s:
        out = dict(path=str(s.path), format=FORMAT, format_version=int(s._attr("format_version")),
                   package_version=s._attr("package_version"), created=s._attr("created"),
                   kind=s.kind, complete=s.complete, units=s.units, split_unit=s._attr("split_unit"),
                   test_fraction=s.test_fraction, split_seed=int(s._attr("split_seed", 0)),
                   rows=s.committed, train_rows=s.n_rows("train"), test_rows=s.n_rows("test"),
                   provenance=s.provenance, sites={}, ground_truth={})
        for site in s.sites:
            ds = s.f["activations"][site]
            n = min(s.committed, max_rows_for_stats)
            out["sites"][site] = dict(
                shape=[s.committed, int(ds.shape[1])], dtype=str(ds.dtype), chunks=list(ds.chunks or []),
                compression=ds.compression, stats_rows=n, **_first_rows_stats(ds, n))
        for k, v in s.f["ground_truth"].items():
            out["ground_truth"][k] = dict(shape=list(v.shape), dtype=str(v.dtype))
        if "documents" in s.f:
            dt = s.documents_test()
            out["documents"] = int(dt.shape[0])
            out["test_documents"] = int(dt.sum())
    return out


# --------------------------------------------------------------------------------------------
# Import: bring your own activations
# --------------------------------------------------------------------------------------------

ARRAY_SUFFIXES = (".npy", ".pt", ".safetensors")


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
            raise StoreError(f"{self.path}: not a plain .npy array ({_first_line(e)})") from None
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
            raise StoreError(f"{self.path}: cannot be loaded as plain tensor data ({_first_line(err)})")
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
            raise StoreError(f"{self.path}: not a readable .safetensors file ({_first_line(e)})") from None
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def import_array(array_path: str | os.PathLike, out: str | os.PathLike, *, test_fraction: float = 0.1,
                 seed: int = 0, site: str = "x", dtype: str | None = None, key: str | None = None,
                 force: bool = False, progress: bool = True) -> Path:
    """Turn a [rows, d] array in a .npy / .pt / .safetensors file into a store (kind "import").

    Rows are split per row (`split_rows`, so row order does not matter). `dtype` defaults to
    float16 for float16 input and float32 otherwise. Rows with NaN or Inf are refused with a count;
    the output is written atomically and an existing one is kept unless `force`.
    """
    array_path, out = Path(array_path), Path(out)
    if out.exists() and not force:  # fail before reading anything
        raise StoreError(f"{out}: already exists; pass --force to overwrite it")
    src = _ArraySource(array_path, key)
    try:
        n, d = src.shape
        dtype = dtype or ("float16" if src.dtype == "float16" else "float32")
        provenance = dict(source=str(array_path.resolve()), format=src.format, key=src.key, shape=[n, d],
                          source_dtype=src.dtype, bytes=array_path.stat().st_size, package_version=__version__)
        itemsize = np.dtype(dtype).itemsize if dtype in ("float16", "float32") else 4
        chunk = chunk_rows_for(d, itemsize)
        block = max(chunk, COPY_BLOCK_BYTES // (d * 4) // chunk * chunk)  # whole chunks per write
        writer = StoreWriter(out, sites={site: d}, provenance=provenance, kind="import", dtype=dtype,
                             units="as imported", split_unit="row", test_fraction=test_fraction,
                             split_seed=seed, force=force)
        try:
            bad = _copy_rows(src, writer, site, block, test_fraction, seed, progress)
            if bad:
                raise StoreError(f"{array_path}: {bad} of {n} rows contain NaN or Inf; nothing was imported")
        except BaseException:
            writer.close(complete=False)  # an import is quick to redo: leave no partial behind
            writer.tmp.unlink(missing_ok=True)
            raise
        return writer.close()
    finally:
        src.close()


def _copy_rows(src: _ArraySource, writer: StoreWriter, site: str, block: int, test_fraction: float,
               seed: int, progress: bool) -> int:
    """Copy all rows block by block; returns the number of non-finite rows (copying stops at the
    first one, counting goes on so the error can say how many)."""
    n = src.shape[0]
    bad = 0
    with tqdm(total=n, unit="row", disable=not progress, desc=f"import {src.path.name}") as bar:
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            a = src.rows(lo, hi)
            if a.dtype.kind == "f":
                bad += int((~np.isfinite(a)).any(axis=1).sum())
            if not bad:
                writer.append({site: a}, test=split_rows(hi - lo, test_fraction, seed, lo))
            bar.update(hi - lo)
    return bad

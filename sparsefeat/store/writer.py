"""Writing a store: `StoreWriter` appends blocks of rows crash-safely and resumes a killed run.

Rows are appended in blocks; `rows/committed` is raised only after the block (and its checksums)
is flushed, so a writer killed at any moment leaves a file whose committed prefix is intact. A
store is written as `<path>.partial` (HDF5 SWMR, so readers can watch it grow) and renamed to
`<path>` once complete, so a finished store is never half-overwritten. (The rename is not
`files.atomic_path`: the `.partial` name is part of the format, it is what `--resume` continues.)
"""

from __future__ import annotations

import errno
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import h5py
import numpy as np
import torch

from .. import __version__
from ..files import OutputError, WriterLock, check_free_space, check_output, describe_os_error, is_disk_full
from . import checksums
from .h5 import (FORMAT, FORMAT_VERSION, StoreError, check_format, first_line, open_for_reading, partial_path,
                 to_json)

CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: large enough to stream fast, small enough to shuffle well
BLOCK_ROWS_TOKENS = 1 << 16
COPY_BLOCK_BYTES = 32 << 20  # imports and rebuilds copy rows in blocks of about this size
FREE_SPACE_MARGIN = 1 << 20  # HDF5 metadata written beside a block's rows
# No raw-data chunk cache for writing: blocks go to the file as they are written, so a full disk fails
# the write itself (an OSError we can report) and not a later flush of cached chunks, after which HDF5
# cannot close the file and the process dies by SIGSEGV.
WRITE_OPTIONS = dict(libver="latest", rdcc_nbytes=0)
DTYPES = ("float16", "float32")
COMPRESSIONS = (None, "none", "lzf", "gzip")
_SITE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def chunk_rows_for(d: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // (d * itemsize))


def check_site_name(site: str, where=None) -> str:
    """A site is an HDF5 dataset name: letters, digits, `_`, `.`, `-`, not starting with `.` or `-`."""
    if not isinstance(site, str) or not _SITE_NAME.fullmatch(site):
        prefix = f"{where}: " if where is not None else ""
        raise StoreError(f"{prefix}bad site name {site!r} (use letters, digits, '_', '.' or '-', "
                         "starting with a letter, digit or '_')")
    return site


class AlreadyComplete(StoreError):
    """`resume=True` found the complete store, written with the same settings: nothing to do."""


@dataclass(frozen=True)
class Settings:
    """Everything that decides the bytes a writer writes; a resume must match all of it."""
    header: dict  # kind, provenance (JSON), units, split_unit, test_fraction, split_seed
    sites: dict  # site -> width
    dtype: str
    compression: str | None
    tokens: bool

    def difference(self, f: h5py.File) -> str | None:
        """What differs between these settings and those of the open store `f` (None: nothing)."""
        for key, want in self.header.items():
            old = f.attrs.get(key)
            old = old.decode() if isinstance(old, bytes) else old
            if isinstance(old, np.generic):
                old = old.item()
            if old != want:
                return f"its {key} differs from this run's ({_short(old)} vs {_short(want)})"
        have = {k: v.shape[1] for k, v in f["activations"].items()}
        if have != self.sites:
            return f"its sites {have} differ from this run's {self.sites}"
        for site, ds in f["activations"].items():
            if str(ds.dtype) != self.dtype:
                return f"its dtype is {ds.dtype}, this run's is {self.dtype}"
            if ds.compression != self.compression:
                return f"its compression is {ds.compression or 'none'}, this run's is {self.compression or 'none'}"
        if ("tokens" in f) != self.tokens:
            return "it records tokens and this run does not" if self.tokens is False else \
                "this run records tokens and it does not"
        return None


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


class StoreWriter:
    """Append activations block by block; crash-safe and resumable.

    >>> with StoreWriter("data/x.h5", sites={"x": 32}, provenance={...}) as w:
    ...     w.append({"x": block}, test=is_test_mask)

    `resume=True` continues `<path>.partial` after its committed rows; every setting that changes the
    bytes written (kind, provenance, units, split, sites, dtype, compression, tokens) must match, and
    a refused resume leaves the `.partial` untouched. `committed_rows` / `committed_docs` tell the
    producer where to continue. `force=True` allows replacing an existing complete store (only once
    the new one is complete). A full disk stops the writer with one line; the committed rows stay.
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
        for site in sites:
            check_site_name(site, self.path)
        if dtype not in DTYPES:
            raise StoreError(f"{self.path}: dtype must be float16 or float32, not {dtype!r}")
        if compression not in COMPRESSIONS:
            raise StoreError(f"{self.path}: compression must be none, lzf or gzip, not {compression!r}")
        if not 0.0 <= test_fraction < 1.0:
            raise StoreError(f"{self.path}: test fraction must be in [0, 1), got {test_fraction}")
        self.sites = {str(k): int(v) for k, v in sites.items()}
        self.dtype = np.dtype(dtype)
        self.allow_nonfinite = allow_nonfinite
        self.with_tokens = tokens
        header = dict(kind=kind, provenance=to_json(provenance), units=units, split_unit=split_unit,
                      test_fraction=float(test_fraction), split_seed=int(split_seed))
        self.settings = Settings(header, dict(self.sites), str(self.dtype),
                                 None if compression in (None, "none") else compression, bool(tokens))
        self._check_paths(resume, force)
        try:
            self._lock = WriterLock(self.tmp, what="store")
        except OutputError as e:
            raise StoreError(str(e)) from None
        try:
            if resume and self.tmp.exists():
                self._check_resumable(self.tmp)
                self._reopen()
            else:
                self._create()
        except BaseException:
            self._lock.release()
            raise
        self.f.swmr_mode = True
        self._closed = False

    # -- set-up ---------------------------------------------------------------------------

    def _check_paths(self, resume: bool, force: bool) -> None:
        """Refuse, before anything is created, what would lose data or cannot work."""
        for p in (self.path, self.tmp):
            if p.is_dir():
                raise StoreError(f"{p}: is a folder; give a file path")
        if self.path.exists() and resume and not self.tmp.exists():
            self._check_resumable(self.path, complete=True)
        if self.path.exists() and not force and not resume:
            raise StoreError(f"{self.path}: already exists; pass --force to overwrite it")
        if self.tmp.exists() and not resume and not force:
            raise StoreError(f"{self.tmp}: an unfinished store is here; pass --resume to continue it "
                             "or --force to start again")
        check_output(self.path, force=True, allow_existing=True)  # bad text, unwritable folder

    def _check_resumable(self, path: Path, complete: bool = False) -> None:
        """Compare this run's settings with the file's, reading it only (a refused resume must not
        change the file). For a complete store, raise AlreadyComplete when they match."""
        try:
            f = open_for_reading(path)
        except StoreError as e:
            raise StoreError(f"{path}: cannot resume: the partial file is unreadable ({e}); "
                             "use --force to start again") from None
        try:
            check_format(f, path)
            version = int(f.attrs.get("format_version"))
            why = self.settings.difference(f)
        except StoreError:
            raise
        except Exception as e:  # damaged internals
            raise StoreError(f"{path}: cannot resume: the file is damaged ({first_line(e)}); "
                             "use --force to start again") from None
        finally:
            f.close()
        if why and complete:
            raise StoreError(f"{self.path}: is already complete; nothing to resume (and it was written with "
                             f"other settings: {why}; use --force to rewrite it)")
        if why:
            raise StoreError(f"{self.path}: cannot resume: {why}; use --force to start again")
        if complete:
            raise AlreadyComplete(f"{self.path}: is already complete; nothing to resume "
                                  "(use --force to rewrite)")
        if version < FORMAT_VERSION:
            raise StoreError(f"{self.path}: cannot resume: the partial file was written by an older sparsefeat "
                             f"(format version {version}); use --force to start again")

    def _create(self) -> None:
        header = self.settings.header
        try:
            if self.tmp.exists():
                self.tmp.unlink()  # an abandoned partial and --force: start again
            f = self.f = h5py.File(self.tmp, "w", **WRITE_OPTIONS)
        except OSError as e:
            raise OutputError(describe_os_error(self.tmp, e)) from None
        try:
            f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, package_version=__version__,
                           created=datetime.now(timezone.utc).isoformat(timespec="seconds"), complete=False,
                           **header)
            comp = self.settings.compression
            g = f.create_group("activations")
            s = f.create_group(checksums.GROUP)
            for site, d in self.sites.items():
                chunk_rows = chunk_rows_for(d, self.dtype.itemsize)
                ds = g.create_dataset(site, shape=(0, d), maxshape=(None, d), dtype=self.dtype,
                                      chunks=(chunk_rows, d), compression=comp)
                ds.attrs.update(units=header["units"], description=f"activations at site {site!r}, one row per sample")
                c = s.create_dataset(site, shape=(0,), maxshape=(None,), dtype="u4", chunks=(4096,))
                c.attrs.update(algorithm=checksums.ALGORITHM, chunk_rows=chunk_rows,
                               description=f"{checksums.ALGORITHM} of each block of chunk_rows rows of "
                                           f"activations/{site} as stored (the last block: its committed rows)")
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
            f.flush()
        except Exception as e:
            self._abandon()
            if isinstance(e, OSError) or is_disk_full(e):
                raise self._output_error(e, resumable=False) from None
            raise
        self.committed_rows = 0
        self.committed_docs = 0
        self._sums = {site: np.zeros(0, dtype=np.uint32) for site in self.sites}
        self._algorithms = {site: checksums.ALGORITHM for site in self.sites}

    def _rebuild_and_open(self, wait: float = 10.0):
        """Rebuild the committed prefix and open it. A reader that holds the file open for a moment (an
        `inspect`, a test polling the committed rows) makes HDF5's own lock fail with EAGAIN; our writer
        lock already excludes other writers, so that is worth a short wait, not a refusal."""
        import time
        deadline = time.monotonic() + wait
        while True:
            try:
                rebuild_committed_prefix(self.tmp)
                return h5py.File(self.tmp, "a", **WRITE_OPTIONS)
            except OSError as e:
                if "unable to lock file" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _reopen(self) -> None:
        try:
            f = h5py.File(self.tmp, "a", **WRITE_OPTIONS)
        except OSError:
            # A killed SWMR writer leaves the consistency flags set and plain opens fail; rebuild the
            # file from its committed prefix (readable with swmr=True) and continue from that.
            check_free_space(self.tmp, self.tmp.stat().st_size + FREE_SPACE_MARGIN, resumable=True)
            try:
                f = self._rebuild_and_open()
            except Exception as e:
                if is_disk_full(e):
                    raise self._output_error(e) from None
                raise StoreError(f"{self.tmp}: cannot resume: the partial file is unreadable "
                                 f"({first_line(e)}); use --force to start again") from None
        self.f = f
        try:
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
            self._sums, self._algorithms = {}, {}
            for site in self.sites:  # the last block's checksum may have run past the committed rows
                c = f[checksums.GROUP][site]
                chunk_rows = int(c.attrs["chunk_rows"])
                algorithm = self._algorithms[site] = checksums.algorithm_of(c, self.tmp)  # continue in kind
                c.resize((-(-n // chunk_rows),))
                sums = c[:]
                if n % chunk_rows:
                    lo = n // chunk_rows * chunk_rows
                    sums = checksums.extend(sums[:-1], f["activations"][site][lo:n], lo, chunk_rows, algorithm)
                    c[-1] = sums[-1]
                self._sums[site] = sums
            for key in ("complete", "completed", "rows"):  # a run killed while it was being closed
                if key in f.attrs:
                    del f.attrs[key]
            f.attrs["complete"] = False
            self.ground_truth_group = f["ground_truth"]
            f.flush()
        except Exception as e:
            self._abandon()
            if is_disk_full(e):
                raise self._output_error(e) from None
            raise

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
        if self._closed:
            raise StoreError(f"{self.path}: the writer is closed")
        arrays = self._checked_block(block)
        n = next(iter(arrays.values())).shape[0]
        test = np.asarray(test, dtype="u1").reshape(-1)
        if test.shape[0] != n:
            raise StoreError(f"{self.path}: split mask has {test.shape[0]} rows, block has {n}")
        if self.with_tokens and tokens is None:
            raise StoreError(f"{self.path}: this store records tokens; append() needs tokens=")
        # A full disk inside HDF5 can end the process by a signal: look before writing.
        nbytes = sum(a.nbytes for a in arrays.values()) + n * (1 + (24 if self.with_tokens else 0))
        check_free_space(self.tmp, nbytes + nbytes // 8 + FREE_SPACE_MARGIN, resumable=True)
        try:
            self._write(arrays, test, tokens, documents_test)
        except Exception as e:
            if not is_disk_full(e):
                raise
            self._abandon()  # the committed prefix stays; --resume continues after it
            raise self._output_error(e) from None
        return self.committed_rows

    def _checked_block(self, block) -> dict[str, np.ndarray]:
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
                arrays[site] = np.ascontiguousarray(a.astype(self.dtype, copy=False))
            if self.dtype == np.float16 and a.dtype.itemsize > 2 and not self.allow_nonfinite:
                over = int((~np.isfinite(arrays[site])).any(axis=1).sum())
                if over:
                    raise StoreError(f"{self.path}: {over} of {n} rows of site {site!r} exceed the float16 range "
                                     "(|x| > 65504); store them as float32")
        if set(arrays) != set(self.sites):
            raise StoreError(f"{self.path}: a block must hold every site {sorted(self.sites)}")
        return arrays

    def _write(self, arrays, test, tokens, documents_test) -> None:
        n = test.shape[0]
        start, stop = self.committed_rows, self.committed_rows + n
        f = self.f
        sums = {}
        for site, a in arrays.items():
            ds = f["activations"][site]
            ds.resize(stop, axis=0)
            ds[start:stop] = a
            c = f[checksums.GROUP][site]
            chunk_rows = int(c.attrs["chunk_rows"])
            sums[site] = checksums.extend(self._sums[site], a, start, chunk_rows, self._algorithms[site])
            c.resize(sums[site].shape)
            c0 = start // chunk_rows
            c[c0:] = sums[site][c0:]
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
        self._sums = sums

    def _output_error(self, e: BaseException, resumable: bool = True) -> OutputError:
        if is_disk_full(e):
            e = OSError(errno.ENOSPC, "no space left on device")
        elif not isinstance(e, OSError):
            e = OSError(None, first_line(e))
        return OutputError(describe_os_error(self.tmp, e, resumable=resumable))

    def _abandon(self) -> None:
        """Drop the file handle after a failed write (its errors are no longer ours to report)."""
        self._closed = True
        try:
            self.f.close()
        except Exception:
            pass
        self._lock.release()

    def close(self, complete: bool = True, ground_truth: Mapping[str, np.ndarray] | None = None,
              attrs: Mapping | None = None) -> Path:
        """Finish the store: write ground truth and extra attributes, mark it complete and rename
        `<path>.partial` to `<path>`. With complete=False the partial file stays for --resume."""
        if self._closed:
            return self.path if complete else self.tmp
        self._closed = True
        try:
            self.f.close()
            if not complete:
                return self.tmp
            return self._finish(ground_truth, attrs)
        except Exception as e:
            if isinstance(e, OSError) or is_disk_full(e):
                raise self._output_error(e) from None
            raise
        finally:
            self._lock.release()

    def _finish(self, ground_truth, attrs) -> Path:
        if self.committed_rows == 0:
            raise StoreError(f"{self.path}: no rows were written")
        nbytes = sum(np.asarray(a).nbytes for a in (ground_truth or {}).values())
        check_free_space(self.tmp, nbytes + FREE_SPACE_MARGIN, resumable=True)
        with h5py.File(self.tmp, "a", **WRITE_OPTIONS) as f:
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


def rebuild_committed_prefix(tmp: Path) -> None:
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
                    if name.startswith("documents/"):
                        keep = nd
                    elif name.startswith(checksums.GROUP + "/"):
                        keep = -(-n // int(obj.attrs["chunk_rows"]))
                    else:
                        keep = n
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

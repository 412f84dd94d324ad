"""Reading a store: `ActivationStore` (sites, splits, provenance, shuffled batch streams, moments)
and `describe` / `verify` for `sparsefeat inspect`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from . import checksums
from .h5 import FORMAT, StoreError, check_format, first_line, open_for_reading, partial_path
from .stream import CopiedRows, MappedRows, prefetched, shuffled_batches
from .writer import COPY_BLOCK_BYTES, chunk_rows_for


class ActivationStore:
    """Read a store: sites, widths, splits, provenance, shuffled batch streams, moments.

    Every block of rows a reader reads is checked against its checksum once (format version 2;
    version 1 stores have none), so damaged rows stop a sweep with one line.

    >>> with ActivationStore("data/sparse.h5") as s:
    ...     for batch in s.batches("x", "train", batch_size=256, seed=0):
    ...         ...
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists() and partial_path(self.path).exists():
            raise StoreError(f"{self.path}: only {partial_path(self.path).name} exists: the store is still "
                             "being written or its writer was killed (resume it with --resume)")
        self.f = open_for_reading(self.path)
        self._mmap = None  # the file mapped read-only, made on the first mapped batch stream
        self._row_maps: dict[str, MappedRows | None] = {}
        self._verifiers: dict[str, checksums.BlockVerifier | None] = {}
        try:
            self.format_version = check_format(self.f, self.path)
            if "activations" not in self.f or "rows" not in self.f:
                raise StoreError(f"{self.path}: malformed store (no activations or rows group)")
            self.committed = int(self.f["rows/committed"][0])
            test = self.f["rows/test"][: self.committed].astype(bool)
            if test.shape[0] != self.committed:
                raise StoreError(f"{self.path}: truncated or corrupt (split mask shorter than committed rows)")
            self._test_mask = test
            for site, ds in self.f["activations"].items():
                if not isinstance(ds, h5py.Dataset) or ds.ndim != 2:
                    raise StoreError(f"{self.path}: malformed store (site {site!r} is not a [rows, d] dataset)")
                if ds.shape[0] < self.committed:
                    raise StoreError(f"{self.path}: truncated or corrupt (site {site!r} has {ds.shape[0]} "
                                     f"rows, {self.committed} committed)")
            self._check_attributes()
        except StoreError:
            self.f.close()
            raise
        except Exception as e:  # corrupt internals: HDF5 errors while reading metadata
            self.f.close()
            raise StoreError(f"{self.path}: truncated or corrupt ({first_line(e)})") from None

    def _check_attributes(self) -> None:
        """Attributes every reader relies on, checked once so a damaged one is one line here and not
        a traceback later."""
        try:
            provenance = json.loads(self._attr("provenance", "{}"))
        except (TypeError, ValueError):
            raise StoreError(f"{self.path}: malformed store (attribute 'provenance' is not JSON)") from None
        if not isinstance(provenance, dict):
            raise StoreError(f"{self.path}: malformed store (attribute 'provenance' is not a JSON object)")
        for key, cast in (("test_fraction", float), ("split_seed", int)):
            try:
                cast(self._attr(key, 0))
            except (TypeError, ValueError):
                raise StoreError(f"{self.path}: malformed store (attribute {key!r} is "
                                 f"{self._attr(key)!r}, not a number)") from None

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

    # -- checksums ------------------------------------------------------------------------

    def _verifier(self, ds: h5py.Dataset) -> checksums.BlockVerifier | None:
        """The checker of a site's blocks (None for a version 1 store, which has no checksums)."""
        site = ds.name.rsplit("/", 1)[-1]
        if site not in self._verifiers:
            group = self.f.get(checksums.GROUP)
            if group is None or site not in group:
                if self.format_version >= 2:
                    raise StoreError(f"{self.path}: malformed store (no checksums of site {site!r})")
                self._verifiers[site] = None
            else:
                self._verifiers[site] = checksums.BlockVerifier(self.f, self.path, site, self.committed,
                                                                self.complete)
        return self._verifiers[site]

    def _read_rows(self, ds: h5py.Dataset, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) (start on a block boundary), checked block by block."""
        a = ds[start:stop]
        check = self._verifier(ds)
        if check is not None:
            check.check_rows(start, a)
        return a

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
        a = self._read_rows(ds, 0, self.committed)
        return torch.from_numpy(np.ascontiguousarray(a[mask])).to(dtype)

    def _blocks(self, ds: h5py.Dataset) -> list[tuple[int, int]]:
        rows = ds.chunks[0] if ds.chunks else chunk_rows_for(ds.shape[1], ds.dtype.itemsize)
        return [(s, min(s + rows, self.committed)) for s in range(0, self.committed, rows)]

    def batches(self, site: str | None = None, split: str = "train", batch_size: int = 4096, *,
                seed: int = 0, epochs: int | None = 1, shuffle: bool = True, drop_last: bool = False,
                buffer_rows: int = 1 << 16, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, pin_memory: bool = False,
                prefetch: int = 0) -> Iterator[torch.Tensor]:
        """Shuffled batches of one split, in constant memory (see `stream.shuffled_batches`).

        Reads whole chunk-aligned blocks in a random order, keeps the rows of the split, and shuffles
        within a buffer of about `buffer_rows` rows. Every row of the split appears exactly once per
        epoch; epoch e uses seed (seed, e), so a stream is reproducible. `epochs=None` repeats forever.
        Unfiltered stores not open in SWMR mode are gathered from a memory map of the file, others
        copied through a buffer: the same seed gives the same batches either way.
        `prefetch>0` reads ahead in a background thread (useful when a GPU consumes the batches).
        """
        if batch_size <= 0:
            raise StoreError(f"{self.path}: batch size must be positive, got {batch_size}")
        ds = self._dataset(site)
        mask = self._check_split(split)
        blocks = [(s, e, np.flatnonzero(mask[s:e])) for s, e in self._blocks(ds)]
        blocks = [b for b in blocks if b[2].shape[0]]
        source = self._mapped_rows(ds) or self._copied_rows(ds, max(buffer_rows, batch_size))
        gen = shuffled_batches(source, blocks, batch_size, seed=seed, epochs=epochs, shuffle=shuffle,
                               drop_last=drop_last, buffer_rows=buffer_rows)

        def to_tensor(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(a)
            if pin_memory and torch.cuda.is_available():
                t = t.pin_memory()
            return t.to(device=device, dtype=dtype, non_blocking=pin_memory)

        if prefetch <= 0:
            return (to_tensor(a) for a in gen)
        return prefetched((to_tensor(a) for a in gen), prefetch)

    def _copied_rows(self, ds: h5py.Dataset, capacity: int) -> CopiedRows:
        reader = _BlockReader(ds)
        check = self._verifier(ds)
        return CopiedRows(reader.read, capacity, reader.chunk_rows, ds.shape[1], ds.dtype,
                          check=check.check if check is not None else None)

    def _mapped_rows(self, ds: h5py.Dataset) -> MappedRows | None:
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

    def _map_rows(self, ds: h5py.Dataset) -> MappedRows | None:
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
        check = self._verifier(ds)
        return MappedRows(self._mmap, offsets, chunk_rows, row_bytes, ds.dtype, ds.shape[1],
                          check=check.check if check is not None else None)

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
            a = self._read_rows(ds, s, e)[mask[s:e]].astype(np.float64)
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
            a = self._read_rows(ds, s, e)[mask[s:e]].astype(np.float64)
            total += float(np.einsum("ij,ij->", a, a))
            n += a.shape[0]
        return total / n

    def verify(self) -> dict:
        """Check every block of every site against its checksum; raises a one-line StoreError at the
        first damaged block. Returns {site: blocks checked} (empty for a version 1 store)."""
        out = {}
        for site in self.sites:
            ds = self._dataset(site)
            if self._verifier(ds) is None:
                continue
            check = checksums.BlockVerifier(self.f, self.path, site, self.committed, self.complete)
            reader = _BlockReader(ds)
            buf = np.empty((reader.chunk_rows, ds.shape[1]), dtype=ds.dtype)
            for s, e in self._blocks(ds):
                try:
                    reader.read(s, e, buf)
                except (OSError, RuntimeError) as err:  # a damaged compressed chunk
                    raise StoreError(f"{self.path}: the row data of site {site!r} is damaged: block "
                                     f"{s // reader.chunk_rows} (rows {s}..{e - 1}) cannot be read "
                                     f"({first_line(err)})") from None
                check.check(s, e, buf[:e - s])
            out[site] = len(check.done)
        return out

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
        out = dict(path=str(s.path), format=FORMAT, format_version=s.format_version,
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


def verify(path: str | os.PathLike) -> dict:
    """`sparsefeat inspect --verify`: every block of every site checked; {site: blocks}."""
    with ActivationStore(path) as s:
        return s.verify()

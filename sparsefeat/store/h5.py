"""The HDF5 layer every sparsefeat file shares (stores and results files): opening a file with
one-line errors, checking its `format` and `format_version`, and writing attributes as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from .. import __version__
from ..errors import SparsefeatError

FORMAT = "sparsefeat.activations"
# 2: adds checksums/<site> (per-chunk checksum of the row data, algorithm named by its attribute:
#    crc32, or adler32 in the first version 2 files). Version 1 files are still read.
FORMAT_VERSION = 2


class StoreError(SparsefeatError):
    """A store is missing, malformed, of another format or version, or was given bad data."""


def partial_path(path: str | os.PathLike) -> Path:
    """Where a store is written until it is complete (then renamed to `path`)."""
    return Path(str(path) + ".partial")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def open_h5(path: Path, mode: str = "r", **kw) -> h5py.File:
    """Open an HDF5 file, turning HDF5's tracebacks into one line that names the file."""
    try:
        return h5py.File(path, mode, **kw)
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise StoreError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        msg = str(e)
        if "already open for write" in msg or "file locking" in msg.lower():
            raise StoreError(
                f"{path}: the file is held by a writer or its writer was killed; "
                "resume the writer (--resume) or open it read-only while it runs") from None
        if "signature" in msg or "truncated" in msg.lower() or "eof" in msg.lower():
            raise StoreError(f"{path}: not an HDF5 file, or truncated/corrupt ({msg.splitlines()[0]})") from None
        raise StoreError(f"{path}: cannot open ({first_line(e)})") from None


def open_for_reading(path: Path) -> h5py.File:
    """Open a store or results file read-only.

    A finished file opens plainly, so HDF5 checks its end-of-file and a truncated file fails at
    once (an SWMR reader skips that check and retries reads of the missing data for minutes). A
    file whose writer is running or was killed refuses a plain open; it is read as an SWMR reader.
    """
    try:
        return h5py.File(path, "r")
    except OSError as e:
        if "already open for write" not in str(e):
            return open_h5(path, "r")  # the same failure, as one line
    return open_h5(path, "r", swmr=True)


def check_format(f: h5py.File, path: Path, expected: str = FORMAT, version: int = FORMAT_VERSION) -> int:
    """Refuse a file of another format or an unsupported version; returns its version."""
    fmt = f.attrs.get("format")
    if fmt is None:
        raise StoreError(f"{path}: not a sparsefeat file (no 'format' attribute)")
    fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
    if fmt != expected:
        raise StoreError(f"{path}: is a '{fmt}' file, expected '{expected}'")
    try:
        v = int(f.attrs.get("format_version", -1))
    except (TypeError, ValueError):
        v = -1
    if v < 1 or v > version:
        raise StoreError(f"{path}: format version {v} is not supported by sparsefeat {__version__} "
                         f"(supports 1..{version}); upgrade sparsefeat")
    return v


def file_format(path: str | os.PathLike) -> str:
    """The `format` attribute of a sparsefeat file (activations or results), for dispatch."""
    path = Path(path)
    if not path.exists() and partial_path(path).exists():
        raise StoreError(f"{path}: only {partial_path(path).name} exists: it is still being written or its "
                         "writer was killed (resume it with --resume, or inspect the .partial file)")
    with open_for_reading(path) as f:
        fmt = f.attrs.get("format")
    if fmt is None:
        raise StoreError(f"{path}: not a sparsefeat file (no 'format' attribute)")
    return fmt.decode() if isinstance(fmt, bytes) else str(fmt)


def json_default(o):
    """`json.dumps(default=...)` for the NumPy scalars and arrays and the paths our records hold."""
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
    return json.dumps(obj, sort_keys=True, default=json_default)

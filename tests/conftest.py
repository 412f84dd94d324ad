"""Shared fixtures: small stores made with the real writer, a small sparse toy, and a helper that
SIGKILLs a writer subprocess once it has committed some rows."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from sparsefeat.store import StoreWriter, partial_path, split_rows


def indexed_rows(lo: int, hi: int, d: int) -> np.ndarray:
    """Rows whose column 0 is the row index (exact in float32 below 2**24) and the rest seeded noise
    of that row, so any batch says which rows it holds."""
    rng = np.random.default_rng([7, lo])
    a = rng.standard_normal((hi - lo, d)).astype(np.float32)
    a[:, 0] = np.arange(lo, hi, dtype=np.float32)
    return a


@pytest.fixture
def make_store(tmp_path):
    """make_store(name, n=..., d=..., test_fraction=..., block=...) -> path of a complete store whose
    site "x" holds `indexed_rows` (row i has x[i, 0] == i), written block by block."""

    def make(name: str = "s.h5", *, n: int = 3000, d: int = 16, test_fraction: float = 0.2,
             block: int = 1000, dtype: str = "float32", seed: int = 0, **writer_kw) -> Path:
        path = tmp_path / name
        with StoreWriter(path, sites={"x": d}, provenance={"test": name}, dtype=dtype,
                         test_fraction=test_fraction, split_seed=seed, **writer_kw) as w:
            for lo in range(0, n, block):
                hi = min(n, lo + block)
                w.append({"x": indexed_rows(lo, hi, d)}, test=split_rows(hi - lo, test_fraction, seed, lo))
        return path

    return make


@pytest.fixture(scope="session")
def sparse_toy(tmp_path_factory) -> Path:
    """A small complete sparse toy store (64 features in 32 dims, 4000 rows), shared by tests."""
    from sparsefeat.toys import write_toy
    out = tmp_path_factory.mktemp("toys") / "sparse.h5"
    return write_toy("sparse", out, n_samples=4000, n_features=64, d=32, progress=False)


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def digest():
    """digest(path) -> sha256 of the file's bytes (to show an error left a file untouched)."""
    return file_digest


def committed_rows(path: Path) -> int:
    """Rows a (possibly still written) store has committed, read as an SWMR reader; 0 if unreadable."""
    try:
        with h5py.File(path, "r", swmr=True) as f:
            return int(f["rows/committed"][0])
    except (OSError, KeyError):
        return 0


@pytest.fixture
def kill_after_commit():
    """kill_after_commit(code, store_path, min_rows) runs `python -c code`, waits until the store's
    .partial has committed at least `min_rows` rows, SIGKILLs the writer and returns the rows
    committed at that moment. Fails if the writer ends by itself first."""

    def run(code: str, store: Path, min_rows: int, timeout: float = 60.0) -> int:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        try:
            while committed_rows(partial_path(store)) < min_rows:
                if proc.poll() is not None:
                    pytest.fail(f"writer ended before it was killed: {proc.stderr.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("writer committed too few rows in time")
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
        return committed_rows(partial_path(store))

    return run


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(size="4m", read_only=False) -> a folder on a fresh tmpfs of that size (a real full disk or
    a real read-only file system); `tmpfs.resize(folder, size)` grows it. Skips where mounting is
    not allowed (it needs root)."""
    mounted = []

    def mount(size: str = "4m", read_only: bool = False) -> Path:
        folder = tmp_path / f"mnt{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    def resize(folder: Path, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)

    mount.resize = resize
    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def run_cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m sparsefeat.cli ARGV` in a fresh process (for failures that could kill a process)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "sparsefeat.cli", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def kill_when():
    """kill_when(code, ready=None, args=(), timeout=120) runs `python -c code args...` and SIGKILLs it
    as soon as `ready()` is true (polled every 10 ms); with `ready=None` the child is expected to
    SIGKILL itself (a hook in `code` that dies in the middle of a write). Fails unless the child ends
    by SIGKILL: a child that finishes or fails by itself was not killed where the test meant."""

    def run(code: str, ready=None, args=(), timeout: float = 120.0) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if ready is not None and ready():
                    proc.send_signal(signal.SIGKILL)
                    break
                if time.monotonic() > deadline:
                    pytest.fail("the child was not killed in time")
                time.sleep(0.01)
            code_ = proc.wait(timeout=30)
            if code_ != -signal.SIGKILL:
                pytest.fail(f"child ended with {code_}, not by SIGKILL: {proc.stderr.read().decode()[-2000:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()

    return run

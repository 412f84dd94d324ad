"""Bad input across every command, in one table (issue 8): each case is an argv, the expected part of
its one-line message, a non-zero exit, no traceback, and no file in the folder created or changed
(every file is hashed before and after).

Commands run in-process through `cli.main` (fast); the files they see are copied into each case's
own folder from a set made once per session (a small toy store, a two-size sweep of it, arrays,
damaged copies).
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from sparsefeat import cli



# --------------------------------------------------------------------------------------------
# The files the cases work on (made once; each case gets its own copy)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def originals(tmp_path_factory) -> Path:
    import torch
    from sparsefeat.toys import write_toy
    from sparsefeat.train import SweepConfig, train_sweep
    src = tmp_path_factory.mktemp("bad-input")
    store = write_toy("sparse", src / "store.h5", n_samples=2000, n_features=16, d=8, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_sweep(store, SweepConfig(sizes=[8, 16], steps=40, seeds=[0, 1], checkpoint_every=0,
                                       test_curve_points=0, device="cpu"), src / "sweep.h5", progress=False)
    finally:
        torch.set_num_threads(threads)
    np.save(src / "rows.npy", np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32))
    np.save(src / "cube.npy", np.zeros((10, 4, 4), np.float32))
    (src / "notes.txt").write_text("not an array\n")
    (src / "binary.toml").write_bytes(b"\x00\xff\xfe\x89PNG\r\n")
    (src / "typed.toml").write_text('[sweep.toy]\nsteps = "many"\n')
    (src / "corpus.txt").write_text("A few words of text to harvest.\n")
    (src / "folder").mkdir()
    _damaged_results(src)
    _damaged_stores(src)
    _killed_toy(src)
    return src


def _damaged_results(src: Path) -> None:
    def variant(name, change):
        shutil.copy(src / "sweep.h5", src / name)
        with h5py.File(src / name, "r+") as f:
            member = next(iter(f["members"].values()))
            change(f, member)

    def nan_decoder(f, g):
        g["decoder"][0, :] = np.nan

    def wrong_shape(f, g):
        del g["decoder"]
        g.create_dataset("decoder", data=np.zeros((3, 5), np.float32))

    def no_metrics(f, g):
        del g["metrics"]

    variant("nan-decoder.h5", nan_decoder)
    variant("wrong-shape.h5", wrong_shape)
    variant("no-metrics.h5", no_metrics)
    (src / "truncated.h5").write_bytes((src / "sweep.h5").read_bytes()[:3000])


def _damaged_stores(src: Path) -> None:
    for name, key, value in (("bad-provenance.h5", "provenance", "{not json"),
                             ("bad-fraction.h5", "test_fraction", "abc")):
        shutil.copy(src / "store.h5", src / name)
        with h5py.File(src / name, "r+") as f:
            f.attrs[key] = value


def _killed_toy(src: Path) -> None:
    """killed.h5.partial: a toy run stopped after its first block, as a kill leaves it."""
    from sparsefeat import store
    from sparsefeat.toys import write_toy
    append, calls = store.StoreWriter.append, []

    def fail_second(self, *a, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # what a Ctrl-C half way does
        return append(self, *a, **kw)

    store.StoreWriter.append = fail_second
    try:
        write_toy("sparse", src / "killed.h5", n_samples=3000, block_rows=1000, n_features=16, d=8, progress=False)
    except KeyboardInterrupt:
        pass
    finally:
        store.StoreWriter.append = append
    assert store.partial_path(src / "killed.h5").exists()


def _read_only(folder: Path) -> bool:
    """Make `folder` read-only; as root (who ignores permissions) mount a read-only tmpfs on it."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def _writable_again(folder: Path) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o755)
    else:
        subprocess.run(["umount", str(folder)], capture_output=True)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# The table: argv (paths relative to the case's folder), expected part of the message
# --------------------------------------------------------------------------------------------

BAD = "bad\udcff.h5"  # a non-UTF-8 byte, as Python hands it over in sys.argv (surrogateescape)
SWEEP = ["--sizes", "8,16", "--steps", "20", "--no-progress", "--device", "cpu"]
HARVEST = ["--corpus", "corpus.txt", "--max-tokens", "50", "--no-progress", "--device", "cpu"]

CASES = [
    # toy
    pytest.param(["toy", "sparse", "--out", "folder", "--force", "--no-progress"], "folder"),
    (["toy", "sparse", "--out", "ro/x.h5", "--no-progress"], "read-only"),
    (["toy", "sparse", "--out", "store.h5", "--no-progress"], "already exists"),
    (["toy", "sparse", "--n-samples", "0", "--out", "new.h5", "--no-progress"], "must be a positive"),
    (["toy", "sparse", "--set", "nope=1", "--out", "new.h5", "--no-progress"], "has no parameter nope"),
    (["toy", "sparse", "--set", "d=wide", "--out", "new.h5", "--no-progress"], "expected int"),
    (["toy", "blob", "--out", "new.h5"], "invalid choice"),
    (["toy", "sparse", "--out", BAD], "not valid UTF-8"),
    pytest.param(["toy", "sparse", "--test-fraction", "0", "--out", "new.h5", "--no-progress"], "test fraction"),
    pytest.param(["toy", "sparse", "--out", "killed.h5", "--resume", "--dtype", "float16", "--n-samples", "3000", "--block-rows", "1000",
                  "--set", "n_features=16", "--set", "d=8", "--no-progress"], "dtype"),
    # import
    pytest.param(["import", "rows.npy", "--out", "folder", "--force", "--no-progress"], "folder"),
    (["import", "rows.npy", "--out", "ro/x.h5", "--no-progress"], "read-only"),
    (["import", "rows.npy", "--out", "store.h5", "--no-progress"], "already exists"),
    (["import", "missing.npy", "--out", "new.h5", "--no-progress"], "missing.npy"),
    (["import", "notes.txt", "--out", "new.h5", "--no-progress"], "notes.txt"),
    pytest.param(["import", "cube.npy", "--out", "new.h5", "--no-progress"], "shape [rows, d]"),
    pytest.param(["import", "rows.npy", "--out", "new.h5", "--site", "", "--no-progress"], "site"),
    pytest.param(["import", "rows.npy", "--out", "rows.npy", "--force", "--no-progress"], "input"),
    pytest.param(["import", "rows.npy", "--out", "new.h5", "--test-fraction", "0", "--no-progress"],
                 "test fraction"),
    # inspect
    (["inspect", "missing.h5"], "missing.h5"),
    (["inspect", "notes.txt"], "notes.txt"),
    (["inspect", "truncated.h5"], "truncated.h5"),
    (["inspect", "folder"], "folder"),
    pytest.param(["inspect", "bad-provenance.h5"], "provenance"),
    # harvest
    (["harvest", "--out", "folder", "--force", *HARVEST], "is a folder"),
    (["harvest", "--out", "store.h5", *HARVEST], "already exists"),
    (["harvest", "--out", "ro/x.h5", *HARVEST], "read-only"),
    (["harvest", "--out", "new.h5", "--corpus", "missing.txt", "--no-progress"], "missing.txt"),
    (["harvest", "--out", "new.h5", "--layers", "99", *HARVEST], "out of range"),
    (["harvest", "--out", "new.h5", "--model", "no-such-model", *HARVEST], "no-such-model"),
    # sweep
    (["sweep", "missing.h5", "--out", "new.h5", *SWEEP], "missing.h5"),
    (["sweep", "store.h5", "--out", "sweep.h5", *SWEEP], "already exists"),
    (["sweep", "store.h5", "--out", "folder", "--force", *SWEEP], "folder"),
    (["sweep", "store.h5", "--out", "new.h5", "--sizes", "0", "--no-progress"], "size"),
    (["sweep", "store.h5", "--out", "new.h5", "--arch", "nope", *SWEEP], "nope"),
    (["sweep", "store.h5", "--out", "new.h5", "--site", "nope", *SWEEP], "nope"),
    (["sweep", "notes.txt", "--out", "new.h5", *SWEEP], "notes.txt"),
    pytest.param(["sweep", "store.h5", "--out", "store.h5", "--force", *SWEEP], "input"),
    pytest.param(["sweep", "store.h5", "--out", "new.h5", "--arch", "topk", "--k", "64", *SWEEP], "k=64"),
    pytest.param(["sweep", "killed.h5.partial", "--out", "new.h5", *SWEEP], "partial"),
    pytest.param(["sweep", "bad-fraction.h5", "--out", "new.h5", *SWEEP], "test_fraction"),
    # count
    (["count", "missing.h5"], "missing.h5"),
    (["count", "store.h5"], "store.h5"),
    (["count", "truncated.h5"], "truncated.h5"),
    (["count", "sweep.h5", "--match-floor", "2"], "match_floor"),
    (["count", BAD], "not valid UTF-8"),
    pytest.param(["count", "no-metrics.h5"], "metrics"),
    pytest.param(["count", "wrong-shape.h5"], "decoder"),
    pytest.param(["count", "nan-decoder.h5"], "decoder"),
    # plot
    (["plot", "sweep.h5", "--out", "store.h5"], "is a file, not a folder"),
    (["plot", "sweep.h5", "--out", "ro/figs"], "read-only"),
    (["plot", "sweep.h5", "--out", "ro"], "read-only"),
    (["plot", "missing.h5", "--out", "figs"], "missing.h5"),
    (["plot", "truncated.h5", "--out", "figs"], "truncated.h5"),
    pytest.param(["plot", "no-metrics.h5", "--out", "figs"], "metrics"),
    pytest.param(["plot", "wrong-shape.h5", "--out", "figs"], "decoder"),
    # run
    (["run", "--out", "store.h5", "--quick", "--no-progress"], "is a file, not a folder"),
    (["run", "--out", "ro", "--quick", "--no-progress"], "read-only"),
    (["run", "--out", "ro/study", "--quick", "--no-progress"], "read-only"),
    (["run", "--config", "typed.toml", "--out", "study", "--no-progress"], "steps must be a whole number or 'auto', got 'many'"),
    (["run", "--config", "binary.toml", "--out", "study", "--no-progress"], "not a TOML file"),
    (["run", "--config", "missing.toml", "--out", "study", "--no-progress"], "no such file"),
    (["run", "--config", "folder", "--out", "study", "--no-progress"], "is a folder"),
    (["run", "--config", BAD, "--out", "study"], "not valid UTF-8"),
    # any command
    (["frobnicate"], "invalid choice"),
    (["sweep", "store.h5"], "--out"),
]


@pytest.mark.parametrize("argv,message", CASES)
def test_bad_input_is_one_line_exit_nonzero_and_changes_no_file(originals, tmp_path, capsys, monkeypatch,
                                                                 argv, message):
    for p in originals.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp_path / p.name)
    ro = tmp_path / "ro"
    if any("ro" in Path(a).parts for a in argv if isinstance(a, str)) and not _read_only(ro):
        pytest.skip("no way to make a read-only folder here (root without mount)")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    try:
        code = cli.main(list(argv))
    finally:
        if ro.exists():
            _writable_again(ro)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err and "internal error" not in err
    lines = [line for line in err.splitlines() if line.startswith("sparsefeat")]
    usage = [line for line in err.splitlines() if line not in lines]  # argparse's usage, if any
    assert len(lines) == 1 and all(line.startswith(("usage:", " ")) for line in usage), err
    assert message in lines[0], err
    assert snapshot(tmp_path) == before  # nothing written, nothing changed, no .partial or temp file left


# --------------------------------------------------------------------------------------------
# What needs a process of its own: a full disk, Ctrl-C
# --------------------------------------------------------------------------------------------


def _with_file_size_limit(limit: int):
    """A child whose files cannot grow past `limit` bytes: writes fail as on a full disk (EFBIG)."""
    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_files


@pytest.mark.slow
def test_a_full_disk_during_plot_leaves_no_half_set_of_figures(originals, tmp_path):
    figs = tmp_path / "figs"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "sparsefeat.cli", "plot", str(originals / "sweep.h5"),
                           "--out", str(figs), "--bootstrap", "20"], capture_output=True, text=True, env=env,
                          preexec_fn=_with_file_size_limit(30_000), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert str(figs) in proc.stderr
    assert list(figs.iterdir()) == []  # no figure, no temporary file: all or nothing
    ok = subprocess.run([sys.executable, "-m", "sparsefeat.cli", "plot", str(originals / "sweep.h5"),
                         "--out", str(figs), "--bootstrap", "20"], capture_output=True, text=True, env=env,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr  # the same command with room to write succeeds


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    study = tmp_path / "study"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    # the child gets SIGINT's default action back: a test runner started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "sparsefeat.cli", "run", "--quick", "--out", str(study),
                             "--no-progress"], stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (study / "study.toml").exists():  # the study has started (imports done)
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["sparsefeat run: error: interrupted"] and "Traceback" not in err


def test_a_bug_says_internal_error_above_its_traceback(monkeypatch, capsys, originals):
    from sparsefeat import count
    monkeypatch.setattr(count, "count_results", lambda *a, **kw: 1 / 0)  # stands for a genuine bug
    assert cli.main(["count", str(originals / "sweep.h5")]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("sparsefeat count: internal error") and "ZeroDivisionError" in err

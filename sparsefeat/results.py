"""The sweep results file (`sweep.h5`): everything the analysis needs, without the trainer.

Layout (documented in full in docs/format.md, section "Results file (sweep.h5)"):

    /                       attrs: format="sparsefeat.results", format_version, package_version, created,
                                   label, site, d, store_path, store_kind, store_provenance (JSON),
                                   store_hash, config (JSON), normalisation_scale,
                                   signal_thresholds (JSON, version 2)
    members/<id>/           attrs: id, arch, dictionary_size, sparsity_name, sparsity, seed
        encoder [m, d], encoder_bias [m], decoder [m, d] (unit rows), decoder_bias [d]
        curves/train, curves/test      [n, 2] float64 (step, loss)
        metrics/<split>                attrs: mse, fvu, l1, loss, l0, dead_fraction, shrinkage, rows
        row_sse/<split>                [rows] float32, ‖x − x̂‖² per evaluated row (normalised units)
        frequency/<split>              [m] float32, share of evaluated rows on which each latent fires
        signals                        attrs: mmcs_next, mmcs_next_hungarian, share_next_0_9,
                                              shared_seed, mmcs_gt, recovered_gt (NaN: not applicable)
        training                       attrs (version 3): steps_trained, stop_reason, converged,
                                              dead_never_alive, dead_died_later, resampled, and (when the
                                              member took a smaller one's dictionary) copied_from,
                                              objective_from_scratch
        last_fired                     [m] int64 (version 3): training step on which each latent last fired
                                       (0: never)
    signals/<table>         compound datasets: the cross-member tables (one row per compared pair)
    ground_truth/features   [n, d] toy stores only: a copy of the store's ground-truth features
    summary                 compound dataset: one row per member and split
    test_rows/documents     [test rows] int64, version 2, stores with documents: each evaluated test row's
                            document id, in the order of row_sse/test

The file is written once, at the end of a sweep, through `files.atomic_path` (a hidden temporary file
renamed when complete), so a reader never sees half a file; an existing file is replaced only with
`force`. Damaged weights (NaN, wrong shape) and members without metrics are one-line `ResultsError`s.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .errors import SparsefeatError
from .files import atomic_path, check_free_space
from .store import check_format, open_h5, to_json

FORMAT = "sparsefeat.results"
FORMAT_VERSION = 3  # 3: members/<id>/training; 2: signal_thresholds, test_rows/documents (1, 2 still read)
V1_SIGNAL_THRESHOLDS = {"match": 0.9, "seed": 0.7}  # fixed in code when version 1 files were written
SPLITS = ("train", "test")
METRIC_KEYS = ("mse", "fvu", "l1", "loss", "l0", "dead_fraction", "shrinkage", "rows")
SIGNAL_KEYS = ("mmcs_next", "mmcs_next_hungarian", "share_next_0_9", "shared_seed", "mmcs_gt", "recovered_gt")
MEMBER_KEYS = ("id", "arch", "dictionary_size", "sparsity_name", "sparsity", "seed")
# How a member trained (version 3). Missing in older files, and "converged" missing for fixed step counts
# (not checked): read as None, "unknown".
TRAINING_KEYS = ("steps_trained", "stop_reason", "converged", "dead_never_alive", "dead_died_later", "resampled",
                 "copied_from", "objective_from_scratch")


class ResultsError(SparsefeatError):
    """A results file is missing, malformed, of another format, or asked for something it lacks."""


@dataclass
class Member:
    """One trained dictionary of a sweep: who it is, how it scored, how it trained."""

    id: str
    arch: str
    dictionary_size: int
    sparsity_name: str  # "l1" (relu-l1: the L1 coefficient α) or "k" (topk)
    sparsity: float
    seed: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> METRIC_KEYS
    signals: dict[str, float] = field(default_factory=dict)  # SIGNAL_KEYS, NaN where not applicable
    curves: dict[str, np.ndarray] = field(default_factory=dict)  # "train"/"test" -> [n, 2] (step, loss)
    # TRAINING_KEYS: steps_trained (int), stop_reason ("converged", "max_steps", "fixed"), converged (bool;
    # None when not checked: a fixed step count, or a file older than version 3); of the latents dead on the
    # test split, dead_never_alive never fired in training and dead_died_later did; resampled: latents
    # re-initialised in training (relu-l1 resample_steps); copied_from: the smaller size whose dictionary
    # this member took because from scratch it ended with a higher training objective (None: its own), and
    # objective_from_scratch: the training objective it ended with from scratch
    training: dict = field(default_factory=dict)

    @property
    def converged(self) -> bool | None:
        """Whether training stopped because the held-out loss converged; None: unknown (fixed steps, old file)."""
        return self.training.get("converged")

    @property
    def steps_trained(self) -> int | None:
        return self.training.get("steps_trained")


@dataclass
class MemberArrays:
    """The large arrays of one member, written beside its `Member` record."""

    encoder: np.ndarray  # [m, d]
    encoder_bias: np.ndarray  # [m]
    decoder: np.ndarray  # [m, d], unit rows
    decoder_bias: np.ndarray  # [d] (zeros for an architecture without one)
    row_sse: dict[str, np.ndarray]  # split -> [rows]
    frequency: dict[str, np.ndarray]  # split -> [m]
    last_fired: np.ndarray | None = None  # [m] training step on which each latent last fired (0: never)


@dataclass
class Results:
    """A results file: small things are read at once; weights and per-row arrays on demand, through
    one HDF5 handle opened at the first read and kept until `close()` (or the end of a `with` block):

        with load_results("sweep.h5") as r:
            decoder = r.decoder(r.members[0].id)
    """

    path: Path
    label: str
    site: str
    d: int
    store_path: str
    store_kind: str
    store_provenance: dict
    store_hash: str
    config: dict
    members: list[Member]
    ground_truth: np.ndarray | None = None
    signals: dict[str, list[dict]] = field(default_factory=dict)
    normalisation_scale: float = 1.0  # the trainer's inputs were raw rows × this (normalised units)
    package_version: str = __version__
    created: str = ""
    signal_thresholds: dict = field(default_factory=lambda: dict(V1_SIGNAL_THRESHOLDS))
    test_documents: np.ndarray | None = None  # [test rows] document id of each evaluated test row
    _file: h5py.File | None = field(default=None, init=False, repr=False, compare=False)

    # -- the one handle --------------------------------------------------------------------------

    def __enter__(self) -> "Results":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _h5(self) -> h5py.File:
        if self._file is None or not self._file.id.valid:
            self._file = open_h5(self.path, "r")
        return self._file

    # -- lookup -------------------------------------------------------------------------------

    def member(self, member_id: str) -> Member:
        for m in self.members:
            if m.id == member_id:
                return m
        raise ResultsError(f"{self.path}: no member {member_id!r} "
                           f"(members: {', '.join(m.id for m in self.members[:6])}"
                           f"{', ...' if len(self.members) > 6 else ''})")

    def _array(self, member_id: str, name: str) -> np.ndarray:
        m = self.member(member_id)  # a clear error for an unknown id
        f, key = self._h5(), f"members/{member_id}/{name}"
        if key not in f:
            raise ResultsError(f"{self.path}: member {member_id!r} has no {name!r}")
        a = f[key][()]
        if name in WEIGHT_SHAPES:
            check_weight(self.path, m, name, a, self.d)
        return a

    def decoder(self, member_id: str) -> np.ndarray:
        """[m, d]: one unit-norm dictionary atom per row (normalised units)."""
        return self._array(member_id, "decoder")

    def encoder(self, member_id: str) -> np.ndarray:
        """[m, d]: one encoder direction per row (not unit norm)."""
        return self._array(member_id, "encoder")

    def encoder_bias(self, member_id: str) -> np.ndarray:
        return self._array(member_id, "encoder_bias")

    def decoder_bias(self, member_id: str) -> np.ndarray:
        return self._array(member_id, "decoder_bias")

    def row_sse(self, member_id: str, split: str) -> np.ndarray:
        """[rows]: ‖x − x̂‖² of each evaluated row of `split`, in normalised units. Rows are in the same
        order for every member of the file, so members can be compared row by row."""
        _check_split(self.path, split)
        return self._array(member_id, f"row_sse/{split}")

    def feature_frequency(self, member_id: str, split: str) -> np.ndarray:
        """[m]: share of the evaluated rows of `split` on which each latent is non-zero."""
        _check_split(self.path, split)
        return self._array(member_id, f"frequency/{split}")

    def last_fired(self, member_id: str) -> np.ndarray:
        """[m]: the training step on which each latent last fired (0: never); version 3 files."""
        return self._array(member_id, "last_fired")

    def table(self) -> list[dict]:
        """One row per member and split: identity, the split's metrics and the member's signals."""
        return [summary_row(m, split) for m in self.members for split in SPLITS if split in m.metrics]


WEIGHT_SHAPES = {"encoder": ("m", "d"), "encoder_bias": ("m",), "decoder": ("m", "d"), "decoder_bias": ("d",)}


def check_weight(path, m: Member, name: str, a: np.ndarray, d: int) -> None:
    """A damaged weight array is a one-line error, never a silent NaN count or a broadcast."""
    want = tuple({"m": m.dictionary_size, "d": d}[k] for k in WEIGHT_SHAPES[name])
    if a.shape != want:
        raise ResultsError(f"{path}: member {m.id!r}: {name} has shape {a.shape}, expected {want} "
                           "(damaged results file)")
    if not np.isfinite(a).all():
        raise ResultsError(f"{path}: member {m.id!r}: {name} holds NaN or Inf values (damaged results file)")


def summary_row(m: Member, split: str) -> dict:
    row = {k: getattr(m, k) for k in MEMBER_KEYS}
    row["split"] = split
    row.update({k: m.metrics[split].get(k, math.nan) for k in METRIC_KEYS})
    row.update({k: m.signals.get(k, math.nan) for k in SIGNAL_KEYS})
    return row


def _check_split(path, split: str) -> None:
    if split not in SPLITS:
        raise ResultsError(f"{path}: unknown split {split!r} (train or test)")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_results(path: str | os.PathLike, results: Results, arrays: dict[str, MemberArrays], *,
                  force: bool = False, resumable: bool = False) -> Path:
    """Write `results` (its `path` is ignored) and each member's arrays to `path`, atomically. A full
    disk is one line (`OutputError`) that says to free space (and `--resume` when `resumable`)."""
    path = Path(path)
    if path.exists() and not force:
        raise ResultsError(f"{path}: already exists; pass --force to overwrite it")
    missing = [m.id for m in results.members if m.id not in arrays]
    if missing:
        raise ValueError(f"no arrays for members {missing}")
    check_free_space(path, _size_estimate(results, arrays), resumable=resumable)
    with atomic_path(path, force=True, resumable=resumable) as tmp:
        with h5py.File(tmp, "w") as f:
            _write_header(f, results)
            g = f.create_group("members")
            for index, m in enumerate(results.members):
                _write_member(g.create_group(m.id), m, arrays[m.id])
                g[m.id].attrs["index"] = index  # HDF5 lists groups by name; this keeps the sweep's order
            sg = f.create_group("signals")
            for name, rows in results.signals.items():
                ds = sg.create_dataset(name, data=_records(rows))
                ds.attrs["description"] = SIGNAL_TABLE_HELP.get(name, "")
            if results.ground_truth is not None:
                ds = f.create_dataset("ground_truth/features", data=np.asarray(results.ground_truth, np.float32))
                ds.attrs["description"] = "copy of the store's ground-truth features (unnormalised directions)"
            f.create_dataset("summary", data=_records(results.table()))
            f["summary"].attrs["description"] = "one row per member and split: metrics and signals"
            if results.test_documents is not None:
                ds = f.create_dataset("test_rows/documents", data=np.asarray(results.test_documents, np.int64))
                ds.attrs["description"] = "document id of each evaluated test row, in the order of row_sse/test"
    return path


def _size_estimate(results: Results, arrays: dict[str, MemberArrays]) -> int:
    """Bytes the file will take, about (float32 arrays, plus room for attributes and tables)."""
    n = sum(np.asarray(getattr(a, k)).size for a in arrays.values()
            for k in ("encoder", "encoder_bias", "decoder", "decoder_bias"))
    n += sum(np.asarray(v).size for a in arrays.values() for part in (a.row_sse, a.frequency) for v in part.values())
    n += sum(2 * np.asarray(a.last_fired).size for a in arrays.values() if a.last_fired is not None)  # int64
    return 4 * n + 4096 * (len(results.members) + 16)


SIGNAL_TABLE_HELP = {
    "next": "each dictionary against the next larger one of the same sparsity and seed",
    "seeds": "each pair of seeds at the same size and sparsity: one-to-one shared fraction",
    "ground_truth": "each dictionary against the store's ground-truth features",
}


def _write_header(f: h5py.File, r: Results) -> None:
    f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, package_version=__version__,
                   created=r.created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   label=r.label, site=r.site, d=int(r.d), store_path=str(r.store_path),
                   store_kind=r.store_kind or "", store_provenance=to_json(r.store_provenance),
                   store_hash=r.store_hash, config=to_json(r.config),
                   normalisation_scale=float(r.normalisation_scale), signal_thresholds=to_json(r.signal_thresholds))


def _write_member(g: h5py.Group, m: Member, a: MemberArrays) -> None:
    g.attrs.update(id=m.id, arch=m.arch, dictionary_size=int(m.dictionary_size), sparsity_name=m.sparsity_name,
                   sparsity=float(m.sparsity), seed=int(m.seed))
    for name in ("encoder", "encoder_bias", "decoder", "decoder_bias"):
        g.create_dataset(name, data=np.asarray(getattr(a, name), dtype=np.float32))
    for split, curve in m.curves.items():
        g.create_dataset(f"curves/{split}", data=np.asarray(curve, dtype=np.float64).reshape(-1, 2))
    for split, values in m.metrics.items():
        mg = g.create_group(f"metrics/{split}")
        mg.attrs.update({k: values[k] for k in METRIC_KEYS})
    for split, v in a.row_sse.items():
        g.create_dataset(f"row_sse/{split}", data=np.asarray(v, dtype=np.float32))
    for split, v in a.frequency.items():
        g.create_dataset(f"frequency/{split}", data=np.asarray(v, dtype=np.float32))
    if a.last_fired is not None:
        g.create_dataset("last_fired", data=np.asarray(a.last_fired, dtype=np.int64))
    g.create_group("signals").attrs.update({k: float(m.signals.get(k, math.nan)) for k in SIGNAL_KEYS})
    training = g.create_group("training")
    for k, v in m.training.items():
        if v is not None:  # absent = unknown
            training.attrs[k] = v


def _records(rows: list[dict]) -> np.ndarray:
    """A list of flat dicts (str, int, float values; same keys) as a numpy structured array."""
    if not rows:
        return np.zeros(0, dtype=[("empty", "i1")])
    fields = []
    for k in rows[0]:
        v = rows[0][k]
        if isinstance(v, str):
            n = max(1, max(len(str(r[k]).encode()) for r in rows))
            fields.append((k, f"S{n}"))
        elif isinstance(v, (bool, np.bool_)):
            fields.append((k, "u1"))
        elif isinstance(v, (int, np.integer)):
            fields.append((k, "i8"))
        else:
            fields.append((k, "f8"))
    out = np.zeros(len(rows), dtype=fields)
    for i, r in enumerate(rows):
        out[i] = tuple(str(r[k]).encode() if dt.startswith("S") else r[k] for k, dt in fields)
    return out


def _from_records(a: np.ndarray) -> list[dict]:
    names = a.dtype.names or ()
    if names == ("empty",):
        return []
    return [{k: _plain(row[k]) for k in names} for row in a]


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def load_results(path: str | os.PathLike) -> Results:
    """Open a results file: metadata, members (metrics, signals, curves) and tables now; arrays later."""
    path = Path(path)
    if not path.exists() and (Path(str(path) + ".ckpt").exists() or Path(str(path) + ".tmp").exists()
                              or any(path.parent.glob(f".{glob.escape(path.name)}.tmp-*"))):
        raise ResultsError(f"{path}: does not exist yet: its sweep is still running or was killed "
                           "(continue it with sweep --resume)")
    f = open_h5(path, "r")
    try:
        r = _read(f, path)
    except BaseException:
        f.close()
        raise
    r._file = f  # kept open for the arrays: one handle per loaded file
    return r


def _read(f: h5py.File, path: Path) -> Results:
    check_format(f, path, FORMAT, FORMAT_VERSION)
    try:
        a = {k: _plain(v) for k, v in f.attrs.items()}
        groups = sorted(f["members"].values(), key=lambda g: int(g.attrs.get("index", 0)))
        members = [_read_member(g) for g in groups]
        signals = {name: _from_records(ds[()]) for name, ds in f["signals"].items()} if "signals" in f else {}
        gt = f["ground_truth/features"][()] if "ground_truth/features" in f else None
        docs = f["test_rows/documents"][()] if "test_rows/documents" in f else None
        thresholds = json.loads(a["signal_thresholds"]) if "signal_thresholds" in a else dict(V1_SIGNAL_THRESHOLDS)
        return Results(path=path, label=a["label"], site=a["site"], d=int(a["d"]), store_path=a["store_path"],
                       store_kind=a["store_kind"], store_provenance=json.loads(a["store_provenance"]),
                       store_hash=a["store_hash"], config=json.loads(a["config"]), members=members,
                       ground_truth=gt, signals=signals, normalisation_scale=float(a["normalisation_scale"]),
                       package_version=a.get("package_version", ""), created=a.get("created", ""),
                       signal_thresholds=thresholds, test_documents=docs)
    except (KeyError, ValueError) as e:
        raise ResultsError(f"{path}: malformed results file ({e})") from None


def _read_member(g: h5py.Group) -> Member:
    a = {k: _plain(v) for k, v in g.attrs.items()}
    if "metrics" not in g:
        raise KeyError(f"member {a.get('id', g.name)!r} has no metrics group")
    metrics = {split: {k: _plain(g[f"metrics/{split}"].attrs[k]) for k in METRIC_KEYS}
               for split in SPLITS if f"metrics/{split}" in g}
    for values in metrics.values():
        values["rows"] = int(values["rows"])
    signals = {k: _plain(g["signals"].attrs.get(k, math.nan)) for k in SIGNAL_KEYS}
    curves = {split: ds[()] for split, ds in g["curves"].items()} if "curves" in g else {}
    return Member(id=a["id"], arch=a["arch"], dictionary_size=int(a["dictionary_size"]),
                  sparsity_name=a["sparsity_name"], sparsity=float(a["sparsity"]), seed=int(a["seed"]),
                  metrics=metrics, signals=signals, curves=curves, training=_read_training(g))


def _read_training(g: h5py.Group) -> dict:
    """The member's training record; every key is present, None where the file does not say."""
    attrs = {k: _plain(v) for k, v in g["training"].attrs.items()} if "training" in g else {}
    out = {k: attrs.get(k) for k in TRAINING_KEYS}
    if out["converged"] is not None:
        out["converged"] = bool(out["converged"])
    for k in ("steps_trained", "dead_never_alive", "dead_died_later", "resampled", "copied_from"):
        if out[k] is not None:
            out[k] = int(out[k])
    return out


def summary_table(r: Results) -> str:
    """A plain-text table by dictionary size: train and test loss, test L0 and dead fraction, MMCS with
    the next size (and with the ground truth, and cross-seed shared fraction, where the file has them)."""
    has_gt = any(not math.isnan(m.signals.get("mmcs_gt", math.nan)) for m in r.members)
    has_seeds = any(not math.isnan(m.signals.get("shared_seed", math.nan)) for m in r.members)
    name = r.members[0].sparsity_name if r.members else "sparsity"
    cols = [("size", 7), (name, 8), ("seed", 5), ("train loss", 11), ("test loss", 11), ("test L0", 9),
            ("dead", 7), ("MMCS next", 10)] + ([("MMCS gt", 8)] if has_gt else []) + \
        ([("shared seeds", 13)] if has_seeds else [])
    lines = [f"{r.label}: {len(r.members)} members, losses in normalised units (scale {r.normalisation_scale:.4g})",
             "".join(f"{c:>{w}}" for c, w in cols)]
    for m in sorted(r.members, key=lambda m: (m.sparsity, m.seed, m.dictionary_size)):
        tr, te = m.metrics.get("train", {}), m.metrics.get("test", {})
        cells = [str(m.dictionary_size), f"{m.sparsity:g}", str(m.seed), _num(tr.get("loss")), _num(te.get("loss")),
                 _num(te.get("l0"), ".2f"), _num(te.get("dead_fraction"), ".3f"), _num(m.signals.get("mmcs_next"), ".3f")]
        if has_gt:
            cells.append(_num(m.signals.get("mmcs_gt"), ".3f"))
        if has_seeds:
            cells.append(_num(m.signals.get("shared_seed"), ".3f"))
        lines.append("".join(f"{c:>{w}}" for c, (_, w) in zip(cells, cols)))
    return "\n".join(lines)


def _num(v, fmt: str = ".4g") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def json_ready(obj):
    """NaN/inf become None so the dict is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_ready(obj.item())
    return obj


def describe(path: str | os.PathLike) -> dict:
    """Everything `sparsefeat inspect` shows about a results file, as a JSON-ready dict."""
    with load_results(path) as r:
        return _description(r)


def _description(r: Results) -> dict:
    return json_ready(dict(
        path=str(r.path), format=FORMAT, format_version=FORMAT_VERSION, package_version=r.package_version,
        created=r.created, label=r.label, site=r.site, d=r.d,
        store=dict(path=r.store_path, kind=r.store_kind, hash=r.store_hash, provenance=r.store_provenance),
        normalisation_scale=r.normalisation_scale, signal_thresholds=r.signal_thresholds, config=r.config,
        members=len(r.members), ground_truth=None if r.ground_truth is None else list(r.ground_truth.shape),
        summary=r.table(), signals=r.signals))

"""A whole study in one folder: data, controls, nulls, sweeps, the count, figures and a report.

    out/
      study.toml   the effective config (every key; copy it, edit it, pass it back with --config)
      stores/      toy stores, MiniLM (trained and random-init) activations, matched-Gaussian nulls
      sweeps/      one results file per dataset/site
      figures/     PNG and PDF (plots.py)
      count.json   the count table (count.py), in full
      report.md    what the study found on the three questions, with the numbers

The study config is a TOML file built once into typed dataclasses (`StudyConfig`: StudyOptions, one
ToyEntry per toy, ModelConfig around a HarvestConfig, a SweepConfig for toys and one for model sites,
CountConfig); each table overrides the defaults below (the `--quick` profile first, then the file), and a
wrong key, type or value is one ConfigError line before anything runs. The layout of study.toml is
unchanged; a study.toml of an older version (fewer keys) loads and is compared as a value. Finished stores and sweeps are kept on a re-run
without `force`; a run killed half way resumes where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError, SparsefeatError
from .files import check_folder_writable, write_text

# --------------------------------------------------------------------------------------------
# The study config
# --------------------------------------------------------------------------------------------


# The --quick profile: a CI-sized study. Its duration, measured on 2 CPU cores, is stated here only.
QUICK_DURATION = "about a minute on 2 CPU cores"
QUICK = {
    "study": {"toy_samples": 16_000},
    "model": {"layers": [0, 6], "max_tokens": 6_000},
    "sweep": {"toy": {"sizes": [16, 32, 64, 128], "steps": 600},
              "model": {"sizes": [48, 96, 192], "steps": 600, "checkpoint_every": 0}},
    "count": {"bootstrap": 200},
}


@dataclass
class StudyOptions:
    seed: int = field(default=0, metadata={"help": "seed of every toy generator and of the splits"})
    toy_samples: int = field(default=40_000, metadata={"help": "rows of each toy store"})
    toy_width: int = field(default=32, metadata={"help": "width d of toys that do not set their own"})
    nulls: bool = field(default=True, metadata={
        "help": "a matched-Gaussian null beside each toy with ground truth and each trained-model site"})
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads (0: torch's default). One is robust: on two cores shared with other "
                "work, two OpenMP threads ran the same sweep up to 7x slower than one"})


@dataclass
class ToyEntry:
    """[toys.NAME]: one toy store of the study. In the TOML table, `kind`, `n_samples`, `seed` and
    `enabled` sit beside the toy's own parameters (the fields of its Params)."""
    kind: str
    params: Any = None                 # the toy's Params (None when the toy is left out)
    n_samples: int | None = None       # default: [study] toy_samples
    seed: int | None = None            # default: [study] seed
    enabled: bool = True


TOY_KEYS = ("kind", "n_samples", "seed", "enabled")


def default_toys() -> dict[str, dict]:
    # 64 features in 32 dims, about 2 active per row: an SAE recovers them on CPU in seconds, so the
    # count can be checked against the truth; the controls have the same width.
    return {"sparse": dict(kind="sparse", n_features=64, mean_active=2.0),
            "gmm": dict(kind="gmm", k=12),
            "square": dict(kind="square")}


def _default_harvest():
    from .harvest import HarvestConfig
    # Only what the study changes from HarvestConfig's own defaults: three layers, a CPU-sized corpus.
    return HarvestConfig(layers=[0, 3, 6], max_tokens=24_000, max_length=128)


@dataclass
class ModelConfig:
    """[model]: the two study switches beside the HarvestConfig of the trained model (its random-init
    twin differs only in `random_init`). In TOML the keys of both sit in one flat table."""
    enabled: bool = field(default=True, metadata={"help": "harvest model activations (MiniLM by default)"})
    random_init_twin: bool = field(default=True, metadata={
        "help": "also harvest the same layers of the model with random weights (the random-init control)"})
    harvest: Any = field(default_factory=_default_harvest)  # HarvestConfig


def _default_sweep(kind: str):
    from .train import SweepConfig
    # Budgets measured on 2 CPU cores: a toy sweep ~10 s, a model sweep ~40 s (d = 384, up to 2d).
    # Toys: two sparsity settings for the frontier figure; lr 1e-2 converges in 1000 steps there.
    # Model sites: lr 1e-2 killed half the latents at m >= d, so 3e-3; α for L0 around 20-40.
    if kind == "toy":
        return SweepConfig(sizes=[16, 32, 64, 128, 256], l1=[0.3, 1.0], seeds=[0, 1], steps=1000, lr=1e-2,
                           checkpoint_every=0)
    return SweepConfig(sizes=[48, 96, 192, 384, 768], l1=[0.05], seeds=[0, 1], steps=1000, lr=3e-3,
                       checkpoint_every=500)


@dataclass
class SweepsConfig:
    """[sweep.toy] and [sweep.model]: the SweepConfig of toy stores and of model sites."""
    toy: Any = field(default_factory=lambda: _default_sweep("toy"))      # SweepConfig
    model: Any = field(default_factory=lambda: _default_sweep("model"))  # SweepConfig


def _default_count():
    from .count import CountConfig
    return CountConfig()


@dataclass
class StudyConfig:
    """The whole study, typed and validated once (`make_config`); `to_table` gives its TOML layout."""
    study: StudyOptions = field(default_factory=StudyOptions)
    toys: dict[str, ToyEntry] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    sweep: SweepsConfig = field(default_factory=SweepsConfig)
    count: Any = field(default_factory=_default_count)  # CountConfig


# --------------------------------------------------------------------------------------------
# TOML tables <-> typed configs
# --------------------------------------------------------------------------------------------


def to_table(config: StudyConfig) -> dict:
    """The TOML layout of a config: every key, [model] flat, toy parameters beside kind/n_samples/seed."""
    toys = {}
    for name, toy in config.toys.items():
        entry = {"kind": toy.kind, "n_samples": toy.n_samples, "seed": toy.seed}
        entry.update(dataclasses.asdict(toy.params) if toy.params is not None else {})
        if not toy.enabled:
            entry["enabled"] = False
        toys[name] = entry
    model = {"enabled": config.model.enabled, "random_init_twin": config.model.random_init_twin,
             **dataclasses.asdict(config.model.harvest)}
    return _without_none({
        "study": dataclasses.asdict(config.study), "toys": toys, "model": model,
        "sweep": {"toy": dataclasses.asdict(config.sweep.toy), "model": dataclasses.asdict(config.sweep.model)},
        "count": dataclasses.asdict(config.count)})


def _without_none(table: dict) -> dict:
    """TOML has no null: a None value is left out (and reads back as its field's default)."""
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in table.items() if v is not None}


def config_dict(config: StudyConfig) -> dict:
    """(Old name of `to_table`.)"""
    return to_table(config)


def deep_merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`, recursively for tables (a table in `toys` replaces its toy)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "toys":
            out[key] = deep_merge(out[key], value)
        elif key == "toys" and isinstance(value, dict):
            out[key] = {**out.get(key, {}), **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def default_table(*, quick: bool = False) -> dict:
    """The defaults in TOML layout (the quick profile on top when asked)."""
    table = to_table(StudyConfig())
    table["toys"] = default_toys()
    return deep_merge(table, QUICK) if quick else table


def make_config(overrides: dict | None = None, *, quick: bool = False, source: str = "study config") -> StudyConfig:
    """Defaults, then the quick profile (if asked), then `overrides` (the TOML layout as a dict), built
    once into typed configs. A table under `toys` replaces the toy of that name; `enabled = false` in
    it leaves that toy out. Any wrong key, type or value is one `ConfigError` naming file and table."""
    if not isinstance(overrides or {}, dict):
        raise ConfigError(f"{source}: expected tables of keys")
    return from_table(deep_merge(default_table(quick=quick), overrides or {}), source)


def load_config(path: str | os.PathLike | None = None, *, quick: bool = False) -> StudyConfig:
    """Defaults, then the quick profile (if asked), then the TOML file; validated (one-line errors)."""
    overrides = {}
    if path is not None:
        path = Path(path)
        try:
            overrides = tomllib.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder, not a TOML file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a TOML file (not UTF-8 text)") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return make_config(overrides, quick=quick, source=str(path) if path else "study config")


def from_table(data: dict, source: str) -> StudyConfig:
    """Build every section from its table, so a typo or a wrong type fails now, not after an hour of sweeps."""
    from .count import CountConfig
    from .harvest import HarvestConfig
    from .train import SweepConfig
    _check_keys(source, data, [f.name for f in dataclasses.fields(StudyConfig)])
    study = build(StudyOptions, _table(data, "study", source), f"{source} [study]")
    model = _table(data, "model", source)
    switches = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "harvest"]
    _check_keys(f"{source} [model]", model, switches + [f.name for f in dataclasses.fields(HarvestConfig)])
    model_config = build(ModelConfig, {k: v for k, v in model.items() if k in switches}, f"{source} [model]")
    model_config.harvest = build(HarvestConfig, {k: v for k, v in model.items() if k not in switches},
                                 f"{source} [model]")
    sweeps = _table(data, "sweep", source)
    _check_keys(f"{source} [sweep]", sweeps, ["toy", "model"])
    sweep = SweepsConfig(**{kind: build(SweepConfig, _table(sweeps, kind, f"{source} [sweep]"),
                                        f"{source} [sweep.{kind}]") for kind in ("toy", "model")})
    toys = {name: build_toy(toy, study, f"{source} [toys.{name}]")
            for name, toy in _table(data, "toys", source).items()}
    count = build(CountConfig, _table(data, "count", source), f"{source} [count]")
    return StudyConfig(study=study, toys=toys, model=model_config, sweep=sweep, count=count)


def build_toy(table, study: StudyOptions, where: str) -> ToyEntry:
    from .toys import make_params, toy_class
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table with kind = \"sparse\" | \"gmm\" | \"square\" | ...")
    if table.get("enabled", True) is False:  # left out: nothing else in the table needs to be valid
        return ToyEntry(kind=str(table.get("kind", "")), enabled=False)
    if "kind" not in table:
        raise ConfigError(f"{where}: needs kind = \"sparse\" | \"gmm\" | \"square\" | ...")
    entry = build(ToyEntry, {k: v for k, v in table.items() if k in TOY_KEYS}, where)
    try:
        params_cls = toy_class(entry.kind).Params
        params = {k: v for k, v in table.items() if k not in TOY_KEYS}
        make_params(entry.kind, params)  # unknown keys: refused with the list of valid ones
        params = typed_fields(params_cls, params, where)
        if "d" in {f.name for f in dataclasses.fields(params_cls)} and "d" not in params:
            params["d"] = study.toy_width
        entry.params = make_params(entry.kind, params)
    except SparsefeatError as e:
        raise ConfigError(f"{where}: {e}") from None
    return entry


def _table(data: dict, key: str, where: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a table ([{key}]), got {type(value).__name__}")
    return value


def _check_keys(where: str, table: dict, valid) -> None:
    valid = list(valid)
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown key {', '.join(map(repr, unknown))} (valid: {', '.join(valid)})")


def build(cls, table: dict, where: str):
    """A dataclass from a TOML table: unknown keys and wrong types refused, nested tables built as the
    dataclasses their fields name, then the class's own checks; any error is one ConfigError line."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
    _check_keys(where, table, [f.name for f in dataclasses.fields(cls) if f.init])
    values = typed_fields(cls, table, where)
    try:
        return cls(**values)
    except (TypeError, ValueError, SparsefeatError) as e:
        raise ConfigError(f"{where}: {e}") from None


def typed_fields(cls, table: dict, where: str) -> dict:
    """`table`'s values checked against the field types of `cls` (ints may stand for floats; numbers
    may stand in a list of strings, as sizes do: 256 or "2x")."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in table.items():
        tp = hints.get(key, Any)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out[key] = build(tp, value, f"{where} {key}")
            continue
        if not _fits(tp, value, in_list=False):
            raise ConfigError(f"{where}: {key} = {value!r} should be {_type_name(tp)}")
        out[key] = float(value) if tp is float and not isinstance(value, bool) else value
    return out


def _fits(tp, value, *, in_list: bool) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value, in_list=in_list) for a in args if a is not type(None))
    if origin in (list, tuple):
        return isinstance(value, list) and all(_fits(args[0] if args else Any, v, in_list=True) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str or tp is Path:
        return isinstance(value, str) or (in_list and isinstance(value, (int, float)) and not isinstance(value, bool))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True  # a type the study config does not restrict


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path (a string)"}.get(tp, getattr(tp, "__name__", str(tp)))


def active_toys(config: StudyConfig) -> dict[str, ToyEntry]:
    return {name: toy for name, toy in config.toys.items() if toy.enabled}


def toy_params(toy: ToyEntry) -> dict:
    """The toy's parameters as `write_toy` keywords."""
    return dataclasses.asdict(toy.params)


def harvest_config(config: StudyConfig, random_init: bool):
    return dataclasses.replace(config.model.harvest, random_init=random_init)


def to_toml(data: dict) -> str:
    """A small TOML writer for the effective config (tables of scalars and lists; None is left out)."""
    lines: list[str] = []

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    def table(name: str, d: dict) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and v is not None}
        if name and (scalars or not any(isinstance(v, dict) for v in d.values())):
            lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{name}.{k}" if name else k, v)

    table("", data)
    return "\n".join(lines).lstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """One dataset/site the study sweeps: where its activations are and what it is."""
    label: str
    store: Path
    site: str
    kind: str  # "toy" or "model" (which sweep section applies)
    role: str  # as count.infer_role reads it from provenance: toy, control, model, random-init, null


class Study:
    """The stages of one study folder; each stage skips what is already finished unless `force`."""

    def __init__(self, config: StudyConfig, out: str | os.PathLike, *, force: bool = False, progress: bool = True):
        self.config = config
        self.out = Path(out)
        self.force = force
        self.progress = progress
        self.stores = self.out / "stores"
        self.sweeps = self.out / "sweeps"
        self.timings: dict[str, float] = {}

    def log(self, text: str) -> None:
        if self.progress:
            print(f"sparsefeat run: {text}", file=sys.stderr, flush=True)

    def stage(self, name: str, fn):
        self.log(f"{name} ...")
        t0 = time.perf_counter()
        result = fn()
        self.timings[name] = time.perf_counter() - t0
        self.log(f"{name}: done in {self.timings[name]:.0f} s")
        return result

    def _done(self, path: Path) -> bool:
        return path.exists() and not self.force

    # -- stores ---------------------------------------------------------------------------

    def toy_stores(self) -> list[Dataset]:
        from .store import partial_path
        from .toys import SITE, write_toy
        out = []
        for name, toy in active_toys(self.config).items():
            path = self.stores / f"{name}.h5"
            if not self._done(path):
                n_samples = self.config.study.toy_samples if toy.n_samples is None else toy.n_samples
                seed = self.config.study.seed if toy.seed is None else toy.seed
                write_toy(toy.kind, path, n_samples=n_samples, seed=seed, force=self.force,
                          resume=partial_path(path).exists() and not self.force, progress=self.progress,
                          **toy_params(toy))
            out.append(Dataset(name, path, SITE, "toy", infer_store_role(path)))
        return out

    def model_stores(self) -> list[Dataset]:
        from .harvest import harvest, site_name
        from .store import partial_path
        if not self.config.model.enabled:
            return []
        twins = [False] + ([True] if self.config.model.random_init_twin else [])
        out = []
        for random_init in twins:
            hc = harvest_config(self.config, random_init)
            name = model_name(hc.model) + ("-random" if random_init else "")
            role = "random-init" if random_init else "model"
            path = self.stores / f"{name}.h5"
            if not self._done(path):
                harvest(hc, path, force=self.force, resume=partial_path(path).exists() and not self.force,
                        progress=self.progress)
            out += [Dataset(f"{name}/{site_name(layer)}", path, site_name(layer), "model", role)
                    for layer in hc.layers]
        return out

    def null_stores(self, datasets: list[Dataset]) -> list[Dataset]:
        from .store import ActivationStore, partial_path
        from .toys import SITE, write_toy
        if not self.config.study.nulls:
            return []
        out = []
        for ds in datasets:
            if not self._wants_null(ds):
                continue
            path = self.stores / f"null-{ds.label.replace('/', '-')}.h5"
            if not self._done(path):
                with ActivationStore(ds.store) as s:
                    rows = s.n_rows()
                write_toy("matched", path, n_samples=rows, seed=self.config.study.seed, source=str(ds.store),
                          site=ds.site, force=self.force, resume=partial_path(path).exists() and not self.force,
                          progress=self.progress)
            out.append(Dataset(f"null:{ds.label}", path, SITE, ds.kind, "null"))
        return out

    @staticmethod
    def _wants_null(ds: Dataset) -> bool:
        """Data with structure to beat: a toy with ground truth and a trained model's site (not the
        controls, not the random-init twin)."""
        return ds.role in ("toy", "model")

    # -- sweeps ---------------------------------------------------------------------------

    def sweep_all(self, datasets: list[Dataset]) -> list[Path]:
        from .train import train_sweep
        paths = []
        for i, ds in enumerate(datasets):
            path = self.sweeps / f"{ds.label.replace('/', '-').replace(':', '-')}.h5"
            if not self._done(path):
                self.log(f"sweep {i + 1}/{len(datasets)}: {ds.label}")
                base = self.config.sweep.toy if ds.kind == "toy" else self.config.sweep.model
                cfg = dataclasses.replace(base, site=ds.site, label=ds.label)
                train_sweep(ds.store, cfg, path, resume=not self.force, force=self.force, progress=self.progress)
            paths.append(path)
        return paths

    # -- analysis -------------------------------------------------------------------------

    def analyse(self, sweeps: list[Path]) -> list:
        from . import count, plots
        counts = count.count_results(sweeps, self.config.count, progress=self.progress)
        write_text(self.out / "count.json", json.dumps(count.to_json(counts), indent=2, allow_nan=False) + "\n")
        plots.plot_all(counts, self.out / "figures", force=True)  # derived from this study's own sweeps
        return counts

    def run_all(self) -> StudyResult:
        """Every stage, then the report."""
        t0 = time.perf_counter()
        data = self.stage("toy stores", self.toy_stores)
        data += self.stage("model activations", self.model_stores)
        nulls = self.stage("matched nulls", lambda: self.null_stores(data))
        sweeps = self.stage("sweeps", lambda: self.sweep_all(data + nulls))
        counts = self.stage("count and figures", lambda: self.analyse(sweeps))
        self.timings["total"] = time.perf_counter() - t0
        report = write_report(self.out, counts, self.timings)
        return StudyResult(self.out, data + nulls, sweeps, counts, report, dict(self.timings))


@dataclass
class StudyResult:
    """What a study produced: its datasets, results files, count table, report and stage times."""
    out: Path
    datasets: list[Dataset]
    sweeps: list[Path]
    counts: list  # count.SweepCount
    report: Path
    timings: dict[str, float]

    def count(self, label: str, sparsity: float | None = None):
        """The count of one dataset/site (at one sparsity setting when it has several)."""
        found = [c for c in self.counts if c.label == label and (sparsity is None or c.sparsity == sparsity)]
        if len(found) != 1:
            raise SparsefeatError(f"{self.out}: {len(found)} sweeps match {label!r} at sparsity {sparsity}")
        return found[0]

    def summary(self) -> str:
        from .count import TABLE_COLUMNS, format_table, table_rows
        table = format_table(TABLE_COLUMNS, table_rows(self.counts))
        return f"{table}\n\nreport: {self.report}\nwall time: {self.timings['total']:.0f} s"


def infer_store_role(path: Path) -> str:
    """The role of a store, from its provenance, by the same rule as `count.infer_role` (not from labels)."""
    from .count import store_role
    from .store import ActivationStore
    with ActivationStore(path) as s:
        return store_role(s.kind, s.provenance, "features" in s.ground_truth)  # as the sweep copies it


def model_name(model: str) -> str:
    return "minilm" if model == "minilm" else Path(model).name.replace("/", "-")


def check_folder(out: Path, config: StudyConfig, force: bool) -> None:
    """A folder holds one study: refuse to mix a different config into it without force. Configs are
    compared as values, so a study.toml written by an older version (fewer keys) still matches."""
    previous = out / "study.toml"
    if not previous.exists() or force:
        return
    try:
        same = load_config(previous) == config
    except SparsefeatError:
        same = False
    if not same:
        raise SparsefeatError(f"{previous}: this folder holds a study with another config; "
                              "pass --force to redo it, or choose another --out")


def run_study(config: StudyConfig, out: str | os.PathLike, *, force: bool = False, progress: bool = True) -> StudyResult:
    """Run every stage into `out` (see the module docstring for the folder) and return what it produced."""
    out = check_folder_writable(out)  # a file, a read-only folder: refused before anything is written
    config_text = to_toml(to_table(config))
    check_folder(out, config, force)
    write_text(out / "study.toml", config_text)
    study = Study(config, out, force=force, progress=progress)
    with torch_threads(config.study.threads):
        return study.run_all()


class torch_threads:
    """Set torch's CPU threads for the study and restore them after (0 leaves torch's default)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch
        self.before = torch.get_num_threads()
        if self.n > 0:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch
        torch.set_num_threads(self.before)
        return False



# --------------------------------------------------------------------------------------------
# The report: the three questions, answered with the numbers
# --------------------------------------------------------------------------------------------

DATA_ROLES = ("toy", "model", "data")


def _name(c, counts) -> str:
    """The label, with the sparsity setting when the study has several for it."""
    many = sum(1 for o in counts if o.label == c.label) > 1
    return f"{c.label} ({c.setting})" if many else c.label


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.1%}"


def answer_train_vs_test(counts) -> list[str]:
    lines = []
    for c in counts:
        if c.role not in DATA_ROLES + ("random-init",):
            continue
        h, first, last, name = c.held_out, c.sizes[0], c.sizes[-1], _name(c, counts)
        gap = (f"test − train MSE {first.gap:+.4f} at m={first.size}, {last.gap:+.4f} at m={last.size} "
               f"(train {last.train_mse:.4f}, test {last.test_mse:.4f})")
        if c.warnings:
            gap += " (* undertrained sizes, see warnings)"
        if h.size is None:
            lines.append(f"- **{name}**: the test loss still improves beyond its bootstrap noise at every step up to "
                         f"m={last.size}; {gap}.")
        elif h.train_still_falls:
            lines.append(f"- **{name}**: the test loss stops improving at m={h.size} (from there to m={last.size} it "
                         f"changes {_pct(h.test_change)}) while the train loss still falls {_pct(h.train_change)}; {gap}.")
        else:
            lines.append(f"- **{name}**: train and test loss both stop improving at m={h.size} (test "
                         f"{_pct(h.test_change)}, train {_pct(h.train_change)} to m={last.size}); {gap}.")
    data = [c for c in counts if c.role in DATA_ROLES + ("random-init",)]
    overfit = [_name(c, counts) for c in data if c.held_out.size is not None and c.held_out.train_still_falls]
    growing = [_name(c, counts) for c in data if c.sizes[-1].gap > max(2 * c.sizes[0].gap, c.sizes[0].gap + 0.005)]
    verdict = (f"Train loss alone would overstate what more latents buy on {', '.join(overfit)}: there, sizes "
               "beyond the held-out stop lower the train loss only. Read every loss curve on test rows."
               if overfit else
               "No dataset here shows train loss falling while test loss stalls: up to the largest size, more "
               "latents still help on held-out rows.")
    if growing:
        verdict += (f" The test − train gap grows with m on {', '.join(growing)}: part of what larger dictionaries "
                    "gain on training rows does not carry over to held-out rows, so the curves to compare are "
                    "the test curves.")
    return lines + ["", verdict]


def answer_false_positives(counts) -> list[str]:
    lines = []
    for c in counts:
        if c.role in ("control", "null"):
            expected = f"; it has {c.expected} components" if c.expected else ""
            lines.append(f"- **{_name(c, counts)}** ({c.role}{expected}): {c.estimate_text()}.")
    for c in counts:
        if c.role not in DATA_ROLES + ("random-init",):
            continue
        parts = []
        for key, comp in c.comparisons.items():
            if comp.role in ("null", "control"):
                verdict = {True: ", within noise", False: ", beyond noise", None: ""}[comp.within_noise]
                parts.append(f"{comp.text()} over {comp.against}{verdict}")
        truth = f" (true number {c.expected})" if c.expected else ""
        excess = "; ".join(parts) or ("none computed (a control itself)" if c.role == "random-init" else "no control")
        lines.append(f"- **{_name(c, counts)}**: {c.estimate_text()}{truth}; excess: {excess}.")
    nulls = [c for c in counts if c.role == "null" and c.saturation.estimate is not None]
    if nulls:
        worst = max(nulls, key=lambda c: c.saturation.estimate)
        lines += ["", f"The matched-Gaussian nulls, which have no sparse structure, get at most "
                      f"{worst.saturation.estimate:.0f} reproduced directions ({worst.label}): that is the count's "
                      "false-positive floor at these settings; a dataset's count means something only as its excess."]
    return lines


def answer_layer_zero(counts) -> list[str]:
    lines = []
    for c in counts:
        if c.role != "model":
            continue
        parts = [f"{c.comparisons[k].text()} over {c.comparisons[k].against}" for k in ("layer 0", "random init")
                 if k in c.comparisons]
        null = f"; over its null {c.comparisons['null'].text()}" if "null" in c.comparisons else ""
        lines.append(f"- **{_name(c, counts)}**: {c.estimate_text()}{null}; {'; '.join(parts) or 'the baseline itself'}.")
    if not lines:
        return ["No model sites in this study."]
    models = [c for c in counts if c.role == "model"]
    verdict = []
    if all(c.saturation.estimate is None for c in models):
        verdict.append(f"No model site saturates inside this sweep (largest size m={models[0].sizes[-1].size}), so "
                       "the study gives lower bounds, not feature counts, for the model; the comparisons below "
                       "are of N(m) at the largest common size.")
    more_random = [c.label for c in models if "random init" in c.comparisons
                   and (c.comparisons["random init"].excess_at_common_size or 0) < 0]
    if more_random:
        verdict.append(f"The random-init model reproduces more directions than the trained one at "
                       f"{', '.join(more_random)}: reproducible directions alone are no evidence of learned features.")
    lines += ["", *verdict] if verdict else []
    return lines + ["", "Excess over layer 0 and over the random-init model's same layer is what a layer adds beyond "
                        "token embeddings and beyond what the architecture alone produces; '?' marks comparisons "
                        "where neither side saturated (the number after it is the difference of N(m) at the largest "
                        "common size, a lower-level signal, not a count)."]


def warnings_section(counts) -> list[str]:
    lines = [f"- **{_name(c, counts)}**: {w}" for c in counts for w in c.warnings]
    return ["Warnings (marked * in the table):", "", *lines, ""] if lines else []


def write_report(out: Path, counts, timings: dict[str, float]) -> Path:
    from .count import TABLE_COLUMNS, format_table, size_table, table_rows
    text = [f"# sparsefeat study: {out.name}", "",
            f"sparsefeat {__version__}; config: `study.toml`; sweeps: `sweeps/`; figures: `figures/`; "
            f"full numbers: `count.json`. Wall time {timings.get('total', math.nan):.0f} s "
            f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')}).", "",
            "Counting rule (docs/method.md): alive latents, near-duplicates merged, reproduced across two seeds at "
            "a decoder cosine above both 0.9 and the chance level of random atoms; the estimate is where that "
            "number N(m) stops growing, or 'no saturation up to m=M' when it never does inside the sweep.", "",
            "## The count", "", "```", format_table(TABLE_COLUMNS, table_rows(counts)), "```", "",
            *warnings_section(counts),
            "## 1. Train or test loss?", "", *answer_train_vs_test(counts), "",
            "## 2. False positives on controls", "", *answer_false_positives(counts), "",
            "## 3. Layer 0 as a baseline", "", *answer_layer_zero(counts), "",
            "## Figures", "",
            *[f"- `figures/{name}.png`" for name in ("loss_vs_size", "dead_vs_size", "agreement_vs_size",
                                                      "ground_truth_vs_size", "loss_vs_l0")], "",
            "## By size", ""]
    for c in counts:
        text += [f"### {c.label} ({c.role}, {c.setting})", "", "```", size_table(c), "```", ""]
    path = out / "report.md"
    write_text(path, "\n".join(text))
    return path

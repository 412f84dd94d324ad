"""A whole study in one folder: data, controls, nulls, sweeps, the count, figures and a report.

    out/
      study.toml   the effective config (every key; copy it, edit it, pass it back with --config)
      stores/      toy stores, MiniLM (trained and random-init) activations, matched-Gaussian nulls
      calibration/ per dataset: the sparsity values a short run tried, the L0 each reached, the grid
      sweeps/      one results file per dataset/site
      figures/     PNG and PDF (plots.py)
      count.json   the count table (count.py), in full
      report.md    what the study found on the three questions, with the numbers

The study config is a TOML file built once into typed dataclasses (`StudyConfig`: StudyOptions, one
ToyEntry per toy, ModelConfig around a HarvestConfig, a SweepConfig for toys and one for model sites,
CalibrationConfig, CountConfig); each table overrides the defaults below (the `--quick` profile first, then the file), and a
wrong key, type or value is one ConfigError line before anything runs. The layout of study.toml is
unchanged; a study.toml of an older version (fewer keys) loads and is compared as a value.

The sparsity grid of each dataset is calibrated (calibrate.py: a short run finds the penalty that
reaches a target L0, the grid spreads a few settings around it), unless the sweep table gives a fixed
l1 or k list: a fixed list overrides the calibration of that kind of sweep ([sweep.toy], [sweep.model]). Finished stores and sweeps are kept on a re-run
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
QUICK_DURATION = "about two minutes on 2 CPU cores: 129 s of CPU with calibration and steps=auto"
QUICK = {
    "study": {"toy_samples": 12_000},
    "model": {"max_tokens": 6_000},
    "sweep": {"toy": {"sizes": [16, 32, 64, 128], "min_steps": 300, "max_steps": 1500, "converge_every": 100,
                      "converge_window": 200, "cooldown_steps": 300},
              "model": {"sizes": [24, 48, 96], "min_steps": 200, "max_steps": 600, "converge_every": 100,
                        "converge_window": 200, "checkpoint_every": 0}},
    "calibration": {"steps": 150},
    "count": {"bootstrap": 200},
}


@dataclass
class StudyOptions:
    seed: int = field(default=0, metadata={"help": "seed of every toy generator and of the splits"})
    toy_samples: int = field(default=20_000, metadata={"help": "rows of each toy store"})
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
    # count can be checked against the truth; the controls have the same width. circle and sphere are
    # manifolds an SAE tiles with as many latents as it has (Michaud et al. 2025): the count must not
    # report the tiles as features, so they get a matched null too (MANIFOLDS).
    return {"sparse": dict(kind="sparse", n_features=64, mean_active=2.0),
            "gmm": dict(kind="gmm", k=12),
            "square": dict(kind="square"),
            "circle": dict(kind="circle"),
            "sphere": dict(kind="sphere")}


MANIFOLDS = ("circle", "sphere")  # toy kinds without features whose count is read against a matched null


def _default_harvest():
    from .harvest import HarvestConfig
    # Only what the study changes from HarvestConfig's own defaults: layer 0 (the baseline) and layer 6,
    # a CPU-sized corpus. The default corpus (pydoc + stdlib docstrings, ~525k tokens) takes minutes to
    # harvest on 2 cores; the first 24k tokens of it are pydoc anyway, so the demo names pydoc alone
    # (honest provenance, and the stdlib is not parsed for nothing). experiments/ run the full corpus.
    return HarvestConfig(layers=[0, 6], corpus=["pydoc"], max_tokens=24_000, max_length=128)


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
    # The sparsity grid is calibrated per dataset (no l1 here; [calibration]). Every size trains until its
    # held-out loss stops improving (steps="auto"), within a budget: the demo must stay near 10 minutes on
    # 2 cores. Toys: lr 1e-2; a size stops when all its members converge, so the weakest calibrated
    # setting (whose held-out loss falls longest: 2-5% per window at 2000 steps on gmm and sparse at
    # m >= 64) sets the pace; d = 32 is cheap, so they get 3000 steps. Model sites: lr 1e-2 killed half
    # the latents at m >= d, so 3e-3; sizes up to 2/3 of the width d = 384: every model site trains three
    # settings, and at 48..384 and 800 steps the six model sweeps alone took 8.5 minutes on 2 cores;
    # experiments/ go further.
    # Toys also start the encoder at 0.1 x the decoder's transpose: at lr 1e-2 and unit scale, the larger
    # dictionaries of the low-dimensional controls (square, circle, sphere, their nulls) lost nearly every
    # latent and ended up to 30% above smaller ones' training objective (26 of 72 size steps rose in the
    # quick study); at 0.1, 19 rose, each by at most 0.4%, and every count stayed where it was.
    # And once a toy size stops, its learning rate falls to 0 over 500 more steps (cooldown_steps): at a
    # constant lr 1e-2 the final weights sit in the step's noise, and on the flat objectives of the
    # controls a larger size could end a little above a smaller one by that noise alone (quick study:
    # 19 of 72 size steps rose, by up to 0.4%; with the cool-down 9, by at most 0.27%). Those that remain
    # (ties on flat objectives, and the strongest settings where large dictionaries lose their latents)
    # take the smaller member's dictionary (SweepConfig.copy_smaller_when_worse): 0 of 72 rise.
    if kind == "toy":
        return SweepConfig(sizes=[16, 32, 64, 128, 256], seeds=[0, 1], steps="auto", min_steps=500, max_steps=3000,
                           converge_every=250, converge_window=500, lr=1e-2, checkpoint_every=0,
                           model={"encoder_scale": 0.1}, cooldown_steps=500)
    return SweepConfig(sizes=[32, 64, 128, 256], seeds=[0, 1], steps="auto", min_steps=500, max_steps=1500,
                       converge_every=250, converge_window=500, lr=3e-3, checkpoint_every=500)


@dataclass
class SweepsConfig:
    """[sweep.toy] and [sweep.model]: the SweepConfig of toy stores and of model sites."""
    toy: Any = field(default_factory=lambda: _default_sweep("toy"))      # SweepConfig
    model: Any = field(default_factory=lambda: _default_sweep("model"))  # SweepConfig


def _default_count():
    from .count import CountConfig
    return CountConfig()


def _default_calibration():
    from .calibrate import CalibrationConfig
    # Calibration runs at half the width: at d = 384 a run at 1x cost a third of a model sweep.
    return CalibrationConfig(size="0.5x")


@dataclass
class StudyConfig:
    """The whole study, typed and validated once (`make_config`); `to_table` gives its TOML layout."""
    study: StudyOptions = field(default_factory=StudyOptions)
    toys: dict[str, ToyEntry] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    sweep: SweepsConfig = field(default_factory=SweepsConfig)
    calibration: Any = field(default_factory=_default_calibration)  # CalibrationConfig
    count: Any = field(default_factory=_default_count)  # CountConfig

    def calibrating(self, kind: str) -> bool:
        """Whether the sweeps of this kind ("toy" or "model") take their sparsity grid from a calibration."""
        return bool(getattr(self.calibration, kind))


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
        "sweep": {kind: sweep_table(config, kind) for kind in ("toy", "model")},
        "calibration": dataclasses.asdict(config.calibration),
        "count": dataclasses.asdict(config.count)})


SPARSITY_KEYS = ("l1", "k")  # the sparsity lists of a SweepConfig: a fixed grid when a file gives one


def sweep_table(config: StudyConfig, kind: str) -> dict:
    """[sweep.KIND] without the sparsity lists when that kind is calibrated (the grid is not a setting)."""
    table = dataclasses.asdict(getattr(config.sweep, kind))
    if config.calibrating(kind):
        for key in SPARSITY_KEYS:
            table.pop(key, None)
    return table


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
    overrides = fixed_grids(overrides or {}, source)
    return from_table(deep_merge(default_table(quick=quick), overrides), source)


def fixed_grids(overrides: dict, source: str) -> dict:
    """A fixed l1 or k list in [sweep.toy] or [sweep.model] turns that kind's calibration off (unless
    [calibration] says so itself: then both would set the grid, which is refused)."""
    sweep, calibration = overrides.get("sweep"), overrides.get("calibration", {})
    if not isinstance(sweep, dict) or not isinstance(calibration, dict):
        return overrides  # from_table names the wrong type
    off = {}
    for kind in ("toy", "model"):
        fixed = [key for key in SPARSITY_KEYS if isinstance(sweep.get(kind), dict) and key in sweep[kind]]
        if not fixed:
            continue
        if calibration.get(kind) is True:
            raise ConfigError(f"{source} [sweep.{kind}]: {fixed[0]} is a fixed sparsity grid, but [calibration] "
                              f"{kind} = true would replace it: leave out one of them")
        off.setdefault(kind, False)
    return deep_merge(overrides, {"calibration": off}) if off else overrides


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
    from .calibrate import CalibrationConfig
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
    calibration = build(CalibrationConfig, _table(data, "calibration", source), f"{source} [calibration]")
    count = build(CountConfig, _table(data, "count", source), f"{source} [count]")
    return StudyConfig(study=study, toys=toys, model=model_config, sweep=sweep, calibration=calibration, count=count)


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
        if value is None:  # only a Python override can say None (TOML has no null): "no limit" and the like
            return type(None) in args
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
    generator: str | None = None  # the toy's kind (sparse, gmm, circle, ...); None for model sites


class Study:
    """The stages of one study folder; each stage skips what is already finished unless `force`."""

    def __init__(self, config: StudyConfig, out: str | os.PathLike, *, force: bool = False, progress: bool = True):
        self.config = config
        self.out = Path(out)
        self.force = force
        self.progress = progress
        self.stores = self.out / "stores"
        self.sweeps = self.out / "sweeps"
        self.calibration = self.out / "calibration"
        self.calibrations: dict[str, Any] = {}  # label -> calibrate.Calibration
        self.timings: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # CPU seconds of this process per stage

    def log(self, text: str) -> None:
        if self.progress:
            print(f"sparsefeat run: {text}", file=sys.stderr, flush=True)

    def stage(self, name: str, fn):
        self.log(f"{name} ...")
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = fn()
        self.timings[name] = time.perf_counter() - t0
        self.cpu[name] = time.process_time() - cpu0  # on a shared machine, what the stage itself cost
        self.log(f"{name}: done in {self.timings[name]:.0f} s (CPU {self.cpu[name]:.0f} s)")
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
            out.append(Dataset(name, path, SITE, "toy", infer_store_role(path), toy.kind))
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
            out.append(Dataset(f"null:{ds.label}", path, SITE, ds.kind, "null", "matched"))
        return out

    @staticmethod
    def _wants_null(ds: Dataset) -> bool:
        """Data with structure to beat: a toy with ground truth and a trained model's site (not the
        controls, not the random-init twin), and the manifolds, whose tiles are read against it."""
        return ds.role in ("toy", "model") or ds.generator in MANIFOLDS

    # -- sparsity grids ---------------------------------------------------------------------

    def calibrate_all(self, datasets: list[Dataset]) -> dict:
        """The sparsity grid of every dataset whose kind is calibrated, each kept as calibration/LABEL.json
        (a re-run reads it back instead of training again)."""
        from .calibrate import Calibration, calibrate
        for i, ds in enumerate(datasets):
            if not self.config.calibrating(ds.kind):
                continue
            path = self.calibration / f"{_file_stem(ds.label)}.json"
            if self._done(path):
                self.calibrations[ds.label] = Calibration(**json.loads(path.read_text()))
                continue
            self.log(f"calibration {i + 1}/{len(datasets)}: {ds.label}")
            cal = calibrate(ds.store, self._sweep_base(ds), self.config.calibration, label=ds.label,
                            progress=self.progress)
            write_text(path, json.dumps(dataclasses.asdict(cal), indent=2) + "\n")
            self.calibrations[ds.label] = cal
        return self.calibrations

    def _sweep_base(self, ds: Dataset):
        base = self.config.sweep.toy if ds.kind == "toy" else self.config.sweep.model
        return dataclasses.replace(base, site=ds.site, label=ds.label)

    def sweep_config(self, ds: Dataset):
        """The dataset's SweepConfig: its kind's, with the calibrated grid when there is one."""
        cfg = self._sweep_base(ds)
        cal = self.calibrations.get(ds.label)
        if cal is None:
            return cfg
        grid = [int(v) for v in cal.grid] if cal.sparsity_name == "k" else list(cal.grid)
        return dataclasses.replace(cfg, **{cal.sparsity_name: grid})

    # -- sweeps ---------------------------------------------------------------------------

    def sweep_all(self, datasets: list[Dataset]) -> list[Path]:
        from .train import train_sweep
        paths = []
        for i, ds in enumerate(datasets):
            path = self.sweeps / f"{_file_stem(ds.label)}.h5"
            if not self._done(path):
                self.log(f"sweep {i + 1}/{len(datasets)}: {ds.label}")
                train_sweep(ds.store, self.sweep_config(ds), path, resume=not self.force, force=self.force,
                            progress=self.progress)
            paths.append(path)
        return paths

    # -- analysis -------------------------------------------------------------------------

    def analyse(self, sweeps: list[Path]):
        """The count (count.Count: the sensitivity table and one headline per dataset/site), count.json
        and the figures."""
        from . import count, plots
        result = count.count_study(sweeps, self.config.count, progress=self.progress)
        write_text(self.out / "count.json",
                   json.dumps(count.to_json(result.sweeps, result.headlines), indent=2, allow_nan=False) + "\n")
        plots.plot_all(result.sweeps, self.out / "figures", force=True, headlines=result.headlines)
        return result

    def run_all(self) -> StudyResult:
        """Every stage, then the report."""
        t0 = time.perf_counter()
        data = self.stage("toy stores", self.toy_stores)
        data += self.stage("model activations", self.model_stores)
        nulls = self.stage("matched nulls", lambda: self.null_stores(data))
        self.stage("calibration", lambda: self.calibrate_all(data + nulls))
        sweeps = self.stage("sweeps", lambda: self.sweep_all(data + nulls))
        result = self.stage("count and figures", lambda: self.analyse(sweeps))
        self.timings["total"] = time.perf_counter() - t0
        report = write_report(self.out, result, self.timings, self.calibrations, self.cpu)
        return StudyResult(self.out, data + nulls, sweeps, result.sweeps, result.headlines, report,
                           dict(self.timings), dict(self.calibrations))


@dataclass
class StudyResult:
    """What a study produced: its datasets, results files, count (every setting, and one headline per
    dataset/site), report, stage times and sparsity calibrations."""
    out: Path
    datasets: list[Dataset]
    sweeps: list[Path]
    counts: list  # count.SweepCount, one per dataset/site and setting (the sensitivity table)
    headlines: list  # count.Headline, one per dataset/site
    report: Path
    timings: dict[str, float]
    calibrations: dict = field(default_factory=dict)  # label -> calibrate.Calibration

    def count(self, label: str, sparsity: float | None = None):
        """The count of one dataset/site: at one sparsity setting, or (none given) the headline's setting
        when it has several."""
        found = [c for c in self.counts if c.label == label and (sparsity is None or c.sparsity == sparsity)]
        if sparsity is None and len(found) > 1:
            from .count import chosen_sweep
            chosen = chosen_sweep(self.headline(label), self.counts)
            found = [chosen] if chosen is not None else found
        if len(found) != 1:
            raise SparsefeatError(f"{self.out}: {len(found)} sweeps match {label!r} at sparsity {sparsity}")
        return found[0]

    def headline(self, label: str):
        found = [h for h in self.headlines if h.label == label]
        if len(found) != 1:
            raise SparsefeatError(f"{self.out}: no headline for {label!r}")
        return found[0]

    def summary(self) -> str:
        from .count import TABLE_COLUMNS, format_table, headline_lines, table_rows
        table = format_table(TABLE_COLUMNS, table_rows(self.counts))
        heads = "\n".join(headline_lines(self.headlines))
        return f"{heads}\n\n{table}\n\nreport: {self.report}\nwall time: {self.timings['total']:.0f} s"


def _file_stem(label: str) -> str:
    return label.replace("/", "-").replace(":", "-")


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
        # as a value (an older study.toml lacks newer keys), or as the table itself: a key that is None in
        # Python (max_tokens: no limit) is left out of TOML, so loading it back gives the study default
        same = load_config(previous) == config or tomllib.loads(previous.read_text()) == to_table(config)
    except (SparsefeatError, tomllib.TOMLDecodeError, OSError, UnicodeDecodeError):
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
HEADLINE_CONTROLS = ("null", "layer 0", "random init")  # the comparisons a headline line carries


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.1%}"


def _chosen(result) -> list:
    """The sweep of each headline's chosen setting (headlines without one are left out)."""
    from .count import chosen_sweep
    return [c for c in (chosen_sweep(h, result.sweeps) for h in result.headlines) if c is not None]


def _number(h) -> str:
    """A headline's number: the estimate, or the lower bound and why there is no estimate."""
    if h.estimate is not None:
        return f"**{h.estimate:.0f}±{h.uncertainty:.0f}** features (plateau from m={h.size})"
    bound = "" if h.lower_bound is None or math.isnan(h.lower_bound) else f"**>{h.lower_bound:.0f}** reproduced directions, "
    unconverged = [w.split(" did not converge")[0] for w in h.warnings if "did not converge" in w]
    why = h.reason + (f"; {', '.join(unconverged)} did not converge within the step budget" if unconverged else "")
    return f"{bound}no estimate ({why})"


def _comparison(key: str, comp) -> str:
    verdict = {True: ", within noise", False: ", beyond noise", None: ""}[comp.within_noise]
    return f"{comp.text()} over {key} `{comp.against}`{verdict}"


def headline_line(h) -> str:
    """One line of the report's lead: the number (or lower bound), the chosen setting, the rule and the
    excess over the null, layer 0 and the random-init twin."""
    expected = "" if h.expected is None else f", expected {h.expected}"
    comps = [_comparison(k, h.comparisons[k]) for k in HEADLINE_CONTROLS if k in h.comparisons]
    excess = f"; {'; '.join(comps)}" if comps else ""
    return f"- **{h.label}** ({h.role}{expected}): {_number(h)} at {h.setting} [{h.rule['name']}]{excess}."


def headlines_section(result) -> list[str]:
    lines = []
    for h in result.headlines:
        lines.append(headline_line(h))
        if h.role != "null" and hasattr(h, "fit_text"):  # a null's fit is shown beside its data's
            lines.append(f"  - {h.fit_text()}")
    rules = {h.rule["name"]: h.rule["description"] for h in result.headlines}
    return ["One number per dataset/site, at the sparsity setting chosen on held-out data "
            f"({'; '.join(f'{k}: {v}' for k, v in rules.items())}; docs/method.md). Excess = the estimate minus "
            "the control's, ± their combined uncertainty; `>`/`<` when one side has only a lower bound; "
            "`?` when neither saturates (then the difference of N at the largest common size).", "", *lines]


def calibration_section(calibrations: dict) -> list[str]:
    if not calibrations:
        return ["Every sparsity grid was fixed in the config (no calibration)."]
    lines = [f"- **{label}**: {cal.text()}" for label, cal in calibrations.items()]
    missed = [label for label, cal in calibrations.items() if not cal.reached]
    note = ([f"Outside the band after every round: {', '.join(missed)} (the grid is centred on the closest value "
             "tried)."] if missed else [])
    return ["Each grid is centred on the penalty at which a short run reached the target L0 on test rows "
            "(calibrate.py; every value tried is in `calibration/`):", "", *lines, *([""] + note if note else [])]


def objective_rises(c) -> list[tuple[int, int, float]]:
    """(size, smaller size, relative rise) where a size ends with a training objective above a smaller
    size's on the same setting (any amount: a larger dictionary can copy a smaller one)."""
    out = []
    for k in range(1, len(c.sizes)):
        best = min(c.sizes[:k], key=lambda r: r.train_objective)
        if c.sizes[k].train_objective > best.train_objective:
            out.append((c.sizes[k].size, best.size, c.sizes[k].train_objective / best.train_objective - 1))
    return out


def training_checks(result) -> list[str]:
    """The two checks of a trustworthy sweep: training objectives that rise with size, and members of a
    headline's setting with every latent dead."""
    rises = [(c, r) for c in result.sweeps for r in objective_rises(c)]
    chosen = {id(c) for c in _chosen(result)}
    dead = [(c, s) for c in result.sweeps if id(c) in chosen for s in c.sizes if s.all_dead]
    lines = []
    if rises:
        lines.append(f"Training objective above a smaller size's on the same setting ({len(rises)} of "
                     f"{sum(len(c.sizes) - 1 for c in result.sweeps)} larger sizes):")
        lines += [f"- {c.label} ({c.setting}{', the headline' if id(c) in chosen else ''}): m={m} ends "
                  f"{rise:+.1%} above m={small}" for c, (m, small, rise) in rises]
    else:
        lines.append("No size ends with a training objective above a smaller size's on the same setting.")
    lines.append("")
    copied = [(c, s) for c in result.sweeps for s in c.sizes if s.copied]
    if copied:
        members = sum(s.seeds for c in result.sweeps for s in c.sizes)
        lines += [f"Members that ended above a smaller member of their seed and setting, and took its dictionary "
                  f"with the extra latents off ({sum(s.copied for _, s in copied)} of {members} members; "
                  "SweepConfig.copy_smaller_when_worse); their objective from scratch, against the final one:",
                  *[f"- {c.label} ({c.setting}{', the headline' if id(c) in chosen else ''}): m={s.size}, "
                    f"{s.copied} of {s.seeds} seeds, {s.scratch_objective / s.train_objective - 1:+.2%} from scratch"
                    for c, s in copied], ""]
    if dead:
        lines += ["Members with every latent dead in a headline's setting:",
                  *[f"- {c.label} ({c.setting}): {s.all_dead} of {s.seeds} at m={s.size}" for c, s in dead]]
    else:
        lines.append("No member of a headline's setting has every latent dead.")
    return lines


def sensitivity_table(result) -> str:
    """Every setting of every dataset/site (count.table_rows) with what the headline rule made of it."""
    from .count import TABLE_COLUMNS, format_table, table_rows
    verdict = {}
    for h in result.headlines:
        for score in h.scores:
            verdict[(h.label, score.sparsity["value"])] = score.status + (f": {score.why}" if score.why else "")
    rows = [row + [verdict.get((c.label, c.sparsity), "-")] for c, row in zip(result.sweeps, table_rows(result.sweeps))]
    return format_table((*TABLE_COLUMNS, "headline rule"), rows)


def answer_train_vs_test(result) -> list[str]:
    lines = []
    chosen = [c for c in _chosen(result) if c.role in DATA_ROLES + ("random-init",)]
    for c in chosen:
        h, first, last = c.held_out, c.sizes[0], c.sizes[-1]
        name = f"{c.label} ({c.setting})"
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
    overfit = [c.label for c in chosen if c.held_out.size is not None and c.held_out.train_still_falls]
    growing = [c.label for c in chosen if c.sizes[-1].gap > max(2 * c.sizes[0].gap, c.sizes[0].gap + 0.005)]
    verdict = (f"Train loss alone would overstate what more latents buy on {', '.join(overfit)}: there, sizes "
               "beyond the held-out stop lower the train loss only. Read every loss curve on test rows."
               if overfit else
               "No dataset here shows train loss falling while test loss stalls: up to the largest size, more "
               "latents still help on held-out rows.")
    if growing:
        verdict += (f" The test − train gap grows with m on {', '.join(growing)}: part of what larger dictionaries "
                    "gain on training rows does not carry over to held-out rows, so the curves to compare are "
                    "the test curves.")
    return ["At each headline's setting:", "", *lines, "", verdict]


def answer_false_positives(result) -> list[str]:
    lines = []
    for h in result.headlines:
        if h.role in ("control", "null"):
            expected = f"; it has {h.expected} components" if h.expected else ""
            null = f"; {_comparison('null', h.comparisons['null'])}" if "null" in h.comparisons else ""
            lines.append(f"- **{h.label}** ({h.role}{expected}): {_number(h)} at {h.setting}{null}.")
    for h in result.headlines:
        if h.role not in DATA_ROLES:
            continue
        parts = [_comparison(k, c) for k, c in h.comparisons.items() if c.role in ("null", "control")]
        truth = f" (true number {h.expected})" if h.expected else ""
        lines.append(f"- **{h.label}**{truth}: {_number(h)}; excess: {'; '.join(parts) or 'no control'}.")
    out = lines
    manifolds = [h for h in result.headlines if "null" in h.comparisons and h.role == "control"]
    for h in manifolds:
        comp = h.comparisons["null"]
        if comp.within_noise or (comp.excess is not None and comp.excess <= 2):
            out += ["", f"**{h.label}** is a manifold an SAE tiles with as many latents as it has: its count is "
                        f"{comp.text()} over its matched null, so the count does not report the tiles as features."]
        elif comp.excess is None:
            out += ["", f"**{h.label}** is a manifold an SAE tiles with as many latents as it has; neither it nor its "
                        f"matched null saturates ({comp.text()}), so the count cannot tell tiles from features here."]
        else:
            out += ["", f"**{h.label}** is a manifold an SAE tiles with as many latents as it has, and its count "
                        f"exceeds its matched null ({comp.text()}): the count cannot tell tiles from features "
                        "here; read it as tiles, not as features."]
    nulls = [h for h in result.headlines if h.role == "null" and h.estimate is not None]
    if nulls:
        worst = max(nulls, key=lambda h: h.estimate)
        out += ["", f"The matched-Gaussian nulls, which have no sparse structure, get at most {worst.estimate:.0f} "
                    f"reproduced directions ({worst.label}): that is the count's false-positive floor; a dataset's "
                    "count means something only as its excess."]
    return out


def answer_layer_zero(result) -> list[str]:
    models = [h for h in result.headlines if h.role == "model"]
    if not models:
        return ["No model sites in this study."]
    lines = []
    for h in models:
        parts = [_comparison(k, h.comparisons[k]) for k in ("layer 0", "random init") if k in h.comparisons]
        lines.append(f"- **{h.label}**: {_number(h)}; {'; '.join(parts) or 'the baseline itself'}.")
    verdict = []
    if all(h.estimate is None for h in models):
        verdict.append("No model site saturates inside this sweep, so the study gives lower bounds, not feature "
                       "counts, for the model; the comparisons are of N(m) at the largest common size.")
    more_random = [h.label for h in models if "random init" in h.comparisons
                   and (h.comparisons["random init"].excess_at_common_size or 0) < 0]
    if more_random:
        verdict.append(f"The random-init model reproduces more directions than the trained one at "
                       f"{', '.join(more_random)}: reproducible directions alone are no evidence of learned features.")
    lines += ["", *verdict] if verdict else []
    return lines + ["", "Excess over layer 0 and over the random-init model's same layer is what a layer adds beyond "
                        "token embeddings and beyond what the architecture alone produces."]


def warnings_section(counts) -> list[str]:
    lines = [f"- **{c.label} ({c.setting})**: {w}" for c in counts for w in c.warnings]
    return ["Warnings (marked * in the table):", "", *lines, ""] if lines else []


def write_report(out: Path, result, timings: dict[str, float], calibrations: dict | None = None,
                 cpu: dict[str, float] | None = None) -> Path:
    """report.md: the headlines first, then the calibration, the training checks, every setting (the
    sensitivity table), the three questions, the figures and the by-size tables."""
    from .count import size_table
    cpu = cpu or {}
    stages = ", ".join(f"{k} {v:.0f} s" + (f" (CPU {cpu[k]:.0f} s)" if k in cpu else "")
                       for k, v in timings.items() if k != "total")
    figures = sorted(p.name for p in (out / "figures").glob("*.png")) if (out / "figures").is_dir() else []
    text = [f"# sparsefeat study: {out.name}", "",
            f"sparsefeat {__version__}; config: `study.toml`; sweeps: `sweeps/`; figures: `figures/`; "
            f"full numbers: `count.json`. Wall time {timings.get('total', math.nan):.0f} s ({stages}).", "",
            "## Headlines", "", *headlines_section(result), "",
            "## Sparsity calibration", "", *calibration_section(calibrations or {}), "",
            "## Training checks", "", *training_checks(result), "",
            "## Sensitivity: every setting", "",
            "Counting rule (docs/method.md): alive latents, near-duplicates merged, reproduced across two seeds at "
            "a decoder cosine above both 0.9 and the chance level of random atoms; the estimate is where that "
            "number N(m) stops growing, or 'no saturation up to m=M' when it never does inside the sweep. The "
            "comparison columns need the same setting on both sides, so with calibrated grids they are mostly "
            "empty: the headlines compare each side at its own chosen setting.", "",
            "```", sensitivity_table(result), "```", "",
            *warnings_section(result.sweeps),
            "## 1. Train or test loss?", "", *answer_train_vs_test(result), "",
            "## 2. False positives on controls", "", *answer_false_positives(result), "",
            "## 3. Layer 0 as a baseline", "", *answer_layer_zero(result), "",
            "## Figures", "", *[f"- `figures/{name}`" for name in figures], "",
            "## By size", ""]
    for c in result.sweeps:
        text += [f"### {c.label} ({c.role}, {c.setting})", "", "```", size_table(c), "```", ""]
    path = out / "report.md"
    write_text(path, "\n".join(text))
    return path

"""A whole study in one folder: data, controls, nulls, sweeps, the count, figures and a report.

    out/
      study.toml   the effective config (every key; copy it, edit it, pass it back with --config)
      stores/      toy stores, MiniLM (trained and random-init) activations, matched-Gaussian nulls
      sweeps/      one results file per dataset/site
      figures/     PNG and PDF (plots.py)
      count.json   the count table (count.py), in full
      report.md    what the study found on the three questions, with the numbers

The study config is a TOML file validated against dataclasses; each section overrides the defaults
below (the `--quick` profile first, then the file). Finished stores and sweeps are kept on a re-run
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
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import SparsefeatError
from .files import check_folder_writable, write_text

# --------------------------------------------------------------------------------------------
# The study config
# --------------------------------------------------------------------------------------------


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
class ModelOptions:
    enabled: bool = field(default=True, metadata={"help": "harvest model activations (MiniLM by default)"})
    random_init_twin: bool = field(default=True, metadata={
        "help": "also harvest the same layers of the model with random weights (the random-init control)"})


def default_toys() -> dict[str, dict]:
    # 64 features in 32 dims, about 2 active per row: an SAE recovers them on CPU in seconds, so the
    # count can be checked against the truth; the controls have the same width.
    return {"sparse": dict(kind="sparse", n_features=64, mean_active=2.0),
            "gmm": dict(kind="gmm", k=12),
            "square": dict(kind="square")}


def default_model() -> dict:
    return dict(enabled=True, random_init_twin=True, model="minilm", corpus=["pydoc"], layers=[0, 3, 6],
                max_tokens=24_000, max_length=128)


def default_sweeps() -> dict[str, dict]:
    # Budgets measured on 2 CPU cores: a toy sweep ~10 s, a model sweep ~40 s (d = 384, up to 2d).
    # Toys: two sparsity settings for the frontier figure; lr 1e-2 converges in 1000 steps there.
    # Model sites: lr 1e-2 killed half the latents at m >= d, so 3e-3; α for L0 around 20-40.
    return {"toy": dict(sizes=[16, 32, 64, 128, 256], l1=[0.3, 1.0], seeds=[0, 1], steps=1000, lr=1e-2,
                        checkpoint_every=0),
            "model": dict(sizes=[48, 96, 192, 384, 768], l1=[0.05], seeds=[0, 1], steps=1000, lr=3e-3,
                          checkpoint_every=500)}


@dataclass
class StudyConfig:
    """The whole study. Sections of the TOML file map to these fields; see `load_config`."""
    study: StudyOptions = field(default_factory=StudyOptions)
    toys: dict[str, dict] = field(default_factory=default_toys)   # name -> kind, n_samples, seed, params
    model: dict = field(default_factory=default_model)            # ModelOptions + HarvestConfig fields
    sweep: dict[str, dict] = field(default_factory=default_sweeps)  # "toy"/"model" -> SweepConfig fields
    count: dict = field(default_factory=dict)                     # CountConfig fields


# The --quick profile: a CI-sized study (about two minutes on 2 CPU cores).
QUICK = {
    "study": {"toy_samples": 16_000},
    "model": {"layers": [0, 6], "max_tokens": 6_000},
    "sweep": {"toy": {"sizes": [16, 32, 64, 128], "steps": 600},
              "model": {"sizes": [48, 96, 192], "steps": 600, "checkpoint_every": 0}},
    "count": {"bootstrap": 200},
}


def config_dict(config: StudyConfig) -> dict:
    return dataclasses.asdict(config)


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


def make_config(overrides: dict | None = None, *, quick: bool = False, source: str = "study config") -> StudyConfig:
    """Defaults, then the quick profile (if asked), then `overrides` (the TOML layout as a dict); validated.
    A table under `toys` replaces the toy of that name; `enabled = false` in it leaves that toy out."""
    data = config_dict(StudyConfig())
    if quick:
        data = deep_merge(data, QUICK)
    return validate(deep_merge(data, overrides or {}), source)


def load_config(path: str | os.PathLike | None = None, *, quick: bool = False) -> StudyConfig:
    """Defaults, then the quick profile (if asked), then the TOML file; validated (one-line errors)."""
    overrides = {}
    if path is not None:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                overrides = tomllib.load(f)
        except FileNotFoundError:
            raise SparsefeatError(f"{path}: no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise SparsefeatError(f"{path}: not valid TOML ({e})") from None
    return make_config(overrides, quick=quick, source=str(path) if path else "study config")


def _check_keys(where: str, table: dict, valid) -> None:
    valid = list(valid)
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise SparsefeatError(f"{where}: unknown key {', '.join(map(repr, unknown))} (valid: {', '.join(valid)})")


def _build(cls, table: dict, where: str):
    _check_keys(where, table, [f.name for f in dataclasses.fields(cls) if f.init])
    try:
        return cls(**table)
    except (TypeError, ValueError, SparsefeatError) as e:
        raise SparsefeatError(f"{where}: {e}") from None


def validate(data: dict, source: str) -> StudyConfig:
    """Check every section against its dataclass, so a typo fails now, not after an hour of sweeps."""
    from .count import CountConfig
    from .harvest import HarvestConfig
    from .toys import make_params
    _check_keys(source, data, [f.name for f in dataclasses.fields(StudyConfig)])
    config = StudyConfig(study=_build(StudyOptions, data.get("study", {}), f"{source} [study]"),
                         toys=data.get("toys", {}), model=data.get("model", {}), sweep=data.get("sweep", {}),
                         count=data.get("count", {}))
    for name, toy in config.toys.items():
        where = f"{source} [toys.{name}]"
        if isinstance(toy, dict) and toy.get("enabled", True) is False:
            continue  # left out: nothing else in the table needs to be valid
        if not isinstance(toy, dict) or "kind" not in toy:
            raise SparsefeatError(f"{where}: needs kind = \"sparse\" | \"gmm\" | \"square\" | ...")
        try:
            make_params(toy["kind"], toy_params(config, toy))
        except SparsefeatError as e:
            raise SparsefeatError(f"{where}: {e}") from None
    model_keys = [f.name for f in dataclasses.fields(ModelOptions)]
    _build(ModelOptions, {k: v for k, v in config.model.items() if k in model_keys}, f"{source} [model]")
    _build(HarvestConfig, {k: v for k, v in config.model.items() if k not in model_keys}, f"{source} [model]")
    _check_keys(f"{source} [sweep]", config.sweep, ["toy", "model"])
    for kind in ("toy", "model"):
        sweep_config(config, kind, where=f"{source} [sweep.{kind}]")
    _build(CountConfig, config.count, f"{source} [count]")
    return config


TOY_KEYS = ("kind", "n_samples", "seed", "enabled")


def active_toys(config: StudyConfig) -> dict[str, dict]:
    return {name: toy for name, toy in config.toys.items() if toy.get("enabled", True)}


def toy_params(config: StudyConfig, toy: dict) -> dict:
    from .toys import toy_class
    params = {k: v for k, v in toy.items() if k not in TOY_KEYS}
    fields = {f.name for f in dataclasses.fields(toy_class(toy["kind"]).Params)}
    if "d" in fields and "d" not in params:
        params["d"] = config.study.toy_width
    return params


def sweep_config(config: StudyConfig, kind: str, where: str = "study config"):
    from .train import SweepConfig
    return _build(SweepConfig, dict(config.sweep.get(kind, {})), where)


def harvest_config(config: StudyConfig, random_init: bool):
    from .harvest import HarvestConfig
    model_keys = {f.name for f in dataclasses.fields(ModelOptions)}
    return HarvestConfig(**{k: v for k, v in config.model.items() if k not in model_keys}, random_init=random_init)


def count_config(config: StudyConfig):
    from .count import CountConfig
    return CountConfig(**config.count)


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
                write_toy(toy["kind"], path, n_samples=int(toy.get("n_samples", self.config.study.toy_samples)),
                          seed=int(toy.get("seed", self.config.study.seed)), force=self.force,
                          resume=partial_path(path).exists() and not self.force, progress=self.progress,
                          **toy_params(self.config, toy))
            out.append(Dataset(name, path, SITE, "toy"))
        return out

    def model_stores(self) -> list[Dataset]:
        from .harvest import harvest
        from .store import partial_path
        if not self.config.model.get("enabled", True):
            return []
        twins = [False] + ([True] if self.config.model.get("random_init_twin", True) else [])
        out = []
        for random_init in twins:
            hc = harvest_config(self.config, random_init)
            name = model_name(hc.model) + ("-random" if random_init else "")
            path = self.stores / f"{name}.h5"
            if not self._done(path):
                harvest(hc, path, force=self.force, resume=partial_path(path).exists() and not self.force,
                        progress=self.progress)
            out += [Dataset(f"{name}/resid_{layer}", path, f"resid_{layer}", "model") for layer in hc.layers]
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
            out.append(Dataset(f"null:{ds.label}", path, SITE, ds.kind))
        return out

    def _wants_null(self, ds: Dataset) -> bool:
        if ds.kind == "model":
            return not ds.label.split("/")[0].endswith("-random")
        return self.config.toys[ds.label]["kind"] == "sparse"

    # -- sweeps ---------------------------------------------------------------------------

    def sweep_all(self, datasets: list[Dataset]) -> list[Path]:
        from .train import train_sweep
        paths = []
        for i, ds in enumerate(datasets):
            path = self.sweeps / f"{ds.label.replace('/', '-').replace(':', '-')}.h5"
            if not self._done(path):
                self.log(f"sweep {i + 1}/{len(datasets)}: {ds.label}")
                cfg = dataclasses.replace(sweep_config(self.config, ds.kind), site=ds.site, label=ds.label)
                train_sweep(ds.store, cfg, path, resume=not self.force, force=self.force, progress=self.progress)
            paths.append(path)
        return paths

    # -- analysis -------------------------------------------------------------------------

    def analyse(self, sweeps: list[Path]) -> list:
        from . import count, plots
        counts = count.count_results(sweeps, count_config(self.config), progress=self.progress)
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


def model_name(model: str) -> str:
    return "minilm" if model == "minilm" else Path(model).name.replace("/", "-")


def check_folder(out: Path, config_text: str, force: bool) -> None:
    """A folder holds one study: refuse to mix a different config into it without force."""
    previous = out / "study.toml"
    if previous.exists() and not force and previous.read_bytes() != config_text.encode():
        raise SparsefeatError(f"{previous}: this folder holds a study with another config; "
                              "pass --force to redo it, or choose another --out")


def run_study(config: StudyConfig, out: str | os.PathLike, *, force: bool = False, progress: bool = True) -> StudyResult:
    """Run every stage into `out` (see the module docstring for the folder) and return what it produced."""
    out = check_folder_writable(out)  # a file, a read-only folder: refused before anything is written
    config_text = to_toml(config_dict(config))
    check_folder(out, config_text, force)
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

"""`sparsefeat` command line: a thin face over the Python API.

Options that configure a library call are generated from its dataclass config (`add_config_args`),
so each default lives in exactly one place. Each subcommand is one `Command` subclass; defining the
class registers it. Errors a user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import traceback
import types
import typing
from pathlib import Path

from . import __version__
from .errors import ConfigError, SparsefeatError

# --------------------------------------------------------------------------------------------
# Generating options from dataclass configs
# --------------------------------------------------------------------------------------------


def _parse_list(item_type):
    def parse(text: str):
        try:
            return [item_type(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item_type.__name__}, "
                                             f"got {text!r}") from None
    parse.__name__ = f"list of {item_type.__name__}"
    return parse


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_config_args(parser: argparse.ArgumentParser, config_cls, *, skip: tuple[str, ...] = (),
                    group: str | None = None) -> None:
    """Add one `--option` per field of a dataclass; help comes from `field(metadata={"help": ...})`.

    Types: int, float, str, bool (``--flag/--no-flag``), Path, and list[int|float|str]
    (comma-separated). Defaults are not copied: a missing option leaves the dataclass default.
    """
    target = parser.add_argument_group(group) if group else parser
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in skip or not f.init:
            continue
        tp = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if tp is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) in (list, tuple):
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str
            target.add_argument(flag, type=_parse_list(item), metavar="LIST", **kw)
        elif tp in (int, float, str, Path):
            choices = f.metadata.get("choices")
            target.add_argument(flag, type=tp, choices=choices, metavar=None if choices else f.name.upper(), **kw)
        else:
            target.add_argument(flag, type=str, **kw)


def config_from_args(config_cls, args: argparse.Namespace, **overrides):
    """Build a config from parsed options: only options the user gave override the defaults."""
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    given = {k: v for k, v in vars(args).items() if k in names}
    given.update(overrides)
    try:
        return config_cls(**given)
    except (TypeError, ValueError) as e:
        raise SparsefeatError(str(e)) from None


def add_common_flags(p: argparse.ArgumentParser, *, resume: str | None = None,
                     force: str = "overwrite an existing output", progress: str = "show a progress bar") -> None:
    """The flags every writing command shares, declared once: --resume (when the command can resume;
    `resume` is its help), --force and --progress/--no-progress."""
    if resume:
        p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--force", action="store_true", help=force)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help=progress)


def print_json(obj) -> None:
    from .store import json_default
    print(json.dumps(obj, indent=2, default=json_default))


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

COMMANDS: dict[str, type[Command]] = {}


class Command:
    """One subcommand: `configure` adds its options, `run` does the work (returns an exit code)."""

    name: str = ""
    help: str = ""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            if cls.name in COMMANDS:
                raise ConfigError(f"command {cls.name!r} is already registered ({COMMANDS[cls.name].__qualname__})")
            COMMANDS[cls.name] = cls

    def configure(self, p: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int | None:
        raise NotImplementedError


# ---- store, toys, import, inspect (issue 2) ------------------------------------------------
# (section: store)


def _store_config(config_cls, args: argparse.Namespace):
    """The config of a command that writes `args.out`, from its options; a bad value names the file."""
    try:
        return config_from_args(config_cls, args)
    except SparsefeatError as e:
        raise ConfigError(f"{args.out}: {e}") from None


def _parse_set_value(params_cls, key: str, text: str):
    """Type a `--set key=value` by the Params field it names (unknown keys are left to the library,
    which refuses them with the list of valid keys)."""
    hints = typing.get_type_hints(params_cls)
    if key not in hints:
        return text
    tp = hints[key]
    optional = _unwrap_optional(tp) is not tp
    tp = _unwrap_optional(tp)
    low = text.strip().lower()
    if optional and low in ("none", "null", ""):
        return None
    if tp is bool:
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise SparsefeatError(f"--set {key}={text}: expected true or false")
    try:
        return tp(text) if tp in (int, float, str) else text
    except ValueError:
        raise SparsefeatError(f"--set {key}={text}: expected {tp.__name__}") from None


def _given_params(params_cls, args: argparse.Namespace) -> dict:
    """Params fields the user gave as options, then `--set key=value` on top."""
    names = {f.name for f in dataclasses.fields(params_cls)}
    params = {k: v for k, v in vars(args).items() if k in names}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SparsefeatError(f"--set {item!r}: expected key=value")
        key = key.strip().replace("-", "_")
        params[key] = _parse_set_value(params_cls, key, value)
    return params


class ToyCommand(Command):
    name = "toy"
    help = "Generate toy data with known structure (a ground truth or a false-positive control) as a store."

    def configure(self, p):
        from .toys import TOYS, ToyConfig
        kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
        for kind, cls in TOYS.items():
            doc = (cls.__doc__ or kind).strip()
            k = kinds.add_parser(kind, help=doc.splitlines()[0], description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
            k.add_argument("--out", type=Path, required=True, help="the store to write")
            add_config_args(k, ToyConfig, group="store options")
            add_config_args(k, cls.Params, group=f"{kind} parameters")
            k.add_argument("--set", action="append", metavar="KEY=VALUE",
                           help="set any parameter of this toy (repeatable)")
            if "d" in {f.name for f in dataclasses.fields(cls.Params)}:
                k.add_argument("--like", type=Path, metavar="STORE",
                               help="take d and scale (E|x|^2) from this store's site")
                k.add_argument("--like-site", metavar="SITE", help="site of --like (default: its only site)")
            add_common_flags(k, resume="continue a killed run (same arguments)", force="overwrite an existing store")

    def run(self, args):
        from .toys import TOYS, ToyConfig, write_toy
        config = _store_config(ToyConfig, args)
        params = _given_params(TOYS[args.kind].Params, args)
        like = (args.like, args.like_site) if getattr(args, "like", None) else None
        path = write_toy(args.kind, args.out, config, like=like, resume=args.resume, force=args.force,
                         progress=args.progress, **params)
        print(f"wrote {path}")


class ImportCommand(Command):
    name = "import"
    help = "Turn your own [rows, d] activations (.npy, .pt tensor, .safetensors) into a store."

    def configure(self, p):
        from .store import ImportConfig
        p.add_argument("array", type=Path, help="the array file (.npy, .pt or .safetensors)")
        p.add_argument("--out", type=Path, required=True, help="the store to write")
        add_config_args(p, ImportConfig, group="import options")
        add_common_flags(p, resume="continue an import stopped part way (e.g. by a full disk; same arguments)",
                         force="overwrite an existing store")

    def run(self, args):
        from .store import ImportConfig, import_array
        path = import_array(args.array, args.out, _store_config(ImportConfig, args), force=args.force,
                            resume=args.resume, progress=args.progress)
        print(f"wrote {path}")


def _print_description(obj, indent: int = 0) -> None:
    """Print a describe() dict as indented `key: value` lines (lists of dicts as one line each)."""
    pad = "  " * indent
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            print(f"{pad}{key}:")
            _print_description(value, indent + 1)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            print(f"{pad}{key}: ({len(value)})")
            for item in value:
                print(f"{pad}  - " + ", ".join(f"{k}={_short(v)}" for k, v in item.items()))
        else:
            print(f"{pad}{key}: {_short(value)}")


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


class InspectCommand(Command):
    name = "inspect"
    help = "Describe a store or a results file: format, sites, shapes, splits, statistics, provenance."

    def configure(self, p):
        p.add_argument("file", type=Path, help="a sparsefeat store or results file")
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        p.add_argument("--verify", action="store_true",
                       help="check every block of a store's rows against its checksum (exit 2 at the first "
                            "damaged block)")

    def run(self, args):
        from . import store
        fmt = store.file_format(args.file)
        if args.verify:
            if fmt != store.FORMAT:
                raise SparsefeatError(f"{args.file}: --verify checks stores; this is a {fmt!r} file")
            checked = store.verify(args.file)
            if not checked:
                print(f"{args.file}: no checksums to verify (a format version 1 store)")
            else:
                print(f"{args.file}: verified " + ", ".join(f"site {k}: {v} blocks" for k, v in checked.items()))
            return 0
        if fmt == store.FORMAT:
            description = store.describe(args.file)
        elif fmt == "sparsefeat.results":
            from . import results  # only needed for results files
            description = results.describe(args.file)
        else:
            raise SparsefeatError(f"{args.file}: unknown sparsefeat format {fmt!r}")
        if args.json:
            print_json(description)
        else:
            _print_description(description)


# ---- sweep (issue 3) -----------------------------------------------------------------------
# (section: sweep)


class SweepCommand(Command):
    name = "sweep"
    help = ("Train sparse autoencoders of several sizes × sparsity settings × seeds in one pass over a store; "
            "report train and test loss by size and write a results file.")

    def configure(self, p):
        from .sae import ARCHITECTURES, SAEOptions
        from .train import SweepConfig
        p.add_argument("store", type=Path, help="the activation store to train on")
        p.add_argument("--out", type=Path, required=True, help="the results file to write (e.g. sweep.h5)")
        add_config_args(p, SweepConfig, skip=("model",), group="sweep options")
        add_config_args(p, SAEOptions, group="initialisation (every architecture)")
        shared = tuple(f.name for f in dataclasses.fields(SAEOptions))
        for name, cls in sorted(ARCHITECTURES.items()):
            if cls.Options is not SAEOptions:
                add_config_args(p, cls.Options, skip=shared, group=f"{name} options")
        p.add_argument("--json", action="store_true", help="print the summary (one row per member and split) as JSON")
        # --ddp (distributed.py): under torchrun, every step shared by the ranks instead of members divided
        p.add_argument("--ddp", action="store_true",
                       help="under torchrun: train the whole sweep data-parallel (DistributedDataParallel); "
                            "--batch-size stays the global batch, each of N processes trains on 1/N of it")
        p.add_argument("--distribute-latents", action="store_true",
                       help="under torchrun: each of N processes holds 1/N of the latents of every dictionary "
                            "(for dictionaries too large for one device; relu-l1 only, not with --ddp)")
        add_common_flags(p, resume="continue a killed sweep from its checkpoint",
                         force="overwrite existing results or an old checkpoint",
                         progress="show the start-up line (members, memory estimate) and a progress bar")

    def run(self, args):
        from .results import describe, load_results, summary_table
        from .train import SweepConfig, train_sweep
        from . import distributed
        config = config_from_args(SweepConfig, args, model=self.model_options(args))
        if args.distribute_latents:
            distributed.check_distribute_latents(config, distributed.world(), ddp=args.ddp)
            if not distributed.under_torchrun():
                raise distributed.DistributedError("--distribute-latents splits dictionaries across the processes "
                                                   "torchrun starts; run `torchrun --nproc-per-node N -m "
                                                   "sparsefeat sweep ... --distribute-latents`")
        if args.ddp and not distributed.under_torchrun():
            raise distributed.DistributedError("--ddp trains across the processes torchrun starts; run "
                                               "`torchrun --nproc-per-node N -m sparsefeat sweep ... --ddp`")
        # under torchrun: latents split (--distribute-latents), every step shared (--ddp), else members across ranks
        run = (distributed.latent_sweep if args.distribute_latents else distributed.ddp_sweep if args.ddp
               else distributed.sweep if distributed.launched() else train_sweep)
        path = run(args.store, config, args.out, resume=args.resume, force=args.force, progress=args.progress)
        if path is None:  # a rank other than 0: rank 0 reports
            return 0
        if args.json:
            print_json(describe(path)["summary"])
        else:
            with load_results(path) as r:
                print(summary_table(r))
            print(f"wrote {path}")

    @staticmethod
    def model_options(args) -> dict:
        """The chosen architecture's options from the flags; a flag of another architecture is refused."""
        from .sae import ARCHITECTURES
        from .train import SweepConfig
        arch = getattr(args, "arch", SweepConfig.arch)
        if arch not in ARCHITECTURES:
            return {}  # SweepConfig names the known ones
        own = {f.name for f in dataclasses.fields(ARCHITECTURES[arch].Options)}
        every = {f.name for cls in ARCHITECTURES.values() for f in dataclasses.fields(cls.Options)}
        given = {k: v for k, v in vars(args).items() if k in every}
        foreign = sorted(set(given) - own)
        if foreign:
            raise SparsefeatError(f"--{foreign[0].replace('_', '-')} is not an option of {arch} "
                                  f"(its options: {', '.join('--' + n.replace('_', '-') for n in sorted(own))})")
        return given

# ---- harvest (issue 4) ---------------------------------------------------------------------
# (section: harvest)


class HarvestCommand(Command):
    name = "harvest"
    help = ("Run a text corpus through a transformers model (default: the shipped MiniLM-L6 on Python's "
            "own docs) and store the residual stream of chosen layers, offline.")

    def configure(self, p):
        from .harvest import HarvestConfig
        p.add_argument("--out", type=Path, required=True, help="the store to write")
        # A corpus is a list of paths: space-separated (paths may hold commas), not comma-separated.
        p.add_argument("--corpus", nargs="+", metavar="PATH", default=argparse.SUPPRESS,
                       help=HarvestConfig.__dataclass_fields__["corpus"].metadata["help"] + " (default: pydoc stdlib)")
        add_config_args(p, HarvestConfig, skip=("corpus",), group="harvest options")
        add_common_flags(p, resume="continue a killed harvest (same arguments)", force="overwrite an existing store")

    def run(self, args):
        from .harvest import HarvestConfig, harvest
        from .store import ActivationStore
        from . import distributed
        run = distributed.harvest if distributed.launched() else harvest  # under torchrun: documents across ranks
        path = run(config_from_args(HarvestConfig, args), args.out, resume=args.resume, force=args.force,
                   progress=args.progress)
        if path is None:  # a rank other than 0: rank 0 reports
            return 0
        with ActivationStore(path) as s:
            print(f"wrote {path}: {s.n_rows():,} rows ({s.n_rows('test'):,} test) from "
                  f"{len(s.documents_test()):,} documents, sites {', '.join(s.sites)}")

# ---- count, plot, run (issue 5) ------------------------------------------------------------
# (section: count)


class CountCommand(Command):
    name = "count"
    help = ("estimate the number of features in sweep results, beside their controls, and where more "
            "latents stop helping on held-out data")

    def configure(self, p):
        p.add_argument("results", nargs="+", type=Path, metavar="RESULTS", help="sweep results files (sweep.h5)")
        p.add_argument("--json", action="store_true", help="print the full count as JSON")
        p.add_argument("--by-size", action="store_true", help="also print each sweep's numbers by size")
        from .count import CountConfig
        add_config_args(p, CountConfig, group="counting rule")

    def run(self, args):
        from . import count
        study = count.count_study(args.results, config_from_args(count.CountConfig, args))
        counts = study.sweeps
        if args.json:
            print_json(count.to_json(counts, study.headlines))
            return 0
        print("headline (one per dataset/site; sparsity chosen on held-out data, docs/method.md):")
        for line in count.headline_lines(study.headlines):
            print(f"  {line}")
        print("\nsensitivity: every sparsity setting")
        print(count.format_table(count.TABLE_COLUMNS, count.table_rows(counts)))
        for h in study.headlines:
            for e in h.excluded:
                s = e["sparsity"]
                print(f"- {h.label} ({s['arch']} {s['name']}={s['value']:g}) excluded: {e['why']}")
        for c in counts:
            for warning in c.warnings:
                print(f"* {c.label} ({c.setting}): {warning}")
        if args.by_size:
            for c in counts:
                print(f"\n{c.label} [{c.role}] {c.setting}\n{count.size_table(c)}")
        return 0


class PlotCommand(Command):
    name = "plot"
    help = "draw the figures of a count (PNG and PDF) from sweep results files"

    def configure(self, p):
        p.add_argument("results", nargs="+", type=Path, metavar="RESULTS", help="sweep results files (sweep.h5)")
        p.add_argument("--out", type=Path, required=True, help="folder for the figures")
        p.add_argument("--force", action="store_true", help="overwrite existing figures")
        from .count import CountConfig
        add_config_args(p, CountConfig, group="counting rule")

    def run(self, args):
        from . import count, plots
        config = config_from_args(count.CountConfig, args)
        plots.check_figures(args.out, plots.FIGURES, force=args.force)  # refused before the work, not after
        counts = count.count_results(args.results, config)
        for path in plots.plot_all(counts, args.out, force=args.force):
            print(path)
        return 0


class RunCommand(Command):
    name = "run"
    help = ("a whole study into one folder: toy data and controls, MiniLM layers and their random-init "
            "twins, matched nulls, sweeps, the count, figures and report.md")

    def configure(self, p):
        p.add_argument("--out", type=Path, required=True, help="study folder (stores/, sweeps/, figures/, ...)")
        p.add_argument("--config", type=Path, help="TOML study config overriding the defaults (see study.toml "
                                                   "in any study folder for every key)")
        from .run import QUICK_DURATION
        p.add_argument("--quick", action="store_true", help=f"a CI-sized study ({QUICK_DURATION})")
        add_common_flags(p, force="redo every stage, overwriting the folder's outputs",
                         progress="show progress bars (default: on)")

    def run(self, args):
        from . import run as study
        config = study.load_config(args.config, quick=args.quick)
        result = study.run_study(config, args.out, force=args.force, progress=args.progress)
        print(result.summary())
        return 0


# ---- export, evaluate (issue 12) -----------------------------------------------------------
# (section: interop)


class ExportCommand(Command):
    name = "export"
    help = ("write trained members of a results file for other tools: a folder SAELens loads with "
            "SAE.load_from_disk, or plain safetensors with our config as metadata")

    def configure(self, p):
        from .export import FORMATS
        p.add_argument("results", type=Path, help="a sweep results file (sweep.h5)")
        p.add_argument("--member", required=True, metavar="ID|all",
                       help="member id (see `sparsefeat inspect`), or all (one sub-folder or file per member)")
        p.add_argument("--format", choices=FORMATS, default="saelens", help="output format (default: saelens)")
        p.add_argument("--out", type=Path, required=True, help="the folder to write")
        p.add_argument("--force", action="store_true", help="replace an existing folder")

    def run(self, args):
        from .export import export
        for path in export(args.results, args.member, args.out, format=args.format, force=args.force):
            print(f"wrote {path}")
        return 0


class EvaluateCommand(Command):
    name = "evaluate"
    help = ("evaluate an SAE saved by SAELens or sparsify on a store's held-out rows with our metrics, "
            "beside a sparsefeat sweep of the same site")

    def configure(self, p):
        p.add_argument("sae", type=Path, metavar="SAE_DIR", help="folder with cfg.json and sae_weights.safetensors "
                                                                 "(SAELens) or sae.safetensors (sparsify)")
        p.add_argument("store", type=Path, help="the activation store to evaluate on (its test split)")
        p.add_argument("--site", help="site of the store (default: --against's site, else the store's only site)")
        p.add_argument("--against", type=Path, metavar="RESULTS", help="a sweep of the same site to compare with")
        p.add_argument("--out", type=Path, metavar="RESULTS", help="write a one-member results file for count/plot")
        p.add_argument("--force", action="store_true", help="overwrite an existing --out")
        p.add_argument("--json", action="store_true", help="print the metrics as JSON")

    def run(self, args):
        from . import foreign
        from .files import check_output
        from .results import load_results
        if args.out is not None:
            check_output(args.out, force=args.force, inputs=[args.store] + ([args.against] if args.against else []))
        sae = foreign.load_foreign(args.sae)
        against = load_results(args.against) if args.against else None
        try:
            site = args.site or (against.site if against else None)
            if against is not None and site != against.site:
                raise SparsefeatError(f"{args.against}: is a sweep of site {against.site!r}, not {site!r}")
            ev = foreign.evaluate_foreign(sae, args.store, site=site,
                                          scale=against.normalisation_scale if against else None)
            rows = [dict(name=f"{sae.library} {sae.arch}", size=sae.size, sparsity=sae.k, split=split, **ev.metrics[split])
                    for split in ("test", "train")]
            if against is not None:
                rows += [dict(name=f"sparsefeat {m.arch}", size=m.dictionary_size, sparsity=m.sparsity,
                              split="test", **m.metrics["test"])
                         for m in sorted(against.members, key=lambda m: (m.sparsity, m.dictionary_size, m.seed))
                         if "test" in m.metrics]
        finally:
            if against is not None:
                against.close()
        if args.json:
            print_json(dict(sae=str(args.sae), site=ev.site, normalisation_scale=ev.scale, rows=rows))
        else:
            print(f"{sae.describe()} on {args.store} site {ev.site}: held-out (test) rows, "
                  f"MSE in normalised units (scale {ev.scale:.4g}); train = a train sample of the same size")
            cols = ("name", "size", "sparsity", "split", "fvu", "mse", "l0", "dead_fraction", "shrinkage", "rows")
            print("".join(f"{c:>14}" if i else f"{c:<22}" for i, c in enumerate(cols)))
            for row in rows:
                cells = [row["name"]] + [_cell(row[c]) for c in cols[1:]]
                print("".join(f"{c:>14}" if i else f"{c:<22}" for i, c in enumerate(cells)))
        if args.out is not None:
            print(f"wrote {foreign.write_foreign_results(ev, args.store, args.out, force=args.force)}")
        return 0


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsefeat",
        description="Count the features in neural-network activations with sparse dictionaries, "
                    "against false-positive controls and the layer-0 baseline.")
    parser.add_argument("--version", action="version", version=f"sparsefeat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cls in COMMANDS.items():
        cmd = cls()
        p = sub.add_parser(name, help=cls.help, description=cls.help)
        cmd.configure(p)
        p.set_defaults(_command=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status. User errors (`SparsefeatError`, an OSError on a path
    the user gave) print one line and return 2; Ctrl-C returns 130; only a bug prints a traceback,
    under a first line that says so."""
    as_process = argv is None  # the `sparsefeat` command itself, not a call from Python code or a test
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    bad = next((a for a in argv if not _is_text(a)), None)
    if bad is not None:  # a non-UTF-8 byte (surrogate-escaped by Python): refuse before any file is touched
        _error("sparsefeat", f"{_printable(bad)}: not valid UTF-8 text; paths and values must be UTF-8")
        return 2
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and its one error line (or --help/--version)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "_command", None):
        parser.print_help()
        return 2
    where = f"sparsefeat {args.command}"
    if as_process:
        _exit_on_interrupt(where)
    try:
        code = args._command.run(args)
    except SparsefeatError as e:
        _error(where, str(e))
        return 2
    except KeyboardInterrupt:
        _error(where, "interrupted")
        return 130
    except BrokenPipeError:
        # `sparsefeat inspect FILE | head`: the reader left; say nothing more and exit quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        if e.filename is None:
            return _internal_error(where)
        _error(where, _describe_os_error(e))
        return 2
    except Exception:
        return _internal_error(where)
    return int(code or 0)


def _exit_on_interrupt(where: str) -> None:
    """Ctrl-C ends the command at once: one line, exit 130. A KeyboardInterrupt can be lost (raised
    inside a destructor or a callback, where Python only reports it) and interpreter shutdown can wait on
    a data-loading thread, so the process leaves through os._exit. That is safe because every writer
    survives SIGKILL (committed blocks, atomic renames; `--resume` continues), which is stronger."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # started with SIGINT ignored (a background job) or handled by the caller: leave it so

    def interrupted(signum, frame):
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        _error(where, "interrupted")
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted)


def _is_text(arg: str) -> bool:
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    """`text` safe to print on any terminal: undecodable bytes as \\xNN, no colour codes, one line."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    return " ".join(text.split("\n")).strip()


def _error(where: str, message: str) -> None:
    # one write: under torchrun (unbuffered) several ranks fail at once, and print's separate writes
    # of the text and the newline would interleave their lines
    sys.stderr.write(f"{where}: error: {_printable(message)}\n")
    sys.stderr.flush()


def _describe_os_error(e: OSError) -> str:
    """One line for an OSError on a path the user gave (reading or writing)."""
    from .files import describe_os_error
    path = _printable(os.fsdecode(e.filename))
    if isinstance(e, FileNotFoundError):
        return f"{path}: no such file or folder"
    if isinstance(e, IsADirectoryError):
        return f"{path}: is a folder, not a file"
    return describe_os_error(path, e)


def _internal_error(where: str) -> int:
    print(f"{where}: internal error (a bug in sparsefeat, not in your input; please report it with the "
          "traceback below)", file=sys.stderr)
    traceback.print_exc()
    return 1


if __name__ == "__main__":
    sys.exit(main())

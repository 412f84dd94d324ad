"""`sparsefeat` command line: a thin face over the Python API.

Options that configure a library call are generated from its dataclass config (`add_config_args`),
so each default lives in exactly one place. Each subcommand is one `Command` subclass; defining the
class registers it. Errors a user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path

from . import __version__
from .errors import SparsefeatError

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


def print_json(obj) -> None:
    from .store import _json_default
    print(json.dumps(obj, indent=2, default=_json_default))


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
            COMMANDS[cls.name] = cls

    def configure(self, p: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int | None:
        raise NotImplementedError


# ---- store, toys, import, inspect (issue 2) ------------------------------------------------
# (section: store)

# ---- sweep (issue 3) -----------------------------------------------------------------------
# (section: sweep)

# ---- harvest (issue 4) ---------------------------------------------------------------------
# (section: harvest)

# ---- count, plot, run (issue 5) ------------------------------------------------------------
# (section: count)


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_command", None):
        parser.print_help()
        return 2
    try:
        code = args._command.run(args)
    except SparsefeatError as e:
        print(f"sparsefeat {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsefeat {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

"""argparse in the house style, shared by ``spmd-lora``, its ``plan`` subcommand and
``tools/profile.py``: one-line usage errors, and every flag's help from one of two tables, the
``TrainConfig`` field table (``spmd_lora.config.fields``) or the table of the other flags
(``spmd_lora.config.cli_flags``)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from ..config.cli_flags import CLI_HELP, cli_help
from ..config.fields import CHOICES, FIELD_HELP, flag
from ..config.train_config import TrainConfig

_FIELD_DEFAULT = object()


class OneLineErrorParser(argparse.ArgumentParser):
    """A usage mistake (unknown flag, bad choice, missing value) prints one ``error:`` line
    naming the command and pointing at ``--help``, instead of the whole usage block; exit 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # "-1e-3" is a value, not a flag: argparse's own pattern misses exponents, and a value
        # it takes for a flag ends in "expected one argument"
        self._negative_number_matcher = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def command_name(parser: argparse.ArgumentParser) -> str:
    """The command a parser reads (``train`` of ``spmd-lora train``, ``profile`` of
    ``tools/profile.py``): the ``COMMAND`` of the help table's ``COMMAND --flag`` keys."""
    return os.path.basename(parser.prog.split()[-1]).removesuffix(".py")


def _with_default(text: str, default, required: bool = False) -> str:
    """The help text with ``(default: ...)`` appended, unless the flag is required, has no
    default (None: the text says what happens without it) or the text already names it."""
    if required or default is None or "default" in text:
        return text
    if isinstance(default, bool):
        return f"{text} (default: {'on' if default else 'off'})"
    return text + " (default: %(default)s)"


def add_field_flag(parser: argparse.ArgumentParser, name: str, *, default=_FIELD_DEFAULT,
                   dest: str | None = None, help_suffix: str = "", required: bool = False,
                   type=None) -> None:
    """The flag of the ``TrainConfig`` field ``name`` (``--kebab-case``): its type from the
    field (or ``type``), its choices and help from ``spmd_lora.config.fields`` (the help
    table's ``COMMAND --flag`` entry instead where the flag means something else in this
    command), its default the field's unless ``default`` is given; ``dest`` renames the
    attribute it sets, ``required`` makes argparse insist on it."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    hint = typing.get_type_hints(TrainConfig)[name]
    if default is _FIELD_DEFAULT:
        default = None if field.default is dataclasses.MISSING else field.default
    text = CLI_HELP.get(f"{command_name(parser)} {flag(name)}", FIELD_HELP[name]) + help_suffix
    kw = {"dest": dest} if dest else {}
    if name == "output_dir":
        parser.add_argument(flag(name), "--output", dest="output_dir", help=text)
    elif hint is bool and field.default:          # on unless --no-NAME
        parser.add_argument(flag(name), default=default, help=_with_default(text, default), **kw,
                            action=argparse.BooleanOptionalAction)
    elif hint is bool:
        parser.add_argument(flag(name), default=default, help=text, action="store_true", **kw)
    elif name == "lora_targets":
        default = default if isinstance(default, str) else ",".join(default)
        parser.add_argument(flag(name), default=default, help=_with_default(text, default), **kw)
    else:
        kind = type or {int: int, float: float, str: str}.get(
            hint, int if "int" in str(hint) else str)
        parser.add_argument(flag(name), type=kind, choices=CHOICES.get(name), default=default,
                            required=required, help=_with_default(text, default, required), **kw)


def add_cli_flag(parser: argparse.ArgumentParser, name: str, *, help_suffix: str = "",
                 **kwargs) -> None:
    """A flag (``--name``) or positional (``name``) that is not a ``TrainConfig`` field, its
    help from ``spmd_lora.config.cli_flags`` (this command's entry, else the general one) with
    its default appended; ``kwargs`` go to ``add_argument``."""
    text = cli_help(command_name(parser), name)
    if text is None:
        raise KeyError(f"{name} has no help in spmd_lora.config.cli_flags.CLI_HELP")
    default = kwargs.get("default")
    bool_flag = kwargs.get("action") in ("store_true", "store_false")
    parser.add_argument(name, help=_with_default(text + help_suffix, None if bool_flag else default,
                                                 kwargs.get("required", False)), **kwargs)

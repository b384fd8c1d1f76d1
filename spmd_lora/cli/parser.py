"""argparse in the house style, shared by ``spmd-lora`` and its ``plan`` subcommand: one-line
usage errors, and flags of ``TrainConfig`` fields built from the field table."""
from __future__ import annotations

import argparse
import dataclasses
import re
import typing
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


def add_field_flag(parser: argparse.ArgumentParser, name: str, *, default=_FIELD_DEFAULT,
                   dest: str | None = None, help_suffix: str = "") -> None:
    """The flag of the ``TrainConfig`` field ``name`` (``--kebab-case``): its type from the
    field, its help and choices from ``spmd_lora.config.fields``, its default the field's
    unless ``default`` is given; ``dest`` renames the attribute it sets."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    hint = typing.get_type_hints(TrainConfig)[name]
    required = field.default is dataclasses.MISSING
    if default is _FIELD_DEFAULT:
        default = field.default
    text = FIELD_HELP[name] + help_suffix
    kw = {"dest": dest} if dest else {}
    if name == "output_dir":
        parser.add_argument(flag(name), "--output", dest="output_dir", help=text)
    elif hint is bool:
        parser.add_argument(flag(name), default=default, help=text, **kw,
                            action=argparse.BooleanOptionalAction if field.default
                            else "store_true")
    elif name == "lora_targets":
        parser.add_argument(flag(name), default=",".join(default), **kw,
                            help=text + " (default: %(default)s)")
    else:
        kind = {int: int, float: float, str: str}.get(hint, int if "int" in str(hint) else str)
        parser.add_argument(flag(name), type=kind,   # required ones are checked by the caller
                            choices=CHOICES.get(name), default=None if required else default,
                            help=text + ("" if required else " (default: %(default)s)"), **kw)

"""argparse in the house error style, shared by ``spmd-lora`` and its ``plan`` subcommand."""
from __future__ import annotations

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """A usage mistake (unknown flag, bad choice, missing value) prints one ``error:`` line
    naming the command and pointing at ``--help``, instead of the whole usage block; exit 2."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")

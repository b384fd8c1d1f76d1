"""The ``spmd-lora`` command line: one parser per subcommand, built from the field table."""
from .commands import build_parser, main

__all__ = ["build_parser", "main"]

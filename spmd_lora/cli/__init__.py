"""The ``spmd-lora`` command line: one parser per subcommand, built from the field table."""
from .commands import main

__all__ = ["main"]

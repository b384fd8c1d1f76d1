"""User-facing error types.

Every mistake a user can make (bad path, malformed data row, a tp that does not divide the
heads, NaN loss) raises a subclass of :class:`SpmdLoraError` with a message that names the
file/field and says what to do. The CLI prints these without a traceback.
"""


class SpmdLoraError(Exception):
    """Base class of errors caused by user input rather than by a bug."""


class ConfigError(SpmdLoraError, ValueError):
    """An invalid model / LoRA / training / mesh configuration."""


class CheckpointError(SpmdLoraError):
    """A missing, malformed or mismatched checkpoint or adapter."""


class DataError(SpmdLoraError, ValueError):
    """A malformed or unusable dataset."""


class TrainingError(SpmdLoraError, RuntimeError):
    """Training cannot continue (e.g. a non-finite loss)."""

"""Run config files: ``spmd-lora train --config run.yaml`` and ``output_dir/config.yaml``.

* :func:`read_config_file` reads a YAML or JSON mapping of ``TrainConfig`` fields (snake_case
  or the flags' kebab-case), checking every key and value type; flags given on the command
  line override it (``cli.py``).
* :func:`write_resolved_config` writes the run's full resolved ``TrainConfig`` to
  ``output_dir/config.yaml`` atomically (temp file + rename).
* :func:`check_resume_config` refuses a ``--resume`` whose config differs from the one saved in
  the checkpoint on a field that changes the results (everything but
  :data:`EXECUTION_ONLY_FIELDS`), naming the field; the data is compared by content digest,
  not by path.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tempfile
import typing
from pathlib import Path

from ..errors import ConfigError
from .train_config import TrainConfig

#: TrainConfig fields that change how a run executes or reports, not what it computes (the
#: mesh, kernels and recomputation give the same math; logging, checkpointing, caching).
class ConfigFileError(ConfigError):
    """A malformed run config file. Its message names the file's keys (TrainConfig field
    names) as written in the file, not as CLI flags."""


EXECUTION_ONLY_FIELDS = frozenset({
    "output_dir", "resume", "log_every", "save_every", "keep_checkpoints", "eval_every",
    "eval_generate",
    "allow_pickle", "tp", "dp", "remat", "attention", "ce_chunk_tokens", "data_cache_dir",
    "data_workers", "data", "sequence_parallel", "mlp_chunk_tokens", "cp", "cp_impl",
    "offload_layers", "host_memory"})


def _fields():
    return {f.name: f for f in dataclasses.fields(TrainConfig)}, typing.get_type_hints(TrainConfig)


def _check_value(path: Path, key: str, value, hint):
    """The value converted to the field's type, or a ConfigFileError naming the key."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigFileError(f"{path}: '{key}' is null; give a value or leave the key out")
    base = next((a for a in args if a is not type(None)), hint) if args and optional else hint

    def bad(what):
        return ConfigFileError(f"{path}: '{key}' must be {what}, got {value!r}")

    if base is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if typing.get_origin(base) is tuple:
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return tuple(value)
    return value


def read_config_file(path) -> dict:
    """The ``TrainConfig`` fields set by a YAML (``.yaml``/``.yml``) or JSON (``.json``) file.

    Raises :class:`ConfigError` naming the file for a missing or unparsable file, a file that
    is not a mapping, an unknown key (with the closest field name) or a value of the wrong type.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigFileError(f"config file not found: {p} (check the --config path)")
    text = p.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigFileError(f"{p}, line {e.lineno}: malformed JSON ({e.msg})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigFileError(f"{p}{where}: malformed YAML ({getattr(e, 'problem', None) or e})"
                          ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigFileError(f"{p}: a config file must be a mapping of TrainConfig fields "
                          f"(key: value), got {type(raw).__name__}")
    fields, hints = _fields()
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigFileError(f"{p}: unknown key '{key}'{hint}; the keys are the TrainConfig "
                              "fields (spmd-lora train --help)")
        out[name] = _check_value(p, str(key), value, hints[name])
    return out


def config_dict(cfg) -> dict:
    """A TrainConfig as plain JSON/YAML values (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def write_resolved_config(out_dir, cfg) -> Path:
    """Write ``out_dir/config.yaml`` (every field, resolved) atomically; returns its path."""
    import yaml

    out = Path(out_dir)
    final = out / "config.yaml"
    fd, tmp = tempfile.mkstemp(prefix=".config.yaml.", dir=out)
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(config_dict(cfg), f, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)        # as the run's other files (mkstemp makes it 0600)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def check_resume_config(saved: dict, cfg, saved_digest: str | None = None,
                        digest: str | None = None) -> None:
    """Refuse to resume when a result-changing field differs from the checkpoint's config.

    ``saved`` is the config stored in the checkpoint; fields it does not have (older
    checkpoints) are not compared. ``saved_digest`` / ``digest``: the data's content digests.
    """
    now = config_dict(cfg)
    for name, value in now.items():
        if name in EXECUTION_ONLY_FIELDS or name not in saved:
            continue
        if json.loads(json.dumps(saved[name])) != value:
            raise ConfigError(f"cannot resume: '{name}' is {value!r} but the checkpoint was made "
                              f"with {saved[name]!r}; resume with the same {name} or start a new "
                              "output_dir")
    if saved_digest and digest and saved_digest != digest:
        raise ConfigError(f"cannot resume: the data ('data' {cfg.data}) differs in content from "
                          "the data the checkpoint was trained on; resume with the same data or "
                          "start a new output_dir")

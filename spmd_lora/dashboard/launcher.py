"""The dashboard's "new run" form: a config file, then ``spmd-lora train`` as a child process.

The form posts a JSON object of ``TrainConfig`` fields and a run name. The name becomes
``NEW_RUNS_DIR/NAME`` (a plain name: letters, digits, ``-``, ``_``, ``.``; never a path), the
fields are validated by ``TrainConfig`` itself (a bad value is a 400 with the same message the
CLI gives), written to ``NAME/train_config.json`` (atomically), and turned into ``spmd-lora
train`` flags (:func:`train_flags`), so the child runs exactly what the file says. Its stdout and
stderr go to ``NAME/train.log``, which the page tails.
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError
from ..reporting import write_json_atomic
from ..config.fields import flag
from ..config.train_config import TrainConfig
from ..tiny import asset_path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def train_flags(cfg) -> list[str]:
    """``spmd-lora train`` flags that reproduce ``cfg`` (fields at their default are left out)."""
    args = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.default is not dataclasses.MISSING and value == field.default:
            continue
        if isinstance(value, bool):                 # only flags that differ from the default
            args.append(flag(field.name) if value else "--no-" + flag(field.name)[2:])
            continue
        if field.name == "lora_targets" and tuple(value) == tuple(field.default):
            continue
        if value is None:
            continue
        text = ",".join(value) if isinstance(value, (tuple, list)) else str(value)
        args += [flag(field.name), text]
    return args


def form_template(run_dirs) -> dict:
    """Settings to prefill the form: the newest given run's (a "run like this one"), else the
    bundled Alpaca sample with a short schedule."""
    for run_dir in reversed(list(run_dirs)):
        try:
            train = json.loads((Path(run_dir) / "run_config.json").read_text())["train"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

        def differs(key, value):
            default = defaults.get(key)
            return tuple(value) != tuple(default) if isinstance(value, list) else value != default

        return {k: v for k, v in train.items() if k in ("model", "data")
                or (k not in ("output_dir", "resume") and differs(k, v))}
    return {"model": "", "data": str(asset_path("alpaca_sample.jsonl")), "template": "alpaca",
            "max_steps": 20, "eval_fraction": 0.1}


def prepare_run(form: dict, new_runs_dir) -> tuple[Path, object]:
    """Validate the form; return (run dir, TrainConfig). Raises ConfigError with a message for
    the page; writes nothing."""
    if not isinstance(form, dict):
        raise ConfigError("the form must post a JSON object")
    name = str(form.get("name", ""))
    if not NAME_RE.match(name) or name in (".", ".."):
        raise ConfigError(f"run name {name!r} must be a plain name (letters, digits, - _ .), "
                          "not a path")
    fields = form.get("config")
    if not isinstance(fields, dict):
        raise ConfigError("config must be a JSON object of train settings")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "output_dir" in fields:
        raise ConfigError("output_dir is set by the run name; leave it out")
    run_dir = Path(new_runs_dir).resolve() / name
    if run_dir.exists():
        raise ConfigError(f"{run_dir} already exists; choose another run name")
    try:
        cfg = TrainConfig(**fields, output_dir=str(run_dir))
    except TypeError as e:
        raise ConfigError(f"config: {e}") from None
    for key in ("model", "data"):
        if not Path(getattr(cfg, key)).exists():
            raise ConfigError(f"{key} {getattr(cfg, key)!r} not found (paths are on the "
                              f"dashboard's machine)")
    return run_dir, cfg


def launch(run_dir: Path, cfg) -> subprocess.Popen:
    """Write ``train_config.json`` and start ``spmd-lora train`` with its stdout/stderr in
    ``train.log``."""
    run_dir.mkdir(parents=True)
    write_json_atomic(run_dir / "train_config.json", dataclasses.asdict(cfg))
    cmd = [sys.executable, "-m", "spmd_lora", "train", *train_flags(cfg)]
    log = open(run_dir / "train.log", "wb")
    log.write(("$ spmd-lora train " + " ".join(cmd[4:]) + "\n").encode())
    log.flush()
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    finally:
        log.close()

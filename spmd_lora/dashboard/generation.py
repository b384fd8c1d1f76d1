"""The dashboard's prompt box: a completion from a run's adapter, via ``spmd-lora generate``.

The run's ``run_config.json`` names the base model, mesh, dtype and template; the adapter is
the run's final ``adapter/``. Generation runs as a child process (the dashboard itself never
loads a model, so it stays light while training runs next to it), one prompt at a time.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError

MAX_PROMPT_CHARS = 4000


def generate_command(run_dir: Path, prompt: str, max_new_tokens: int = 48) -> list[str]:
    """The ``spmd-lora generate`` command line for ``prompt`` on this run's adapter."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("prompt must be a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ConfigError(f"prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    if not 1 <= int(max_new_tokens) <= 512:
        raise ConfigError("max_new_tokens must be in 1..512")
    try:
        train = json.loads((run_dir / "run_config.json").read_text())["train"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{run_dir} has no run_config.json; cannot tell which model it "
                          f"trained") from None
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir} has no adapter yet; generation uses the run's final "
                          f"adapter/")
    cmd = [sys.executable, "-m", "spmd_lora", "generate", "--model", train["model"],
           "--adapter", str(run_dir / "adapter"), "--tp", str(train["tp"]), "--dp", "1",
           "--dtype", train["dtype"], "--max-new-tokens", str(int(max_new_tokens)),
           "--prompt", prompt]
    if train.get("template") in ("alpaca", "rag"):
        cmd += ["--template", train["template"]]
    return cmd


def generate(run_dir: Path, prompt: str, max_new_tokens: int = 48, timeout: float = 600) -> dict:
    """{"completion": text} or {"error": the child's error line}."""
    cmd = generate_command(run_dir, prompt, max_new_tokens)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"generation took longer than {timeout:.0f} s"}
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        errors = [line for line in p.stderr.splitlines() if line.strip()]
        return {"error": (errors or [f"exit code {p.returncode}"])[-1]}
    return {"completion": json.loads(lines[-1])["completion"]}

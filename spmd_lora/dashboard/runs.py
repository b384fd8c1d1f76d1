"""What the dashboard knows about one run directory, read fresh on every request.

A run directory is what ``spmd-lora train`` writes: ``metrics.jsonl`` (appended while it
trains), ``run_config.json``, optional ``census.json``, ``checkpoints/step_N/``, ``adapter/``,
``loss.png`` and, for runs started from the dashboard, ``train.log``. Any of them may be missing
(a run that has not started yet, or that is still writing its first step): the summary then
carries a ``message`` saying so instead of failing. A run directory that does not exist (not
created yet, or deleted while the dashboard runs) has status ``missing`` and a summary that
says only that (``exists: false``), not what else is absent.
"""
from __future__ import annotations

import codecs
import json
import shlex
import time
from pathlib import Path

from ..reporting import read_metrics

#: a run whose metrics changed this recently (seconds) counts as running
LIVE_SECONDS = 120


def display_name(run_dir: Path) -> str:
    """``parent/name``: runs are often all called ``run`` (``spmd_lora_demo/run``)."""
    return f"{run_dir.parent.name}/{run_dir.name}"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def checkpoints_on_disk(run_dir: Path) -> list[dict]:
    root = run_dir / "checkpoints"
    found = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit():
                size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                found.append({"name": d.name, "step": int(d.name[5:]), "bytes": size,
                              "mtime": d.stat().st_mtime})
    return sorted(found, key=lambda c: c["step"])


def run_status(run_dir: Path, child_running: bool = False) -> str:
    metrics = run_dir / "metrics.jsonl"
    if child_running:
        return "running"
    if not run_dir.exists():
        return "missing"
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return "finished"
    if not metrics.is_file():
        return "no metrics yet"
    return "running" if time.time() - metrics.stat().st_mtime < LIVE_SECONDS else "stopped"


def export_commands(run_dir: Path, train: dict | None) -> list[dict]:
    """For a run whose adapter is written: the ``spmd-lora export`` command lines that take it
    elsewhere (a merged HF checkpoint for transformers / vLLM, a GGUF of the merged model and a
    GGUF LoRA adapter for llama.cpp / Ollama), each ``{"what", "command"}``; [] before that."""
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file() or not (train or {}).get("model"):
        return []
    quant = train.get("base_quant", "none")
    common = ["--model", train["model"], "--adapter", str(adapter)] + (
        ["--base-quant", quant] if quant != "none" else [])
    lines = [("merged HF checkpoint (transformers, vLLM)", [], run_dir / "merged"),
             ("merged model as GGUF (llama.cpp, Ollama, LM Studio)",
              ["--format", "gguf", "--outtype", "f16"], run_dir / "model-f16.gguf"),
             ("the adapter alone as GGUF LoRA (llama-cli --lora, Ollama ADAPTER)",
              ["--format", "gguf-lora"], run_dir / "adapter.gguf")]
    return [{"what": what, "command": shlex.join(["spmd-lora", "export", *common, *extra,
                                                  "--output", str(out)])}
            for what, extra, out in lines]


def summary(run_dir, child_running: bool = False) -> dict:
    """Everything but the metric rows: status, message, config, mesh, memory, census,
    checkpoints; for a run directory that does not exist, only that."""
    run_dir = Path(run_dir)
    status = run_status(run_dir, child_running)
    if not run_dir.exists():
        return {"path": str(run_dir), "name": display_name(run_dir), "status": status,
                "exists": False,
                "message": f"run directory {run_dir} does not exist (yet); the page fills in "
                           f"when training writes to it"}
    message = None
    if not (run_dir / "metrics.jsonl").is_file():
        message = (f"no metrics yet in {run_dir}: training writes metrics.jsonl after its first "
                   f"step (is this a training output directory?)")
    run_config = _read_json(run_dir / "run_config.json")
    census = _read_json(run_dir / "census.json")
    rows = read_metrics(run_dir)
    peaks = [r["peak_bytes"] for r in rows if "peak_bytes" in r]
    memory = {
        "compiled_step": (census or {}).get("memory_per_device") or None,
        "measured_peak_bytes": max(peaks) if peaks else None,
    }
    return {
        "path": str(run_dir), "name": display_name(run_dir), "status": status, "exists": True,
        "message": message,
        "config": (run_config or {}).get("train"),
        "model": (run_config or {}).get("model"),
        "mesh": (run_config or {}).get("mesh"),
        "data": (run_config or {}).get("data"),
        "total_steps": (run_config or {}).get("total_steps"),
        "memory": memory,
        "census": None if census is None else {
            "summary": census.get("summary"), "measured": census.get("measured"),
            "rows": census.get("census"), "compile_s": census.get("compile_s"),
            "backend": census.get("backend")},
        "checkpoints": checkpoints_on_disk(run_dir),
        "adapter": (run_dir / "adapter").is_dir(),
        "export_commands": export_commands(run_dir, (run_config or {}).get("train")),
        "eval_samples": latest_eval_samples(run_dir),
        "loss_png": (run_dir / "loss.png").is_file(),
    }


def latest_eval_samples(run_dir: Path) -> dict | None:
    """The newest evaluation of ``run_dir/eval_samples.jsonl`` (``--eval-generate``): ``{"step",
    "samples": [{"question", "generated", "reference"}, ...]}``; None without one (a line cut
    by a writer, or not JSON, is skipped)."""
    path = Path(run_dir) / "eval_samples.jsonl"
    if not path.is_file():
        return None
    for line in reversed(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("samples"), list):
            return {"step": row.get("step"), "samples": row["samples"]}
    return None


def read_log(run_dir, offset: int = 0, limit: int = 65536) -> dict:
    """Bytes of ``run_dir/train.log`` from ``offset`` (at most ``limit``), as text ending on a
    whole character: the bytes of a character cut by ``limit`` (or still being written) are
    left for the next read, which ``next`` points at."""
    path = Path(run_dir) / "train.log"
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read(limit)
    except FileNotFoundError:
        return {"text": "", "next": offset, "exists": False}
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    text = decoder.decode(chunk, final=False)
    held = len(decoder.getstate()[0])                  # a partial character at the end
    return {"text": text, "next": offset + len(chunk) - held, "exists": True}

"""What a training run writes besides the adapter and checkpoints, for people to look at.

* ``run_config.json``: the resolved ``TrainConfig``, the model config, the mesh and the dataset
  sizes, written once at start-up (the dashboard shows it).
* ``census.json`` (``census=True``, the default; ``--no-census`` skips it): the compiled train
  step's collective census (``spmd_lora.analysis.hlo``, the same rows as ``tools/profile.py``) and XLA's
  per-device memory analysis. The step is lowered and compiled on the first step's inputs just
  before that step runs; JAX's compilation cache then serves the step itself, so this adds no
  compile, only the HLO parse (see docs/benchmarks.md). A census that cannot be taken is a note,
  never a failed run.
* TensorBoard event files under ``tensorboard/`` (``report_to="tensorboard"``, needs the
  ``tensorboard`` extra: tensorboardX).
* ``peak_bytes`` in each metrics line where the device reports it (GPUs; CPUs do not).

:func:`read_metrics` reads ``metrics.jsonl`` back, also while a run is appending to it.

Every JSON file is written atomically (temporary file + rename).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .errors import ConfigError
from .paths import write_text_atomic
from .analysis import hlo


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` (temporary file + rename)."""
    write_text_atomic(path, json.dumps(obj, indent=1, default=str))


def read_metrics(run_dir, since: int = 0) -> list[dict]:
    """Metric rows of ``run_dir/metrics.jsonl`` from row index ``since`` on. A last line still
    being written (no newline yet, or not valid JSON) is left for the next read."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        return []
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]                      # the line being written
    rows = []
    for line in lines:
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows[since:]


def check_report_to(report_to: str) -> None:
    """Fail before anything is written when the requested logger is not installed."""
    if report_to == "tensorboard":
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise ConfigError("--report-to tensorboard needs tensorboardX: "
                              "pip install 'spmd_lora[tensorboard]'") from None


def write_run_config(out: Path, cfg, model_cfg, mesh, n_train: int, n_eval: int,
                     total_steps: int) -> None:
    write_json_atomic(out / "run_config.json", {
        "train": dataclasses.asdict(cfg),
        "model": dataclasses.asdict(model_cfg),
        "mesh": {"axes": dict(mesh.shape), "devices": [str(d) for d in mesh.devices.flat],
                 "platform": mesh.devices.flat[0].platform},
        "data": {"train_examples": n_train, "eval_examples": n_eval},
        "total_steps": total_steps,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def write_census(out: Path, step_fn, args, mesh, lora_rank: int, note=print) -> dict | None:
    """Compile ``step_fn`` on ``args`` (the real first step's inputs; the step's own call then
    reuses this executable) and write its collective census and per-device memory analysis to
    ``out/census.json``. Returns the census, or None after a ``note`` when it cannot be taken."""
    t0 = time.perf_counter()
    lowered = step_fn.lower(*args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    try:
        census = hlo.collective_census(compiled, mesh, lowered)
    except Exception as e:                   # noqa: BLE001 - a census is never worth a failed run
        note(f"note: census.json skipped: the compiled step's HLO could not be read ({e})")
        return None
    parse_s = time.perf_counter() - t0 - compile_s
    mem = compiled.memory_analysis()
    memory = {}
    if mem is not None:
        memory = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
                  ("argument", "output", "alias", "temp")}
        memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    result = {"census": census, "summary": hlo.summarize(census),
              "measured": hlo.measured(census, lora_rank), "memory_per_device": memory,
              "compile_s": round(compile_s, 2), "census_s": round(parse_s, 2),
              "backend": mesh.devices.flat[0].platform}
    write_json_atomic(out / "census.json", result)
    return result


def device_peak_bytes(mesh) -> int | None:
    """Largest peak memory in use over the mesh's devices on this process, when the backend
    reports it (GPUs do; the CPU backend does not)."""
    import jax
    return peak_bytes_in_use([d for d in mesh.devices.flat if d.process_index == jax.process_index()])


def peak_bytes_in_use(devices) -> int | None:
    peaks = []
    for d in devices:
        stats = d.memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


class MetricsReporter:
    """Appends metric dicts to ``metrics.jsonl`` and, if asked, to TensorBoard."""

    def __init__(self, metrics_file, out: Path, report_to: str = "none"):
        self.file = metrics_file
        self.tb = None
        if report_to == "tensorboard":
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))

    def log(self, entry: dict) -> None:
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{'eval' if key.startswith('eval') else 'train'}/{key}",
                                       value, entry["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

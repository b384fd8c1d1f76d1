"""``loss.png`` of a run: train loss per step and eval loss, from ``metrics.jsonl``.

Written at the end of training and by ``spmd-lora plot RUN_DIR``. matplotlib is an optional
extra (``pip install 'spmd_lora[plot]'``): without it the plot is skipped with a note, never an
error. The PNG is written atomically (temporary file + rename).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import ConfigError
from .reporting import read_metrics


def _stderr_note(text: str) -> None:
    print(text, file=sys.stderr)


def write_loss_plot(run_dir, output=None, note=_stderr_note) -> Path | None:
    """Plot ``run_dir/metrics.jsonl`` to ``output`` (default ``run_dir/loss.png``; its directory
    is created). Returns the path, or None (with a ``note``) when matplotlib is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir} (check the RUN_DIR path)")
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (is it a training output directory?)")
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        raise ConfigError(f"{run_dir / 'metrics.jsonl'} holds no loss yet; plot it once a step "
                          f"has finished")
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        note("note: loss.png skipped: matplotlib is not installed "
             "(pip install 'spmd_lora[plot]')")
        return None

    out = Path(output) if output else run_dir / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#3b6fb6", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#d9822b", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title(f"{run_dir.resolve().parent.name}/{run_dir.resolve().name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out

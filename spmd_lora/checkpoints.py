"""Atomic, resumable training checkpoints.

``<output_dir>/checkpoints/step_N/`` holds ``lora.safetensors`` (LoRA factors), ``optimizer.npz``
(optimizer state leaves, in tree order), ``state.json`` (step, data position, RNG seed, config
echo). Each is written into a temporary directory that is renamed into place only when complete,
so a run killed at any moment leaves either the previous checkpoints or a complete new one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from .errors import CheckpointError
from .parallel.placement import replicated_to_host
from .runtime.distributed import agree

STEP_DIR = re.compile(r"^step_(\d+)$")


def _flatten(tree) -> dict[str, np.ndarray]:
    paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): replicated_to_host(v) for p, v in paths}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_dir(final: Path, fill) -> Path:
    """Create ``final`` by calling ``fill(tmp_dir)`` on a sibling temp dir, then renaming it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{final.name}_", dir=final.parent))
    try:
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(ckpt_root: Path, step: int, lora, opt_state, state: dict, keep: int) -> Path:
    """Write checkpoints/step_<step> atomically and keep only the newest ``keep``. Only process 0
    writes (LoRA and optimizer state are replicated); the others return the path."""
    lora_host = _flatten(lora)
    opt_host = [replicated_to_host(x) for x in jax.tree.leaves(opt_state)]
    if jax.process_index() != 0:
        return Path(ckpt_root) / f"step_{step}"

    def fill(tmp: Path):
        save_file(lora_host, str(tmp / "lora.safetensors"))
        np.savez(tmp / "optimizer.npz", *opt_host)
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))

    path = write_atomic_dir(Path(ckpt_root) / f"step_{step}", fill)
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of interrupted writes are ignored)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, lora_template, opt_state_template):
    """(lora, opt_state, state dict) restored into the structure of the given templates."""
    path = Path(path)
    try:
        flat = load_file(str(path / "lora.safetensors"))
        state = json.loads((path / "state.json").read_text())
        with np.load(path / "optimizer.npz") as z:
            opt_leaves = [z[f"arr_{i}"] for i in range(len(z.files))]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e}); delete it to resume from an "
                              f"older one") from None
    paths, treedef = jax.tree_util.tree_flatten_with_path(lora_template)
    missing = [jax.tree_util.keystr(p) for p, _ in paths if jax.tree_util.keystr(p) not in flat]
    if missing:
        raise CheckpointError(f"{path}: LoRA tensors {missing[:3]} missing: the checkpoint was made "
                              f"with different lora_targets/model; start a fresh output dir")
    for p, t in paths:
        if flat[jax.tree_util.keystr(p)].shape != t.shape:
            raise CheckpointError(f"{path}: LoRA tensor {jax.tree_util.keystr(p)} has shape "
                                  f"{flat[jax.tree_util.keystr(p)].shape}, expected {t.shape} "
                                  f"(different lora_rank or model?)")
    lora = jax.tree.unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths])
    opt_def = jax.tree.structure(opt_state_template)
    if opt_def.num_leaves != len(opt_leaves):
        raise CheckpointError(f"{path}: optimizer state does not match this configuration")
    opt_state = jax.tree.unflatten(opt_def, opt_leaves)
    return lora, opt_state, state


def agreed_checkpoints(ckpt_root: Path) -> list[Path]:
    """:func:`list_checkpoints`, checked to be the same on every process of a multi-process
    run (one string per process through ``distributed.agree``, a barrier): a process that sees
    a different newest checkpoint (or none) than process 0 would resume from another state,
    so every process raises the same CheckpointError instead."""
    found = list_checkpoints(ckpt_root)
    views = agree(found[-1].name if found else "")
    for rank, view in enumerate(views):
        if view != views[0]:
            what = lambda v: f"checkpoint {v}" if v else "no checkpoint"
            raise CheckpointError(
                f"process {rank} sees {what(view)} in {ckpt_root} but process 0 sees "
                f"{what(views[0])}; every process must see the same output directory: put "
                f"output_dir on a file system all hosts share (same path), then resume")
    return found

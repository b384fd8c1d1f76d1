"""Atomic, verified, resumable training checkpoints.

``<output_dir>/checkpoints/step_N/`` holds ``lora.safetensors`` (LoRA factors), ``optimizer.npz``
(optimizer state leaves, in tree order), ``state.json`` (step, data position, RNG seed, config
echo) and, written last, ``manifest.json``: every other file's size and sha256. Each is
written into a temporary directory that is renamed into place only when complete, so a run
killed at any moment leaves either the previous checkpoints or a complete new one; the
manifest catches what happens to the files afterwards (a truncated copy, a flipped byte).
``--resume`` takes the newest checkpoint that verifies and loads (:func:`resume_checkpoint`),
saying which newer ones it skipped and why; every process of a run takes the same one.
"""
from __future__ import annotations

import hashlib
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
MANIFEST = "manifest.json"
CHECKPOINT_FILES = ("lora.safetensors", "optimizer.npz", "state.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
                 for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))

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
    except Exception as e:  # noqa: BLE001 - safetensors, zipfile and json each raise their own
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); delete it to resume "
                              f"from an older one") from None
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


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint ``path`` cannot be trusted (a missing, unreadable or mismatched
    manifest, a missing file, a size or sha256 that differs from the manifest's), or None when
    every file is as its manifest says."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the checkpoint was not finished, or is older than manifests)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    for name in CHECKPOINT_FILES:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want.get("size"):
            return f"{name} has {size} bytes, the manifest says {want.get('size')}"
        if _sha256(f) != want.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def remove_stale_temporaries(ckpt_root: Path) -> list[Path]:
    """Remove the ``.tmp_*`` directories that interrupted checkpoint writes left in
    ``ckpt_root`` (process 0 only; call it before any checkpoint is written). Returns them."""
    root = Path(ckpt_root)
    if jax.process_index() != 0 or not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(".tmp_") and p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def resume_checkpoint(ckpt_root: Path, lora_template, opt_state_template, say=None):
    """The newest checkpoint in ``ckpt_root`` that verifies (:func:`verify_checkpoint`) and
    loads: (path, lora, opt_state, state), or None when there is no checkpoint at all. Each newer
    one that fails is reported through ``say(text)`` with the reason. Every process of a
    multi-process run must take the same one (else each raises the same CheckpointError, see
    :func:`agreed_checkpoints`); CheckpointError when checkpoints exist but none can be used."""
    found = agreed_checkpoints(ckpt_root)
    skipped, chosen = [], None
    for path in reversed(found):
        reason = verify_checkpoint(path)
        if reason is None:
            try:
                chosen = (path, *load_checkpoint(path, lora_template, opt_state_template))
            except CheckpointError as e:
                reason = str(e).split(": ", 1)[-1]
        if chosen:
            break
        skipped.append(f"{path.name}: {reason}")
        if say:
            say(f"checkpoint {path} skipped: {reason}")
    views = agree(chosen[0].name if chosen else "")
    if any(v != views[0] for v in views):
        raise CheckpointError(f"the processes of this run would resume from different "
                              f"checkpoints in {ckpt_root} ({', '.join(v or 'none' for v in views)} "
                              f"by rank); every process must see the same files")
    if found and chosen is None:
        raise CheckpointError(f"no checkpoint in {ckpt_root} can be resumed from: "
                              f"{'; '.join(skipped)}. Delete the damaged ones, or start a "
                              f"fresh output_dir")
    return chosen

"""Verified checkpoints (issue 26, item 1): each checkpoint's manifest lists every file's size
and sha256; ``--resume`` takes the newest checkpoint that verifies, says which it skipped and
why, and resumes bit-identically to an uninterrupted run."""
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from spmd_lora import checkpoints
from spmd_lora.errors import CheckpointError
from spmd_lora.tiny import asset_path, build_tiny_llama
from spmd_lora.train import TrainConfig, train

LORA = {"layers": {"q_proj": {"A": jnp.arange(12.0).reshape(3, 4), "B": jnp.ones((4, 3))}}}
OPT = (jnp.zeros(3), {"mu": jnp.arange(5.0)})
FILES = ("lora.safetensors", "optimizer.npz", "state.json", "manifest.json")


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def two_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        checkpoints.save_checkpoint(root, step, LORA, OPT, {"data": {"epoch": 0}}, keep=2)
    return root


def test_manifest_lists_every_file(two_checkpoints):
    step4 = two_checkpoints / "step_4"
    manifest = json.loads((step4 / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(FILES[:3]) and manifest["step"] == 4
    for name, entry in manifest["files"].items():
        assert entry["size"] == (step4 / name).stat().st_size and len(entry["sha256"]) == 64
    assert checkpoints.verify_checkpoint(step4) is None


@pytest.mark.parametrize("damage", [_truncate, _flip])
@pytest.mark.parametrize("name", FILES)
def test_resume_skips_a_damaged_checkpoint(two_checkpoints, name, damage):
    damage(two_checkpoints / "step_4" / name)
    said = []
    path, lora, opt, state = checkpoints.resume_checkpoint(two_checkpoints, LORA, OPT, said.append)
    assert path.name == "step_2" and state["step"] == 2
    np.testing.assert_array_equal(lora["layers"]["q_proj"]["A"], LORA["layers"]["q_proj"]["A"])
    assert len(said) == 1 and "step_4" in said[0] and "skipped" in said[0], said
    if name != "manifest.json":
        assert name in said[0], said


def test_no_usable_checkpoint_is_one_error(two_checkpoints):
    _truncate(two_checkpoints / "step_4" / "lora.safetensors")
    (two_checkpoints / "step_2" / "manifest.json").unlink()
    (two_checkpoints / "step_2" / "optimizer.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be resumed from: "
                                              r"step_4: lora.safetensors .*; step_2: "):
        checkpoints.resume_checkpoint(two_checkpoints, LORA, OPT)
    assert checkpoints.resume_checkpoint(two_checkpoints.parent / "none", LORA, OPT) is None


def test_a_checkpoint_without_manifest_still_loads_when_intact(two_checkpoints):
    """Checkpoints written before manifests existed: loaded when their files load."""
    (two_checkpoints / "step_4" / "manifest.json").unlink()
    said = []
    path, *_ = checkpoints.resume_checkpoint(two_checkpoints, LORA, OPT, said.append)
    assert path.name == "step_2" and "no manifest.json" in said[0]


def test_stale_temporaries_are_removed(two_checkpoints):
    stale = two_checkpoints / ".tmp_step_6_abc"
    stale.mkdir()
    (stale / "lora.safetensors").write_bytes(b"half")
    assert checkpoints.remove_stale_temporaries(two_checkpoints) == [stale]
    assert not stale.exists() and (two_checkpoints / "step_4").is_dir()


def test_resume_past_a_corrupted_checkpoint_is_bit_identical(tmp_path):
    """A 6-step run with checkpoints at 2, 4, 6; a byte of step_6's LoRA flipped; --resume
    skips step_6, resumes at step 4, and its final adapter equals the uninterrupted run's bit
    for bit."""
    model = build_tiny_llama(tmp_path / "tiny", num_hidden_layers=1)
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(model), data=str(asset_path("alpaca_sample.jsonl")),
                      output_dir=str(out), template="alpaca", max_seq_len=128, lora_rank=4,
                      lora_dropout=0.1, learning_rate=3e-3, batch_size=2, max_steps=6,
                      save_every=2, keep_checkpoints=3, seed=3)
    train(cfg)
    first = load_file(out / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(out / "adapter")
    _flip(out / "checkpoints" / "step_6" / "lora.safetensors")
    import io
    log = io.StringIO()
    train(TrainConfig(**{**cfg.__dict__, "resume": True}), progress_stream=log)
    assert "resumed at step 4" in log.getvalue() and "step_6 skipped" in log.getvalue()
    second = load_file(out / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert checkpoints.verify_checkpoint(out / "checkpoints" / "step_6") is None   # rewritten

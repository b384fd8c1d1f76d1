"""The device temporaries' peak from an XLA dump (spmd_lora.analysis.buffers) on a tiny CPU
program: XLA:CPU writes the same buffer assignment and live-range files as XLA:GPU (the train
step's GPU checks are in test_gpu_compile.py)."""
import jax
import jax.numpy as jnp
import pytest

from spmd_lora.analysis import buffers
from spmd_lora.errors import ConfigError


def _step(x, w):
    with jax.named_scope("mlp"):
        h = jnp.tanh(x @ w)
    with jax.named_scope("lm_head"):
        return (h @ w.T).sum()


def test_cpu_dump_peak_matches_memory_analysis(tmp_path):
    lowered = jax.jit(jax.grad(_step)).lower(jax.ShapeDtypeStruct((256, 512), jnp.float32),
                                             jax.ShapeDtypeStruct((512, 512), jnp.float32))
    compiled = lowered.compile(buffers.dump_options(str(tmp_path)))
    peak = buffers.read_peak(str(tmp_path), module="jit__step")
    assert peak.platform == "cpu"
    assert peak.temp_bytes == compiled.memory_analysis().temp_size_in_bytes
    assert sum(b.size for b in peak.buffers) == peak.peak_bytes <= peak.temp_bytes
    assert all(b.shape == "f32[256,512]" for b in peak.buffers)
    assert any("mlp" in b.scope for b in peak.buffers), [b.scope for b in peak.buffers]
    d = peak.to_dict(top=1)
    assert d["buffers_listed"] == 1 and d["buffers_live"] == len(peak.buffers)
    lines = buffers.format_peak(d)
    assert lines[0].startswith("device buffers live at the peak (XLA:CPU buffer assignment)")


def test_compile_with_buffers_and_missing_dump(tmp_path):
    lowered = jax.jit(lambda x: jnp.sin(x) @ x).lower(jax.ShapeDtypeStruct((64, 64), jnp.float32))
    compiled, peak = buffers.compile_with_buffers(lowered)
    assert peak.temp_bytes == compiled.memory_analysis().temp_size_in_bytes
    with pytest.raises(ConfigError, match="no XLA buffer assignment dump"):
        buffers.read_peak(str(tmp_path))


@pytest.mark.parametrize("op_name,short", [
    ("jit(step)/while/body/closed_call/transpose(jvp())/while/body/closed_call/checkpoint/"
     "layer/checkpoint/rematted_computation/mlp/dot_general", "remat layer/mlp/dot_general"),
    ("jit(step)/while/body/closed_call/jvp(loss)/while/body/closed_call/lm_head/nd,dv->nv/"
     "dot_general", "fwd loss/lm_head/dot_general"),
    ("jit(step)/while/body/closed_call/transpose(jvp())/while/body/closed_call/checkpoint/"
     "layer/checkpoint/attention/spmd_lora_flash_dkv/pallas_call",
     "bwd layer/attention/spmd_lora_flash_dkv"),
    ("jit(step)/div", "div"),
    ("", ""),
])
def test_short_scope(op_name, short):
    assert buffers.short_scope(op_name) == short

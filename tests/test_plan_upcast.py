"""The plan's CPU-upcast allowance follows what the compiled program does (issue #13).

jaxlib 0.10's XLA:CPU compiles every bf16 matmul as an f32 dot on converted operands (so a CPU
plan holds f32 weight copies a GPU compile does not); jaxlib 0.12's runs them natively in bf16.
The allowance must be > 0 exactly when the compiled program has no 16-bit dot.
"""
import jax
import pytest

from spmd_lora.analysis import plan
from spmd_lora.config.model_config import ModelConfig
from spmd_lora.config.lora_config import LoraConfig

F32_DOT = ("  ROOT %dot.280 = f32[64,8]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, "
           "rhs_contracting_dims={0}")
BF16_DOT = ("  ROOT %dot.294 = bf16[256,8]{1,0} dot(%param_0, %param_1), "
            "lhs_contracting_dims={1}, rhs_contracting_dims={0}")


def test_upcasts_matmuls_reads_dot_dtypes():
    assert plan.upcasts_matmuls(F32_DOT)
    assert not plan.upcasts_matmuls(F32_DOT + "\n" + BF16_DOT)
    assert not plan.upcasts_matmuls(BF16_DOT.replace("bf16", "f16"))


def test_tiny_plan_allowance_matches_compiled_program():
    cfg = ModelConfig(vocab_size=1000, hidden_size=192, intermediate_size=640, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=48)
    p = plan.plan_memory(cfg, tp=2, max_seq_len=128, lora=LoraConfig(rank=8, targets="all"),
                         dtype="bfloat16", attention="blockwise")
    version = tuple(int(x) for x in jax.__version__.split(".")[:2])
    if version <= (0, 10):
        assert p["cpu_upcast_allowance"] > 0         # XLA:CPU 0.10: f32 dots only
    elif version >= (0, 12):
        assert p["cpu_upcast_allowance"] == 0        # XLA:CPU 0.12: native bf16 dots
    else:
        pytest.skip(f"no recorded expectation for jax {jax.__version__}")
    assert p["peak_gpu_estimate"] == p["peak"] - p["cpu_upcast_allowance"]

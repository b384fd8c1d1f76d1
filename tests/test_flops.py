"""The FLOP formula of a train step (spmd_lora/flops.py) against an independent count: the
dot_general equations of the differentiated program, and a hand count."""
import jax
import jax.numpy as jnp
import pytest

from spmd_lora.analysis import flops
from spmd_lora.engine import sharded
from spmd_lora.config.model_config import ModelConfig
from spmd_lora.config.lora_config import LoraConfig
from spmd_lora.weights.lora import init_lora
from spmd_lora.parallel.mesh import make_mesh
from spmd_lora.model import ForwardOptions
from spmd_lora.weights.shapes import random_params

CFG = ModelConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=32)
S = 64


def _program_flops(remat, ce_chunk_tokens, targets, rank=4, rows=1):
    lc = LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
    mesh = make_mesh(1, 1)
    params = random_params(CFG, mesh, "float32")
    lora = init_lora(CFG, lc, jax.random.key(0))
    batch = {"tokens": jnp.zeros((rows, S), jnp.int32),
             "loss_mask": jnp.ones((rows, S), jnp.int32)}
    opts = ForwardOptions(cfg=CFG, tp=1, lora=lc, attention_impl="xla", remat=remat,
                          ce_chunk_tokens=ce_chunk_tokens)
    loss = sharded.loss_sum_fn(opts, mesh)
    jaxpr = jax.make_jaxpr(jax.grad(lambda lp: loss(params, lp, batch)[0]))(lora)
    return flops.jaxpr_matmul_flops(jaxpr), lc


@pytest.mark.parametrize("remat,ce_chunk_tokens,targets,rows", [
    ("none", 4096, "all", 1),
    ("none", 32, "all", 2),             # chunked CE: nothing recomputed (fused CE)
    ("full", 4096, "all", 1),
    ("full", 32, ("q_proj", "v_proj"), 1),
    ("save-dots", 4096, ("o_proj", "down_proj"), 1),
    ("save-dots", 4096, ("v_proj",), 1),   # no LoRA on o_proj: P V not recomputed
    ("offload", 4096, "all", 1),
    ("offload", 4096, ("v_proj",), 1),
    ("offload-input", 4096, "all", 1),
    ("offload-input", 32, ("q_proj", "down_proj"), 2),
])
def test_hardware_flops_match_the_program(remat, ce_chunk_tokens, targets, rows):
    counted, lc = _program_flops(remat, ce_chunk_tokens, targets, rows=rows)
    expected = flops.step_flops(CFG, S, rows, lora_rank=lc.rank, lora_targets=lc.targets,
                                remat=remat, attention="xla")
    assert counted == expected.hardware, (counted, expected.as_dict())


def test_useful_flops_hand_count():
    # 2 layers, D=128, F=344, 4 heads x 32 (2 kv heads), V=1000, S=64, r=4 on q and down.
    t = 64
    w = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 344
    linears = 2 * (2 * t * w + 2 * t * w)                 # forward + input gradient
    head = 2 * t * 128 * 1000 * 2
    lora = 2 * 6 * t * 4 * ((128 + 128) + (344 + 128))
    attn = 2 * 3.5 * (2 * 2 * 64 * 64 * 32 * 4 / 2)       # (QK + PV) causal half, x 3.5
    f = flops.step_flops(CFG, S, lora_rank=4, lora_targets=("q_proj", "down_proj"),
                         attention="causal")
    assert f.useful == linears + head + lora + attn
    assert f.hardware == f.useful                       # nothing recomputed, exact triangle
    # blockwise in one block computes the whole square (twice the triangle), 3.5x over
    b = flops.step_flops(CFG, S, lora_rank=4, lora_targets=("q_proj", "down_proj"),
                         attention="blockwise", block_q=64, block_k=64)
    assert b.hardware - b.useful == attn


@pytest.mark.parametrize("s,bq,bk", [(2048, 256, 256), (2048, 512, 256), (1000, 256, 512),
                                     (300, 128, 128), (64, 64, 64)])
def test_causal_tiles_match_the_kernel_loop_bounds(s, bq, bk):
    # spmd_lora/kernels/_masks.py key_spans (the blockwise tile loop): q block i visits k blocks
    # [0, min(cdiv(i*bq + bq, bk), nk)) over the sequence padded to a multiple of lcm(bq, bk).
    import math
    lcm = bq * bk // math.gcd(bq, bk)
    pad = -(-s // lcm) * lcm
    nq, nk = pad // bq, pad // bk
    visited = sum(min(-(-(i * bq + bq) // bk), nk) for i in range(nq))
    # the formula pads to whole blocks only; with lcm padding the extra q blocks are all-pad
    expected = flops.causal_tiles(s, bq, bk)
    extra = sum(min(-(-(i * bq + bq) // bk), nk) for i in range(-(-s // bq), nq))
    assert visited - extra == expected


def test_counter_refuses_while_loops():
    jaxpr = jax.make_jaxpr(lambda x: jax.lax.while_loop(lambda c: c[0] < 3,
                                                        lambda c: (c[0] + 1, c[1] @ c[1]),
                                                        (0, x)))(jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="while"):
        flops.jaxpr_matmul_flops(jaxpr)

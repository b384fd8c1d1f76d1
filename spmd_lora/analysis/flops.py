"""FLOPs of a LoRA train step: the useful work, and what a given configuration really computes.

Counted are matrix-multiply FLOPs (2 per multiply-add); element-wise work (norms, rotary,
softmax exponentials, SiLU, the optimizer) is left out, as in the usual MFU accounting. With
T = rows x S tokens, L layers, and per layer the frozen projection weights
W = sum(in x out) over the projection table (config/projections.py):

* frozen linears: forward 2 T W and input gradient 2 T W per layer (the weights are frozen,
  so no weight gradient): ``4 T W L``;
* LM head (D x V): forward and input gradient, ``4 T D V`` (the embedding lookup is free);
* LoRA on each targeted projection (in x r, r x out): forward ``2 T r (in + out)``, input
  gradients and weight gradients twice that: ``6 T r (in + out)`` per projection and layer;
* causal attention: the forward's two matmuls (Q K^T and P V) over the lower triangle,
  ``4 S^2 hd H / 2`` per row and layer, and forward + backward = 3.5 x that (the backward's
  four matmuls plus the score recomputation every fused kernel does, as FlashAttention counts).

This is the same for any framework that runs the step (it is what the step has to compute),
so ``useful / step time / matmul ceiling`` compares frameworks fairly.

"Hardware" FLOPs add what a configuration recomputes or computes needlessly on top:

* remat ``full`` / ``offload``: the layers' forward runs again in the backward (frozen
  linears, LoRA forward, attention forward), all but the layer's last matmul (down_proj and
  LoRA's second factor on it), whose output no derivative needs (with ``offload`` each
  half-layer is its own checkpoint, so o_proj's output is skipped as well, and with ``xla``
  attention and no LoRA on o_proj, attention's P V too);
* remat ``offload-input``: as ``offload``, plus the attention block's whole forward once more
  (frozen linears, LoRA, attention): the MLP's input is rebuilt from the offloaded layer input
  before the MLP half's backward;
* remat ``save-dots``: matmuls without batch dimensions are saved, so only attention's
  forward (batched einsums) is recomputed;
* (nothing for the cross-entropy: it computes its input gradient in its forward, so no
  chunking recomputes the logits; before that fused form, each chunk's logits were recomputed
  in the backward, ``2 T D V`` more);
* attention as implemented: ``xla`` computes the whole S x S square (forward 4 S^2 hd H, an
  autodiff backward of 4 matmuls, no score recomputation), ``blockwise`` computes whole
  diagonal tiles (tiles = the number of (q block, k block) pairs at or below the diagonal).
"""
from __future__ import annotations

import dataclasses

from ..config.model_config import ModelConfig
from ..config.projections import (BLOCKS, PROJECTIONS as PROJECTION_TABLE, ROW_PARALLEL,
                                  TARGETS as PROJECTIONS, projection_dims)

PROJECTION_BLOCK = {name: p.block for name, p in PROJECTION_TABLE.items()}


def causal_tiles(seq_len: int, block_q: int, block_k: int) -> int:
    """(q block, k block) pairs a causal blockwise kernel computes: for each q block, the k
    blocks up to the one holding its last row (the sequence padded to whole blocks)."""
    nq = -(-seq_len // block_q)
    nk_total = -(-seq_len // block_k)
    return sum(min(-(-((i + 1) * block_q) // block_k), nk_total) for i in range(nq))


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Matmul FLOPs of one train step, by part. ``useful``: the work the step has to do;
    ``hardware``: what the configuration computes (useful + recomputation + masked work)."""

    linears: float
    lm_head: float
    lora: float
    attention: float
    attention_hw: float
    remat: float

    @property
    def useful(self) -> float:
        return self.linears + self.lm_head + self.lora + self.attention

    @property
    def hardware(self) -> float:
        return self.linears + self.lm_head + self.lora + self.attention_hw + self.remat

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "useful": self.useful, "hardware": self.hardware}


def step_flops(cfg: ModelConfig, seq_len: int, rows: int = 1, *, lora_rank: int = 8,
               lora_targets=PROJECTIONS, remat: str = "none", attention: str = "blockwise", block_q: int = 512,
               block_k: int = 512) -> StepFlops:
    """Matmul FLOPs of one train step on ``rows`` sequences of ``seq_len`` tokens (see the
    module docstring). ``attention``: "blockwise" (tiles of ``block_q`` x ``block_k``, each at
    or below the diagonal computed whole), "xla" (the whole square, autodiff backward) or
    "causal" (exactly the lower triangle: useful = hardware)."""
    t = float(rows * seq_len)
    L, D, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    H, hd = cfg.num_heads, cfg.head_dim
    dims = [projection_dims(cfg, n) for n in PROJECTIONS]
    w = sum(i * o for i, o in dims)
    lora_w = sum(lora_rank * sum(projection_dims(cfg, n)) for n in lora_targets)
    attn_fwd_causal = 4.0 * rows * H * hd * seq_len * seq_len / 2.0       # per layer
    if attention == "causal":
        attn_fwd_hw, attn_bwd_hw = attn_fwd_causal, 2.5 * attn_fwd_causal
    elif attention == "xla":
        attn_fwd_hw = 4.0 * rows * H * hd * seq_len * seq_len
        attn_bwd_hw = 2.0 * attn_fwd_hw                                   # dV, dP, dQ, dK
    elif attention == "blockwise":
        bq, bk = min(block_q, seq_len), min(block_k, seq_len)
        tile = 4.0 * rows * H * hd * bq * bk                              # QK^T + PV
        attn_fwd_hw = tile * causal_tiles(seq_len, bq, bk)
        attn_bwd_hw = 2.5 * attn_fwd_hw                                   # 5 matmuls per tile
    else:
        raise ValueError(f"attention {attention!r}: one of causal, xla, blockwise")
    if remat in ("full", "offload", "offload-input"):
        # The layer's last matmul (the last block's row-parallel projection, down_proj, and
        # LoRA's r x out factor on it) feeds only the residual sum, which no derivative of the
        # layer needs: it is not recomputed. With offload each block (half-layer) is its own
        # checkpoint: every block's row-parallel projection (o_proj too) is skipped.
        lasts = ROW_PARALLEL[-1:] if remat == "full" else ROW_PARALLEL
        last = 0
        for name in lasts:
            f_in, f_out = projection_dims(cfg, name)
            last += f_in * f_out + (lora_rank * f_out if name in lora_targets else 0)
        remat_fl = L * (2.0 * t * (w + lora_w - last) + attn_fwd_hw)
        attn_out = next(n for n in ROW_PARALLEL if PROJECTION_BLOCK[n] == "attention")
        if remat != "full" and attention == "xla" and attn_out not in lora_targets:
            # the half-layer recompute skips o_proj; without LoRA on it nothing in the
            # backward needs attention's output, and autodiff drops its P V matmul (the
            # fused kernels compute their output whole)
            remat_fl -= L * attn_fwd_hw / 2
        if remat == "offload-input":
            # the blocks before the last once more, whole: their output is the next block's
            # offloaded-by-nobody input, rebuilt from the layer input
            again = [n for n in PROJECTIONS if PROJECTION_BLOCK[n] != BLOCKS[-1]]
            w_again = sum(i * o for i, o in (projection_dims(cfg, n) for n in again))
            lora_again = sum(lora_rank * sum(projection_dims(cfg, n))
                             for n in again if n in lora_targets)
            remat_fl += L * (2.0 * t * (w_again + lora_again) + attn_fwd_hw)
    elif remat == "save-dots":
        remat_fl = L * attn_fwd_hw
    elif remat == "none":
        remat_fl = 0.0
    else:
        raise ValueError(f"remat {remat!r} unknown")
    return StepFlops(
        linears=4.0 * t * w * L,
        lm_head=4.0 * t * D * V,
        lora=6.0 * t * lora_w * L,
        attention=3.5 * attn_fwd_causal * L,
        attention_hw=(attn_fwd_hw + attn_bwd_hw) * L,
        remat=remat_fl)


def measure_matmul_ceiling(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> dict:
    """The machine's matmul ceiling as JAX sees it: the best of ``repeats`` timed n x n x n
    matmuls (jit, ``dtype``) after a warm-up. Returns {n, dtype, seconds, flops_per_s}."""
    import time

    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "dtype": str(dtype), "seconds": best, "flops_per_s": 2.0 * n ** 3 / best}


# ----------------------------------------------------------------------------- counting a program

def jaxpr_matmul_flops(jaxpr) -> float:
    """Matmul FLOPs of a (closed) jaxpr, counted from its ``dot_general`` equations: 2 x the
    product of the output shape and the contracted dimensions, scan bodies times their length,
    every other sub-jaxpr (jit, shard_map, checkpoint, custom_vjp, cond branches: the largest)
    once. A ``while`` loop has no static trip count: ValueError. An independent count for
    testing :func:`step_flops`."""
    import math

    from jax.extend import core as jcore

    def count(jx) -> float:
        total = 0.0
        for eqn in jx.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                out = eqn.outvars[0].aval.shape
                total += 2.0 * math.prod(out) * math.prod(lhs[i] for i in lc)
                continue
            if name == "while":
                raise ValueError("while loop: trip count unknown")
            subs = [v for v in eqn.params.values()
                    if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr))]
            subs += [x for v in eqn.params.values() if isinstance(v, (tuple, list))
                     for x in v if isinstance(x, (jcore.Jaxpr, jcore.ClosedJaxpr))]
            if not subs:
                continue
            inner = [count(s.jaxpr if isinstance(s, jcore.ClosedJaxpr) else s) for s in subs]
            if name == "cond":
                total += max(inner)
            elif name == "scan":
                total += eqn.params["length"] * sum(inner)
            elif name in ("custom_vjp_call", "custom_vjp_call_jaxpr"):
                total += inner[0]                   # the primal; the fwd/bwd rules are thunks
            else:
                total += sum(inner)
        return total

    return count(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr)

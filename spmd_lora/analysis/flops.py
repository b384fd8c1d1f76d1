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
  forward (batched einsums) is recomputed (with ``xla`` attention and no LoRA on o_proj, only
  its Q K^T: o_proj's output is saved and nothing else needs P V);
* (nothing for the cross-entropy: it computes its input gradient in its forward, so no
  chunking recomputes the logits; before that fused form, each chunk's logits were recomputed
  in the backward, ``2 T D V`` more);
* attention as implemented: ``xla`` computes the whole S x S square (forward 4 S^2 hd H, an
  autodiff backward of 4 matmuls, no score recomputation), ``blockwise`` computes whole
  diagonal tiles (tiles = the number of (q block, k block) pairs at or below the diagonal).

A DPO step (:func:`dpo_step_flops`) is the policy's train step above plus the reference's
forward (the frozen base without LoRA, under ``stop_gradient``: linears ``2 T W L``, LM head
``2 T D V``, attention forward; never recomputed) on the same rows. A pair of a P-token prompt
and C- and R-token answers is two causal rows in the ``separate`` layout (P + C and P + R
tokens, padded to the longer), or ONE row in the ``shared-prefix`` layout (:func:`dpo_rows`:
the prompt once, then each answer behind a copy of the prompt's last token), whose masks let
each answer see the prompt and itself, never the other answer: attention pairs causal(P) +
C P + causal(C) + R P + causal(R) instead of causal(P + C) + causal(P + R)
(:func:`dpo_attention_pairs`). With P >> C the shared prefix halves the step's work
(:func:`dpo_layout_saving`); the attention kernels still compute the rejected x chosen block of
the shared row's causal triangle (hardware).
"""
from __future__ import annotations

import dataclasses
import math

from ..config.fields import CHOICES
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
    padding: float = 0.0        # linears, LM head and LoRA on padding tokens (hardware only)

    @property
    def useful(self) -> float:
        return self.linears + self.lm_head + self.lora + self.attention

    @property
    def hardware(self) -> float:
        return (self.linears + self.lm_head + self.lora + self.attention_hw + self.remat
                + self.padding)

    def __add__(self, other: "StepFlops") -> "StepFlops":
        return StepFlops(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                 dataclasses.astuple(other))))

    def scaled(self, k: float) -> "StepFlops":
        return StepFlops(*(k * a for a in dataclasses.astuple(self)))

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "useful": self.useful, "hardware": self.hardware}


def _attention_hw(cfg: ModelConfig, seq_len: int, rows: int, attention: str, block_q: int,
                  block_k: int, attn_fwd_useful: float) -> tuple[float, float]:
    """(forward, backward) attention FLOPs per layer that ``attention`` computes on ``rows``
    rows of ``seq_len`` tokens (causal by token index, other masks as data); "causal" computes
    exactly the useful pairs (``attn_fwd_useful``)."""
    H, hd = cfg.num_heads, cfg.head_dim
    if attention == "causal":
        return attn_fwd_useful, 2.5 * attn_fwd_useful
    if attention == "xla":
        attn_fwd_hw = 4.0 * rows * H * hd * seq_len * seq_len
        return attn_fwd_hw, 2.0 * attn_fwd_hw                             # dV, dP, dQ, dK
    if attention == "blockwise":
        bq, bk = min(block_q, seq_len), min(block_k, seq_len)
        tile = 4.0 * rows * H * hd * bq * bk                              # QK^T + PV
        attn_fwd_hw = tile * causal_tiles(seq_len, bq, bk)
        return attn_fwd_hw, 2.5 * attn_fwd_hw                             # 5 matmuls per tile
    raise ValueError(f"attention {attention!r}: one of causal, xla, blockwise")


def step_flops(cfg: ModelConfig, seq_len: int, rows: int = 1, *, lora_rank: int = 8,
               lora_targets=PROJECTIONS, remat: str = "none", attention: str = "blockwise", block_q: int = 512,
               block_k: int = 512, attention_pairs: float | None = None) -> StepFlops:
    """Matmul FLOPs of one train step on ``rows`` sequences of ``seq_len`` tokens (see the
    module docstring). ``attention``: "blockwise" (tiles of ``block_q`` x ``block_k``, each at
    or below the diagonal computed whole), "xla" (the whole square, autodiff backward) or
    "causal" (exactly the lower triangle: useful = hardware). ``attention_pairs``: the
    (query, key) pairs a row's mask lets through, for the useful count (default the causal
    triangle, ``seq_len**2 / 2``; a shared-prefix DPO row has fewer, :func:`dpo_step_flops`)."""
    t = float(rows * seq_len)
    L, D, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    H, hd = cfg.num_heads, cfg.head_dim
    dims = [projection_dims(cfg, n) for n in PROJECTIONS]
    w = sum(i * o for i, o in dims)
    lora_w = sum(lora_rank * sum(projection_dims(cfg, n)) for n in lora_targets)
    if attention_pairs is None:
        attention_pairs = seq_len * seq_len / 2.0
    attn_fwd_causal = 4.0 * rows * H * hd * attention_pairs               # per layer
    attn_fwd_hw, attn_bwd_hw = _attention_hw(cfg, seq_len, rows, attention, block_q, block_k,
                                             attn_fwd_causal)
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
        attn_out = next(n for n in ROW_PARALLEL if PROJECTION_BLOCK[n] == "attention")
        if attention == "xla" and attn_out not in lora_targets:
            # o_proj's output is a saved dot: without LoRA on o_proj nothing needs attention's
            # output again, and autodiff drops the recomputed P V (as for offload above)
            remat_fl -= L * attn_fwd_hw / 2
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


# ----------------------------------------------------------------------------- DPO

#: The batch layouts of a DPO pair (``--dpo-layout``): one row holding the prompt once and both
#: answers (the default), or two rows, prompt + chosen and prompt + rejected.
DPO_LAYOUTS = CHOICES["dpo_layout"]


def _check_dpo_layout(layout: str) -> None:
    if layout not in DPO_LAYOUTS:
        raise ValueError(f"DPO layout {layout!r}: one of {', '.join(DPO_LAYOUTS)}")


def dpo_rows(prompt: int, chosen: int, rejected: int | None = None,
             layout: str = "shared-prefix") -> tuple[int, int]:
    """(rows, tokens per row) of one preference pair in the batch. ``prompt``: the prompt's
    tokens (BOS included), ``chosen`` / ``rejected``: each answer's (EOS included; rejected
    defaults to chosen), as :mod:`spmd_lora.data.preference` tokenizes them.

    * ``separate``: 2 rows, prompt + chosen and prompt + rejected, both padded to the longer;
    * ``shared-prefix``: 1 row of ``prompt - 1`` prefix tokens, then each answer's segment:
      the prompt's last token again (its logit predicts the answer's first token) and the
      answer, ``prompt + chosen + rejected + 1`` tokens."""
    _check_dpo_layout(layout)
    rejected = chosen if rejected is None else rejected
    if layout == "separate":
        return 2, prompt + max(chosen, rejected)
    return 1, prompt + chosen + rejected + 1


def dpo_attention_pairs(prompt: int, chosen: int, rejected: int | None = None,
                        layout: str = "shared-prefix") -> float:
    """The (query, key) pairs one preference pair's masks let through, summed over its rows,
    with the module's causal convention (a causal block of n tokens counts n**2 / 2; the exact
    count adds half a pair per token, n (n + 1) / 2).

    ``separate``: causal(P + C) + causal(P + R). ``shared-prefix`` (prefix p = P - 1 tokens,
    segments c = C + 1 and r = R + 1, :func:`dpo_rows`): causal(p) + c p + causal(c) + r p +
    causal(r): an answer's tokens see the prefix and their own segment, never the other
    answer."""
    _check_dpo_layout(layout)
    rejected = chosen if rejected is None else rejected
    if layout == "separate":
        return ((prompt + chosen) ** 2 + (prompt + rejected) ** 2) / 2.0
    p, c, r = prompt - 1, chosen + 1, rejected + 1
    return p * p / 2.0 + c * p + c * c / 2.0 + r * p + r * r / 2.0


def forward_flops(cfg: ModelConfig, seq_len: int, rows: int = 1, *, attention: str = "blockwise",
                  block_q: int = 512, block_k: int = 512,
                  attention_pairs: float | None = None) -> StepFlops:
    """Matmul FLOPs of a forward of the frozen base alone (no LoRA, no backward, so nothing
    recomputed): linears ``2 T W L``, LM head ``2 T D V`` (to the log-probs; the fused loss's
    input-gradient matmul is dropped by the compiler when nothing differentiates it), attention
    forward. DPO's reference model. Arguments as :func:`step_flops`."""
    t = float(rows * seq_len)
    L = cfg.num_layers
    w = sum(i * o for i, o in (projection_dims(cfg, n) for n in PROJECTIONS))
    if attention_pairs is None:
        attention_pairs = seq_len * seq_len / 2.0
    attn_fwd = 4.0 * rows * cfg.num_heads * cfg.head_dim * attention_pairs
    attn_fwd_hw, _ = _attention_hw(cfg, seq_len, rows, attention, block_q, block_k, attn_fwd)
    return StepFlops(linears=2.0 * t * w * L, lm_head=2.0 * t * cfg.hidden_size * cfg.vocab_size,
                     lora=0.0, attention=attn_fwd * L, attention_hw=attn_fwd_hw * L, remat=0.0)


@dataclasses.dataclass(frozen=True)
class DpoStepFlops:
    """Matmul FLOPs of one DPO train step: ``policy`` (base + LoRA, forward and backward, as
    :func:`step_flops`) and ``reference`` (the base alone, forward only, :func:`forward_flops`)
    on the same rows."""

    layout: str
    policy: StepFlops
    reference: StepFlops

    @property
    def useful(self) -> float:
        return self.policy.useful + self.reference.useful

    @property
    def hardware(self) -> float:
        return self.policy.hardware + self.reference.hardware

    def as_dict(self) -> dict:
        return {"layout": self.layout, "policy": self.policy.as_dict(),
                "reference": self.reference.as_dict(), "useful": self.useful,
                "hardware": self.hardware}


def dpo_step_flops(cfg: ModelConfig, prompt: int, chosen: int, rejected: int | None = None,
                   pairs: int = 1, *, layout: str = "shared-prefix", lora_rank: int = 8,
                   lora_targets=PROJECTIONS, remat: str = "none", attention: str = "blockwise",
                   block_q: int = 512, block_k: int = 512) -> DpoStepFlops:
    """Matmul FLOPs of one DPO train step on ``pairs`` preference pairs of a ``prompt``-token
    prompt and answers of ``chosen`` and ``rejected`` tokens, in ``layout``
    (:func:`dpo_rows`). Useful work counts the real tokens and the pairs the masks let
    through (:func:`dpo_attention_pairs`); hardware adds what ``attention`` computes of the
    whole causal rows (a shared-prefix row's rejected x chosen block is computed and masked),
    remat's recomputation (the policy only: the reference is not differentiated) and, in the
    separate layout, the shorter row's padding (``padding``). Other keywords as
    :func:`step_flops`."""
    rejected = chosen if rejected is None else rejected
    rows, seq = dpo_rows(prompt, chosen, rejected, layout)
    hw = dict(attention=attention, block_q=block_q, block_k=block_k)
    train = dict(lora_rank=lora_rank, lora_targets=lora_targets, remat=remat, **hw)
    if layout == "shared-prefix":
        att = dpo_attention_pairs(prompt, chosen, rejected, layout)
        policy = step_flops(cfg, seq, **train, attention_pairs=att)
        reference = forward_flops(cfg, seq, **hw, attention_pairs=att)
    else:
        def padded(real, whole):
            """``real``'s useful parts, ``whole``'s (the padded rows') hardware extras."""
            work = ("linears", "lm_head", "lora")
            extra = sum(getattr(whole, k) - getattr(real, k) for k in work)
            return dataclasses.replace(real, attention_hw=whole.attention_hw, remat=whole.remat,
                                       padding=extra)
        policy = padded(step_flops(cfg, prompt + chosen, **train)
                        + step_flops(cfg, prompt + rejected, **train),
                        step_flops(cfg, seq, rows, **train))
        reference = padded(forward_flops(cfg, prompt + chosen, **hw)
                           + forward_flops(cfg, prompt + rejected, **hw),
                           forward_flops(cfg, seq, rows, **hw))
    return DpoStepFlops(layout, policy.scaled(pairs), reference.scaled(pairs))


def dpo_layout_saving(cfg: ModelConfig, prompt: int, chosen: int, rejected: int | None = None,
                      **kw) -> dict:
    """What the shared-prefix layout saves over the separate one for the same pairs
    (keywords as :func:`dpo_step_flops`): both layouts' useful and hardware FLOPs, each
    layout's tokens per pair, and the savings ``1 - shared / separate``."""
    f = {lay: dpo_step_flops(cfg, prompt, chosen, rejected, layout=lay, **kw)
         for lay in DPO_LAYOUTS}
    out = {lay: {"useful": x.useful, "hardware": x.hardware,
                 "tokens": math.prod(dpo_rows(prompt, chosen, rejected, lay))}
           for lay, x in f.items()}
    for k in ("useful", "hardware", "tokens"):
        out[f"{k}_saving"] = 1.0 - out["shared-prefix"][k] / out["separate"][k]
    return out


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

    def live_eqns(jx):
        """The equations whose results reach the jaxpr's outputs, in order: the compiler
        drops the rest (e.g. the gradient matmul in the primal of a custom_vjp that is not
        differentiated, as DPO's reference forward)."""
        live = {v for v in jx.outvars if isinstance(v, jcore.Var)}
        kept = []
        for eqn in reversed(jx.eqns):
            if any(v in live for v in eqn.outvars):
                kept.append(eqn)
                live.update(v for v in eqn.invars if isinstance(v, jcore.Var))
        return kept[::-1]

    def count(jx) -> float:
        total = 0.0
        for eqn in live_eqns(jx):
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

"""Global entry points: the per-device model of ``model.py`` wrapped in ``jax.shard_map``.

These take GLOBAL arrays laid out by the sharding plan (``mesh.py``) and are what training,
evaluation, generation and the tools call. Gradients of these may be taken outside the
shard_map (with check_vma=True, JAX sums the replicated LoRA factors' gradients over the mesh
itself, inside the backward layer scan); the train step (``step.py``) instead differentiates
per device and reduces the LoRA gradients once per step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import model
from .mesh import BATCH_SPEC, DP, REPLICATED, TP, lora_specs, param_specs


def batch_extras(tokens, positions, segment_ids):
    """Default positions (0..S-1 per row) when none are given; segment ids pass through."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return positions, segment_ids


def loss_sum_fn(opts: model.ForwardOptions, mesh):
    """Returns f(params, lora, batch, key) -> (sum of token losses, number of target tokens),
    both scalars summed over the whole global batch. ``batch`` is a dict with ``tokens``,
    ``loss_mask`` and optional ``positions`` / ``segment_ids`` ([B, S], B split over dp);
    ``key`` is a PRNG key for LoRA dropout or None."""
    def per_device(params, lora, tokens, loss_mask, positions, segment_ids, key):
        total, count = model.loss_sum(params, lora, tokens, loss_mask, positions, segment_ids,
                                      opts, key)
        return jax.lax.psum(total, DP), jax.lax.psum(count, DP)

    def f(params, lora, batch, key=None):
        positions, segment_ids = batch_extras(batch["tokens"], batch.get("positions"),
                                               batch.get("segment_ids"))
        seg_spec = None if segment_ids is None else BATCH_SPEC
        key_spec = None if key is None else REPLICATED
        mapped = jax.shard_map(
            per_device, mesh=mesh,
            in_specs=(param_specs(params), lora_specs(lora), BATCH_SPEC, BATCH_SPEC, BATCH_SPEC,
                      seg_spec, key_spec),
            out_specs=(REPLICATED, REPLICATED), check_vma=True)
        return mapped(params, lora, batch["tokens"], batch["loss_mask"], positions, segment_ids, key)

    return f


def logits_fn(opts: model.ForwardOptions, mesh):
    """Returns f(params, lora, tokens, positions=None, segment_ids=None) -> [B, S, V] float32
    logits, gathered (for inspection and tests; training never materialises them)."""

    def per_device(params, lora, tokens, positions, segment_ids):
        h = model.hidden_states(params, lora, tokens, positions, segment_ids, opts)
        layout = opts.layout(tokens.shape[1])
        if layout.sp:                                   # gather the sequence back: [B, S, D]
            h = layout.gather(h)[:, :tokens.shape[1]]
        return model.local_logits(h, params, opts)                            # [B, S, Vl]

    def f(params, lora, tokens, positions=None, segment_ids=None):
        positions, segment_ids = batch_extras(tokens, positions, segment_ids)
        mapped = jax.shard_map(
            per_device, mesh=mesh,
            in_specs=(param_specs(params), lora_specs(lora), BATCH_SPEC, BATCH_SPEC,
                      None if segment_ids is None else BATCH_SPEC),
            out_specs=P(DP, None, TP), check_vma=True)
        return mapped(params, lora, tokens, positions, segment_ids)[..., :opts.cfg.vocab_size]

    return f

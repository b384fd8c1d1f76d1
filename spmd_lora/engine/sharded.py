"""Global entry points: the per-device model of :mod:`spmd_lora.model` wrapped in ``jax.shard_map``.

These take GLOBAL arrays laid out by the sharding plan (``mesh.py``) and are what training,
evaluation, generation and the tools call. Gradients of these may be taken outside the
shard_map (with check_vma=True, JAX sums the replicated LoRA factors' gradients over the mesh
itself, inside the backward layer scan); the train step (``step.py``) instead differentiates
per device and reduces the LoRA gradients once per step.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from .. import model
from ..parallel.mesh import BATCH_SPEC, CP, DP, REPLICATED, TP, lora_specs
from ..parallel.zigzag import prepare_batch
from ..weights.shapes import param_specs


def prepared_batch(batch: dict, opts: model.ForwardOptions) -> dict:
    """The global batch in the one batch schema (``zigzag.prepare_batch``): as it is when the
    host prepared it (``put_batch``, ``shard_micro_batches``), else (``tokens``, ``loss_mask``
    and optional ``positions`` / ``segment_ids``) prepared here, inside the jitted function."""
    return prepare_batch(batch, opts.cp, opts.tp)


def loss_sum_fn(opts: model.ForwardOptions, mesh):
    """Returns f(params, lora, batch, key) -> (sum of token losses, number of target tokens),
    both scalars summed over the whole global batch. ``batch``: dict of global [B, S] arrays
    split over dp along B and over cp along S (``BATCH_SPEC``), as the batch preparation
    (``zigzag.prepare_batch``) leaves them: ``tokens``, ``targets``, ``target_weights``,
    ``positions``, ``token_index``, optional ``segment_ids`` (zig-zag with cp > 1); a raw
    batch (``tokens``, ``loss_mask``, ...) is prepared inside. ``key`` is a PRNG key for LoRA
    dropout or None."""
    def per_device(params, lora, batch, key):
        total, count = model.loss_sum(params, lora, batch, opts, key)
        return jax.lax.psum(total, (DP, CP)), jax.lax.psum(count, (DP, CP))

    def f(params, lora, batch, key=None):
        batch = prepared_batch(batch, opts)
        mapped = jax.shard_map(
            per_device, mesh=mesh,
            in_specs=(param_specs(params), lora_specs(lora), {k: BATCH_SPEC for k in batch},
                      None if key is None else REPLICATED),
            out_specs=(REPLICATED, REPLICATED), check_vma=True)
        return mapped(params, lora, batch, key)

    return f


def preference_sums_fn(opts: model.ForwardOptions, mesh, pref: model.PreferenceLoss):
    """Returns f(params, lora, batch) -> (sum of DPO pair losses, {metric: sum over pairs},
    number of pairs), scalars summed over the whole global batch: the forward of the DPO step
    (:func:`model.preference_sums`: policy and LoRA-off reference) without gradients or
    dropout, for held-out evaluation. ``batch`` as for :func:`loss_sum_fn`, the pairs in
    ``pref``'s layout (one row each, or two adjacent rows; whole pairs on every dp shard);
    all-padding pairs count for nothing."""
    names = model.PREFERENCE_METRICS

    def per_device(params, lora, batch):
        total, (sums, pairs) = model.preference_sums(params, lora, batch, opts, pref)
        over_dp = lambda x: jax.lax.psum(x, DP)  # noqa: E731  (pair sums: cp-invariant)
        return over_dp(total), {k: over_dp(sums[k]) for k in names}, over_dp(pairs)

    def f(params, lora, batch):
        batch = prepared_batch(batch, opts)
        mapped = jax.shard_map(
            per_device, mesh=mesh,
            in_specs=(param_specs(params), lora_specs(lora), {k: BATCH_SPEC for k in batch}),
            out_specs=(REPLICATED, {k: REPLICATED for k in names}, REPLICATED), check_vma=True)
        return mapped(params, lora, batch)

    return f


def logits_fn(opts: model.ForwardOptions, mesh):
    """Returns f(params, lora, batch) -> [B, S, V] float32 logits, gathered, in the batch's
    layout (zig-zag with cp > 1: see ``zigzag.from_zigzag``); for inspection and
    tests, training never materialises them. ``batch`` as for :func:`loss_sum_fn`."""

    def per_device(params, lora, batch):
        tokens = batch["tokens"]
        h = model.hidden_states(params, lora, tokens, batch["positions"],
                                batch.get("segment_ids"), opts,
                                token_index=batch["token_index"])
        layout = opts.layout(tokens.shape[1])
        if layout.sp:                                   # gather the sequence back: [B, S, D]
            h = layout.gather(h)[:, :tokens.shape[1]]
        return model.local_logits(h, params, opts)                            # [B, S, Vl]

    def f(params, lora, batch):
        batch = {k: v for k, v in prepared_batch(batch, opts).items()
                 if k in ("tokens", "positions", "segment_ids", "token_index")}
        mapped = jax.shard_map(
            per_device, mesh=mesh,
            in_specs=(param_specs(params), lora_specs(lora), {k: BATCH_SPEC for k in batch}),
            out_specs=P(DP, CP, TP), check_vma=True)
        return mapped(params, lora, batch)[..., :opts.cfg.vocab_size]

    return f

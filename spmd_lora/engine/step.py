"""The jit-compiled training step: token-weighted gradient accumulation + AdamW on LoRA only.

Base weights are an input, never differentiated and never given optimizer state. The loss of
an accumulated step is the mean over ALL target tokens of all its micro-batches: each
micro-batch's gradient of the SUM of its token losses is accumulated, then divided by the total
token count, so micro-batches with more loss tokens weigh more (unlike a mean of means).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from .. import model
from ..model import ForwardOptions
from ..parallel.mesh import CP, DP, MESH_AXES, REPLICATED, lora_specs
from ..weights.shapes import param_specs
from ..parallel.placement import MICRO_BATCH_SPEC
from . import sharded



@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


def lr_schedule(cfg: OptimizerConfig):
    """Linear warmup from 0 to learning_rate, then cosine decay to min_lr_ratio * learning_rate."""
    peak = cfg.learning_rate
    decay_steps = max(cfg.total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if cfg.warmup_steps else peak, peak_value=peak,
        warmup_steps=cfg.warmup_steps, decay_steps=decay_steps, end_value=peak * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Optional global-norm clipping, then AdamW (decoupled weight decay, as torch.optim.AdamW)."""
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    if cfg.max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw


def make_train_step(opts: ForwardOptions, mesh, optimizer: optax.GradientTransformation,
                    preference: model.PreferenceLoss | None = None):
    """Returns jitted step(params, lora, opt_state, batches, key) -> (lora, opt_state, metrics).

    ``batches``: dict of int32 arrays [A, B, S] (A micro-batches of B rows, B split over dp, S
    over cp) as :func:`shard_micro_batches` lays them out, the fields of the batch schema
    (``zigzag.prepare_batch``, zig-zag with cp > 1; raw ``tokens`` / ``loss_mask`` batches are
    prepared inside). ``key``: PRNG key for LoRA dropout. ``lora`` and ``opt_state`` are
    donated. metrics: loss (token mean), grad_norm (before clipping), tokens (target tokens in
    the step).

    Gradients are taken per device inside the shard_map, w.r.t. a copy of the LoRA factors cast
    to varying over (dp, cp, tp): the backward then emits no LoRA-gradient collective at all, the
    micro-batch gradients accumulate locally, and ONE psum over the mesh per step reduces them
    (instead of one per layer and micro-batch).

    ``preference`` (objective dpo): the step is :func:`make_preference_step`'s instead.
    """
    if preference is not None:
        return make_preference_step(opts, mesh, optimizer, preference)
    use_dropout = opts.lora is not None and opts.lora.dropout > 0.0

    def accumulate(params, lora, batches, key):
        """Per device. Returns (LoRA gradients of the summed token loss, loss sum, token count),
        all summed over the mesh."""
        lora_v = jax.lax.pcast(lora, MESH_AXES, to="varying")

        def micro(carry, xs):
            grad_acc, loss_acc, count_acc = carry
            batch, index = xs
            micro_key = jax.random.fold_in(key, index) if use_dropout else None
            (total, count), grads = jax.value_and_grad(
                lambda lp: model.loss_sum(params, lp, batch, opts, micro_key),
                has_aux=True)(lora_v)
            grad_acc = jax.tree.map(jnp.add, grad_acc, grads)
            return (grad_acc, loss_acc + total, count_acc + count), None

        n_micro = batches["tokens"].shape[0]
        (grads, total, count), _ = jax.lax.scan(
            micro, (_zero_grads(lora), _scalar0(), _scalar0()), (batches, jnp.arange(n_micro)))
        return (jax.lax.psum(grads, MESH_AXES), jax.lax.psum(total, (DP, CP)),
                jax.lax.psum(count, (DP, CP)))

    def step(params, lora, opt_state, batches, key):
        batches = sharded.prepared_batch(batches, opts)
        grads, total, count = _on_every_device(accumulate, mesh, (REPLICATED, REPLICATED),
                                               params, lora, batches, key)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        lora, opt_state = _apply_update(optimizer, grads, opt_state, lora)
        metrics = {"loss": total / count, "grad_norm": optax.tree.norm(grads), "tokens": count}
        return lora, opt_state, metrics

    return _jit_step(step, mesh)


def _zero_grads(lora):
    """Zero LoRA-gradient accumulators, varying over the whole mesh (the scan carry's type)."""
    return jax.tree.map(
        lambda x: jax.lax.pcast(jnp.zeros(x.shape, x.dtype), MESH_AXES, to="varying"), lora)


def _scalar0(axes=(DP, CP)):
    """A float32 zero varying over ``axes``: a per-shard sum's initial value."""
    return jax.lax.pcast(jnp.zeros((), jnp.float32), axes, to="varying")


def _on_every_device(accumulate, mesh, out_tail, params, lora, batches, key):
    """``accumulate(params, lora, batches, key)`` per device under ``shard_map``: params and
    LoRA in their specs, batches as micro-batches, the key replicated; it returns the LoRA
    gradients (LoRA specs) followed by outputs with the specs ``out_tail``."""
    return jax.shard_map(
        accumulate, mesh=mesh,
        in_specs=(param_specs(params), lora_specs(lora),
                  {k: MICRO_BATCH_SPEC for k in batches}, REPLICATED),
        out_specs=(lora_specs(lora), *out_tail), check_vma=True)(params, lora, batches, key)


def _apply_update(optimizer, grads, opt_state, lora):
    """One optimizer update of the LoRA factors: (lora, opt_state)."""
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state


def _jit_step(step, mesh):
    """``step`` jitted with LoRA and optimizer state donated and every output replicated."""
    replicated = NamedSharding(mesh, REPLICATED)
    return jax.jit(step, donate_argnums=(1, 2), out_shardings=(replicated, replicated, replicated))


def make_preference_step(opts: ForwardOptions, mesh, optimizer: optax.GradientTransformation,
                         preference: model.PreferenceLoss):
    """The DPO train step: ``step(params, lora, opt_state, batches, key) -> (lora, opt_state,
    metrics)``, the same arguments and shardings as :func:`make_train_step`'s.

    ``batches`` [A, B, S]: each micro-batch holds preference pairs in ``preference``'s layout
    (:mod:`spmd_lora.model.preference`): one row per pair (shared prefix), or two adjacent
    rows (chosen, rejected), B/dp rows per dp shard (even, so a pair never straddles two
    shards); a row may be split over cp. The loss is the MEAN over every pair of the step: each
    micro-batch's gradient of the SUM of its pair losses is accumulated per device, ONE psum
    over the mesh reduces them, and the sum is divided by the step's pair count, so every pair
    weighs the same whichever micro-batch it is in (per pair, not per token nor per
    micro-batch). metrics: loss (pair mean), grad_norm, tokens (completion tokens of the
    policy rows), pairs, and the means over pairs of ``model.PREFERENCE_METRICS``
    (TRL's ``rewards/*`` and ``logps/*``)."""
    use_dropout = opts.lora is not None and opts.lora.dropout > 0.0
    names = model.PREFERENCE_METRICS

    def accumulate(params, lora, batches, key):
        """Per device: (LoRA gradients of the summed pair loss, loss sum, pair count, token
        count, metric sums), all summed over the mesh."""
        lora_v = jax.lax.pcast(lora, MESH_AXES, to="varying")

        def micro(carry, xs):
            grad_acc, loss_acc, pairs_acc, tokens_acc, metric_acc = carry
            batch, index = xs
            micro_key = jax.random.fold_in(key, index) if use_dropout else None
            (total, (sums, pairs)), grads = jax.value_and_grad(
                lambda lp: model.preference_sums(params, lp, batch, opts, preference, micro_key),
                has_aux=True)(lora_v)
            grad_acc = jax.tree.map(jnp.add, grad_acc, grads)
            tokens = jnp.sum(batch["target_weights"].astype(jnp.float32))
            metric_acc = {k: metric_acc[k] + sums[k] for k in names}
            return (grad_acc, loss_acc + total, pairs_acc + pairs, tokens_acc + tokens,
                    metric_acc), None

        n_micro = batches["tokens"].shape[0]
        per_dp = lambda: _scalar0((DP,))  # noqa: E731  (pair sums: cp-invariant)
        init = (_zero_grads(lora), per_dp(), per_dp(), _scalar0(), {k: per_dp() for k in names})
        (grads, total, pairs, tokens, sums), _ = jax.lax.scan(
            micro, init, (batches, jnp.arange(n_micro)))
        # the pair sums are cp-invariant already (model.preference_sums), the tokens are not
        over_dp = lambda x: jax.lax.psum(x, DP)  # noqa: E731
        return (jax.lax.psum(grads, MESH_AXES), over_dp(total), over_dp(pairs),
                jax.lax.psum(tokens, (DP, CP)), {k: over_dp(v) for k, v in sums.items()})

    def step(params, lora, opt_state, batches, key):
        batches = sharded.prepared_batch(batches, opts)
        grads, total, pairs, tokens, sums = _on_every_device(
            accumulate, mesh, (REPLICATED, REPLICATED, REPLICATED, {k: REPLICATED for k in names}),
            params, lora, batches, key)
        pairs = jnp.maximum(pairs, 1.0)
        grads = jax.tree.map(lambda g: g / pairs, grads)
        lora, opt_state = _apply_update(optimizer, grads, opt_state, lora)
        metrics = {"loss": total / pairs, "grad_norm": optax.tree.norm(grads), "tokens": tokens,
                   "pairs": pairs, **{k: v / pairs for k, v in sums.items()}}
        return lora, opt_state, metrics

    return _jit_step(step, mesh)

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


def make_train_step(opts: ForwardOptions, mesh, optimizer: optax.GradientTransformation):
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
    """
    use_dropout = opts.lora is not None and opts.lora.dropout > 0.0

    def accumulate(params, lora, batches, key):
        """Per device. Returns (LoRA gradients of the summed token loss, loss sum, token count),
        all summed over the mesh."""
        lora_v = jax.lax.pcast(lora, MESH_AXES, to="varying")
        varying = lambda x, axes: jax.lax.pcast(x, axes, to="varying")

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
        zeros = jax.tree.map(lambda x: varying(jnp.zeros(x.shape, x.dtype), MESH_AXES), lora)
        scalar0 = varying(jnp.zeros((), jnp.float32), (DP, CP))
        (grads, total, count), _ = jax.lax.scan(
            micro, (zeros, scalar0, scalar0), (batches, jnp.arange(n_micro)))
        return (jax.lax.psum(grads, MESH_AXES), jax.lax.psum(total, (DP, CP)),
                jax.lax.psum(count, (DP, CP)))

    def step(params, lora, opt_state, batches, key):
        batches = sharded.prepared_batch(batches, opts)
        per_device = jax.shard_map(
            accumulate, mesh=mesh,
            in_specs=(param_specs(params), lora_specs(lora),
                      {k: MICRO_BATCH_SPEC for k in batches}, REPLICATED),
            out_specs=(lora_specs(lora), REPLICATED, REPLICATED), check_vma=True)
        grads, total, count = per_device(params, lora, batches, key)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        lora = optax.apply_updates(lora, updates)
        metrics = {"loss": total / count, "grad_norm": optax.tree.norm(grads), "tokens": count}
        return lora, opt_state, metrics

    replicated = NamedSharding(mesh, REPLICATED)
    return jax.jit(step, donate_argnums=(1, 2), out_shardings=(replicated, replicated, replicated))

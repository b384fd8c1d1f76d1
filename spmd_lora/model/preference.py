"""Direct Preference Optimization (DPO) with LoRA, per device (inside ``shard_map``).

Batch layout (phase 1): a preference pair is TWO rows of the same micro-batch, adjacent: row
2i = prompt + chosen, row 2i+1 = prompt + rejected, with loss weights (``target_weights``) on
the completion tokens only. A dp shard holds an even number of whole rows, so both halves of a
pair land on the same device and the pair's loss is computed there without communication.

The policy is the frozen base plus LoRA; the reference is the same frozen base with the LoRA
term off (``lora=None``), run in the same step under ``stop_gradient`` (nothing is
precomputed into the data). For each pair, with sequence log-probs summed over the completion
tokens (:func:`spmd_lora.model.loss.sequence_logps`), ``m = (pi_c - ref_c) - (pi_r - ref_r)``:

* ``sigmoid``: ``-[(1 - ls) * logsigmoid(beta * m) + ls * logsigmoid(-beta * m)]`` (DPO; with
  label smoothing ``ls`` > 0 the conservative cDPO);
* ``ipo``: ``(m' - 1 / (2 beta))^2`` with ``m'`` the same margin of per-token MEAN log-ratios
  (each log-ratio divided by its completion's token count), as TRL's ``ipo`` loss.

Metrics use TRL's names: ``rewards/chosen`` = beta (pi_c - ref_c), ``rewards/rejected``,
``rewards/accuracies`` (chosen reward > rejected reward), ``rewards/margins``,
``logps/chosen`` = pi_c, ``logps/rejected``: here as sums over this device's pairs.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .llama import hidden_states
from .loss import sequence_logps
from .options import ForwardOptions

F32 = jnp.float32

#: The per-pair metrics, TRL's names; the train step reports their means over the step's pairs.
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                      "rewards/margins", "logps/chosen", "logps/rejected")

LOSS_TYPES = ("sigmoid", "ipo")


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
    """The DPO objective's settings: ``beta`` (> 0), ``loss_type`` (sigmoid | ipo),
    ``label_smoothing`` (sigmoid only, in [0, 0.5))."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0


def pair_losses(policy, reference, counts, pref: PreferenceLoss):
    """Per-pair DPO losses and metrics from per-row sequence log-probs.

    policy, reference, counts: [2P] float32 (rows 2i chosen, 2i+1 rejected; counts = the
    completion tokens of each row). Returns (losses [P], metrics: dict name -> [P], valid [P]
    float32: 1 for a real pair, 0 for an all-padding one, whose loss and metrics are zeroed)."""
    pc, pr = policy[0::2], policy[1::2]
    rc, rr = reference[0::2], reference[1::2]
    nc, nr = counts[0::2], counts[1::2]
    valid = ((nc > 0) & (nr > 0)).astype(F32)
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    beta = pref.beta
    if pref.loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        ls = pref.label_smoothing
        losses = -(1.0 - ls) * jax.nn.log_sigmoid(z) - ls * jax.nn.log_sigmoid(-z)
    elif pref.loss_type == "ipo":
        margin = (chosen_ratio / jnp.maximum(nc, 1.0) - rejected_ratio / jnp.maximum(nr, 1.0))
        losses = (margin - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {pref.loss_type!r}; choose from "
                         f"{', '.join(LOSS_TYPES)}")
    rc_reward = jax.lax.stop_gradient(beta * chosen_ratio)
    rr_reward = jax.lax.stop_gradient(beta * rejected_ratio)
    metrics = {"rewards/chosen": rc_reward, "rewards/rejected": rr_reward,
               "rewards/accuracies": (rc_reward > rr_reward).astype(F32),
               "rewards/margins": rc_reward - rr_reward,
               "logps/chosen": jax.lax.stop_gradient(pc),
               "logps/rejected": jax.lax.stop_gradient(pr)}
    return losses * valid, {k: v * valid for k, v in metrics.items()}, valid


def preference_sums(params, lora, batch: dict, opts: ForwardOptions, pref: PreferenceLoss,
                    key=None):
    """Per device: (sum of this shard's pair losses, (metric sums dict, number of pairs)).

    batch: this device's shard of the prepared batch (cp = 1), [B, S] fields as
    :func:`spmd_lora.model.loss_sum` reads them, B even, pairs on adjacent rows (module
    docstring). Two forwards: the policy (``lora``, dropout ``key``) and the reference (no
    LoRA, no dropout, ``stop_gradient``). Everything returned is tp-invariant and local to
    this dp shard."""
    weights = batch["target_weights"]

    def logps(lp, k):
        h = hidden_states(params, lp, batch["tokens"], batch["positions"],
                          batch.get("segment_ids"), opts, k, batch["token_index"])
        return sequence_logps(h, batch["targets"], weights, params, opts)   # [B]

    policy = logps(lora, key)
    reference = jax.lax.stop_gradient(logps(None, None))
    counts = jnp.sum(weights.astype(F32), axis=-1)                          # [B]
    losses, metrics, valid = pair_losses(policy, reference, counts, pref)
    return jnp.sum(losses), ({k: jnp.sum(v) for k, v in metrics.items()}, jnp.sum(valid))

"""Direct Preference Optimization (DPO) with LoRA, per device (inside ``shard_map``).

Two batch layouts of a preference pair (:class:`PreferenceLoss` ``shared_prefix``):

* shared prefix (one row per pair): the prompt once, then the chosen answer, then the
  rejected one, in segments ``kernels.branch_segment(pair, role)``: role 0 the prompt (less
  its last token), 1 the chosen answer, 2 the rejected one, each answer segment starting with
  a copy of the prompt's last token (whose logits predict the answer's first token) and its
  positions continuing the prompt's. An answer attends to the prompt and to itself, never to
  the other answer (the kernels' branch-segment mask), so the prompt is computed once.
* separate (two rows per pair, adjacent): row 2i = prompt + chosen, row 2i+1 = prompt +
  rejected; a dp shard holds an even number of whole rows.

Either way a pair's log-probs are summed on one dp shard (over cp when the row is split), and
the loss weights (``target_weights``) are on the completion tokens only.

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

from ..kernels import BRANCH_ROLES, BRANCH_SEGMENT_BASE
from ..parallel.mesh import CP
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
    ``label_smoothing`` (sigmoid only, in [0, 0.5)), ``shared_prefix`` (the batch layout:
    one row per pair, or two adjacent rows; module docstring)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    shared_prefix: bool = False
    pairs_per_row: int = 1

    def __post_init__(self):
        if self.pairs_per_row < 1 or (self.pairs_per_row > 1 and not self.shared_prefix):
            raise ValueError(f"pairs_per_row={self.pairs_per_row}: more than one pair per row "
                             f"needs the shared-prefix layout, and at least one")


def pair_losses(policy, reference, counts, pref: PreferenceLoss):
    """Per-pair DPO losses and metrics from per-row sequence log-probs.

    policy, reference, counts: [2P] float32 (entries 2i chosen, 2i+1 rejected, of pair i;
    counts = the completion tokens of each). Returns (losses [P], metrics: dict name -> [P], valid [P]
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


def answer_slots(segment_ids, pairs_per_row: int = 1):
    """Shared-prefix layout: [B, S] int32, the completion slot of each token of its row, 2k on
    the chosen answer of the row's pair k and 2k + 1 on its rejected one (from the group and
    role of their branch segments, ``kernels.branch_segment(k, role)``); prompt and padding
    tokens carry no loss weight, their slot is any in range."""
    role = jnp.bitwise_and(segment_ids, BRANCH_ROLES - 1)
    group = jnp.right_shift(segment_ids - BRANCH_SEGMENT_BASE, 2)       # BRANCH_ROLES = 4
    return jnp.clip(2 * group + role - 1, 0, 2 * pairs_per_row - 1)


def preference_sums(params, lora, batch: dict, opts: ForwardOptions, pref: PreferenceLoss,
                    key=None):
    """Per device: (sum of this shard's pair losses, (metric sums dict, number of pairs)).

    batch: this device's shard of the prepared batch, [B, S] fields as
    :func:`spmd_lora.model.loss_sum` reads them, in ``pref``'s layout (module docstring): up to
    ``pairs_per_row`` pairs in each of the B rows (shared prefix), or B/2 pairs on adjacent
    rows. Two forwards: the
    policy (``lora``, dropout ``key``) and the reference (no LoRA, no dropout,
    ``stop_gradient``). The completions' log-probs are summed over cp (a row split into
    chunks); everything returned is tp- and cp-invariant and local to this dp shard."""
    weights = batch["target_weights"]
    if pref.shared_prefix:
        per_row = 2 * pref.pairs_per_row
        slots = answer_slots(batch["segment_ids"], pref.pairs_per_row)
        opts = dataclasses.replace(opts, branch_segments=True)
    else:
        slots, per_row = None, 1

    def logps(lp, k):
        h = hidden_states(params, lp, batch["tokens"], batch["positions"],
                          batch.get("segment_ids"), opts, k, batch["token_index"])
        return jax.lax.psum(sequence_logps(h, batch["targets"], weights, params, opts,
                                           slots, per_row), CP)             # [B * per_row]

    policy = logps(lora, key)
    reference = jax.lax.stop_gradient(logps(None, None))
    w = weights.astype(F32)
    if slots is None:
        counts = jnp.sum(w, axis=-1)                                        # [B]
    else:                            # completion b * per_row + slot, as sequence_logps sums
        rows = jnp.arange(w.shape[0], dtype=jnp.int32)[:, None]
        counts = jax.ops.segment_sum(w.reshape(-1), (rows * per_row + slots).reshape(-1),
                                     num_segments=w.shape[0] * per_row)     # [B * per_row]
    counts = jax.lax.psum(counts, CP)
    losses, metrics, valid = pair_losses(policy, reference, counts, pref)
    return jnp.sum(losses), ({k: jnp.sum(v) for k, v in metrics.items()}, jnp.sum(valid))

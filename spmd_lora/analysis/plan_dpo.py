"""The memory plan of a DPO train step by prompt length: ``spmd-lora plan --objective dpo``.

The DPO step (``engine/step.make_preference_step``: the policy's forward and backward with
LoRA, and the reference's forward, the same base without LoRA) is compiled on abstract shapes
as the SFT step is (:func:`spmd_lora.analysis.plan.plan_memory`). Its batch has the one batch
schema, [A, B, S] int32 fields split B over dp, and B and S follow from the pair layout
(:func:`spmd_lora.analysis.flops.dpo_rows`), for ``pairs`` pairs of a P-token prompt (BOS
included) and two answers of C tokens (EOS included) each:

* ``separate``: B = 2 x pairs rows (prompt + chosen, prompt + rejected) of S = P + C;
* ``shared-prefix``: B = pairs rows of S = P + 2 C + 1 (the prompt once, each answer behind a
  copy of its last token), with ``segment_ids`` (the answers see the prompt, not each other).

Only the ``PreferenceLoss`` flag ``shared_prefix`` and the segment ids tell the two programs
apart; the masks are data. As in training, ``max_seq_len`` is a pair's row (shared-prefix) or
longer row (separate), and ``batch_size`` counts pairs.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..model import PreferenceLoss
from .flops import DPO_LAYOUTS, dpo_rows
from .plan import plan_memory

__all__ = ["DPO_LAYOUTS", "dpo_preference", "dpo_row_len", "dpo_prompt_len", "plan_dpo_memory"]


def dpo_preference(layout: str) -> PreferenceLoss:
    """The DPO loss of ``layout``; beta, loss type and label smoothing change no buffer, so
    the defaults stand for them."""
    if layout not in DPO_LAYOUTS:
        raise ConfigError(f"dpo_layout {layout!r}: one of {', '.join(DPO_LAYOUTS)}")
    return PreferenceLoss(shared_prefix=layout == "shared-prefix")


def dpo_row_len(prompt_len: int, completion_len: int, layout: str) -> int:
    """Tokens per row (the step's S) of a pair of a ``prompt_len``-token prompt and answers of
    ``completion_len`` tokens."""
    return dpo_rows(prompt_len, completion_len, completion_len, layout)[1]


def dpo_prompt_len(max_seq_len: int, completion_len: int, layout: str) -> int:
    """The longest prompt whose pair fits rows of ``max_seq_len`` tokens (the inverse of
    :func:`dpo_row_len`); ConfigError when the answers leave no room for a prompt."""
    if completion_len < 1:
        raise ConfigError(f"completion_len must be >= 1 (tokens of each answer, EOS "
                          f"included), got {completion_len}")
    prompt = max_seq_len - (dpo_row_len(0, completion_len, layout))
    if prompt < 1:
        raise ConfigError(f"max_seq_len={max_seq_len} leaves no room for a prompt: a pair's "
                          f"{'row' if layout == 'shared-prefix' else 'rows'} in the {layout} "
                          f"layout with answers of {completion_len} tokens need "
                          f"{dpo_row_len(1, completion_len, layout)} tokens at least")
    return prompt


def plan_dpo_memory(cfg, tp: int, dp: int = 1, prompt_len: int = 4096, *,
                    completion_len: int = 512, layout: str = "shared-prefix", pairs: int = 1,
                    **kw) -> dict:
    """Per-device memory of one DPO step on ``pairs`` pairs per micro-batch (global, split over
    dp: a multiple of dp) of a ``prompt_len``-token prompt and two ``completion_len``-token
    answers in ``layout``: :func:`spmd_lora.analysis.plan.plan_memory` of the DPO step (its
    other keywords as there) on the layout's rows, plus ``dpo_layout``, ``prompt_len``,
    ``completion_len``, ``pairs`` and ``rows_per_pair`` (``batch`` is the rows,
    ``max_seq_len`` the row length)."""
    preference = dpo_preference(layout)
    if pairs < 1 or pairs % dp:
        raise ConfigError(f"objective dpo splits whole pairs over dp: batch_size={pairs} (pairs "
                          f"per micro-batch) must be a multiple of dp={dp}")
    rows, seq = dpo_rows(prompt_len, completion_len, completion_len, layout)
    p = plan_memory(cfg, tp, dp, seq, batch=rows * pairs, preference=preference,
                    segments=layout == "shared-prefix", **kw)
    p.update(dpo_layout=layout, prompt_len=prompt_len, completion_len=completion_len,
             pairs=pairs, rows_per_pair=rows)
    return p

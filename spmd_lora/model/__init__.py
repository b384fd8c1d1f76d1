"""The Llama forward pass with LoRA, written per device (runs inside ``jax.shard_map``).

Every function here sees the LOCAL shard of one (dp, cp, tp) device and communicates only
through explicit collectives: over the ``tp`` axis, Megatron-style,

* column-parallel q/k/v/gate/up: local output columns, no collective;
* row-parallel o/down: local input rows; the partial outputs are summed over tp (LoRA's rank-r
  term folded into that sum);
* vocab-parallel embedding and vocab-parallel cross-entropy (``pmax`` + ``psum`` of sum-exp and
  of the target logit) that never gathers the full logits;

and, with context parallelism (cp > 1), over the ``cp`` axis inside attention only: each cp
rank holds two zig-zag chunks of the sequence (laid out by the batch preparation,
:mod:`spmd_lora.parallel.zigzag`), and ring attention (``ppermute`` of K/V blocks, or an
all-gather of K/V) lets its queries see every earlier key, by global token index.

Where the residual stream lives is the sequence layout's business
(:mod:`spmd_lora.parallel.sequence`): replicated ``[B, S, D]`` on every tp device (the column
block input is ``pcast`` to tp-varying, the row block output ``psum``-ed), or, with sequence
parallelism, ``[B, S/tp, D]`` (``all_gather`` before a column block, ``psum_scatter`` after a row
block). Position-wise work can run in tiles (``mlp_chunk_tokens``, ``ce_chunk_tokens``).

Shapes in comments are local: ``B`` local batch, ``S`` local sequence (the cp rank's tokens,
padded to a multiple of tp under sequence parallelism), ``R`` residual rows held (S/tp or S),
``D`` hidden, ``Hl``/``KVl`` local q/kv heads, ``hd`` head dim, ``Fl`` local intermediate,
``Vl`` local (padded) vocab. Norms, rotary tables and softmax statistics run in float32 whatever
the weight dtype (the rotation itself, as in HF, in the activations' dtype).

Modules: :mod:`.options` (``ForwardOptions``), :mod:`.layers` (RMS norm, rotary embeddings,
vocab-parallel embedding), :mod:`.lora_linear` (column / row linears with LoRA), :mod:`.dropout`
(LoRA dropout masks), :mod:`.remat` (the layer scan's checkpoint policy), :mod:`.llama` (the
layer and the stack), :mod:`.loss` (LM head and vocab-parallel cross-entropy, per-row sequence log-probs),
:mod:`.preference` (the DPO loss of adjacent chosen / rejected rows).
"""
from .layers import apply_rope, embed, rms_norm, rope_tables
from .llama import hidden_states, loss_sum, mlp_residual
from .lora_linear import column_linear, row_linear
from .loss import cross_entropy_sum, local_logits, sequence_logps
from .options import REMAT_POLICIES, ForwardOptions
from .preference import PREFERENCE_METRICS, PreferenceLoss, preference_sums

__all__ = ["REMAT_POLICIES", "ForwardOptions", "apply_rope", "column_linear", "cross_entropy_sum",
           "embed", "hidden_states", "local_logits", "loss_sum", "mlp_residual", "rms_norm",
           "rope_tables", "row_linear", "sequence_logps", "PREFERENCE_METRICS", "PreferenceLoss",
           "preference_sums"]

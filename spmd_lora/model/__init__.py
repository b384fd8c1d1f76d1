"""The per-device Llama forward with LoRA, written for ``jax.shard_map`` (see llama.py)."""
from .llama import (REMAT_POLICIES, ForwardOptions, apply_rope, column_linear, cross_entropy_sum,
                    embed, hidden_states, local_logits, loss_sum, mlp_residual, rms_norm,
                    rope_tables, row_linear)

__all__ = ["REMAT_POLICIES", "ForwardOptions", "apply_rope", "column_linear", "cross_entropy_sum",
           "embed", "hidden_states", "local_logits", "loss_sum", "mlp_residual", "rms_norm",
           "rope_tables", "row_linear"]

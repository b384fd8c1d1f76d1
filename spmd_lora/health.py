"""Stop a run whose LoRA factors have collapsed or blown up, with one clear error.

A far too large learning rate does not always give a NaN loss: with ``learning_rate=1e30`` the
first AdamW step moves every factor by about 1e30, the activations saturate, the loss freezes and
the gradients become exactly zero, and training would carry on, wasting the run. After every
step :class:`DivergenceGuard` checks

* the loss and the gradient norm are finite;
* the global norm of the LoRA factors is finite and below ``max_lora_norm`` (a healthy run's
  factors have norms of order 1-100; 1e6 only comes from a runaway step);
* the gradient norm has not been exactly zero for ``zero_grad_steps`` steps in a row (LoRA B
  starts at zero, but the gradient of B is not zero unless the model is dead).

and raises :class:`~spmd_lora.errors.TrainingError` naming the step, what went wrong and what to
do, plus the newest checkpoint to go back to.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .errors import TrainingError

MAX_LORA_NORM = 1e6
ZERO_GRAD_STEPS = 3


@jax.jit
def lora_norm(lora) -> jax.Array:
    """Global L2 norm of all LoRA factors (one small reduction on the replicated tree)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(lora)))


class DivergenceGuard:
    """Checks each finished step (see the module docstring); keeps the zero-gradient streak."""

    def __init__(self, max_lora_norm: float = MAX_LORA_NORM, zero_grad_steps: int = ZERO_GRAD_STEPS):
        self.max_lora_norm, self.zero_grad_steps = max_lora_norm, zero_grad_steps
        self.zero_streak = 0

    def check(self, step: int, loss: float, grad_norm: float, factor_norm: float,
              last_checkpoint) -> None:
        """Raise TrainingError when step ``step`` left the run unusable. ``last_checkpoint()``
        names the newest checkpoint (called only then)."""
        if (math.isfinite(loss) and math.isfinite(grad_norm) and math.isfinite(factor_norm)
                and factor_norm <= self.max_lora_norm and grad_norm != 0.0):
            self.zero_streak = 0
            return
        hint = f"lower learning_rate or check the data. Last checkpoint: {last_checkpoint()}"
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise TrainingError(f"loss became {loss} (grad norm {grad_norm}) at step {step}; {hint}")
        if not math.isfinite(factor_norm) or factor_norm > self.max_lora_norm:
            raise TrainingError(f"LoRA factors blew up at step {step} (norm {factor_norm:.3g}, "
                                f"healthy runs stay far below {self.max_lora_norm:.0e}); {hint}")
        self.zero_streak = self.zero_streak + 1 if grad_norm == 0.0 else 0
        if self.zero_streak >= self.zero_grad_steps:
            raise TrainingError(f"gradients have been exactly zero for {self.zero_streak} steps "
                                f"(step {step}, loss stuck at {loss:.4f}): training has collapsed; "
                                f"{hint}")

"""Rematerialisation of the layer scan's body: the ``remat`` policy of :class:`ForwardOptions`.

none | full (recompute the whole layer in the backward) | save-dots (keep the matmul outputs
without batch dims) | offload (keep only the two half-layer inputs, in host memory; each
half is its own checkpoint, so the backward recomputes one half at a time).
"""
from __future__ import annotations

import jax

from .options import ForwardOptions

# Names of the per-layer values the ``offload`` remat policy keeps in host memory.
LAYER_INPUT, MLP_INPUT = "layer_input", "mlp_input"


def remat(fn, opts: ForwardOptions):
    """``fn`` (the scan body over layers) under the policy ``opts.remat``."""
    policies = jax.checkpoint_policies
    if opts.remat == "none":
        return fn
    if opts.remat == "full":
        return jax.checkpoint(fn, policy=policies.nothing_saveable)
    if opts.remat == "save-dots":
        return jax.checkpoint(fn, policy=policies.dots_with_no_batch_dims_saveable)
    # offload: the two half-layer inputs (the layer input and the residual after attention)
    # wait in host memory; each half is its own checkpoint (decoder_layer), so the backward
    # recomputes one half at a time and the device peak is that of the larger half.
    policy = policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT, MLP_INPUT],
        offload_src="device", offload_dst="pinned_host")
    return jax.checkpoint(fn, policy=policy)


def remat_half(fn, opts: ForwardOptions):
    """One half of a layer (attention or MLP, with its residual add): its own checkpoint under
    the ``offload`` policy (recomputed in its own backward, from its input offloaded by
    :func:`remat`), else ``fn`` as it is."""
    if opts.remat == "offload":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    return fn

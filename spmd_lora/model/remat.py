"""Rematerialisation of the layer scan's body: the ``remat`` policy of :class:`ForwardOptions`.

* ``none``: every intermediate the backward needs is kept.
* ``full``: only the layer's input is kept (on the device, by the scan); the whole layer is
  recomputed in its backward.
* ``save-dots``: the matmul outputs without batch dims are kept; attention is recomputed.
* ``offload``: only the two half-layer inputs are kept (the layer input and the residual after
  attention), in pinned host memory; each half is its own checkpoint, so the backward
  recomputes one half at a time: 2 x [B, R, D] per layer on the host.
* ``offload-input``: only the layer input is kept, in pinned host memory: 1 x [B, R, D] per
  layer, half of ``offload``. The backward recomputes the attention half to get the MLP's
  input, then each half again in its own backward: one extra attention forward per layer.

With ``ForwardOptions.offload_layers`` = K (< L), only the first K layers send their saved
inputs to the host; the other L - K keep the same inputs on the device (same recomputation,
same function): :func:`layer_segments` splits the layer scan there.
"""
from __future__ import annotations

import jax

from .options import ForwardOptions

# Names of the per-layer values the offload policies keep (in host memory, or on the device
# for the layers past ``offload_layers``).
LAYER_INPUT, MLP_INPUT = "layer_input", "mlp_input"

OFFLOAD_POLICIES = ("offload", "offload-input")


def saved_names(policy: str) -> list[str]:
    """The named per-layer values an offload policy keeps."""
    return [LAYER_INPUT, MLP_INPUT] if policy == "offload" else [LAYER_INPUT]


def layer_segments(opts: ForwardOptions) -> list[tuple[int, int, bool]]:
    """The layer scan's segments [(first layer, end, on the host)]: one segment of all layers,
    or, with an offload policy and 0 < ``offload_layers`` < L, the first ``offload_layers``
    layers offloaded and the rest kept on the device."""
    n = opts.cfg.num_layers
    if opts.remat not in OFFLOAD_POLICIES:
        return [(0, n, False)]
    k = n if opts.offload_layers is None else opts.offload_layers
    if k in (0, n):
        return [(0, n, k == n)]
    return [(0, k, True), (k, n, False)]


def remat(fn, opts: ForwardOptions, to_host: bool = True):
    """``fn`` (the scan body over layers) under the policy ``opts.remat``; for the offload
    policies, ``to_host`` says where its saved inputs wait (pinned host memory, or the
    device)."""
    policies = jax.checkpoint_policies
    if opts.remat == "none":
        return fn
    if opts.remat == "full":
        return jax.checkpoint(fn, policy=policies.nothing_saveable)
    if opts.remat == "save-dots":
        return jax.checkpoint(fn, policy=policies.dots_with_no_batch_dims_saveable)
    names = saved_names(opts.remat)
    if not to_host:
        return jax.checkpoint(fn, policy=policies.save_only_these_names(*names))
    policy = policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=names,
        offload_src="device", offload_dst="pinned_host")
    return jax.checkpoint(fn, policy=policy)


def remat_half(fn, opts: ForwardOptions):
    """One half of a layer (attention or MLP, with its residual add): its own checkpoint under
    the offload policies (recomputed in its own backward from its saved input, so the device
    peak is that of the larger half), else ``fn`` as it is."""
    if opts.remat in OFFLOAD_POLICIES:
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    return fn

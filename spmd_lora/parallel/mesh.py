"""Device mesh and THE sharding plan.

Mesh axes ``(dp, cp, tp)``, tp varying fastest: ``dp`` (data parallel: the batch is split over
it along B), ``cp`` (context parallel: the sequence is split over it along S, in the zig-zag
layout of :mod:`spmd_lora.parallel.zigzag`) and ``tp`` (tensor parallel, Megatron-style, with
optional sequence parallelism of the activations). Every parameter's PartitionSpec comes from
``PARAM_SPECS`` below; nothing else in the package decides how a weight is laid out. Weights
are replicated over dp and cp alike.

Parameter tree (global shapes; ``L`` layers, ``D`` hidden, ``F`` intermediate, ``H``/``KV`` heads,
``hd`` head dim, ``Vp`` vocab padded to a multiple of tp, ``KVe`` kv heads after replication for
tp > KV, i.e. ``tp * max(KV // tp, 1)``)::

    embed        [Vp, D]        rows over tp      vocab-parallel lookup, psum of the rows
    lm_head      [D, Vp]        columns over tp   vocab-parallel cross-entropy (absent if tied)
    final_norm   [D]            replicated
    layers/attn_norm [L, D]     replicated
    layers/mlp_norm  [L, D]     replicated
    layers/<proj>    [L, in, out]  the seven projections of THE projection table
                     (config/projections.py, which lists their shapes): a column-parallel one
                     split along out (``P(None, None, tp)``), a row-parallel one along in
                     (``P(None, tp, None)``, psum(tp) after); k/v with KVe kv heads

Quantised linears (``base_quant`` int8 / nf4) and the spec tree of an actual parameter tree
(``param_specs``) live on the weights floor (weights/quant.py, weights/shapes.py).

LoRA factors (``lora/layers/<proj>/a`` [L, in, r] and ``.../b`` [L, r, out], fp32) are
replicated on every device. The batch ``[B, S]`` is split over dp along B and over cp along S
(``BATCH_SPEC``).
"""
from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..config.projections import PROJECTIONS
from ..errors import ConfigError

DP, CP, TP = "dp", "cp", "tp"
MESH_AXES = (DP, CP, TP)

# how a [L, in, out] projection weight is split over tp, by its kind in the projection table
PROJECTION_SPECS = {"column": P(None, None, TP), "row": P(None, TP, None)}

PARAM_SPECS = {
    "embed": P(TP, None),
    "lm_head": P(None, TP),
    "final_norm": P(),
    "layers": {
        "attn_norm": P(),
        "mlp_norm": P(),
        **{name: PROJECTION_SPECS[p.parallel] for name, p in PROJECTIONS.items()},
    },
}

BATCH_SPEC = P(DP, CP)
REPLICATED = P()


def lora_specs(lora):
    """LoRA factors are replicated: a P() for every leaf."""
    return jax.tree.map(lambda _: REPLICATED, lora)


def make_mesh(dp: int = 1, tp: int = 1, cp: int = 1) -> Mesh:
    """A (dp, cp, tp) mesh over the first dp*cp*tp devices. tp varies fastest, so a tp group
    sits on neighbouring devices (one node's NVLink domain), then cp, then dp."""
    if min(dp, tp, cp) < 1:
        raise ConfigError(f"dp, cp and tp must be >= 1, got dp={dp} cp={cp} tp={tp}")
    devices = jax.devices()
    n = dp * cp * tp
    if n > len(devices):
        raise ConfigError(
            f"dp*cp*tp = {dp}*{cp}*{tp} = {n} devices requested but only {len(devices)} "
            f"{devices[0].platform} device(s) are visible (on CPU, set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
    return mesh_over(devices[:n], dp, tp, cp)


def mesh_over(devices, dp: int, tp: int, cp: int = 1) -> Mesh:
    """The (dp, cp, tp) mesh over exactly these dp*cp*tp devices (in order, tp fastest)."""
    return jax.make_mesh((dp, cp, tp), MESH_AXES, devices=list(devices),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


def named(mesh: Mesh, spec_tree):
    """NamedSharding tree from a PartitionSpec tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree,
                        is_leaf=lambda x: isinstance(x, P))

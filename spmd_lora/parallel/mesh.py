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
    layers/q_proj    [L, D, H*hd]    columns over tp (whole heads per device)
    layers/k_proj    [L, D, KVe*hd]  columns over tp
    layers/v_proj    [L, D, KVe*hd]  columns over tp
    layers/o_proj    [L, H*hd, D]    rows over tp, psum(tp) after
    layers/mlp_norm  [L, D]     replicated
    layers/gate_proj [L, D, F]  columns over tp
    layers/up_proj   [L, D, F]  columns over tp
    layers/down_proj [L, F, D]  rows over tp, psum(tp) after

With a quantised base (``base_quant`` int8 / nf4, see quant.py) each of the seven linears is a
QuantWeight whose leaves are in the canonical orientation ``[L, N, ...]``, ``N`` the tp-split
dimension (out of q/k/v/gate/up, in of o/down); every leaf is split over tp along axis 1
(``QUANT_SPECS``)::

    int8: values [L, N, D] int8, scale [L, N] f32
    nf4:  packed [L, N, D/2] uint8, absmax_codes [L, N, D/64] uint8,
          group_scale / group_offset [L, N*D/16384] f32

LoRA factors (``lora/layers/<proj>/a`` [L, in, r] and ``.../b`` [L, r, out], fp32) are
replicated on every device. The batch ``[B, S]`` is split over dp along B and over cp along S
(``BATCH_SPEC``).
"""
from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..errors import ConfigError
from ..weights.quant import is_quantised

DP, CP, TP = "dp", "cp", "tp"
MESH_AXES = (DP, CP, TP)

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")

PARAM_SPECS = {
    "embed": P(TP, None),
    "lm_head": P(None, TP),
    "final_norm": P(),
    "layers": {
        "attn_norm": P(),
        "mlp_norm": P(),
        **{name: P(None, None, TP) for name in COLUMN_PARALLEL},
        **{name: P(None, TP, None) for name in ROW_PARALLEL},
    },
}

QUANT_SPECS = {
    "int8": {"values": P(None, TP, None), "scale": P(None, TP)},
    "nf4": {"packed": P(None, TP, None), "absmax_codes": P(None, TP, None),
            "group_scale": P(None, TP), "group_offset": P(None, TP)},
}

BATCH_SPEC = P(DP, CP)
REPLICATED = P()


def param_specs(params):
    """PartitionSpec tree matching ``params`` (which may omit lm_head when embeddings are tied)."""
    specs = {k: PARAM_SPECS[k] for k in params if k != "layers"}
    specs["layers"] = {k: v.with_leaves(**quant_specs(v.kind)) if is_quantised(v)
                       else PARAM_SPECS["layers"][k] for k, v in params["layers"].items()}
    return specs


def quant_specs(kind: str) -> dict:
    """Leaf name -> PartitionSpec of a quantised linear (``kind`` int8 | nf4)."""
    return dict(QUANT_SPECS[kind])


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

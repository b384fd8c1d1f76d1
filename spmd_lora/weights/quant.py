"""Quantised frozen base weights (QLoRA): ``base_quant = "none" | "int8" | "nf4"``.

Only the seven decoder linears (THE projection table, config/projections.py) are quantised (as bitsandbytes/QLoRA do); embeddings, norms and
the LM head keep the model dtype. A quantised linear is stored in its CANONICAL orientation
``C [L, N, D]``: ``N`` is the dimension tensor parallelism splits (the output of a
column-parallel q/k/v/gate/up, the input of a row-parallel o/down) and ``D`` the hidden size,
which no linear splits. So ``C`` is HF's ``[out, in]`` weight for a column-parallel linear and its
transpose for a row-parallel one, and ``W = C.T`` resp. ``W = C`` in our ``x @ W`` layout
(parallel/mesh.py; ``N``, ``D`` from :func:`~spmd_lora.config.projections.canonical_dims`).
Every quantisation block runs along ``D`` inside one row of ``C``, so no block ever
straddles a tp shard boundary, and the quantised base does not depend on tp.

* ``int8`` (:class:`Int8Weight`): one absmax scale per row of ``C`` (``values`` int8 [L, N, D],
  ``scale`` f32 [L, N]; ``C ~ values * scale``). That is LLM.int8's per-output-channel weight
  scaling for column-parallel linears and per-input-channel for row-parallel ones (a
  per-output-channel scale of o/down would span every tp shard); no outlier decomposition.
* ``nf4`` (:class:`NF4Weight`): the QLoRA NormalFloat-4 code book (:data:`NF4_CODE`), blocks of 64
  along ``D``, two codes per uint8 (even element in the high nibble), and double quantisation of
  the per-block absmax: groups of 256 consecutive absmax (row-major over ``[N, D/64]``) are
  centred and quantised to 8 bits with bitsandbytes' signed dynamic map (:func:`dynamic_map`).
  Leaves: ``packed`` uint8 [L, N, D/2], ``absmax_codes`` uint8 [L, N, D/64], ``group_scale`` and
  ``group_offset`` f32 [L, N*D/64/256]. The one difference from bitsandbytes: the centring offset
  is the mean of each 256-group, not of the whole tensor, so every group lives in one shard (for a
  tensor of exactly one group the two agree bit for bit; tests/test_quant.py checks it). The
  first level (codes and absmax of a column-parallel ``[out, in]`` weight) equals
  ``bitsandbytes.functional.quantize_4bit(W, blocksize=64, quant_type="nf4")`` exactly.

Sharding (``QUANT_SPECS``): every leaf is split over tp along ``N`` (axis 1)::

    int8: values [L, N, D] int8, scale [L, N] f32
    nf4:  packed [L, N, D/2] uint8, absmax_codes [L, N, D/64] uint8,
          group_scale / group_offset [L, N*D/16384] f32

A group
stays inside one shard when ``N/tp * D/64`` is a multiple of 256 (Llama 7B-70B: always);
:func:`check_nf4_layout` reports the rare config where it is not.

Host side (numpy, at load time, one shard and one layer at a time): :func:`quantize_int8`,
:func:`quantize_nf4`, :func:`dequantize_host`. Device side (inside shard_map, per layer inside
the layer scan): :func:`matmul` dequantises the local shard to the compute dtype just before the
matmul, under ``jax.checkpoint``, so the backward dequantises again instead of keeping a
full-precision copy: a dequantised layer lives only transiently.
"""
from __future__ import annotations

import dataclasses
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config.projections import PROJECTIONS, TARGETS, canonical_dims
from ..errors import ConfigError
from ..parallel.mesh import PARAM_SPECS, TP, named

BASE_QUANTS = ("none", "int8", "nf4")
NF4_BLOCK = 64
NF4_GROUP = 256                       # absmax values per double-quantisation group
QUANT_CHUNK_ELEMENTS = 1 << 18       # weights quantised at once while loading (1 MiB in fp32)
QUANTISED_LINEARS = TARGETS          # every projection of the table

QUANT_SPECS = {
    "int8": {"values": P(None, TP, None), "scale": P(None, TP)},
    "nf4": {"packed": P(None, TP, None), "absmax_codes": P(None, TP, None),
            "group_scale": P(None, TP), "group_offset": P(None, TP)},
}

# The 16 NF4 values as published with QLoRA (Dettmers et al. 2023, appendix E) and used by
# bitsandbytes: normal quantiles, asymmetric so that 0 is represented exactly.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def check_base_quant(base_quant: str) -> str:
    if base_quant not in BASE_QUANTS:
        raise ConfigError(f"base_quant {base_quant!r} unknown; choose from {', '.join(BASE_QUANTS)}")
    return base_quant


def _linspace_f32(start: float, stop: float, n: int) -> np.ndarray:
    """float32 linspace rounded as torch's CPU kernel rounds it (start + i*step for the first
    half, stop - (n-1-i)*step for the second, each with a single rounding), so the dynamic map
    below equals bitsandbytes' bit for bit."""
    start32, stop32 = np.float32(start), np.float32(stop)
    step = np.float64((stop32 - start32) / np.float32(n - 1))
    i = np.arange(n)
    out = np.where(i < n // 2, np.float64(start32) + step * i, np.float64(stop32) - step * (n - 1 - i))
    return out.astype(np.float32)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (7 exponent bits): 256 sorted float32 values in
    [-1, 1]. For exponent i (0..6) there are 2**i fraction steps, the midpoints of a linspace from
    0.1 to 1 scaled by 10**(i-6), with both signs; plus 0 and 1, and one spare 0."""
    values = []
    for i in range(7):
        bounds = _linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (i - 6))
        values += list(scale * means) + list(-scale * means)
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return np.sort(np.array(values, np.float32))


DYNAMIC_CODE = dynamic_map()


def normal_float_code() -> np.ndarray:
    """The NF4 values derived from first principles (Dettmers et al.): 8 positive and 7 negative
    quantiles of N(0, 1) at evenly spaced probabilities from 0.5 to 0.9677083, plus 0, scaled to
    [-1, 1]. Used by the tests as an independent check of :data:`NF4_CODE`."""
    ppf, offset = NormalDist().inv_cdf, 0.9677083
    pos = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    v = np.sort(np.array(pos + [0.0] + neg))
    return (v / np.abs(v).max()).astype(np.float32)


def _nearest(scaled: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest code value (ties go down), as bitsandbytes' bucketize on midpoints."""
    bounds = (code[:-1] + code[1:]) / np.float32(2.0)
    return np.searchsorted(bounds, scaled, side="left").astype(np.uint8)


def _blockwise(x: np.ndarray, code: np.ndarray):
    """x [n, block] float32 -> (codes [n, block] uint8, absmax [n] float32): bitsandbytes'
    blockwise rule, x * (1/absmax) clipped to [-1, 1], then the nearest code."""
    absmax = np.maximum(x.max(axis=-1), -x.min(axis=-1))
    inv = np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))
    scaled = x * inv[:, None]
    np.clip(scaled, -1.0, 1.0, out=scaled)
    return _nearest(scaled, code), absmax


# ----------------------------------------------------------------------------- host quantisers

def quantize_int8(c: np.ndarray) -> dict:
    """c [N, D] (canonical rows) -> {"values": int8 [N, D], "scale": float32 [N]}."""
    c = np.asarray(c, np.float32)
    absmax = np.abs(c).max(axis=-1)
    inv = np.float32(127.0) / np.maximum(absmax, np.float32(1e-38))
    values = np.clip(np.rint(c * inv[:, None]), -127, 127).astype(np.int8)
    return {"values": values, "scale": (absmax / np.float32(127.0)).astype(np.float32)}


def quantize_nf4(c: np.ndarray) -> dict:
    """c [N, D] (canonical rows, D % 64 == 0, N*D/64 % 256 == 0) -> {"packed": uint8 [N, D/2],
    "absmax_codes": uint8 [N, D/64], "group_scale", "group_offset": float32 [N*D/64/256]}."""
    c = np.asarray(c, np.float32)
    n, d = c.shape
    nb = d // NF4_BLOCK
    codes, absmax = _blockwise(c.reshape(n * nb, NF4_BLOCK), NF4_CODE)
    codes = codes.reshape(n, d)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    groups = absmax.reshape(-1, NF4_GROUP)
    offset = groups.mean(axis=-1, dtype=np.float32)
    absmax_codes, group_scale = _blockwise(groups - offset[:, None], DYNAMIC_CODE)
    return {"packed": packed, "absmax_codes": absmax_codes.reshape(n, nb),
            "group_scale": group_scale, "group_offset": offset}


QUANTIZERS = {"int8": quantize_int8, "nf4": quantize_nf4}


def dequantize_host(kind: str, q: dict) -> np.ndarray:
    """numpy float32 C [N, D] from one layer's host leaves, with the exact arithmetic of
    :meth:`QuantWeight.dequantize` (merged exports, tests)."""
    leaves = {k: jnp.asarray(v) for k, v in q.items()}
    return np.asarray(_DEQUANT[kind](leaves))


def _dequant_int8(q):
    return q["values"].astype(jnp.float32) * q["scale"][..., None]


def _dequant_nf4(q):
    packed = q["packed"]                                         # [.., N, D/2]
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*packed.shape[:-1], -1)
    values = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)]      # [.., N, D]
    ac = q["absmax_codes"]                                       # [.., N, nb]
    nb = ac.shape[-1]
    groups = ac.reshape(*ac.shape[:-2], -1, NF4_GROUP)           # [.., G, 256]
    absmax = (jnp.asarray(DYNAMIC_CODE)[groups.astype(jnp.int32)] * q["group_scale"][..., None]
              + q["group_offset"][..., None]).reshape(ac.shape)  # [.., N, nb]
    blocks = values.reshape(*values.shape[:-1], nb, NF4_BLOCK) * absmax[..., None]
    return blocks.reshape(values.shape)


_DEQUANT = {"int8": _dequant_int8, "nf4": _dequant_nf4}


# ----------------------------------------------------------------------------- device side

@dataclasses.dataclass(frozen=True)
class QuantWeight:
    """A quantised linear's leaves (global, per layer stack, or one device's local shard).

    ``column``: True for column-parallel (``W = C.T``), False for row-parallel (``W = C``).
    ``compute_dtype``: the dtype :func:`matmul` dequantises to. ``shape`` / ``dtype`` are those
    of the dense ``W`` the leaves stand for (so code that reads ``w.shape`` works unchanged).
    """

    kind = ""

    @property
    def leaves(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("column", "compute_dtype")}

    def _nd(self):
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        lead, n, d = self._nd()
        return (*lead, d, n) if self.column else (*lead, n, d)

    @property
    def dtype(self):
        return np.dtype(self.compute_dtype)

    def dequantize(self, dtype=None):
        """C [.., N, D] in ``dtype`` (default compute_dtype), computed in float32."""
        return _DEQUANT[self.kind](self.leaves).astype(dtype or self.compute_dtype)

    def with_leaves(self, **leaves):
        return dataclasses.replace(self, **leaves)


@dataclasses.dataclass(frozen=True)
class Int8Weight(QuantWeight):
    values: object
    scale: object
    column: bool = True
    compute_dtype: str = "float32"
    kind = "int8"

    def _nd(self):
        s = self.values.shape
        return s[:-2], s[-2], s[-1]


@dataclasses.dataclass(frozen=True)
class NF4Weight(QuantWeight):
    packed: object
    absmax_codes: object
    group_scale: object
    group_offset: object
    column: bool = True
    compute_dtype: str = "float32"
    kind = "nf4"

    def _nd(self):
        s = self.packed.shape
        return s[:-2], s[-2], 2 * s[-1]


WEIGHT_TYPES = {"int8": Int8Weight, "nf4": NF4Weight}
for _cls in WEIGHT_TYPES.values():
    jax.tree_util.register_dataclass(
        _cls, data_fields=[f.name for f in dataclasses.fields(_cls)
                           if f.name not in ("column", "compute_dtype")],
        meta_fields=["column", "compute_dtype"])


def is_quantised(w) -> bool:
    return isinstance(w, QuantWeight)


@jax.checkpoint
def _dequant_matmul(x, w: QuantWeight):
    c = w.dequantize(x.dtype)                                    # [N_l, D]
    if w.column:
        return jnp.einsum("...d,nd->...n", x, c)                 # x [.., D] @ C.T -> [.., N_l]
    return jnp.einsum("...n,nd->...d", x, c)                     # x [.., N_l] @ C -> [.., D]


def matmul(x, w):
    """``x @ W`` for a dense ``w`` [in, out] or a :class:`QuantWeight` (one layer's local shard):
    the shard is dequantised to ``x.dtype`` just before the matmul, and again in the backward
    (``jax.checkpoint``), never stored."""
    if is_quantised(w):
        return _dequant_matmul(x, w)
    return x @ w


# ----------------------------------------------------------------------------- layout

def quant_specs(kind: str) -> dict:
    """Leaf name -> PartitionSpec of a quantised linear (``kind`` int8 | nf4)."""
    return dict(QUANT_SPECS[kind])


def canonical_shape(name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """[L, N, D] of a linear whose dense global shape (mesh.py) is ``shape`` [L, in, out]."""
    L, fan_in, fan_out = shape
    return (L, *canonical_dims(name, (fan_in, fan_out)))


def leaf_shapes(kind: str, canonical: tuple[int, int, int]) -> dict:
    """Global shape and dtype of every leaf of a [L, N, D] linear."""
    L, n, d = canonical
    if kind == "int8":
        return {"values": ((L, n, d), np.int8), "scale": ((L, n), np.float32)}
    groups = n * (d // NF4_BLOCK) // NF4_GROUP
    return {"packed": ((L, n, d // 2), np.uint8), "absmax_codes": ((L, n, d // NF4_BLOCK), np.uint8),
            "group_scale": ((L, groups), np.float32), "group_offset": ((L, groups), np.float32)}


def check_nf4_layout(name: str, canonical: tuple[int, int, int], tp: int) -> None:
    """ConfigError unless a [L, N, D] linear can be NF4-quantised with tp shards along N."""
    _, n, d = canonical
    if d % NF4_BLOCK:
        raise ConfigError(f"base_quant nf4 needs hidden_size divisible by {NF4_BLOCK} (blocks of "
                          f"{NF4_BLOCK} along it), got {d}; use base_quant int8")
    if (n // tp) * (d // NF4_BLOCK) % NF4_GROUP:
        raise ConfigError(
            f"base_quant nf4: {name} has {n // tp} rows per device (tp={tp}) of {d // NF4_BLOCK} "
            f"blocks, not a multiple of the {NF4_GROUP}-absmax double-quantisation group; use "
            f"another tp or base_quant int8")


def abstract_weight(kind: str, name: str, shape, mesh, compute_dtype) -> QuantWeight:
    """A QuantWeight of ShapeDtypeStructs with the plan's shardings (planning, profiling)."""
    canonical = canonical_shape(name, shape)
    if kind == "nf4":
        check_nf4_layout(name, canonical, mesh.shape["tp"])
    shardings = named(mesh, quant_specs(kind))
    leaves = {k: jax.ShapeDtypeStruct(s, dt, sharding=shardings[k])
              for k, (s, dt) in leaf_shapes(kind, canonical).items()}
    return WEIGHT_TYPES[kind](**leaves, column=_is_column(name),
                              compute_dtype=np.dtype(compute_dtype).name)


def _is_column(name: str) -> bool:
    return PROJECTIONS[name].column


def make_quantised_weight(kind: str, name: str, shape, mesh, compute_dtype, read_rows):
    """Quantise one stacked linear straight into each device's shard.

    ``shape``: dense global [L, in, out]; ``read_rows(layer, rows)`` -> float numpy C[layer, rows]
    [len(rows), D] read from the checkpoint (a memory-map slice). Each device's shard is
    quantised once, layer by layer in chunks of about ``QUANT_CHUNK_ELEMENTS`` weights (whole
    double-quantisation groups), so the only full-precision data ever held is one chunk; the
    packed shard is shared by all leaves of that shard and dropped after the last leaf.
    """
    tp = mesh.shape["tp"]
    canonical = canonical_shape(name, shape)
    if kind == "nf4":
        check_nf4_layout(name, canonical, tp)
    L, n, d = canonical
    rows_per_shard = n // tp
    shapes = leaf_shapes(kind, canonical)
    shardings = named(mesh, quant_specs(kind))
    group_rows = max(1, NF4_GROUP * NF4_BLOCK // d) if kind == "nf4" else 1
    chunk = max(group_rows, QUANT_CHUNK_ELEMENTS // d // group_rows * group_rows)
    cache: dict[int, dict] = {}

    def shard(k: int) -> dict:
        if k not in cache:
            out = {f: np.empty((L, s[1] // tp, *s[2:]), dt) for f, (s, dt) in shapes.items()}
            for layer in range(L):
                for r0 in range(0, rows_per_shard, chunk):
                    r1 = min(r0 + chunk, rows_per_shard)
                    rows = np.arange(k * rows_per_shard + r0, k * rows_per_shard + r1)
                    for f, q in QUANTIZERS[kind](read_rows(layer, rows)).items():
                        per_row = shapes[f][0][1] // tp / rows_per_shard
                        out[f][layer, round(r0 * per_row):round(r1 * per_row)] = q
            cache[k] = out
        return cache[k]

    def leaf(field):
        size = shapes[field][0][1]

        def callback(idx):
            start = idx[1].start or 0
            return shard(start * tp // size)[field][idx[0]]
        return jax.make_array_from_callback(shapes[field][0], shardings[field], callback)

    leaves = {f: leaf(f) for f in shapes}
    cache.clear()
    return WEIGHT_TYPES[kind](**leaves, column=_is_column(name),
                              compute_dtype=np.dtype(compute_dtype).name)


def dequantized_params(params, mesh) -> dict:
    """The parameter tree with every QuantWeight replaced by the dense W it stands for (global
    [L, in, out] in its compute dtype, laid out by mesh.PARAM_SPECS): the float model the
    quantised one computes, for tests and comparisons."""
    def dense(name, w):
        if not is_quantised(w):
            return w
        c = w.dequantize()
        c = jnp.swapaxes(c, -1, -2) if w.column else c
        return jax.device_put(c, NamedSharding(mesh, PARAM_SPECS["layers"][name]))

    return {**params, "layers": {k: dense(k, v) for k, v in params["layers"].items()}}

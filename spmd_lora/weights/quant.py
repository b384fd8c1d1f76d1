"""Quantised frozen base weights (QLoRA): ``base_quant = "none" | "int8" | "nf4"``.

Only the seven decoder linears (THE projection table, config/projections.py) are quantised (as
bitsandbytes/QLoRA do); embeddings, norms and the LM head keep the model dtype. A quantised linear
is stored in its CANONICAL orientation ``C [L, N, D]``: ``N`` is the dimension tensor parallelism
splits (the output of a column-parallel q/k/v/gate/up, the input of a row-parallel o/down) and
``D`` the hidden size, which no linear splits. So ``C`` is HF's ``[out, in]`` weight for a
column-parallel linear and its transpose for a row-parallel one, and ``W = C.T`` resp. ``W = C``
in our ``x @ W`` layout (parallel/mesh.py; ``N``, ``D`` from
:func:`~spmd_lora.config.projections.canonical_dims`). Every quantisation block runs along ``D``
inside one row of ``C``, so no block ever straddles a tp shard boundary.

* ``int8`` (:class:`Int8Weight`): one absmax scale per row of ``C`` (``values`` int8 [L, N, D],
  ``scale`` f32 [L, N]; ``C ~ values * scale``). That is LLM.int8's per-output-channel weight
  scaling for column-parallel linears and per-input-channel for row-parallel ones (a
  per-output-channel scale of o/down would span every tp shard); no outlier decomposition.
* ``nf4`` (:class:`NF4Weight`): the QLoRA NormalFloat-4 code book (:data:`NF4_CODE`), blocks of 64
  along ``D`` (``nb = ceil(D/64)`` a row), two codes per uint8 (even element in the high
  nibble), and double quantisation of the per-block absmax: within each UNIT of ``u`` rows
  (:func:`nf4_unit_rows`: the rows one device holds at the largest tp the model allows), groups
  of 256 consecutive absmax (row-major over the unit's ``[u, nb]``) are centred on their mean and
  quantised to 8 bits with bitsandbytes' signed dynamic map (:func:`dynamic_map`). Leaves:
  ``packed`` uint8 [L, N, ceil(D/2)], ``absmax_codes`` uint8 [L, N, nb], ``group_scale`` and
  ``group_offset`` f32 [L, N/u * ceil(u*nb/256)]; static fields ``hidden`` (D) and ``unit_rows``.
  The first level (codes and absmax of a column-parallel ``[out, in]`` weight) equals
  ``bitsandbytes.functional.quantize_4bit(W, blocksize=64, quant_type="nf4")`` exactly, row by
  row (of the whole tensor when D is a multiple of 64). The one difference from bitsandbytes:
  the centring offset is the mean of each group, not of the whole tensor, so every group lives
  in one shard (for a tensor of one group the two agree; tests/test_quant.py checks it).

Any shape works. The padding lives in the arithmetic only (stored: the last nibble of a row of odd
D). A row's partial last block is padded with zeros (its absmax is that of its real values, the
padding gets code 7 = 0.0, as bitsandbytes pads a tensor's last block; an odd D ends the packed
row with that code), and a unit's partial last group is padded, after centring, with zeros (its
offset and scale are those of its real absmax). Dequantisation slices both paddings away. For
Llama 7B-70B every unit is whole groups of whole blocks, and the units' groups are the consecutive
256-groups of the shard.

Sharding (``QUANT_SPECS``): every leaf is split over tp along ``N`` (axis 1)::

    int8: values [L, N, D] int8, scale [L, N] f32
    nf4:  packed [L, N, ceil(D/2)] uint8, absmax_codes [L, N, nb] uint8,
          group_scale / group_offset [L, N/u * ceil(u*nb/256)] f32

Every device holds whole units at every valid tp, and a kv head replicated for tp > kv heads is
a unit of its own, so the quantised base does not depend on tp.

Host side (numpy, at load time, one shard and one layer at a time): :func:`quantize_int8`,
:func:`quantize_nf4`, :func:`quantize_host`. Device side (inside shard_map, per layer inside
the layer scan): :func:`matmul` dequantises the local shard to the compute dtype just before the
matmul, under ``jax.checkpoint``, so the backward dequantises again instead of keeping a
full-precision copy: a dequantised layer lives only transiently.
"""
from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config.model_config import ModelConfig
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


def nf4_blocks(c: np.ndarray):
    """The first level, per row: c [N, D] -> (codes uint8 [N, nb*64], absmax float32 [N, nb]),
    ``nb = ceil(D/64)`` blocks of 64 along ``D``. A row's last block, when partial, is padded with
    zeros: its absmax is that of its real values and the padding gets code 7 (0.0), as
    bitsandbytes pads the last block of a tensor."""
    c = np.asarray(c, np.float32)
    n, d = c.shape
    nb = -(-d // NF4_BLOCK)
    c = np.pad(c, ((0, 0), (0, nb * NF4_BLOCK - d)))
    codes, absmax = _blockwise(c.reshape(n * nb, NF4_BLOCK), NF4_CODE)
    return codes.reshape(n, nb * NF4_BLOCK), absmax.reshape(n, nb)


def _double_quant(units: np.ndarray):
    """units [U, A] first-level absmax (one row per double-quantisation unit) -> (codes uint8
    [U, A], scale float32 [U*g], offset float32 [U*g]), ``g = ceil(A/256)`` groups per unit.
    Each group is centred on the mean of its real absmax and quantised with
    :data:`DYNAMIC_CODE`; a unit's last group, when partial, is padded after centring with
    zeros, which never raise its scale (the absmax of its real values, as bitsandbytes)."""
    n_units, a = units.shape
    full, part = divmod(a, NF4_GROUP)
    g = full + (part > 0)
    offset = np.empty((n_units, g), np.float32)
    offset[:, :full] = units[:, :full * NF4_GROUP].reshape(n_units, full, NF4_GROUP).mean(
        axis=-1, dtype=np.float32)
    if part:
        offset[:, full] = units[:, full * NF4_GROUP:].mean(axis=-1, dtype=np.float32)
    centred = np.zeros((n_units, g * NF4_GROUP), np.float32)
    centred[:, :a] = units - np.repeat(offset, NF4_GROUP, axis=1)[:, :a]
    codes, scale = _blockwise(centred.reshape(n_units * g, NF4_GROUP), DYNAMIC_CODE)
    return codes.reshape(n_units, g * NF4_GROUP)[:, :a], scale, offset.reshape(-1)


def quantize_nf4(c: np.ndarray, unit_rows: int | None = None) -> dict:
    """c [N, D] (canonical rows, any shape) -> {"packed": uint8 [N, ceil(D/2)], "absmax_codes":
    uint8 [N, nb], "group_scale", "group_offset": float32 [N/u * ceil(u*nb/256)]} with
    ``nb = ceil(D/64)`` and ``u = unit_rows`` (default N; it must divide N): the absmax of each
    ``u`` consecutive rows form one unit of ``ceil(u*nb/256)`` double-quantisation groups
    (row-major, the last one maybe partial). An odd ``D`` ends each packed row with the padding
    code 7 in the low nibble."""
    c = np.asarray(c, np.float32)
    n, d = c.shape
    u = n if unit_rows is None else unit_rows
    codes, absmax = nf4_blocks(c)
    codes = codes[:, :2 * (-(-d // 2))]
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    absmax_codes, group_scale, group_offset = _double_quant(absmax.reshape(n // u, -1))
    return {"packed": packed, "absmax_codes": absmax_codes.reshape(absmax.shape),
            "group_scale": group_scale, "group_offset": group_offset}


def quantize_host(kind: str, c: np.ndarray, unit_rows: int | None = None) -> QuantWeight:
    """c [N, D] (canonical rows) -> a column-oriented QuantWeight of numpy leaves; its
    :meth:`~QuantWeight.dequantize` is the exact arithmetic of the device (merged exports,
    tests). ``unit_rows``: NF4's rows per double-quantisation unit (:func:`quantize_nf4`;
    int8 quantises every row on its own)."""
    c = np.asarray(c, np.float32)
    if kind == "int8":
        return Int8Weight(**quantize_int8(c))
    u = len(c) if unit_rows is None else unit_rows
    return NF4Weight(**quantize_nf4(c, u), hidden=c.shape[1], unit_rows=u)


def _dequant_nf4(q: dict, hidden: int, unit_rows: int):
    """C [.., N, hidden] float32 from NF4 leaves (global, stacked or one shard: N is any
    multiple of ``unit_rows``); row padding (the partial last block, an odd ``hidden``'s last
    nibble) and group padding are sliced away."""
    q = {k: jnp.asarray(v) for k, v in q.items()}
    packed = q["packed"]                                         # [.., N, ceil(D/2)]
    *lead, n, half = packed.shape
    pad = [(0, 0)] * (len(lead) + 1)
    ac = q["absmax_codes"]                                       # [.., N, nb]
    nb = ac.shape[-1]
    units, per_unit = n // unit_rows, unit_rows * nb
    groups = -(-per_unit // NF4_GROUP)
    ac = jnp.pad(ac.reshape(*lead, units, per_unit), pad + [(0, groups * NF4_GROUP - per_unit)])
    ac = ac.reshape(*lead, units, groups, NF4_GROUP)             # [.., U, g, 256]
    group = lambda x: x.reshape(*lead, units, groups, 1)         # noqa: E731
    absmax = (jnp.asarray(DYNAMIC_CODE)[ac.astype(jnp.int32)] * group(q["group_scale"])
              + group(q["group_offset"]))
    absmax = absmax.reshape(*lead, units, groups * NF4_GROUP)[..., :per_unit].reshape(*lead, n, nb)
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*lead, n, 2 * half)
    codes = jnp.pad(codes, pad + [(0, nb * NF4_BLOCK - 2 * half)])
    values = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)]      # [.., N, nb*64]
    blocks = values.reshape(*lead, n, nb, NF4_BLOCK) * absmax[..., None]
    return blocks.reshape(*lead, n, nb * NF4_BLOCK)[..., :hidden]


# ----------------------------------------------------------------------------- device side

@dataclasses.dataclass(frozen=True)
class QuantWeight:
    """A quantised linear's leaves (global, per layer stack, or one device's local shard).

    ``column``: True for column-parallel (``W = C.T``), False for row-parallel (``W = C``).
    ``compute_dtype``: the dtype :func:`matmul` dequantises to. ``shape`` / ``dtype`` are those
    of the dense ``W`` the leaves stand for (so code that reads ``w.shape`` works unchanged).
    These and the other static fields (``META``) are pytree metadata, not leaves.
    """

    kind = ""
    META = ("column", "compute_dtype")

    @property
    def leaves(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in self.META}

    def _nd(self):
        raise NotImplementedError

    def _dequantize(self):
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
        return self._dequantize().astype(dtype or self.compute_dtype)

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

    def _dequantize(self):
        return jnp.asarray(self.values).astype(jnp.float32) * jnp.asarray(self.scale)[..., None]


@dataclasses.dataclass(frozen=True)
class NF4Weight(QuantWeight):
    """``hidden``: D, the length of a row of C (``packed`` holds ``ceil(D/2)`` bytes a row);
    ``unit_rows``: the rows of one double-quantisation unit (:func:`nf4_unit_rows`)."""

    packed: object
    absmax_codes: object
    group_scale: object
    group_offset: object
    hidden: int
    unit_rows: int
    column: bool = True
    compute_dtype: str = "float32"
    kind = "nf4"
    META = ("hidden", "unit_rows", "column", "compute_dtype")

    def _nd(self):
        s = self.packed.shape
        return s[:-2], s[-2], self.hidden

    def _dequantize(self):
        return _dequant_nf4(self.leaves, self.hidden, self.unit_rows)


WEIGHT_TYPES = {"int8": Int8Weight, "nf4": NF4Weight}
for _cls in WEIGHT_TYPES.values():
    jax.tree_util.register_dataclass(
        _cls, data_fields=[f.name for f in dataclasses.fields(_cls) if f.name not in _cls.META],
        meta_fields=list(_cls.META))


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


def max_tp(cfg: ModelConfig) -> int:
    """The largest tp that can split ``cfg`` (:meth:`ModelConfig.check_tp`); every valid tp
    divides it. A valid tp divides the heads and the intermediate size, so their gcd ``g``, and
    the kv heads divide it or it divides them: so ``g`` itself when the kv heads divide ``g``,
    else (no valid tp is a multiple of the kv heads) ``gcd(g, kv heads)``."""
    g = math.gcd(cfg.num_heads, cfg.intermediate_size)
    return g if g % cfg.num_kv_heads == 0 else math.gcd(g, cfg.num_kv_heads)


def nf4_unit_rows(cfg: ModelConfig, name: str) -> int:
    """Rows of canonical ``C`` in one NF4 double-quantisation unit of linear ``name``: the rows
    one device holds at tp = :func:`max_tp` (for k/v: its kv heads, one replicated head when
    that tp exceeds the kv heads). Every device at every valid tp holds whole units, and a
    replicated kv head is a unit of its own, so the quantised base does not depend on tp."""
    m = max_tp(cfg)
    n, _ = canonical_dims(name, PROJECTIONS[name].dims(cfg, m * cfg.kv_heads_per_device(m)))
    return n // m


def leaf_shapes(kind: str, canonical: tuple[int, int, int], unit_rows: int | None) -> dict:
    """Global shape and dtype of every leaf of a [L, N, D] linear (NF4: ``unit_rows`` rows per
    double-quantisation unit, :func:`quantize_nf4`; int8: None)."""
    L, n, d = canonical
    if kind == "int8":
        return {"values": ((L, n, d), np.int8), "scale": ((L, n), np.float32)}
    nb = -(-d // NF4_BLOCK)
    groups = n // unit_rows * -(-unit_rows * nb // NF4_GROUP)
    return {"packed": ((L, n, -(-d // 2)), np.uint8), "absmax_codes": ((L, n, nb), np.uint8),
            "group_scale": ((L, groups), np.float32), "group_offset": ((L, groups), np.float32)}


def _layout(kind: str, cfg: ModelConfig, name: str, canonical, compute_dtype) -> dict:
    """The static fields of a QuantWeight of linear ``name``."""
    meta = {"column": PROJECTIONS[name].column, "compute_dtype": np.dtype(compute_dtype).name}
    if kind == "nf4":
        meta.update(hidden=canonical[2], unit_rows=nf4_unit_rows(cfg, name))
    return meta


def abstract_weight(kind: str, cfg: ModelConfig, name: str, shape, mesh,
                    compute_dtype) -> QuantWeight:
    """A QuantWeight of ShapeDtypeStructs with the plan's shardings (planning, profiling)."""
    canonical = canonical_shape(name, shape)
    meta = _layout(kind, cfg, name, canonical, compute_dtype)
    shardings = named(mesh, quant_specs(kind))
    leaves = {k: jax.ShapeDtypeStruct(s, dt, sharding=shardings[k])
              for k, (s, dt) in leaf_shapes(kind, canonical, meta.get("unit_rows")).items()}
    return WEIGHT_TYPES[kind](**leaves, **meta)


def _rows_per_quantisation(kind: str, d: int, unit_rows: int) -> int:
    """Fewest rows that quantise on their own exactly as in their unit: 1 for int8; for NF4 the
    fewest rows of whole 256-groups when a unit is made of those, else the unit."""
    if kind == "int8":
        return 1
    whole = NF4_GROUP // math.gcd(-(-d // NF4_BLOCK), NF4_GROUP)
    return whole if unit_rows % whole == 0 else unit_rows


def make_quantised_weight(kind: str, cfg: ModelConfig, name: str, shape, mesh, compute_dtype,
                          read_rows):
    """Quantise one stacked linear straight into each device's shard.

    ``shape``: dense global [L, in, out]; ``read_rows(layer, rows)`` -> float numpy C[layer, rows]
    [len(rows), D] read from the checkpoint (a memory-map slice). Each device's shard is
    quantised once, layer by layer in chunks of about ``QUANT_CHUNK_ELEMENTS`` weights (whole
    double-quantisation units, or whole groups of one), so the only full-precision data ever
    held is one chunk; the packed shard is shared by all leaves of that shard and dropped after
    the last leaf.
    """
    tp = mesh.shape["tp"]
    canonical = canonical_shape(name, shape)
    meta = _layout(kind, cfg, name, canonical, compute_dtype)
    L, n, d = canonical
    rows_per_shard = n // tp
    shapes = leaf_shapes(kind, canonical, meta.get("unit_rows"))
    shardings = named(mesh, quant_specs(kind))
    step = _rows_per_quantisation(kind, d, meta.get("unit_rows"))
    chunk = max(step, QUANT_CHUNK_ELEMENTS // d // step * step)
    cache: dict[int, dict] = {}

    def shard(k: int) -> dict:
        if k not in cache:
            out = {f: np.empty((L, s[1] // tp, *s[2:]), dt) for f, (s, dt) in shapes.items()}
            for layer in range(L):
                for r0 in range(0, rows_per_shard, chunk):
                    r1 = min(r0 + chunk, rows_per_shard)
                    rows = np.arange(k * rows_per_shard + r0, k * rows_per_shard + r1)
                    q = quantize_host(kind, read_rows(layer, rows), step).leaves
                    for f, v in q.items():
                        local = shapes[f][0][1] // tp
                        out[f][layer, r0 * local // rows_per_shard:r1 * local // rows_per_shard] = v
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
    return WEIGHT_TYPES[kind](**leaves, **meta)


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

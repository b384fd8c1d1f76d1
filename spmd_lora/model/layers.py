"""The parameter-free and position-wise layers of the per-device forward: RMS norm, rotary
embeddings (with HF's linear / llama3 frequency scaling) and the vocab-parallel embedding.

Shapes are local (see :mod:`.llama`): ``B`` local batch, ``S`` local sequence, ``R`` residual
rows held, ``D`` hidden, ``hd`` head dim, ``Vl`` local (padded) vocab. Norm statistics and
rotary tables are computed in float32 whatever the weight dtype (the rotation itself, as in HF,
in the activations' dtype).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..config.model_config import ModelConfig
from ..parallel.mesh import TP
from ..parallel.sequence import SeqLayout, scatter_tiles
from .options import ForwardOptions

F32 = jnp.float32


def rms_norm(x, weight, eps):
    """x [..., D] -> [..., D] in x.dtype; statistics in float32."""
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(F32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[hd/2] float32 inverse frequencies, with HF's linear / llama3 scaling."""
    hd = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd))))
    inv = inv.astype(np.float32)
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / np.float32(rs.factor)
    elif rs.rope_type == "llama3":
        old = rs.original_max_position_embeddings
        low_wavelen = old / rs.low_freq_factor
        high_wavelen = old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_tables(positions, cfg: ModelConfig, dtype=F32):
    """positions [B, S] int -> (cos, sin) each [B, S, 1, hd], computed in float32 and cast to
    ``dtype`` (HF casts them to the activations' dtype the same way)."""
    freqs = positions.astype(F32)[..., None] * jnp.asarray(rope_inv_freq(cfg))  # [B, S, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb)[:, :, None, :].astype(dtype), jnp.sin(emb)[:, :, None, :].astype(dtype))


def apply_rope(x, cos, sin):
    """x [B, S, heads, hd] -> same; HF's rotate_half convention. Like HF, the product runs in
    x's dtype (the float32 tables cast to it), so a bf16 model keeps no float32 copy of q/k."""
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def embed(tokens, table_local, opts: ForwardOptions, layout: SeqLayout | None = None):
    """Vocab-parallel lookup. tokens [B, S]; table_local [Vl, D] -> the looked-up rows summed
    over tp: [B, S, D] (psum), or this device's rows [B, R, D] under sequence parallelism,
    where the lookup and its reduce-scatter run over tiles of ``mlp_chunk_tokens`` tokens (so
    the [B, S, D] partial rows never exist)."""
    vl = table_local.shape[0]

    def lookup(tok):                                                        # [B, N] -> [B, N, D]
        local = tok - jax.lax.axis_index(TP) * vl
        hit = (local >= 0) & (local < vl)
        rows = jnp.take(table_local, jnp.clip(local, 0, vl - 1), axis=0)
        return jnp.where(hit[..., None], rows, 0)

    if layout is None:
        return jax.lax.psum(lookup(tokens), TP)
    tile = opts.mlp_tile_rows(layout) if layout.sp else None
    if tile is None:
        return layout.scatter(lookup(tokens))
    return scatter_tiles(lambda t, start: lookup(t[..., 0]), tokens[..., None], tile, layout)

"""The Llama forward pass, written per device (runs inside ``jax.shard_map``).

Every function here sees the LOCAL shard of one (dp, tp) device and communicates only through
explicit collectives over the ``tp`` axis, Megatron-style:

* column-parallel q/k/v/gate/up: local output columns, no collective;
* row-parallel o/down: local input rows, one ``psum(tp)`` each (LoRA's rank-r term folded into it);
* vocab-parallel embedding (one ``psum``) and vocab-parallel cross-entropy (``pmax`` + ``psum``
  of sum-exp and of the target logit) that never gathers the full logits.

Shapes in comments are local: ``B`` local batch, ``S`` sequence, ``D`` hidden, ``Hl``/``KVl``
local q/kv heads, ``hd`` head dim, ``Fl`` local intermediate, ``Vl`` local (padded) vocab.
Norms, rotary tables and softmax run in float32 whatever the weight dtype.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .kernels import attention
from .lora import LoraConfig
from .mesh import DP, TP
from .quant import matmul

F32 = jnp.float32
REMAT_POLICIES = ("none", "full", "save-dots")


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """Static (compile-time) settings of the per-device forward."""

    cfg: ModelConfig
    tp: int
    lora: LoraConfig | None = None
    attention_impl: str = "auto"
    remat: str = "none"
    ce_chunk_tokens: int = 4096

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            from .errors import ConfigError
            raise ConfigError(f"remat {self.remat!r} unknown; choose from {', '.join(REMAT_POLICIES)}")


# ----------------------------------------------------------------------------- basic layers

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


def rope_tables(positions, cfg: ModelConfig):
    """positions [B, S] int -> (cos, sin) each [B, S, 1, hd] float32."""
    freqs = positions.astype(F32)[..., None] * jnp.asarray(rope_inv_freq(cfg))  # [B, S, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb)[:, :, None, :], jnp.sin(emb)[:, :, None, :]


def apply_rope(x, cos, sin):
    """x [B, S, heads, hd] -> same; HF's rotate_half convention, computed in float32."""
    xf = x.astype(F32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------- LoRA-aware linears

def _lora_delta(x, lora, b_cols, opts: ForwardOptions, key):
    """dropout(x) [.., in] @ a [in, r] @ b[:, b_cols] [r, out_l] * scaling, in x.dtype."""
    if opts.lora.dropout > 0.0 and key is not None:
        keep = jax.random.bernoulli(key, 1.0 - opts.lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - opts.lora.dropout), 0).astype(x.dtype)
    h = x @ lora["a"].astype(x.dtype)                                        # [.., r]
    return (h @ b_cols.astype(x.dtype)) * jnp.asarray(opts.lora.scaling, x.dtype)


def column_linear(x, w, lora, unit, opts: ForwardOptions, key=None):
    """Column-parallel projection. x [B, S, in] (replicated over tp); w [in, out_l] local columns.

    ``unit`` = (units_total, unit_size) of the GLOBAL LoRA output (heads and head dim, or F and
    1): this device's slice of b starts at unit ``axis_index(tp) * units_total // tp`` (so with
    tp > KV, the devices sharing a kv head read the same columns of b). Returns [B, S, out_l].
    """
    y = matmul(x, w)
    if lora is not None:
        units, size = unit
        width = w.shape[-1]
        start = (jax.lax.axis_index(TP) * units // opts.tp) * size
        b_local = jax.lax.dynamic_slice_in_dim(lora["b"], start, width, axis=1)
        y = y + _lora_delta(x, lora, b_local, opts, key)
    return y


def row_linear(x, w, lora, opts: ForwardOptions, key=None):
    """Row-parallel projection. x [B, S, in_l] (local slice of the input features);
    w [in_l, out] local rows. LoRA uses the local rows of a; its rank-r term is added before
    the single psum(tp). Returns [B, S, out], replicated over tp."""
    y = matmul(x, w)
    if lora is not None:
        in_l = w.shape[0]
        a_local = jax.lax.dynamic_slice_in_dim(lora["a"], jax.lax.axis_index(TP) * in_l, in_l, axis=0)
        y = y + _lora_delta(x, {"a": a_local}, lora["b"], opts, key)
    return jax.lax.psum(y, TP)


# ----------------------------------------------------------------------------- blocks

def attention_block(x, p, lora, cos, sin, segment_ids, opts: ForwardOptions, keys):
    """x [B, S, D] -> [B, S, D] (after the o_proj psum)."""
    cfg = opts.cfg
    b, s, _ = x.shape
    hd = cfg.head_dim
    q = column_linear(x, p["q_proj"], lora.get("q_proj"), (cfg.num_heads, hd), opts, keys[0])
    k = column_linear(x, p["k_proj"], lora.get("k_proj"), (cfg.num_kv_heads, hd), opts, keys[1])
    v = column_linear(x, p["v_proj"], lora.get("v_proj"), (cfg.num_kv_heads, hd), opts, keys[2])
    q = apply_rope(q.reshape(b, s, -1, hd), cos, sin)                         # [B, S, Hl, hd]
    k = apply_rope(k.reshape(b, s, -1, hd), cos, sin)                         # [B, S, KVl, hd]
    v = v.reshape(b, s, -1, hd)                                               # [B, S, KVl, hd]
    o = attention(q, k, v, causal=True, segment_ids=segment_ids, impl=opts.attention_impl)
    return row_linear(o.reshape(b, s, -1), p["o_proj"], lora.get("o_proj"), opts, keys[3])


def mlp_block(x, p, lora, opts: ForwardOptions, keys):
    """SwiGLU MLP. x [B, S, D] -> [B, S, D] (after the down_proj psum)."""
    f = (opts.cfg.intermediate_size, 1)
    gate = column_linear(x, p["gate_proj"], lora.get("gate_proj"), f, opts, keys[4])   # [B, S, Fl]
    up = column_linear(x, p["up_proj"], lora.get("up_proj"), f, opts, keys[5])         # [B, S, Fl]
    return row_linear(jax.nn.silu(gate) * up, p["down_proj"], lora.get("down_proj"), opts, keys[6])


def decoder_layer(x, p, lora, cos, sin, segment_ids, opts: ForwardOptions, key):
    """One pre-norm Llama layer: exactly two psum(tp). x [B, S, D] -> [B, S, D]."""
    keys = _dropout_keys(key, opts)
    eps = opts.cfg.rms_norm_eps
    # The normed input is replicated over tp but feeds several column-parallel projections. Marking
    # it tp-varying once here means the backward sums their input gradients locally and needs ONE
    # psum per block (Megatron's f operator), instead of one per projection.
    h = jax.lax.pcast(rms_norm(x, p["attn_norm"], eps), TP, to="varying")
    x = x + attention_block(h, p, lora, cos, sin, segment_ids, opts, keys)
    h = jax.lax.pcast(rms_norm(x, p["mlp_norm"], eps), TP, to="varying")
    return x + mlp_block(h, p, lora, opts, keys)


def _dropout_keys(key, opts: ForwardOptions):
    """Seven per-projection keys (q k v o gate up down). Column-parallel inputs are identical on
    every tp device, so their masks must be too; row-parallel inputs are per-device slices, so
    their keys also fold in the tp index."""
    if key is None or opts.lora is None or opts.lora.dropout == 0.0:
        return (None,) * 7
    keys = [jax.random.fold_in(key, i) for i in range(7)]
    tp_index = jax.lax.axis_index(TP)
    for i in (3, 6):
        keys[i] = jax.random.fold_in(keys[i], tp_index)
    return tuple(keys)


def embed(tokens, table_local, opts: ForwardOptions):
    """Vocab-parallel lookup. tokens [B, S]; table_local [Vl, D] -> [B, S, D] (psum over tp)."""
    vl = table_local.shape[0]
    local = tokens - jax.lax.axis_index(TP) * vl
    hit = (local >= 0) & (local < vl)
    rows = jnp.take(table_local, jnp.clip(local, 0, vl - 1), axis=0)
    return jax.lax.psum(jnp.where(hit[..., None], rows, 0), TP)


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def hidden_states(params, lora, tokens, positions, segment_ids, opts: ForwardOptions, key=None):
    """Embedding + all decoder layers (lax.scan over the stacked layers) + final norm.

    tokens, positions [B, S] int32; segment_ids [B, S] int32 or None -> [B, S, D].
    """
    x = embed(tokens, params["embed"], opts)
    cos, sin = rope_tables(positions, opts.cfg)
    lora_layers = (lora or {}).get("layers", {})
    if key is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(DP))

    def body(h, xs):
        p, lp, idx = xs
        layer_key = None if key is None else jax.random.fold_in(key, idx)
        return decoder_layer(h, p, lp, cos, sin, segment_ids, opts, layer_key), None

    idx = jnp.arange(opts.cfg.num_layers)
    x, _ = jax.lax.scan(_remat(body, opts.remat), x, (params["layers"], lora_layers, idx))
    return rms_norm(x, params["final_norm"], opts.cfg.rms_norm_eps)


# ----------------------------------------------------------------------------- LM head

def _head_local(params):
    """[D, Vl]: the lm_head's local columns, or the tied embedding's local rows transposed."""
    return params["lm_head"] if "lm_head" in params else params["embed"].T


def local_logits(h, params, opts: ForwardOptions):
    """h [N.., D] -> float32 logits over this device's vocab slice [N.., Vl]; padded vocab
    entries are -inf-like so they never win a max or add to a sum-exp."""
    head = _head_local(params)
    logits = jnp.einsum("...d,dv->...v", h, head, preferred_element_type=F32)
    vl = head.shape[-1]
    col = jax.lax.axis_index(TP) * vl + jnp.arange(vl)
    return jnp.where(col < opts.cfg.vocab_size, logits, jnp.finfo(F32).min)


def _ce_chunk(h, targets, weights, params, opts: ForwardOptions):
    """Vocab-parallel cross-entropy of one chunk. h [N, D]; targets, weights [N].
    Returns the weighted sum of per-token losses (replicated over tp)."""
    logits = local_logits(h, params, opts)                                   # [N, Vl]
    vl = logits.shape[-1]
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), TP)    # [N]
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - m[:, None]), axis=-1), TP)
    local_t = targets - jax.lax.axis_index(TP) * vl
    hit = (local_t >= 0) & (local_t < vl)
    picked = jnp.take_along_axis(logits, jnp.clip(local_t, 0, vl - 1)[:, None], axis=-1)[:, 0]
    target_logit = jax.lax.psum(jnp.where(hit, picked, 0.0), TP)
    return jnp.sum((jnp.log(sum_exp) + m - target_logit) * weights)


def loss_sum(params, lora, tokens, loss_mask, positions, segment_ids, opts: ForwardOptions,
             key=None):
    """Per-device loss of this device's batch rows: (sum of token losses, number of target
    tokens), both tp-invariant and local to this dp shard."""
    h = hidden_states(params, lora, tokens, positions, segment_ids, opts, key)
    return cross_entropy_sum(h, tokens, loss_mask, params, opts)


def cross_entropy_sum(h, tokens, loss_mask, params, opts: ForwardOptions):
    """Next-token loss. h [B, S, D]; tokens, loss_mask [B, S] (loss_mask[t] = 1 when token t is a
    target, i.e. HF labels != -100). Returns (sum of losses, number of target tokens), local to
    this dp shard. Runs over chunks of ``ce_chunk_tokens`` rows with rematerialisation, so the
    [tokens, Vl] logits of only one chunk are ever live."""
    b, s, d = h.shape
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1).reshape(-1)
    weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros((b, 1), loss_mask.dtype)], axis=1)
    weights = weights.reshape(-1).astype(F32)
    h = h.reshape(-1, d)
    n = h.shape[0]
    chunk = min(opts.ce_chunk_tokens, n)
    if chunk == n:
        return _ce_chunk(h, targets, weights, params, opts), jnp.sum(weights)
    pad = (-n) % chunk
    h = jnp.pad(h, ((0, pad), (0, 0)))
    targets, weights_p = jnp.pad(targets, (0, pad)), jnp.pad(weights, (0, pad))
    n_chunks = h.shape[0] // chunk

    @jax.checkpoint
    def chunk_loss(xs):
        return _ce_chunk(*xs, params, opts)

    per_chunk = jax.lax.map(chunk_loss, (h.reshape(n_chunks, chunk, d),
                                         targets.reshape(n_chunks, chunk),
                                         weights_p.reshape(n_chunks, chunk)))    # [n_chunks]
    return jnp.sum(per_chunk), jnp.sum(weights)

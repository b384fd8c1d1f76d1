"""The Llama forward pass, written per device (runs inside ``jax.shard_map``).

Every function here sees the LOCAL shard of one (dp, cp, tp) device and communicates only
through explicit collectives: over the ``tp`` axis, Megatron-style,

* column-parallel q/k/v/gate/up: local output columns, no collective;
* row-parallel o/down: local input rows; the partial outputs are summed over tp (LoRA's rank-r
  term folded into that sum);
* vocab-parallel embedding and vocab-parallel cross-entropy (``pmax`` + ``psum`` of sum-exp and
  of the target logit) that never gathers the full logits;

and, with context parallelism (cp > 1), over the ``cp`` axis inside attention only: each cp
rank holds two zig-zag chunks of the sequence (laid out by the batch preparation,
:mod:`spmd_lora.parallel.zigzag`), and ring attention (``ppermute`` of K/V blocks, or an
all-gather of K/V) lets its queries see every earlier key, by global token index.

Where the residual stream lives is the sequence layout's business
(:mod:`spmd_lora.parallel.sequence`): replicated ``[B, S, D]`` on every tp device (the column
block input is ``pcast`` to tp-varying, the row block output ``psum``-ed), or, with sequence
parallelism, ``[B, S/tp, D]`` (``all_gather`` before a column block, ``psum_scatter`` after a row
block). Position-wise work can run in tiles (``mlp_chunk_tokens``, ``ce_chunk_tokens``).

Shapes in comments are local: ``B`` local batch, ``S`` local sequence (the cp rank's tokens,
padded to a multiple of tp under sequence parallelism), ``R`` residual rows held (S/tp or S),
``D`` hidden, ``Hl``/``KVl`` local q/kv heads, ``hd`` head dim, ``Fl`` local intermediate,
``Vl`` local (padded) vocab. Norms, rotary tables and softmax statistics run in float32 whatever
the weight dtype (the rotation itself, as in HF, in the activations' dtype).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from . import dropout as lora_dropout
from ..config.model_config import ModelConfig
from .dropout import Dropout
from ..kernels import CP_IMPLS, _vma, attention, ring_attention
from ..config.lora_config import LoraConfig
from ..parallel.mesh import CP, DP, TP
from ..weights.quant import matmul
from ..parallel.sequence import SeqLayout, gather_tiles, scatter_tiles, tiled

F32 = jnp.float32
REMAT_POLICIES = ("none", "full", "save-dots", "offload")
# Attention impls that have a context-parallel block kernel (ring attention needs the lse).
CP_ATTENTION_IMPLS = ("auto", "blockwise", "pallas")
# token_index of padded positions: later than every real token, so no real query sees them.
PAD_TOKEN_INDEX = 2 ** 30
# Tokens per MLP / attention-projection tile when the sequence is longer (the user-facing default).
# Names of the per-layer values the ``offload`` remat policy keeps in host memory.
LAYER_INPUT, MLP_INPUT = "layer_input", "mlp_input"


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """Static (compile-time) settings of the per-device forward.

    ``sequence_parallel``: shard the residual stream along the sequence over tp (only matters
    when tp > 1). ``cp``: context-parallel degree (the batch arrives in zig-zag layout, with
    ``targets`` / ``target_weights`` / ``token_index``); ``cp_impl``: "ring" | "allgather".
    ``mlp_chunk_tokens``: run the MLP over tiles of this many tokens (0 = whole sequence at
    once). ``remat``: none | full | save-dots | offload (the two half-layer inputs in host
    memory, each half recomputed in its own backward).
    """

    cfg: ModelConfig
    tp: int
    lora: LoraConfig | None = None
    attention_impl: str = "auto"
    remat: str = "none"
    ce_chunk_tokens: int = 4096
    sequence_parallel: bool = True
    mlp_chunk_tokens: int = 0
    cp: int = 1
    cp_impl: str = "ring"

    def __post_init__(self):
        from ..errors import ConfigError
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat {self.remat!r} unknown; choose from {', '.join(REMAT_POLICIES)}")
        if self.mlp_chunk_tokens < 0:
            raise ConfigError(f"mlp_chunk_tokens must be >= 0 (0 = off), got {self.mlp_chunk_tokens}")
        if self.ce_chunk_tokens < 1:
            raise ConfigError(f"ce_chunk_tokens must be >= 1, got {self.ce_chunk_tokens}")
        if self.cp < 1:
            raise ConfigError(f"cp must be >= 1, got {self.cp}")
        if self.cp_impl not in CP_IMPLS:
            raise ConfigError(f"cp_impl {self.cp_impl!r} unknown; choose from {', '.join(CP_IMPLS)}")
        if self.cp > 1 and self.attention_impl not in CP_ATTENTION_IMPLS:
            raise ConfigError(
                f"attention {self.attention_impl!r} has no context-parallel block kernel (it "
                f"returns no log-sum-exp); with cp > 1 use one of {', '.join(CP_ATTENTION_IMPLS)}")

    def layout(self, seq_len: int) -> SeqLayout:
        """The sequence layout of a batch of ``seq_len`` tokens."""
        return SeqLayout(seq_len=seq_len, tp=self.tp, sp=self.sequence_parallel and self.tp > 1)

    def mlp_tile_rows(self, layout: SeqLayout) -> int | None:
        """Local rows per MLP tile (a tile gathers ``mlp_chunk_tokens`` tokens), or None when
        the MLP runs untiled (tiling off, or the sequence is no longer than one tile)."""
        rows = self.mlp_chunk_tokens // layout.gather_factor
        if self.mlp_chunk_tokens and rows < layout.local_rows:
            return max(rows, 1)
        return None

    def ce_chunk_rows(self, layout: SeqLayout, local_rows: int) -> int:
        """Local rows per cross-entropy chunk (a chunk gathers ``ce_chunk_tokens`` tokens)."""
        return max(1, min(self.ce_chunk_tokens // layout.gather_factor, local_rows))

    def tile_counts(self, seq_len: int, local_batch: int) -> tuple[int, int]:
        """(MLP tiles per layer, cross-entropy chunks) of one micro-batch, for the census."""
        layout = self.layout(seq_len)
        tile = self.mlp_tile_rows(layout)
        tiles = -(-layout.local_rows // tile) if tile else 1
        n = local_batch * layout.local_rows
        return tiles, -(-n // self.ce_chunk_rows(layout, n))


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


# ----------------------------------------------------------------------------- LoRA-aware linears

def _lora_delta(x, lora, b_cols, opts: ForwardOptions, drop: Dropout | None, cols):
    """dropout(x) [.., in] @ a [in, r] @ b_cols [r, out_l] * scaling, in x.dtype. ``cols`` are
    the global input-feature ids of x's columns (for the layout-independent dropout mask)."""
    x = lora_dropout.apply(x, drop, cols, opts.lora.dropout)
    return _lora_product(x, lora["a"].astype(x.dtype), b_cols.astype(x.dtype), opts.lora.scaling)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lora_product(x, a, b, scaling: float):
    """(x [.., in] @ a [in, r]) @ b [r, out] * scaling. Its backward is written out so that
    both weight gradients contract over the tokens with the rank-r factor on the left
    (``dh^T x``, ``h^T g``): autodiff's ``x^T dh`` puts the [tokens, in] activation on the left,
    and XLA:CPU then copies it into a transposed layout (per layer, inside the layer scan)."""
    return ((x @ a) @ b) * jnp.asarray(scaling, x.dtype)


def _lora_product_fwd(x, a, b, scaling):
    h = x @ a                                                                # [.., r]
    return (h @ b) * jnp.asarray(scaling, x.dtype), (x, a, b, h)


def _lora_product_bwd(scaling, res, g):
    x, a, b, h = res
    g = g * jnp.asarray(scaling, g.dtype)                                    # [.., out]
    dh = g @ b.T                                                             # [.., r]
    tokens = (((0,), (0,)), ((), ()))
    flat = lambda v: v.reshape(-1, v.shape[-1])                              # noqa: E731
    db = jax.lax.dot_general(flat(h), flat(g), tokens)                       # [r, out]
    da = jax.lax.dot_general(flat(dh), flat(x), tokens).T                    # [in, r]
    dx = dh @ a.T
    return _like_vma(dx, x), _like_vma(da, a), _like_vma(db, b)


_lora_product.defvjp(_lora_product_fwd, _lora_product_bwd)


def _like_vma(ct, primal):
    """The cotangent ``ct`` typed like ``primal`` under check_vma: summed over the mesh axes
    only it varies over (what autodiff's transpose of the implicit ``pcast`` does), and cast to
    vary over the axes only ``primal`` varies over."""
    axes = _vma.varying_axes(primal)
    extra = tuple(sorted(_vma.varying_axes(ct) - axes))
    if extra:
        ct = jax.lax.psum(ct, extra)
    return _vma.pvary(ct, axes)


def column_linear(x, w, lora, unit, opts: ForwardOptions, drop: Dropout | None = None):
    """Column-parallel projection. x [B, S, in] (the same on every tp device); w [in, out_l]
    local columns. ``unit`` = (units_total, unit_size) of the GLOBAL LoRA output (heads and head
    dim, or F and 1): this device's slice of b starts at unit ``axis_index(tp) * units_total //
    tp`` (so with tp > KV, the devices sharing a kv head read the same columns of b).
    Returns [B, S, out_l]; no collective."""
    y = matmul(x, w)
    if lora is not None:
        units, size = unit
        width = y.shape[-1]
        start = (jax.lax.axis_index(TP) * units // opts.tp) * size
        b_local = jax.lax.dynamic_slice_in_dim(lora["b"], start, width, axis=1)
        cols = jnp.arange(x.shape[-1], dtype=jnp.int32)
        y = y + _lora_delta(x, lora, b_local, opts, drop, cols)
    return y


def row_linear(x, w, lora, opts: ForwardOptions, drop: Dropout | None = None):
    """Row-parallel projection. x [B, S, in_l] (local slice of the input features); w
    [in_l, out] local rows. LoRA uses the local rows of a. Returns this device's PARTIAL sum
    [B, S, out] (the caller reduces it over tp: psum or psum_scatter), so LoRA's rank-r term
    rides in the same single reduction."""
    y = matmul(x, w)
    if lora is not None:
        in_l = x.shape[-1]
        start = jax.lax.axis_index(TP) * in_l
        a_local = jax.lax.dynamic_slice_in_dim(lora["a"], start, in_l, axis=0)
        cols = start + jnp.arange(in_l, dtype=jnp.int32)
        y = y + _lora_delta(x, {"a": a_local}, lora["b"], opts, drop, cols)
    return y


# ----------------------------------------------------------------------------- blocks

@dataclasses.dataclass(frozen=True)
class SequenceInputs:
    """Per-token inputs every layer reads, the cp rank's whole local sequence on every tp
    device (padded to ``layout.padded_len`` = S_pad).

    positions [B, S_pad] int32 (rotary); segment_ids [B, S_pad] int32 or None; token_index
    [B, S_pad] int32, each token's index in the unpermuted sequence (the causal mask of ring
    attention, and the dropout row); batch_rows [B] uint32 global batch rows for LoRA dropout,
    or None without dropout."""

    layout: SeqLayout
    positions: jax.Array
    segment_ids: jax.Array | None
    token_index: jax.Array
    batch_rows: jax.Array | None


def _drop(key, seq: SequenceInputs, rows, index):
    """Dropout of projection ``index`` (q k v o gate up down = 0..6) for the tokens ``rows``
    [B, N] (token indices), or None."""
    if key is None or seq.batch_rows is None:
        return None
    return Dropout(jax.random.fold_in(key, index), seq.batch_rows, rows)


def attention_block(x, p, lora, seq: SequenceInputs, opts: ForwardOptions, key=None):
    """x [B, R, D] local residual rows -> [B, R, D] (after the o_proj reduction). With tiles
    (``mlp_chunk_tokens``) the q/k/v projections and o_proj run tile by tile, so neither the
    gathered [B, S, D] input nor its gradient is ever whole: only q/k/v/o of the local heads
    span the sequence."""
    cfg = opts.cfg
    hd = cfg.head_dim
    layout = seq.layout
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)                       # [B, R, D]

    def qkv(hg, rows):                                                      # [B, N, D] gathered
        q = column_linear(hg, p["q_proj"], lora.get("q_proj"), (cfg.num_heads, hd), opts,
                          _drop(key, seq, rows, 0))
        k = column_linear(hg, p["k_proj"], lora.get("k_proj"), (cfg.num_kv_heads, hd), opts,
                          _drop(key, seq, rows, 1))
        v = column_linear(hg, p["v_proj"], lora.get("v_proj"), (cfg.num_kv_heads, hd), opts,
                          _drop(key, seq, rows, 2))
        return q, k, v

    def o_proj(o, rows):                                                    # [B, N, Hl*hd]
        return row_linear(o, p["o_proj"], lora.get("o_proj"), opts, _drop(key, seq, rows, 3))

    # Tiles pay under sequence parallelism, where the gathered input is tp x the local q.
    tile = opts.mlp_tile_rows(layout) if layout.sp else None
    if tile is None:
        q, k, v = qkv(layout.gather(h), seq.token_index)                    # [B, S, ..]
    else:   # one tiled scan for all three
        q, k, v = gather_tiles(
            lambda hg, start: qkv(hg, _tile_rows(seq.token_index, layout, start, tile)), h,
            tile, layout)
    b, s, _ = q.shape
    cos, sin = rope_tables(seq.positions, cfg, q.dtype)                     # [B, S, 1, hd]
    q = apply_rope(q.reshape(b, s, -1, hd), cos, sin)                       # [B, S, Hl, hd]
    k = apply_rope(k.reshape(b, s, -1, hd), cos, sin)                       # [B, S, KVl, hd]
    v = v.reshape(b, s, -1, hd)                                             # [B, S, KVl, hd]
    if opts.cp > 1:
        kernel = "auto" if opts.attention_impl == "auto" else opts.attention_impl
        o = ring_attention(q, k, v, axis_name=CP, q_index=seq.token_index,
                           k_index=seq.token_index, q_segment_ids=seq.segment_ids,
                           kv_segment_ids=seq.segment_ids, impl=opts.cp_impl, kernel=kernel)
    else:
        o = attention(q, k, v, causal=True, segment_ids=seq.segment_ids,
                      impl=opts.attention_impl)
    o = o.reshape(b, s, -1)
    if tile is None:
        return layout.scatter(o_proj(o, seq.token_index))
    return scatter_tiles(
        lambda t, start: o_proj(t, _tile_rows(seq.token_index, layout, start, tile)), o, tile,
        layout)


def _tile_rows(token_index, layout: SeqLayout, start, size: int):
    """Token indices [B, g*size] of a gathered tile (its dropout rows) from the local
    sequence's ``token_index`` [B, S_pad]."""
    return jnp.take(token_index, layout.tile_rows(start, size), axis=1, mode="clip")


def mlp_residual(x, p, lora, layout: SeqLayout, opts: ForwardOptions, key=None,
                 seq: SequenceInputs | None = None):
    """The MLP half of a layer on the local residual rows: x + SwiGLU(rms_norm(x)), x [B, R, D]
    -> [B, R, D], over tiles of ``opts.mlp_chunk_tokens`` gathered tokens when set (norm,
    MLP, down_proj reduction and residual add per tile, so no [B, R, D] intermediate but the
    output). ``seq`` gives the token indices and batch rows for dropout (None: no dropout)."""
    cfg = opts.cfg
    f = (cfg.intermediate_size, 1)

    def mlp(x_tile, start):                                                 # [B, c, D] local
        h_tile = rms_norm(x_tile, p["mlp_norm"], cfg.rms_norm_eps)
        hg = layout.gather(h_tile)                                          # [B, g*c, D]
        use = seq is not None and key is not None
        rows = _tile_rows(seq.token_index, layout, start, h_tile.shape[1]) if use else None
        drop = lambda index: _drop(key, seq, rows, index) if use else None  # noqa: E731
        gate = column_linear(hg, p["gate_proj"], lora.get("gate_proj"), f, opts,
                             drop(4))                                       # [B, g*c, Fl]
        up = column_linear(hg, p["up_proj"], lora.get("up_proj"), f, opts,
                           drop(5))                                         # [B, g*c, Fl]
        y = row_linear(jax.nn.silu(gate) * up, p["down_proj"], lora.get("down_proj"), opts,
                       drop(6))
        return x_tile + layout.scatter(y)

    tile = opts.mlp_tile_rows(layout)
    return tiled(mlp, x, tile) if tile else mlp(x, 0)


def decoder_layer(x, p, lora, seq: SequenceInputs, opts: ForwardOptions, key=None):
    """One pre-norm Llama layer on the local residual rows x [B, R, D] -> [B, R, D]: one
    reduction over tp after o_proj and one after down_proj (psum, or psum_scatter with
    sequence parallelism), and the matching gathers before the column blocks."""
    attn = lambda x, p, lora, key: x + attention_block(x, p, lora, seq, opts, key)  # noqa: E731
    mlp = lambda x, p, lora, key: mlp_residual(x, p, lora, seq.layout, opts, key, seq)  # noqa: E731
    if opts.remat == "offload":   # each half recomputed in its own backward (see _remat)
        attn = jax.checkpoint(attn, policy=jax.checkpoint_policies.nothing_saveable)
        mlp = jax.checkpoint(mlp, policy=jax.checkpoint_policies.nothing_saveable)
    x = checkpoint_name(x, LAYER_INPUT)
    x = attn(x, p, lora, key)
    x = checkpoint_name(x, MLP_INPUT)
    return mlp(x, p, lora, key)


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


def _remat(fn, opts: ForwardOptions):
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


def global_batch_rows(batch: int):
    """[B] uint32: the global batch rows of this device's (dp-sharded) batch rows."""
    first = jax.lax.axis_index(DP) * batch
    return (first + jnp.arange(batch, dtype=jnp.int32)).astype(jnp.uint32)


def hidden_states(params, lora, tokens, positions, segment_ids, opts: ForwardOptions, key=None,
                  token_index=None):
    """Embedding + all decoder layers (lax.scan over the stacked layers) + final norm.

    tokens, positions [B, S] int32 (the local sequence: with cp > 1, this rank's zig-zag
    chunks); segment_ids [B, S] int32 or None; token_index [B, S] int32, each token's index in
    the unpermuted sequence (required with cp > 1; default 0..S-1). Returns this device's
    residual rows [B, R, D] (``opts.layout(S)``: R = S, or S_pad/tp with sequence parallelism).
    """
    b, s = tokens.shape
    layout = opts.layout(s)
    if token_index is None:
        if opts.cp > 1:
            raise ValueError("cp > 1 needs token_index (the batch's zig-zag layout)")
        token_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    use_dropout = key is not None and opts.lora is not None and opts.lora.dropout > 0.0
    seq = SequenceInputs(
        layout=layout, positions=layout.pad(positions),
        segment_ids=None if segment_ids is None else layout.pad(segment_ids, -1),
        token_index=layout.pad(token_index, PAD_TOKEN_INDEX),
        batch_rows=global_batch_rows(b) if use_dropout else None)
    x = embed(layout.pad(tokens), params["embed"], opts, layout)            # [B, R, D]
    lora_layers = (lora or {}).get("layers", {})

    def body(h, xs):
        p, lp, idx = xs
        layer_key = jax.random.fold_in(key, idx) if use_dropout else None
        return decoder_layer(h, p, lp, seq, opts, layer_key), None

    idx = jnp.arange(opts.cfg.num_layers)
    x, _ = jax.lax.scan(_remat(body, opts), x, (params["layers"], lora_layers, idx))
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
    return _mask_padded_vocab(logits, opts)


def _mask_padded_vocab(logits, opts: ForwardOptions):
    """Padded vocab columns (global id >= vocab_size) -> -inf-like. Without padding (tp
    divides V) this is the identity: no pass over the [N, Vl] logits."""
    if opts.cfg.padded_vocab(opts.tp) == opts.cfg.vocab_size:
        return logits
    vl = logits.shape[-1]
    col = jax.lax.axis_index(TP) * vl + jnp.arange(vl)
    return jnp.where(col < opts.cfg.vocab_size, logits, jnp.finfo(F32).min)


def _ce_chunk(h, targets, weights, params, opts: ForwardOptions):
    """Vocab-parallel cross-entropy of one chunk. h [N, D] (the same rows on every tp device);
    targets, weights [N]. Returns the weighted sum of per-token losses (replicated over tp).

    Fused linear cross-entropy: the forward also computes the gradient w.r.t. h,
    ``(weights * (softmax - onehot)) @ head^T``, and keeps only that [N, D] for the backward,
    which scales it by the incoming cotangent. So neither the [N, Vl] logits nor anything of
    their size is saved, and a chunked loss recomputes nothing (before, each chunk's logits
    were rematerialised in the backward)."""
    return _fused_ce(h, _head_local(params), targets, weights, opts)


def _ce_forward(h, head, targets, weights, opts: ForwardOptions, head_grad: bool = False):
    """(weighted loss sum, its gradient w.r.t. h, and w.r.t. the head when ``head_grad``, else
    None) of one chunk; see :func:`_ce_chunk`."""
    logits = _mask_padded_vocab(
        jnp.einsum("nd,dv->nv", h, head, preferred_element_type=F32), opts)  # [N, Vl]
    vl = logits.shape[-1]
    m = jax.lax.pmax(jnp.max(logits, axis=-1), TP)                           # [N]
    e = jnp.exp(logits - m[:, None])
    sum_exp = jax.lax.psum(jnp.sum(e, axis=-1), TP)
    local_t = targets - jax.lax.axis_index(TP) * vl                          # out of range: not here
    here = (local_t >= 0) & (local_t < vl)                                   # [N]
    t_col = jnp.clip(local_t, 0, vl - 1)
    # The target's logit and head column by gather (O(N)), not by a one-hot pass over [N, Vl].
    picked = jnp.take_along_axis(logits, t_col[:, None], axis=1)[:, 0]
    target_logit = jax.lax.psum(jnp.where(here, picked, 0.0), TP)
    loss = jnp.sum((jnp.log(sum_exp) + m - target_logit) * weights)
    # dL/dlogits = e * scale - onehot * w (rows scaled: scale = w / sum_exp), so
    # dL/dh = (e @ head^T) * scale - w * head[:, target]^T: no [N, Vl] pass besides the matmul.
    scale = weights / sum_exp
    w_here = jnp.where(here, weights, 0.0)
    head_t = jnp.take(head, t_col, axis=1).T.astype(F32)                     # [N, D]
    dh = (jnp.einsum("nv,dv->nd", e.astype(head.dtype), head, preferred_element_type=F32)
          * scale[:, None] - w_here[:, None] * head_t)
    dh = _like_vma(dh, h)             # summed over tp when h is the same on every tp device
    dhead = None
    if head_grad:   # only when the base itself is differentiated (tests, full fine-tuning)
        onehot = jnp.arange(vl, dtype=t_col.dtype)[None, :] == t_col[:, None]  # [N, Vl]
        dlogits = e * scale[:, None] - jnp.where(onehot, w_here[:, None], 0.0)
        dhead = jnp.einsum("nd,nv->dv", h.astype(F32), dlogits).astype(head.dtype)
    return loss, dh.astype(h.dtype), dhead


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_ce(h, head, targets, weights, opts: ForwardOptions):
    return _ce_forward(h, head, targets, weights, opts)[0]


def _fused_ce_fwd(h, head, targets, weights, opts):
    # symbolic_zeros: primals arrive as CustomVJPPrimal(value, perturbed); the head's gradient
    # is computed only when it is differentiated (never for LoRA: the base is frozen).
    loss, dh, dhead = _ce_forward(h.value, head.value, targets.value, weights.value, opts,
                                  head_grad=head.perturbed)
    return loss, (dh, dhead)


def _fused_ce_bwd(opts, res, g):
    dh, dhead = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None
    dh = dh * g.astype(dh.dtype)
    if dhead is not None:
        # The head (lm_head, or the tied embedding) varies over tp only (its sharding): sum
        # the per-device gradients over the other axes, as autodiff's transposes would.
        dhead = dhead * g.astype(dhead.dtype)
        extra = tuple(sorted(_vma.varying_axes(dhead) - {TP}))
        if extra:
            dhead = jax.lax.psum(dhead, extra)
    return dh, dhead, None, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd, symbolic_zeros=True)


def next_token_targets(tokens, loss_mask):
    """(targets, weights) [B, S]: targets[t] = tokens[t + 1], weights[t] = loss_mask[t + 1] as
    float32 (0 at the last position). loss_mask[t] = 1 when token t is a target (HF labels !=
    -100). For a whole, unpermuted sequence only (with cp > 1 the batch preparation forms them
    before the zig-zag permutation)."""
    b = tokens.shape[0]
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
    weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros((b, 1), loss_mask.dtype)], axis=1)
    return targets, weights.astype(F32)


def loss_sum(params, lora, batch: dict, opts: ForwardOptions, key=None):
    """Per-device loss of this device's tokens: (sum of token losses, number of target tokens),
    both tp-invariant and local to this device's dp (and cp) shard.

    batch: dict of local [B, S] int32 arrays: ``tokens``, ``positions``, optional
    ``segment_ids``, and either ``loss_mask`` (whole sequences, cp = 1) or, in zig-zag layout
    (cp > 1), ``targets``, ``target_weights`` and ``token_index``."""
    h = hidden_states(params, lora, batch["tokens"], batch["positions"],
                      batch.get("segment_ids"), opts, key, batch.get("token_index"))
    if "targets" in batch:
        targets, weights = batch["targets"], batch["target_weights"].astype(F32)
    else:
        targets, weights = next_token_targets(batch["tokens"], batch["loss_mask"])
    return cross_entropy_sum(h, targets, weights, params, opts)


def cross_entropy_sum(h, targets, weights, params, opts: ForwardOptions):
    """Next-token loss. h [B, R, D] local residual rows (``opts.layout``); targets, weights
    [B, S] (the target token and loss weight of each local position, e.g. from
    :func:`next_token_targets`). Returns (sum of losses, sum of weights), local to this dp
    (and cp) shard.

    Runs over chunks of ``ce_chunk_tokens`` tokens with rematerialisation, so the [tokens, Vl]
    logits of only one chunk are ever live. Under sequence parallelism a chunk is gathered from
    every tp device's rows (all_gather; reduce-scatter of its gradient), so each token's loss is
    computed once and the LM head is never gathered."""
    b, s = targets.shape
    layout = opts.layout(s)
    rows, d = h.shape[1], h.shape[2]
    targets, weights = layout.pad(targets), layout.pad(weights.astype(F32))  # [B, S_pad]
    count = jnp.sum(weights)
    n = b * rows                                                              # local rows
    g = layout.gather_factor
    chunk = opts.ce_chunk_rows(layout, n)
    n_chunks = -(-n // chunk)
    hf = jnp.pad(h.reshape(n, d), ((0, n_chunks * chunk - n), (0, 0)))

    def chunk_loss(h_chunk, j):
        """Loss of local flat rows [j*chunk, (j+1)*chunk), gathered over tp when SP."""
        flat = j * chunk + jnp.arange(chunk, dtype=jnp.int32)                # [c]
        bi, local = flat // rows, flat % rows
        seq_idx = (jnp.arange(g, dtype=jnp.int32)[:, None] * rows + local[None, :]).reshape(-1)
        bi = jnp.tile(jnp.minimum(bi, b - 1), g)                             # [g*c]
        valid = jnp.tile(flat < n, g)
        t = targets[bi, seq_idx]
        w = jnp.where(valid, weights[bi, seq_idx], 0.0)
        hg = layout.gather(h_chunk, axis=0) if layout.sp else h_chunk        # [g*c, D]
        return _ce_chunk(hg, t, w, params, opts)

    if n_chunks == 1:
        return chunk_loss(hf, 0), count
    per_chunk = jax.lax.map(lambda xs: chunk_loss(*xs),
                            (hf.reshape(n_chunks, chunk, d), jnp.arange(n_chunks, dtype=jnp.int32)))
    return jnp.sum(per_chunk), count

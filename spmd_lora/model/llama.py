"""The Llama decoder, per device: the attention and MLP halves of a layer, the layer, and the
stack (embedding, ``lax.scan`` over the stacked layers, final norm), and the per-device loss.

Shapes in comments are local: ``B`` local batch, ``S`` local sequence (the cp rank's tokens,
padded to a multiple of tp under sequence parallelism), ``R`` residual rows held (S/tp or S),
``D`` hidden, ``Hl``/``KVl`` local q/kv heads, ``hd`` head dim, ``Fl`` local intermediate. Where
the residual rows live (``[B, S, D]`` on every tp device, or ``[B, S/tp, D]`` with sequence
parallelism) is :class:`~spmd_lora.parallel.sequence.SeqLayout`'s business: ``layout.gather``
before a column block, ``layout.scatter`` (psum or psum_scatter over tp) after a row block.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ..kernels import attention, ring_attention
from ..parallel.mesh import CP, DP
from ..parallel.sequence import SeqLayout, gather_tiles, scatter_tiles, tiled
from .dropout import Dropout
from .layers import apply_rope, embed, rms_norm, rope_tables
from .lora_linear import column_linear, row_linear
from .loss import cross_entropy_sum
from .options import PAD_TOKEN_INDEX, ForwardOptions
from .remat import LAYER_INPUT, MLP_INPUT, layer_segments, remat, remat_half

F32 = jnp.float32


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

    def norm(t):
        with jax.named_scope("attn_norm"):
            return rms_norm(t, p["attn_norm"], cfg.rms_norm_eps)            # [B, R|c, D]

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

    # Tiles pay in every layout: untiled, the backward of the q/k/v projections sums six
    # [B, S, D] partial input gradients (3 base + 3 LoRA) that XLA:GPU keeps all live at once
    # (one fused add), the largest buffers of a long-context step; tiled, they are [B, c, D].
    tile = opts.mlp_tile_rows(layout)
    with jax.named_scope("qkv"):
        if tile is None:
            q, k, v = qkv(layout.gather(norm(x)), seq.token_index)          # [B, S, ..]
        else:   # one tiled scan for all three, the norm inside (no [B, R, D] normed copy)
            q, k, v = gather_tiles(
                lambda hg, start: qkv(hg, _tile_rows(seq.token_index, layout, start, tile)), x,
                tile, layout, pre=norm)
    b, s, _ = q.shape
    with jax.named_scope("rope"):
        cos, sin = rope_tables(seq.positions, cfg, q.dtype)                 # [B, S, 1, hd]
        q = apply_rope(q.reshape(b, s, -1, hd), cos, sin)                   # [B, S, Hl, hd]
        k = apply_rope(k.reshape(b, s, -1, hd), cos, sin)                   # [B, S, KVl, hd]
    v = v.reshape(b, s, -1, hd)                                             # [B, S, KVl, hd]
    with jax.named_scope("attention"):
        if opts.cp > 1:
            kernel = "auto" if opts.attention_impl == "auto" else opts.attention_impl
            o = ring_attention(q, k, v, axis_name=CP, q_index=seq.token_index,
                               k_index=seq.token_index, q_segment_ids=seq.segment_ids,
                               kv_segment_ids=seq.segment_ids, impl=opts.cp_impl, kernel=kernel)
        else:
            o = attention(q, k, v, causal=True, segment_ids=seq.segment_ids,
                          impl=opts.attention_impl, branch_segments=opts.branch_segments)
    o = o.reshape(b, s, -1)
    with jax.named_scope("o_proj"):
        if tile is None:
            return layout.scatter(o_proj(o, seq.token_index))
        return scatter_tiles(
            lambda t, start: o_proj(t, _tile_rows(seq.token_index, layout, start, tile)), o,
            tile, layout)


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
        with jax.named_scope("mlp_norm"):
            h_tile = rms_norm(x_tile, p["mlp_norm"], cfg.rms_norm_eps)
        use = seq is not None and key is not None
        rows = _tile_rows(seq.token_index, layout, start, h_tile.shape[1]) if use else None
        drop = lambda index: _drop(key, seq, rows, index) if use else None  # noqa: E731
        with jax.named_scope("mlp"):
            hg = layout.gather(h_tile)                                      # [B, g*c, D]
            gate = column_linear(hg, p["gate_proj"], lora.get("gate_proj"), f, opts,
                                 drop(4))                                   # [B, g*c, Fl]
            up = column_linear(hg, p["up_proj"], lora.get("up_proj"), f, opts,
                               drop(5))                                     # [B, g*c, Fl]
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
    attn, mlp = remat_half(attn, opts), remat_half(mlp, opts)
    x = checkpoint_name(x, LAYER_INPUT)
    x = attn(x, p, lora, key)
    x = checkpoint_name(x, MLP_INPUT)
    return mlp(x, p, lora, key)


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
    with jax.named_scope("embed"):
        x = embed(layout.pad(tokens), params["embed"], opts, layout)        # [B, R, D]
    lora_layers = (lora or {}).get("layers", {})

    def body(h, xs):
        p, lp, idx = xs
        layer_key = jax.random.fold_in(key, idx) if use_dropout else None
        with jax.named_scope("layer"):
            return decoder_layer(h, p, lp, seq, opts, layer_key), None

    x = scan_layers(body, x, params["layers"], lora_layers, opts)
    with jax.named_scope("final_norm"):
        return rms_norm(x, params["final_norm"], opts.cfg.rms_norm_eps)


def scan_layers(body, x, layers, lora_layers, opts: ForwardOptions):
    """Run ``body(h, (layer params, layer LoRA, layer index))`` over the stacked layers
    (``lax.scan``), under the remat policy, one scan per :func:`~.remat.layer_segments`
    segment. A segment short of all layers reads its frozen weights by index from the whole
    stack (closed over, not sliced: a slice would copy them); the small LoRA factors are
    sliced."""
    segments = layer_segments(opts)
    if len(segments) == 1:
        (_, n, to_host), = segments
        idx = jnp.arange(n)
        return jax.lax.scan(remat(body, opts, to_host), x, (layers, lora_layers, idx))[0]

    def indexed(h, xs):
        lp, idx = xs
        p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, idx, keepdims=False), layers)
        return body(h, (p, lp, idx))

    for start, stop, to_host in segments:
        lora_part = jax.tree.map(lambda a: a[start:stop], lora_layers)
        x = jax.lax.scan(remat(indexed, opts, to_host), x,
                         (lora_part, jnp.arange(start, stop)))[0]
    return x


def loss_sum(params, lora, batch: dict, opts: ForwardOptions, key=None):
    """Per-device loss of this device's tokens: (sum of token losses, number of target tokens),
    both tp-invariant and local to this device's dp (and cp) shard.

    batch: this device's shard of the prepared batch, the same fields at every cp
    (:func:`spmd_lora.parallel.zigzag.prepare_batch`): local [B, S] int32 ``tokens``,
    ``targets``, ``target_weights``, ``positions``, ``token_index`` and optional
    ``segment_ids`` (zig-zag layout with cp > 1)."""
    h = hidden_states(params, lora, batch["tokens"], batch["positions"],
                      batch.get("segment_ids"), opts, key, batch["token_index"])
    return cross_entropy_sum(h, batch["targets"], batch["target_weights"], params, opts)

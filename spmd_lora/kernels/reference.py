"""Plain XLA attention: the oracle every other implementation is tested against.

Materialises the full [B, H, S, S] score matrix, so memory is quadratic in S.
"""
import jax
import jax.numpy as jnp

from ._masks import segments_visible


def reference_attention(q, k, v, *, causal=True, segment_ids=None):
    """Softmax attention in float32.

    q: [B, S, H, D]; k, v: [B, S, KV, D] with H a multiple of KV (q head h uses kv head
    h // (H // KV), as in HF transformers); segment_ids: optional [B, S] int32, tokens attend
    only within their own segment (and a branch segment also
    sees its shared prefix: :func:`~._masks.segments_visible`). Returns [B, S, H, D] in q's dtype.
    """
    b, s, h, d = q.shape
    kv = k.shape[2]
    group = h // kv
    qf = q.astype(jnp.float32).reshape(b, s, kv, group, d)
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qf, kf) / jnp.sqrt(jnp.float32(d))
    mask = jnp.ones((b, 1, 1, s, s), dtype=bool)
    if causal:
        mask = mask & jnp.tril(jnp.ones((s, s), dtype=bool))[None, None, None]
    if segment_ids is not None:
        same = segments_visible(segment_ids, segment_ids)
        mask = mask & same[:, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, vf)
    return out.reshape(b, s, h, d).astype(q.dtype)

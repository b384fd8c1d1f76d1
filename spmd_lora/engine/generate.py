"""Batched KV-cache generation inside ``jax.shard_map`` (greedy, temperature, top-k, top-p).

Layout: prompts are LEFT-padded to a common length ``P`` (a multiple of 8) with an attention
mask; positions count real tokens only (``cumsum(mask) - 1``, as HF ``generate``), so greedy
output equals ``transformers`` ``generate(do_sample=False)`` with left padding. One prefill call
writes the prompt into the cache and samples the first token; then one jitted decode step per
new token (a Python loop, fixed shapes) feeds the last token at cache slot ``P + step``.
Programs are compiled per (batch, prompt width, cache size) and sampling mode (greedy; or
sampling with/without top-k [widths bucketed: <=64, 128, ...] and with/without top-p);
temperature, top_k and top_p values are runtime inputs.

Per device (inside shard_map, check_vma=True): the KV cache of every layer is
``[B_local, Smax, KVl, hd]`` (kv heads over tp exactly as the k/v_proj columns, batch over dp),
stacked over layers to ``[L, B, Smax, KVe, hd]`` globally, spec ``P(None, dp, None, tp, None)``.
The layers reuse spmd_lora.model's embed / rms_norm / rope / column_linear / row_linear (with
LoRA) / mlp_residual / local_logits. Prefill attention is ``spmd_lora.kernels.attention``
(the model's ``attention`` impl, O(S) memory for long prompts; padding is segment 0); decode
attention is a plain masked float32 softmax of the new token over the cache.

Sampling never gathers the vocabulary: the logits stay vocab-parallel ``[B, Vl]``.
Greedy is a per-device max + argmax combined with ``pmax`` / ``pmin`` (lowest index on ties, as
``torch.argmax``). Sampling is exact Gumbel-max: ``argmax(z + Gumbel)`` over the kept tokens, with
noise from a counter-based hash of (seed, step, global row, global vocab index), so results
depend on the seed only, not on the mesh. top-k: each device's top k_cap values are all-gathered
([B, tp*k_cap], small) to find the global k-th value; top-p: the exact nucleus threshold is found
by a 32-step bisection over float32 bit patterns, each step one ``psum`` of [B] masses
(HF's order: temperature, then top-k, then top-p).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .. import model as M
from ..errors import ConfigError, DataError
from ..kernels import attention
from ..parallel.placement import put_global, to_host
from ..parallel.mesh import CP, DP, TP, lora_specs
from ..weights.shapes import param_specs
from ..data import encode_prompt
from ..tokenizer import decode_whole_characters

F32 = jnp.float32
CACHE_SPEC = P(None, DP, None, TP, None)


# ----------------------------------------------------------------------------- per device

def _cached_attention(q, ck, cv, mask):
    """q [B, T, Hl, hd]; ck, cv [B, Smax, KVl, hd]; mask [B, T, Smax] bool -> [B, T, Hl, hd].
    q head h uses local kv head h // (Hl // KVl), as HF."""
    b, t, h, d = q.shape
    kv = ck.shape[2]
    qf = q.astype(F32).reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qf, ck.astype(F32)) / jnp.sqrt(jnp.float32(d))
    m = mask[:, None, None]
    scores = jnp.where(m, scores, jnp.finfo(F32).min)
    probs = jnp.where(m, jax.nn.softmax(scores, axis=-1), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, cv.astype(F32))
    return out.reshape(b, t, h, d).astype(q.dtype)


def _layer(x, p, lora, ck, cv, cos, sin, mask, start, segments, opts: M.ForwardOptions):
    cfg = opts.cfg
    b, t, _ = x.shape
    hd = cfg.head_dim
    h = M.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = M.column_linear(h, p["q_proj"], lora.get("q_proj"), (cfg.num_heads, hd), opts)
    k = M.column_linear(h, p["k_proj"], lora.get("k_proj"), (cfg.num_kv_heads, hd), opts)
    v = M.column_linear(h, p["v_proj"], lora.get("v_proj"), (cfg.num_kv_heads, hd), opts)
    q = M.apply_rope(q.reshape(b, t, -1, hd), cos, sin)
    k = M.apply_rope(k.reshape(b, t, -1, hd), cos, sin)
    v = v.reshape(b, t, -1, hd)
    ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), start, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), start, axis=1)
    if segments is not None:            # prefill of an empty cache: the package's kernel, O(S) memory
        o = attention(q, k, v, causal=True, segment_ids=segments, impl=opts.attention_impl)
    else:
        o = _cached_attention(q, ck, cv, mask)
    x = x + jax.lax.psum(M.row_linear(o.reshape(b, t, -1), p["o_proj"], lora.get("o_proj"), opts), TP)
    return M.mlp_residual(x, p, lora, opts.layout(t), opts), ck, cv


def _forward_cached(params, lora, ck, cv, tokens, positions, pmask, start, opts, prefill=False):
    """tokens, positions [B, T] written at cache slots [start, start + T); pmask [B, Smax] marks
    cache slots that hold real tokens (padding 0). ``prefill``: the cache is empty and start is
    0, so attention runs over the new tokens only, with the kernels' causal attention (padding
    as segment 0, prompt tokens segment 1). Returns (last hidden state [B, D], ck, cv)."""
    smax, t = ck.shape[2], tokens.shape[1]
    x = M.embed(tokens, params["embed"], opts)
    cos, sin = M.rope_tables(positions, opts.cfg)
    if prefill:
        mask, segments = None, pmask[:, :t].astype(jnp.int32)
    else:
        slots = jnp.arange(smax)
        mask = pmask[:, None, :] & (slots[None, None, :] <= (start + jnp.arange(t))[None, :, None])
        segments = None

    def body(h, xs):
        p, lp, k_l, v_l = xs
        h, k_l, v_l = _layer(h, p, lp, k_l, v_l, cos, sin, mask, start, segments, opts)
        return h, (k_l, v_l)

    x, (ck, cv) = jax.lax.scan(body, x, (params["layers"], (lora or {}).get("layers", {}), ck, cv))
    return M.rms_norm(x[:, -1], params["final_norm"], opts.cfg.rms_norm_eps), ck, cv


def _vp_argmax(score, col):
    """Vocab-parallel argmax of score [B, Vl] (global column ids col [Vl]) -> [B] int32, the
    lowest global index among the maxima."""
    best = jnp.max(score, axis=-1)
    idx = col[jnp.argmax(score, axis=-1)]
    gbest = jax.lax.pmax(best, TP)
    return jax.lax.pmin(jnp.where(best == gbest, idx, jnp.iinfo(jnp.int32).max), TP)


def _sortable(x):
    """float32 -> int32 key with the same order."""
    b = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(b >= 0, b, b ^ jnp.int32(0x7FFFFFFF))


def _unsortable(k):
    return jax.lax.bitcast_convert_type(jnp.where(k >= 0, k, k ^ jnp.int32(0x7FFFFFFF)), F32)


def _gumbel(seed, step, rows, col):
    """Gumbel noise [B, Vl] from a counter-based hash of (seed, step, row, global column)."""
    from jax.extend.random import threefry_2x32
    shape = (rows.shape[0], col.shape[0])
    c0 = jnp.broadcast_to(col.astype(jnp.uint32)[None, :], shape).reshape(-1)
    c1 = jnp.broadcast_to(rows.astype(jnp.uint32)[:, None], shape).reshape(-1)
    key = jnp.stack([seed.astype(jnp.uint32), step.astype(jnp.uint32)])
    bits = threefry_2x32(key, jnp.concatenate([c0, c1]))[:c0.shape[0]].reshape(shape)
    u = (bits >> 8).astype(F32) * jnp.float32(2.0 ** -24) + jnp.float32(2.0 ** -25)   # (0, 1)
    return -jnp.log(-jnp.log(u))


def _warp(logits, mode, knobs, col, opts):
    """HF's warpers on vocab-parallel logits [B, Vl]: logits / temperature, then top-k, then
    top-p; tokens filtered out (and padded vocab entries) become -inf. Returns [B, Vl] float32.

    ``mode`` (static): (greedy, k_cap, use_top_p), k_cap >= top_k the compiled top-k width (0:
    no top-k); ``knobs`` (traced float32 [3]): temperature, top_k, top_p."""
    _, k_cap, use_top_p = mode
    vl = logits.shape[-1]
    valid = (col < opts.cfg.vocab_size)[None, :]
    z = jnp.where(valid, logits / knobs[0], -jnp.inf)
    if k_cap:
        k = min(k_cap, vl)
        cand = jax.lax.all_gather(jax.lax.top_k(z, k)[0], TP, axis=1, tiled=True)   # [B, tp*k]
        top = jax.lax.top_k(cand, min(k_cap, cand.shape[1]))[0]                    # descending
        kth = top[:, jnp.clip(knobs[1].astype(jnp.int32), 1, top.shape[1]) - 1]
        z = jnp.where(z >= kth[:, None], z, -jnp.inf)
    if use_top_p:
        m = jax.lax.pmax(jnp.max(z, axis=-1), TP)                                  # [B]
        e = jnp.exp(z - m[:, None])                                                # 0 where -inf
        target = knobs[2] * jax.lax.psum(jnp.sum(e, axis=-1), TP)

        def mass_above(key):                                # unnormalised mass of tokens z > t
            return jax.lax.psum(jnp.sum(jnp.where(z > _unsortable(key)[:, None], e, 0.0), axis=-1), TP)

        # smallest t with mass_above(t) < top_p: keep z >= t (HF keeps a token while the mass of
        # the tokens ranked above it is < top_p). Invariant: lo fails, hi satisfies.
        hi = _sortable(m)
        lo = hi * 0 + _sortable(jnp.float32(-jnp.inf))

        def bisect(_, lohi):
            lo, hi = lohi
            mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
            ok = mass_above(mid) < target            # once hi - lo <= 1, mid == lo fails
            return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

        lo, hi = jax.lax.fori_loop(0, 33, bisect, (lo, hi))
        z = jnp.where(z >= _unsortable(hi)[:, None], z, -jnp.inf)
    return z


def _sample(logits, mode, knobs, seed, step, opts):
    """logits [B, Vl] float32 (this device's vocab slice) -> next token [B] int32."""
    vl = logits.shape[-1]
    col = jax.lax.axis_index(TP) * vl + jnp.arange(vl, dtype=jnp.int32)
    if mode[0]:
        return _vp_argmax(jnp.where((col < opts.cfg.vocab_size)[None, :], logits, -jnp.inf), col)
    z = _warp(logits, mode, knobs, col, opts)
    b = z.shape[0]
    rows = jax.lax.axis_index(DP) * b + jnp.arange(b)
    score = jnp.where(z > -jnp.inf, z + _gumbel(seed, step, rows, col), -jnp.inf)
    return _vp_argmax(score, col)


# ----------------------------------------------------------------------------- jitted programs

@functools.lru_cache(maxsize=32)
def _programs(opts: M.ForwardOptions, mesh, mode, cache_dtype):
    """(prefill, decode) jitted for these static settings."""
    tp = mesh.shape[TP]
    kvl = opts.cfg.kv_heads_per_device(tp)
    hd, nl = opts.cfg.head_dim, opts.cfg.num_layers

    def per_device_prefill(params, lora, tokens, positions, pmask, knobs, seed):
        b, smax = tokens.shape[0], pmask.shape[1]
        ck = jnp.zeros((nl, b, smax, kvl, hd), cache_dtype)
        cv = jnp.zeros((nl, b, smax, kvl, hd), cache_dtype)
        h, ck, cv = _forward_cached(params, lora, ck, cv, tokens, positions, pmask, 0, opts,
                                    prefill=True)
        tok = _sample(M.local_logits(h, params, opts), mode, knobs, seed, jnp.int32(0), opts)
        return ck, cv, tok

    def per_device_decode(params, lora, ck, cv, tok, pos, pmask, slot, knobs, seed, step):
        h, ck, cv = _forward_cached(params, lora, ck, cv, tok[:, None], pos[:, None], pmask,
                                    slot, opts)
        return ck, cv, _sample(M.local_logits(h, params, opts), mode, knobs, seed, step, opts)

    b2, b1, rep = P(DP, None), P(DP), P()

    def prefill(params, lora, tokens, positions, pmask, knobs, seed):
        return jax.shard_map(
            per_device_prefill, mesh=mesh,
            in_specs=(param_specs(params), lora_specs(lora), b2, b2, b2, rep, rep),
            out_specs=(CACHE_SPEC, CACHE_SPEC, b1), check_vma=True,
        )(params, lora, tokens, positions, pmask, knobs, seed)

    def decode(params, lora, ck, cv, tok, pos, pmask, slot, knobs, seed, step):
        return jax.shard_map(
            per_device_decode, mesh=mesh,
            in_specs=(param_specs(params), lora_specs(lora), CACHE_SPEC, CACHE_SPEC, b1, b1, b2,
                      rep, rep, rep, rep),
            out_specs=(CACHE_SPEC, CACHE_SPEC, b1), check_vma=True,
        )(params, lora, ck, cv, tok, pos, pmask, slot, knobs, seed, step)

    return jax.jit(prefill), jax.jit(decode, donate_argnums=(2, 3))


def _mode(temperature, top_k, top_p):
    """(static mode, runtime knobs) of a sampling setting (see _warp)."""
    greedy = temperature == 0.0
    k_cap = 0 if greedy or top_k == 0 else max(64, 1 << (int(top_k) - 1).bit_length())
    mode = (greedy, k_cap, not greedy and top_p < 1.0)
    return mode, jnp.asarray([1.0 if greedy else temperature, top_k, top_p], jnp.float32)


def _round_up(n, m):
    return -(-n // m) * m


def generate(model, prompts_token_ids: list[list[int]], max_new_tokens: int, *, temperature=0.0,
             top_k=0, top_p=1.0, eos_token_id=None, seed=0) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens after each prompt; returns the new tokens of each
    prompt, ending with ``eos_token_id`` (included) when a row emits it.

    ``model``: a :class:`spmd_lora.api.Model`. ``temperature=0``: greedy (equal to HF
    ``generate(do_sample=False)``); otherwise sampling from ``softmax(logits / temperature)``
    restricted by ``top_k`` (0: off) and ``top_p`` (1.0: off), deterministic for a given
    ``seed`` (and independent of the mesh). ``eos_token_id``: an int, a list of ints, or None.
    """
    if model.mesh.shape[CP] > 1:
        raise ConfigError(
            f"generation needs cp = 1 (the KV cache holds whole sequences on every device), "
            f"but the model was loaded with cp={model.mesh.shape[CP]}: load it again with "
            f"cp=1 (--cp 1) to generate")
    bad = [f"{name} (--{name.replace('_', '-')}) must be {rule}, got {value}"
           for name, value, rule, ok in (
               ("temperature", temperature, ">= 0 (0 = greedy)", temperature >= 0),
               ("top_k", top_k, ">= 0 (0 = off)", top_k >= 0),
               ("top_p", top_p, "in (0, 1]", 0.0 < top_p <= 1.0),
               ("max_new_tokens", max_new_tokens, ">= 0", max_new_tokens >= 0)) if not ok]
    if bad:
        raise ConfigError("; ".join(bad))
    prompts = [list(map(int, p)) for p in prompts_token_ids]
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if not p:
            raise DataError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        if min(p) < 0 or max(p) >= vocab:
            raise DataError(f"prompt {i} holds token ids outside [0, {vocab}) of this model")
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    eos = set() if eos_token_id is None else (
        {int(eos_token_id)} if np.isscalar(eos_token_id) else set(map(int, eos_token_id)))
    mode, knobs = _mode(temperature, top_k, top_p)

    mesh = model.mesh
    dp = mesh.shape[DP]
    n = len(prompts)
    rows = prompts + [[0]] * (_round_up(n, dp) - n)          # dummy rows so dp divides the batch
    b = len(rows)
    plen = _round_up(max(len(p) for p in rows), 8)
    smax = plen + _round_up(max_new_tokens, 8)
    tokens = np.zeros((b, plen), np.int32)
    pmask = np.ones((b, smax), bool)
    lengths = np.array([len(p) for p in rows], np.int32)
    for i, p in enumerate(rows):
        tokens[i, plen - len(p):] = p
        pmask[i, :plen - len(p)] = False
    positions = np.maximum(np.cumsum(pmask[:, :plen], axis=1) - 1, 0).astype(np.int32)

    # The KV cache holds whole sequences: generation runs the replicated (non-SP) layout.
    opts = dataclasses.replace(model.options, sequence_parallel=False, mlp_chunk_tokens=0)
    cache_dtype = np.dtype(model.params["layers"]["k_proj"].dtype)
    prefill, decode = _programs(opts, mesh, mode, cache_dtype)
    put = lambda x, spec: put_global(x, NamedSharding(mesh, spec))
    lora = model.lora or {}
    seed_arr = jnp.asarray(np.uint32(seed % 2 ** 32))
    pmask_d = put(pmask, P(DP, None))
    ck, cv, tok = prefill(model.params, lora, put(tokens, P(DP, None)), put(positions, P(DP, None)),
                          pmask_d, knobs, seed_arr)
    out = [[] for _ in range(n)]
    done = np.zeros(n, bool)
    for step in range(max_new_tokens):
        host = to_host(tok)                  # gathered from every process when dp spans them
        for i in range(n):
            if not done[i]:
                out[i].append(int(host[i]))
                done[i] = int(host[i]) in eos
        if done.all() or step == max_new_tokens - 1:
            break
        ck, cv, tok = decode(model.params, lora, ck, cv, put(host, P(DP)),
                             put(lengths + step, P(DP)), pmask_d, jnp.int32(plen + step),
                             knobs, seed_arr, jnp.int32(step + 1))
    return out


def generate_text(model, tokenizer, prompts: list, template: str | None = None,
                  max_prompt_tokens: int | None = None, chat_template: str | None = None,
                  **kw) -> list[str]:
    """Tokenize ``prompts``, generate, and decode the new text of each (special tokens skipped;
    a character cut by ``max_new_tokens`` is left out, not shown as U+FFFD).

    Without ``template`` each prompt is a string, tokenized as ``tokenizer(text)`` (BOS added
    by the tokenizer). With ``template`` ("alpaca", "rag", "text", "auto") each prompt is a
    record dict, or a string taken as the ``instruction`` (alpaca) / ``question`` with no
    passages (rag) / ``text``, and is tokenized exactly as training tokenizes prompts:
    ``spmd_lora.data.encode_prompt(record, tokenizer, template, max_prompt_tokens)`` (BOS +
    ``format_prompt``; for rag, passages dropped/truncated to fit ``max_prompt_tokens``).
    ``template="chat"`` takes a string as one user turn (or a ``messages`` record) and renders
    it with the chat template up to the generation prompt, as training renders it
    (``chat_template``: a built-in name or Jinja file; default the tokenizer's; with ``rag`` it
    renders the RAG prompt as a chat too).
    ``eos_token_id`` defaults to the tokenizer's; other keywords go to :func:`generate`
    (``max_new_tokens`` defaults to 128).
    """
    ids = []
    for i, p in enumerate(prompts):
        if template is not None:
            if isinstance(p, str):
                p = {"alpaca": {"instruction": p}, "rag": {"question": p, "contexts": []},
                     "chat": {"messages": [{"role": "user", "content": p}]}}.get(
                    template, {"text": p})
            ids.append(list(encode_prompt(p, tokenizer, template, max_len=max_prompt_tokens,
                                          chat_template=chat_template)))
        elif isinstance(p, str):
            ids.append(list(tokenizer(p)["input_ids"]))
        else:
            raise DataError(f"generate_text: prompt {i} is a {type(p).__name__}; prompts must be "
                            f"strings unless a template is given")
    kw.setdefault("eos_token_id", getattr(tokenizer, "eos_token_id", None))
    max_new = kw.pop("max_new_tokens", 128)
    new = generate(model, ids, max_new, **kw)
    return [decode_whole_characters(tokenizer, t, skip_special_tokens=True) for t in new]

#!/usr/bin/env python
"""Where a train step's time goes: the step and its parts timed in one process.

    python tools/step_breakdown.py --config tiny|small|long|long8k [--repeats 5]
        [--parts ceiling,step,attention,ce,linears,bound] [--remat none,full]
        [--blocks 128,256,512,xla]

Model and step as ``tools/bench.py`` (random Llama, LoRA r=8 on all linears, fp32 on CPU,
batch 1). Parts, each jitted and timed forward + backward on the step's shapes:

* ``step``: the whole train step (``make_train_step``) per remat policy;
* ``attention``: one layer's causal attention, per impl (blockwise at each ``--blocks`` size,
  and xla when listed), gradients w.r.t. q, k, v; x layers;
* ``ce``: the vocab-parallel cross-entropy (LM head + loss) on [S, D] hidden states, gradient
  w.r.t. them, in one chunk and in chunks of S/2;
* ``linears``: one layer's frozen projections (q, k, v, o, gate, up, down) forward and input
  gradient with plain matmuls, x layers;
* ``ceiling``: a 2048^3 matmul;
* ``bound``: the best utilisation this step could reach with XLA's own kernels: every matmul
  the step must run (attention's tile products at the CPU tile size, the LM head's two, the
  frozen linears), each timed alone at its shape, summed as if nothing else took time; then
  plus the element-wise passes no implementation can skip (the softmax exponentials of each
  attention tile, forward and backward, and the max and exp-sum over the [S, V] logits).

Each part's time is the minimum of ``--repeats`` runs (the least-disturbed one, on a shared
machine), next to its matmul FLOPs (``spmd_lora.analysis.flops``) and FLOP/s. "other" = the step
minus the parts it is made of: element-wise work (norms, rotary, SiLU, LoRA's small matmuls,
the optimizer), loop overheads. Prints the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _time(fn, repeats):
    import jax
    jax.block_until_ready(fn())                     # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


PARTS = ("ceiling", "step", "attention", "ce", "linears", "bound")


def main(argv=None):
    bench = _load_bench()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny", choices=list(bench.CONFIGS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--remat", default="none,full")
    ap.add_argument("--blocks", default="128,256,512,xla",
                    help="attention variants: blockwise block sizes, and xla")
    ap.add_argument("--ce-chunk-tokens", type=int, default=4096)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from spmd_lora.model import REMAT_POLICIES
    for flag, values, allowed in (("--parts", args.parts, PARTS),
                                  ("--remat", args.remat, REMAT_POLICIES)):
        unknown = sorted(set(values.split(",")) - set(allowed))
        if unknown:
            ap.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if not all(b == "xla" or (b.isdigit() and int(b) > 0) for b in args.blocks.split(",")):
        ap.error(f"--blocks {args.blocks!r}: comma-separated positive block sizes, or xla")

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    from spmd_lora.analysis import flops as F
    from spmd_lora.kernels import attention
    from spmd_lora.kernels.flash_attention import BlockSizes
    from spmd_lora.config.lora_config import LoraConfig
    from spmd_lora.engine.factory import build_train_step, forward_options, mesh_for
    from spmd_lora.weights.shapes import param_specs
    from spmd_lora.model import cross_entropy_sum
    from spmd_lora.weights.shapes import random_params
    from spmd_lora.engine.step import OptimizerConfig
    from spmd_lora.parallel.placement import shard_micro_batches
    model_dims, _model_config, _loadavg = bench.model_dims, bench._model_config, bench._loadavg

    m = model_dims(args.config)
    cfg = _model_config(m)
    s, d, L = m["seq"], m["hidden"], m["layers"]
    useful = F.step_flops(cfg, s, lora_rank=8)              # by part; the same for every remat
    h, hd = cfg.num_heads, cfg.head_dim
    lora_cfg = LoraConfig(rank=8, alpha=16.0, targets="all")
    mesh = mesh_for()
    parts = args.parts.split(",")
    rows = []
    print(f"config {args.config}: L={L} d={d} S={s} V={m['vocab']}; load average {_loadavg()}",
          flush=True)

    def report(name, seconds, flop=None):
        row = {"part": name, "seconds": seconds}
        extra = ""
        if flop:
            row["flops"] = flop
            extra = f"  {flop / 1e9:8.2f} GFLOP  {flop / seconds / 1e9:6.1f} GFLOP/s"
        rows.append(row)
        print(f"  {name:34s} {seconds * 1e3:9.1f} ms{extra}", flush=True)

    ceiling = None
    if "ceiling" in parts or "bound" in parts:
        c = F.measure_matmul_ceiling(2048, "float32", repeats=args.repeats)
        ceiling = c["flops_per_s"]
        report("ceiling 2048^3 matmul", c["seconds"], 2.0 * 2048 ** 3)

    if "step" in parts:
        params = random_params(cfg, mesh, "float32")
        opt = OptimizerConfig(learning_rate=2e-4, weight_decay=0.0, max_grad_norm=None,
                              total_steps=10 ** 6)
        rng = np.random.default_rng(0)
        batches = shard_micro_batches({"tokens": rng.integers(0, m["vocab"], (1, 1, s)),
                                       "loss_mask": np.ones((1, 1, s), np.int32)}, mesh)
        for remat in args.remat.split(","):
            step = build_train_step(cfg, mesh=mesh, lora=lora_cfg, remat=remat,
                                    ce_chunk_tokens=args.ce_chunk_tokens, optimizer=opt)
            state = list(step.init_state(jax.random.key(0)))
            key = jax.random.key(1)

            def one():
                state[0], state[1], met = step(params, state[0], state[1], batches, key)
                return met["loss"]
            report(f"step remat={remat} (useful)", _time(one, args.repeats), useful.useful)

    if "attention" in parts:
        kq = jax.random.split(jax.random.key(2), 4)
        q = jax.random.normal(kq[0], (1, s, h, hd), jnp.float32)
        k = jax.random.normal(kq[1], (1, s, h, hd), jnp.float32)
        v = jax.random.normal(kq[2], (1, s, h, hd), jnp.float32)
        ct = jax.random.normal(kq[3], (1, s, h, hd), jnp.float32)
        impls = [("xla", None) if b == "xla" else ("blockwise", int(b))
                 for b in args.blocks.split(",") if b == "xla" or int(b) <= s]
        for impl, blk in impls:
            bs = BlockSizes(block_q=blk, block_k=blk, block_q_bwd=blk, block_k_bwd=blk) \
                if blk else None

            def loss(q, k, v, impl=impl, bs=bs):
                return jnp.sum(attention(q, k, v, causal=True, impl=impl, block_sizes=bs) * ct)
            g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            t = _time(lambda g=g: g(q, k, v), args.repeats)
            report(f"attention {impl}{'' if blk is None else f' b{blk}'} x{L} (useful)", t * L,
                   useful.attention)

    if "ce" in parts:
        params = random_params(cfg, mesh, "float32")
        hs = jax.random.normal(jax.random.key(3), (1, s, d), jnp.float32)
        targets = jax.random.randint(jax.random.key(4), (1, s), 0, m["vocab"])
        weights = jnp.ones((1, s), jnp.float32)
        for chunk in (s, max(1, s // 2)):
            opts = forward_options(cfg, lora=lora_cfg, ce_chunk_tokens=chunk)

            def per_dev(p, hs, t, w, opts=opts):
                return cross_entropy_sum(hs, t, w, p, opts)[0]
            f = jax.shard_map(per_dev, mesh=mesh, in_specs=(param_specs(params), P(), P(), P()),
                              out_specs=P(), check_vma=False)
            g = jax.jit(jax.grad(lambda hs, f=f: f(params, hs, targets, weights)))
            t = _time(lambda g=g: g(hs), args.repeats)
            report(f"ce {-(-s // chunk)} chunk(s) (useful)", t, useful.lm_head)

    if "linears" in parts:
        dims = [F.projection_dims(cfg, n) for n in F.PROJECTIONS]
        ws = [jax.random.normal(jax.random.key(10 + i), io, jnp.float32) * 0.02
              for i, io in enumerate(dims)]
        xs = [jax.random.normal(jax.random.key(20 + i), (s, io[0]), jnp.float32)
              for i, io in enumerate(dims)]

        cts = [jax.random.normal(jax.random.key(30 + i), (s, io[1]), jnp.float32)
               for i, io in enumerate(dims)]

        def lin(xs, ws, cts):                       # random cotangents: nothing folds
            return sum(jnp.sum((x @ w) * c) for x, w, c in zip(xs, ws, cts))
        g = jax.jit(jax.value_and_grad(lin))         # the forward's value keeps x @ w alive
        t = _time(lambda: g(xs, ws, cts), args.repeats)
        report(f"frozen linears x{L} (fwd + dx)", t * L, useful.linears)

    if "bound" in parts:
        _bound(cfg, s, useful.useful, ceiling, args.repeats, report)

    print(f"load average after: {_loadavg()}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "rows": rows}, f, indent=1)
    return 0


def _bound(cfg, s, useful, ceiling, repeats, report):
    """Time each matmul shape of the step alone (and the softmax passes); report the sum and
    the utilisation it would give (useful FLOPs / that time / ceiling): an upper bound for
    any step built from XLA's kernels, which run these products one at a time."""
    import jax
    import jax.numpy as jnp

    from spmd_lora.analysis import flops as F
    from spmd_lora.kernels import registry

    L, d, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    kv, g, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    choice = registry.choose("auto", seq_len=s, head_dim=hd, backend="cpu")
    b = min(choice.block_sizes.block_q, s)       # the tile the step's kernel runs
    tiles = F.causal_tiles(s, b, b) * L
    fl = F.step_flops(cfg, s, attention="blockwise", block_q=b, block_k=b)
    drawn = [0]

    def rnd(*shape):
        drawn[0] += 1
        return jax.random.normal(jax.random.key(drawn[0]), shape, jnp.float32)

    def timed(fn, *xs):              # short products: the first runs after a compile are slow
        f = jax.jit(fn)
        return _time(lambda: f(*xs), max(repeats, 10))

    q, k, sc = rnd(kv, b * g, hd), rnd(kv, b, hd), rnd(kv, b * g, b)
    ein = jnp.einsum
    # Per tile, forward: S = QK^T, PV; backward: S again, dP = dO V^T (both contract D, as
    # QK^T), dV = P^T dO and dK = dS^T Q (on the backward's transposed tile these contract its
    # minor axis, as PV), and dQ = dS K, which contracts the tile's other axis (dS feeds both
    # dK and dQ, so one of them always does): 3 + 3 + 1 products, the kernel's own layout.
    t_qk = timed(lambda a, c: ein("nrd,nsd->nrs", a, c), q, k)
    t_pv = timed(lambda p, c: ein("nrs,nsd->nrd", p, c), sc, k)
    t_ptd = timed(lambda p, a: ein("nrs,nrd->nsd", p, a), sc, q)
    attn = tiles * (3 * t_qk + 3 * t_pv + t_ptd)
    report(f"bound: attention tile matmuls b{b} x{tiles}", attn, fl.attention_hw)
    h, head, e = rnd(s, d), rnd(d, V), rnd(s, V)
    ce = (timed(lambda x, w: x @ w, h, head) + timed(lambda x, w: x @ w.T, e, head))
    report("bound: LM head matmuls", ce, fl.lm_head)
    lin = 0.0
    for name in F.PROJECTIONS:              # forward and input gradient of each projection
        f_in, f_out = F.projection_dims(cfg, name)
        x, w, dy = rnd(s, f_in), rnd(f_in, f_out), rnd(s, f_out)
        lin += timed(lambda a, c: a @ c, x, w) + timed(lambda a, c: a @ c.T, dy, w)
    report(f"bound: frozen linear matmuls x{L}", lin * L, fl.linears)
    matmuls = attn + ce + lin * L
    report("bound: matmuls only (useful)", matmuls, useful)
    # Exponentials every implementation computes: each tile's, forward and backward (the
    # backward recomputes them, or reads them back), and the logits' max and exp-sum.
    t_exp = timed(lambda x: jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)), sc)
    t_lse = timed(lambda x: jnp.sum(jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)), -1), e)
    soft = 2 * tiles * t_exp + t_lse
    report("bound: softmax passes", soft)
    report("bound: matmuls + softmax (useful)", matmuls + soft, useful)
    for name, t in (("matmuls only", matmuls), ("matmuls + softmax", matmuls + soft)):
        print(f"  utilisation bound, {name}: {useful / t / ceiling * 100:.1f} % of the ceiling",
              flush=True)


def _load_bench():
    """tools/bench.py by path (tools/ never goes on sys.path: profile.py there would shadow
    the standard library's)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_bench", os.path.join(_HERE, "bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    sys.exit(main())

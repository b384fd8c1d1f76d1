"""Wall time of context-parallel attention: ring vs allgather vs single-device blockwise.

Times the forward and the forward+backward (gradient of sum(out * cotangent) in q, k, v) of

* ``ring``      -- ``ring_attention(impl="ring")`` over a cp mesh axis, zig-zag layout;
* ``allgather`` -- ``ring_attention(impl="allgather")``, same layout;
* ``single``    -- ``attention(impl="blockwise")`` on the whole sequence on one device;
* ``local``     -- ``ring_attention(axis_name=None)`` on the whole sequence on one device
  (the index-masked block kernel alone: its cost against ``single``'s static causal bounds),

with the same block kernel (blockwise, the CPU default) and block size, and prints one
markdown row per (variant, pass): min / median wall milliseconds over ``--repeats`` runs after
one warm-up, the median CPU time of the process per call (all threads: less sensitive to other
load on a shared machine than wall time), and the bytes one device sends over cp per call
(from the compiled HLO's collective census). On CPU the cp "devices" are fake: they share the host's cores, so this shows the
ring's bookkeeping cost (per-step merges, loop overhead, transfers as copies), not a
multi-GPU speed-up.

    python tools/cp_attention_timing.py --cp 4 --seq-len 2048
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cp", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block", type=int, default=256, help="blockwise tile (q and k)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["single", "local", "ring", "allgather"],
                    choices=["single", "local", "ring", "allgather"])
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if "jax" not in sys.modules:  # fake CPU devices for the cp axis
        flag = f"--xla_force_host_platform_device_count={args.cp}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    try:
        from spmd_lora.parallel import zigzag as cpl
        from spmd_lora.analysis.hlo import collective_census
        from spmd_lora.kernels import BlockSizes, attention, ring_attention
    except ImportError:  # running from a checkout without `pip install -e .`
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from spmd_lora.parallel import zigzag as cpl
        from spmd_lora.analysis.hlo import collective_census
        from spmd_lora.kernels import BlockSizes, attention, ring_attention

    b, s, h, kvh, d, cp = (args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim,
                           args.cp)
    if s % (2 * cp):
        raise SystemExit(f"error: --seq-len must be a multiple of 2*cp = {2 * cp}")
    if len(jax.devices()) < cp:
        raise SystemExit(f"error: need {cp} devices, have {len(jax.devices())}")
    dtype = jnp.dtype(args.dtype)
    bs = BlockSizes(args.block, args.block, args.block, args.block)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (b, s, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, s, kvh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, s, kvh, d), jnp.float32).astype(dtype)
    ct = jax.random.normal(keys[3], (b, s, h, d), jnp.float32).astype(dtype)
    mesh = jax.make_mesh((cp,), ("cp",), devices=jax.devices()[:cp],
                         axis_types=(jax.sharding.AxisType.Explicit,))

    def timed(fn, *xs):
        compiled = jax.jit(fn).lower(*xs).compile()
        jax.block_until_ready(compiled(*xs))          # warm-up
        walls, cpus = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(*xs))
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        return (compiled, 1e3 * min(walls), 1e3 * float(np.median(walls)),
                1e3 * float(np.median(cpus)))

    rows = []
    for variant in args.variants:
        if variant == "single":
            dev = jax.devices()[0]
            xs = [jax.device_put(x, dev) for x in (q, k, v, ct)]

            def fwd(q, k, v, ct):
                return attention(q, k, v, causal=True, impl="blockwise", block_sizes=bs)
        elif variant == "local":
            dev = jax.devices()[0]
            xs = [jax.device_put(x, dev) for x in (q, k, v, ct)]
            pos = jax.device_put(np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)), dev)

            def fwd(q, k, v, ct, pos=pos):
                return ring_attention(q, k, v, axis_name=None, q_index=pos, k_index=pos,
                                      kernel="blockwise", block_sizes=bs)
        else:
            perm = cpl.zigzag_permutation(s, cp)
            tok, heads = P(None, "cp"), P(None, "cp", None, None)
            idx = np.broadcast_to(perm.astype(np.int32), (b, s))
            put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
            xs = [put(np.asarray(x)[:, perm], heads) for x in (q, k, v, ct)]
            idx_d = put(idx, tok)

            def local(q, k, v, idx, impl=variant):
                return ring_attention(q, k, v, axis_name="cp", q_index=idx, k_index=idx,
                                      impl=impl, kernel="blockwise", block_sizes=bs)

            smap = jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, tok),
                                 out_specs=heads, check_vma=True)

            def fwd(q, k, v, ct, smap=smap, idx_d=idx_d):
                return smap(q, k, v, idx_d)

        def fwd_bwd(q, k, v, ct, fwd=fwd):
            loss = lambda q, k, v: jnp.sum(  # noqa: E731
                fwd(q, k, v, ct).astype(jnp.float32) * ct.astype(jnp.float32))
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            compiled, t_min, t_med, cpu = timed(fn, *xs)
            sent = sum(r["count"] * r["wire_bytes"] for r in collective_census(compiled, mesh)
                       if r["axis"] == "cp")
            rows.append((variant, name, t_min, t_med, cpu, sent))

    dev = jax.devices()[0]
    print(f"# causal attention, B={b} S={s} H={h} KV={kvh} hd={d} {dtype.name}, cp={cp}, "
          f"blockwise tile {args.block}, {args.repeats} runs after 1 warm-up")
    print(f"# jax {jax.__version__}, backend {jax.default_backend()} ({dev.device_kind}), "
          f"{os.cpu_count()} host cores")
    print("| variant | pass | min ms | median ms | median CPU ms (all threads) | "
          "cp bytes sent per device |")
    print("|---|---|---|---|---|---|")
    for variant, name, t_min, t_med, cpu, sent in rows:
        print(f"| {variant} | {name} | {t_min:.1f} | {t_med:.1f} | {cpu:.1f} | "
              f"{sent / 2**20:.2f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compiled temporary memory of attention forward+backward vs sequence length.

For each implementation and sequence length, compiles (never runs) the gradient of
``sum(attention(q, k, v) * cotangent)`` with respect to q, k, v from ``jax.ShapeDtypeStruct``s
and prints ``compiled.memory_analysis().temp_size_in_bytes``: the scratch XLA needs beyond
inputs and outputs. Default shapes are Llama-2-7B's attention (32 heads, head dim 128, batch 1,
bf16). Plain XLA attention materialises [B, H, S, S] scores, so its temp memory grows ~4x per
doubling of S; blockwise grows ~2x.

    python tools/attention_memory.py                      # xla vs blockwise, S = 4k..64k
    python tools/attention_memory.py --impls blockwise --seq-lens 4096 131072

The pallas kernel only compiles on GPU; it is included automatically when the backend is one.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

try:
    from spmd_lora.kernels import attention
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kernels import attention  # type: ignore[no-redef]


def temp_bytes(impl: str, seq_len: int, *, batch: int, heads: int, kv_heads: int,
               head_dim: int, dtype, causal: bool = True) -> tuple[int, float]:
    q = jax.ShapeDtypeStruct((batch, seq_len, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((batch, seq_len, kv_heads, head_dim), dtype)

    def loss(q, k, v, ct):
        out = attention(q, k, v, causal=causal, impl=impl)
        return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    t0 = time.perf_counter()
    compiled = step.lower(q, kv, kv, q).compile()
    secs = time.perf_counter() - t0
    return compiled.memory_analysis().temp_size_in_bytes, secs


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    ap.add_argument("--impls", nargs="+", default=None,
                    help="default: xla blockwise (+ pallas on GPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    impls = args.impls or (["xla", "blockwise"] +
                           (["pallas"] if jax.default_backend() == "gpu" else []))
    kv_heads = args.kv_heads or args.heads
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    print(f"# attention fwd+bwd compiled temp memory: batch {args.batch}, {args.heads} heads "
          f"({kv_heads} kv), head dim {args.head_dim}, {dtype.name}, causal")
    print(f"# jax {jax.__version__}, backend {jax.default_backend()} ({dev.device_kind})")
    print(f"| S | " + " | ".join(f"{i} temp" for i in impls) + " | "
          + " | ".join(f"{i} compile s" for i in impls) + " |")
    print("|---|" + "---|" * (2 * len(impls)))
    prev = {}
    for s in args.seq_lens:
        cells, times = [], []
        for impl in impls:
            try:
                n, secs = temp_bytes(impl, s, batch=args.batch, heads=args.heads,
                                     kv_heads=kv_heads, head_dim=args.head_dim, dtype=dtype)
            except Exception as e:  # noqa: BLE001 - report and go on
                cells.append(f"failed: {type(e).__name__}")
                times.append("-")
                continue
            growth = f" (x{n / prev[impl]:.1f})" if prev.get(impl) else ""
            prev[impl] = n
            cells.append(_fmt(n) + growth)
            times.append(f"{secs:.1f}")
        print(f"| {s:,} | " + " | ".join(cells) + " | " + " | ".join(times) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

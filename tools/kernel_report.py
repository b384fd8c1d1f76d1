#!/usr/bin/env python
"""Our Pallas attention kernels compiled for GPUs without one: registers, spills, shared memory.

    python tools/kernel_report.py --target h100 h200 [--head-dims 64,128] [--json out.json]
    python tools/kernel_report.py --target a100 --blocks 128,64,4,3,64,64,4,2   # try tiles

Needs JAX's CUDA plugin (``pip install -e ".[cuda12]"``), no GPU. For each target and head
dim it compiles the forward and both backward kernels (``spmd_lora_flash_fwd / dq / dkv``) in
every variant the model uses: causal and not, a length that is a multiple of the tiles and one
that is not (padded inside the kernel), with and without segment ids (packing), GQA 4:1, in
bf16 and fp16; and the context-parallel block kernels (``spmd_lora_flash_block_*``, cp=2 ring).
ptxas (the CUDA wheel's, as XLA runs it) gives registers, spill bytes and stack; XLA's thunk
sequence gives shared memory per block and threads. The tiles are the registry's for that GPU
kind unless ``--blocks`` gives them (block_q, block_k, warps, stages, then the same for the
backward). Exit status 1 when a kernel of ours spills registers.

What this does not show: time (a deviceless compile runs nothing), and cuDNN.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def variants(dtypes):
    """(label, causal, padded, segments, ring, dtype): the kernel variants the model uses."""
    out = []
    for dt in dtypes:
        for causal in (True, False):
            for padded in (False, True):
                for seg in (False, True):
                    out.append((f"{'causal' if causal else 'full'}"
                                f"{'-padded' if padded else ''}{'-seg' if seg else ''}",
                                causal, padded, seg, False, dt))
        out += [("ring-cp2", True, False, False, True, dt),
                ("ring-cp2-seg", True, False, True, True, dt)]
    return out


def report(targets, head_dims, dtypes, seq_len=1024, blocks=None, heads=8, kv_heads=2,
           log=print):
    """Rows {target, head_dim, variant, dtype, kernel, registers, spill_bytes, stack,
    shared_memory, threads} for every compiled kernel of ours."""
    from spmd_lora.analysis import gpu_kernels
    from spmd_lora.analysis.gpu_targets import resolve_target
    from spmd_lora.kernels import registry
    rows = []
    for target in targets:
        gpu = resolve_target(target)
        for d in head_dims:
            tiles = blocks or registry.choose("pallas", seq_len=seq_len, head_dim=d,
                                              backend="gpu",
                                              device_kind=gpu.device_kind).block_sizes
            log(f"# {gpu.name} ({gpu.device_kind}), head dim {d}: {tiles}")
            for label, causal, padded, seg, ring, dt in variants(dtypes):
                t = time.perf_counter()
                s = seq_len - 24 if padded else seq_len
                try:
                    _, kernels = gpu_kernels.compile_attention(
                        gpu.name, seq_len=s, heads=heads, kv_heads=kv_heads, head_dim=d,
                        dtype=dt, causal=causal, segments=seg, ring=ring, block_sizes=tiles)
                except Exception as e:  # noqa: BLE001 - e.g. shared memory overflow: a finding
                    rows.append({"target": gpu.name, "head_dim": d, "variant": label,
                                 "dtype": dt, "kernel": "-", "error": str(e).splitlines()[0]})
                    log(f"  {label:<18} {dt:<9} ERROR {rows[-1]['error'][:100]}")
                    continue
                for k in kernels:
                    if k.kind != "ours":
                        continue
                    rows.append({"target": gpu.name, "head_dim": d, "variant": label,
                                 "dtype": dt, "kernel": k.name, "registers": k.registers,
                                 "spill_bytes": k.spill_bytes, "stack": k.stack,
                                 "shared_memory": k.shared_memory, "threads": k.threads[0],
                                 "arch": k.arch, "serialized_wgmma": k.serialized_wgmma,
                                 "tiles": dataclasses.asdict(tiles)})
                    note = "  wgmma serialized" if k.serialized_wgmma else ""
                    log(f"  {label:<18} {dt:<9} {k.name:<28} regs {k.registers:>3}  spill "
                        f"{k.spill_bytes:>5} B  smem {k.shared_memory / 1024:6.1f} KiB  "
                        f"threads {k.threads[0]:>3}  ({time.perf_counter() - t:.1f} s){note}")
    return rows


def worst_by_kernel(rows) -> dict:
    """(target, head_dim, kernel) -> max registers, max spill bytes, max shared memory."""
    out = {}
    for r in rows:
        if r["kernel"] == "-":
            continue
        key = (r["target"], r["head_dim"], r["kernel"])
        w = out.setdefault(key, {"registers": 0, "spill_bytes": 0, "shared_memory": 0})
        for f in w:
            w[f] = max(w[f], r[f])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", nargs="+", default=["h100"],
                    help="GPUs to compile for (spmd_lora.analysis.gpu_targets names)")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--blocks", default=None,
                    help="tiles to try instead of the registry's: block_q,block_k,num_warps,"
                         "num_stages,block_q_bwd,block_k_bwd,num_warps_bwd,num_stages_bwd")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from spmd_lora.analysis.gpu_targets import ensure_plugin_can_start, quiet_xla_warnings
    ensure_plugin_can_start()
    quiet_xla_warnings()
    from spmd_lora.errors import SpmdLoraError
    from spmd_lora.analysis.gpu_targets import require_cuda_plugin, resolve_target
    from spmd_lora.kernels import BlockSizes
    try:
        for t in args.target:
            resolve_target(t)
        require_cuda_plugin()
        blocks = None
        if args.blocks:
            vals = [int(v) for v in args.blocks.split(",")]
            if len(vals) != 8:
                raise ValueError("needs 8 integers")
            blocks = BlockSizes(*vals[:2], *vals[4:6], num_warps=vals[2], num_stages=vals[3],
                                num_warps_bwd=vals[6], num_stages_bwd=vals[7])
        head_dims = [int(d) for d in args.head_dims.split(",")]
    except (SpmdLoraError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = report(args.target, head_dims, args.dtypes.split(","), args.seq_len, blocks)
    worst = worst_by_kernel(rows)
    print("\nworst case over the variants:")
    print(f"  {'target':<10} {'hd':>4} {'kernel':<28} {'regs':>5} {'spill B':>8} {'smem KiB':>9}")
    for (target, d, name), w in sorted(worst.items()):
        print(f"  {target:<10} {d:>4} {name:<28} {w['registers']:>5} {w['spill_bytes']:>8} "
              f"{w['shared_memory'] / 1024:>9.1f}")
    errors = [r for r in rows if r["kernel"] == "-"]
    spills = [k for k, w in worst.items() if w["spill_bytes"]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "errors": errors}, f, indent=1)
    for r in errors:
        print(f"  ! {r['target']} hd {r['head_dim']} {r['variant']} {r['dtype']}: {r['error']}")
    for target, d, name in spills:
        print(f"  ! {target} hd {d}: {name} spills registers")
    return 1 if spills or errors else 0


if __name__ == "__main__":
    sys.exit(main())

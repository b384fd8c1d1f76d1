"""Collective census (and optional per-collective timing) of the real LoRA train step: the
logic of ``tools/profile.py`` (which holds its command line; :func:`run` takes its arguments).

    python tools/profile.py --model llama2-7b --tp 4 --max-seq-len 4096 --lora-rank 16 \
        --lora-targets all --dtype bfloat16 --json census.json [--time]

Compiles ``step.make_train_step`` on abstract shapes (presets need no weights; a model
directory only needs config.json), parses the compiled HLO (``spmd_lora.analysis.hlo``) and prints
every collective with its mesh axis, shape, bytes and count per step (collectives inside the
layer / cross-entropy / accumulation scans are multiplied by the trip counts), totals per
(kind, axis), and the comparison with our formula and the Megatron(-SP) minimum
(``hlo.expected_collectives``).

``--time``
    CPU: times each distinct collective at its shape with a small jitted shard_map on the same
    mesh (fake host devices sharing the CPU cores: this measures XLA:CPU's in-process
    collectives, useful to check the tool, not a network); shapes whose arrays on all devices
    exceed ``--time-max-bytes`` are skipped with a note.
    GPU (untested here, no GPU on the development machine): the same micro-benchmarks run on
    the GPUs (NCCL), and ``--trace DIR`` additionally records a ``jax.profiler`` trace of a few
    real steps with random weights (open it with TensorBoard/XProf or Perfetto to read each
    collective's device time inside the step).

``--target h100`` (any GPU of ``spmd_lora.analysis.gpu_targets``; needs ``pip install -e ".[cuda12]"``,
no GPU): the step is compiled for that GPU ahead of time (XLA:GPU, deviceless), so the census
reads the GPU program (async start/done pairs counted once, combined collectives by operand),
and a kernel table follows: every Pallas kernel of ours and every XLA Triton fusion with its
registers, spill bytes and stack (ptxas), shared memory and threads (``spmd_lora.analysis.gpu_kernels``).
``--hosts H`` spreads the devices over H hosts.

On CPU the fake device count must be fixed before JAX starts: this script sets
``XLA_FLAGS=--xla_force_host_platform_device_count=tp*dp`` itself when it is not set, and says
so on stderr when it raises a smaller count the user set.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from . import gpu_kernels, hlo, plan
from ..config.fields import with_flag_names
from ..config.lora_config import LoraConfig
from ..config.model_config import resolve_model_config
from ..engine.factory import build_train_step, forward_options
from ..errors import SpmdLoraError
from ..parallel.placement import shard_micro_batches
from ..parallel.zigzag import padded_seq_len
from ..paths import write_text_atomic
from .gpu_targets import (ensure_plugin_can_start, quiet_xla_warnings, require_cuda_plugin,
                          resolve_target)
from .hlo import DTYPE_BYTES


def _fmt_bytes(n):
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _shape_str(shapes):
    if len(shapes) <= 2:
        return " + ".join(shapes)
    return f"{shapes[0]} + {len(shapes) - 1} more"


def print_census(census, out=sys.stdout):
    rows = sorted(census, key=lambda r: (-r["count"] * r["bytes"], r["kind"], r["axis"]))
    head = f"{'count/step':>10}  {'kind':<18} {'axis':<9} {'n':>2}  {'shape(s)':<34} {'bytes/op':>10} {'bytes/step':>11}  {'phase':<8} source"
    print(head, file=out)
    print("-" * len(head), file=out)
    widened = False
    for r in rows:
        shapes, nbytes = r.get("program_shapes", r["shapes"]), r.get("program_bytes", r["bytes"])
        mark = "*" if shapes != r["shapes"] else " "
        widened |= mark == "*"
        print(f"{r['count']:>10}  {r['kind']:<18} {r['axis']:<9} {r['group_size']:>2}  "
              f"{_shape_str(shapes):<33}{mark} {_fmt_bytes(nbytes):>10} "
              f"{_fmt_bytes(r['count'] * nbytes):>11}  {r['phase']:<8} {r['source']}", file=out)
    if widened:
        print("* dtype as the program emits it; XLA:CPU widened it (bf16 -> f32) in this compile, "
              "a GPU compile keeps it", file=out)


def print_kernels(kernels, out=sys.stdout):
    """Our Pallas kernels row by row; XLA's Triton fusions and other kernels summed up."""
    summary = gpu_kernels.summarize(kernels)
    print("\nGPU kernels (ptxas: registers, spill bytes, stack; thunk sequence: shared memory "
          "per block, threads, launches per program):", file=out)
    for row in gpu_kernels.format_table(kernels, kinds=("ours",)):
        print("  " + row, file=out)
    t, x = summary["triton"], summary["xla"]
    print(f"  + {t['kernels']} XLA Triton fusions (GEMMs with default tiles: no autotuning in a "
          f"deviceless compile): max {t['max_registers']} registers, max "
          f"{t['max_shared_memory'] / 1024:.1f} KiB shared memory, spilling: "
          f"{', '.join(t['spilling']) or 'none'}", file=out)
    print(f"  + {x['kernels']} other XLA kernels (LLVM-emitted fusions, not run through ptxas "
          f"here)", file=out)
    spilling = summary["ours"]["spilling"]
    if spilling:
        print(f"  ! our kernels spill registers: {', '.join(spilling)}", file=out)


# ----------------------------------------------------------------------------- timing

def _bench_fn(kind, axes, mesh, n_arrays, dim=0):
    import jax
    from jax.sharding import PartitionSpec as P

    spec = P(tuple(mesh.axis_names))
    if kind == "all-reduce":
        def f(*xs):
            return jax.lax.psum(xs, axes)
    elif kind == "all-gather":
        def f(*xs):
            return tuple(jax.lax.all_gather(x, axes, axis=dim, tiled=True) for x in xs)
    elif kind == "reduce-scatter":
        def f(*xs):
            return tuple(jax.lax.psum_scatter(x, axes, scatter_dimension=dim, tiled=True)
                         for x in xs)
    else:
        return None
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(spec,) * n_arrays,
                                 out_specs=(spec,) * n_arrays, check_vma=False))


def time_collectives(census, mesh, iters=5, max_bytes=2 ** 30):
    """Median wall time of each distinct (kind, axis, shapes) on ``mesh``. Returns rows with
    seconds per op, and per step (x count), or a skip note."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P


    jdt = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32, "s32": jnp.int32,
           "f64": jnp.float64, "u32": jnp.uint32, "pred": jnp.bool_}
    n_dev = mesh.devices.size
    groups = {}
    for r in census:
        if r["axis"] in ("self", "?") or "partial" in r["axis"]:
            continue
        key = (r["kind"], r["axis"], tuple(r["shapes"]), r.get("dimension", 0))
        groups.setdefault(key, 0)
        groups[key] += r["count"]
    results = []
    for (kind, axis, shapes, dim), count in sorted(groups.items(), key=lambda kv: -kv[1]):
        row = {"kind": kind, "axis": axis, "shapes": list(shapes), "count": count}
        locals_ = []
        for s in shapes:
            dt, dims = s.split("[")
            dims = [int(d) for d in dims.rstrip("]").split(",") if d]
            gs = int(np.prod([mesh.shape[a] for a in axis.split("+")]))
            if kind == "all-gather":
                dims[dim] //= gs
            elif kind == "reduce-scatter":
                dims[dim] *= gs
            locals_.append((dt, dims or [1]))
        total = n_dev * sum(DTYPE_BYTES[dt] * int(np.prod(d)) for dt, d in locals_)
        fn = _bench_fn(kind, tuple(axis.split("+")), mesh, len(locals_), dim)
        if fn is None or any(dt not in jdt for dt, _ in locals_):
            row["skipped"] = f"no micro-benchmark for {kind} / dtype"
        elif total > max_bytes:
            row["skipped"] = f"arrays need {total / 2 ** 30:.1f} GiB on all devices (> --time-max-bytes)"
        if "skipped" in row:
            results.append(row)
            continue
        sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
        xs = [jax.jit(lambda d=d, dt=dt: jnp.ones((n_dev * d[0], *d[1:]), jdt[dt]),
                      out_shardings=sharding)() for dt, d in locals_]
        jax.block_until_ready(fn(*xs))                      # compile + warm up
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            jax.block_until_ready(fn(*xs))
            times.append(time.perf_counter() - t)
        del xs
        row["seconds"] = statistics.median(times)
        row["seconds_per_step"] = row["seconds"] * count
        results.append(row)
    return results


def trace_steps(args, cfg, lora_cfg, mesh, trace_dir, steps):
    """GPU path (also runs on CPU for tiny models): real steps with random weights under
    jax.profiler.trace. Needs the weights to fit on the devices."""
    import jax
    import numpy as np


    step = build_train_step(cfg, args, mesh=mesh, lora=lora_cfg)
    params = step.random_params(args.dtype, base_quant=args.base_quant)
    lora, state = step.init_state(jax.random.key(0))
    rng = np.random.default_rng(0)
    shape = (args.micro_batches, args.batch, args.max_seq_len)
    batches = shard_micro_batches({"tokens": rng.integers(0, cfg.vocab_size, shape),
                                   "loss_mask": np.ones(shape)}, mesh)
    key = jax.random.key(1)
    lora, state, m = step(params, lora, state, batches, key)        # compile
    jax.block_until_ready(m)
    times = []
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            t = time.perf_counter()
            lora, state, m = step(params, lora, state, batches, key)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
    return {"trace_dir": trace_dir, "step_seconds": times, "loss": float(m["loss"])}


# ----------------------------------------------------------------------------- main

def _jsonable(expected: dict) -> dict:
    """expected_collectives() with its (kind, term) keys as 'kind/term' strings."""
    return {k: ({f"{a}/{b}": n for (a, b), n in v.items()} if k in ("counts", "megatron") else v)
            for k, v in expected.items()}


def run(args) -> int:
    """The census (and timings, trace) of the step ``args`` (tools/profile.py's parsed
    arguments) describe, printed; 0, or 2 on a usage/config error (one ``error:`` line)."""
    if args.target is None:
        plan.ensure_host_devices(args.tp * args.dp * args.cp)
    else:
        ensure_plugin_can_start()
        quiet_xla_warnings()


    try:
        cfg = resolve_model_config(args.model)
        lora_cfg = LoraConfig(rank=args.lora_rank, alpha=float(args.lora_rank), targets=args.targets)
        if args.target is None and (args.hosts != 1 or args.autotune_results):
            raise SpmdLoraError("--hosts and --autotune-results need --target (e.g. --target h100)")
        if args.target is not None:
            resolve_target(args.target)
            require_cuda_plugin()
        t0 = time.perf_counter()
        mesh = plan.plan_mesh(args.dp, args.tp, args.cp, args.target, args.hosts)
        lowered, mesh, _ = plan.lower_train_step(
            cfg, args.tp, args.dp, max_seq_len=args.max_seq_len, batch=args.batch, lora=lora_cfg,
            dtype=args.dtype, remat=args.remat, attention=args.attention,
            micro_batches=args.micro_batches, ce_chunk_tokens=args.ce_chunk_tokens,
            sequence_parallel=args.sequence_parallel, mlp_chunk_tokens=args.mlp_chunk_tokens,
            base_quant=args.base_quant, cp=args.cp, cp_impl=args.cp_impl, mesh=mesh)
        kernels = None
        if args.target is not None:
            compiled, kernels = gpu_kernels.compile_with_kernels(
                lowered, plan.gpu_compiler_options(args.autotune_results))
        else:
            compiled = lowered.compile()
    except SpmdLoraError as e:
        print(f"error: {with_flag_names(str(e))}", file=sys.stderr)
        return 2
    compile_s = time.perf_counter() - t0
    census = hlo.collective_census(compiled, mesh, lowered)
    summary = hlo.summarize(census)
    local_batch = args.batch // args.dp
    # the sequence one cp rank holds (zig-zag chunks, padded to a multiple of 2*cp*tp)
    s_pad = padded_seq_len(args.max_seq_len, args.cp, args.tp) if args.cp > 1 else args.max_seq_len
    local_seq = s_pad // args.cp
    opts = forward_options(cfg, tp=args.tp, sequence_parallel=args.sequence_parallel,
                           mlp_chunk_tokens=args.mlp_chunk_tokens,
                           ce_chunk_tokens=args.ce_chunk_tokens)
    layout = opts.layout(local_seq)
    mlp_tiles, ce_chunks = opts.tile_counts(local_seq, local_batch)
    dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]

    def formula(sp, tiles=mlp_tiles, chunks=ce_chunks):
        return hlo.expected_collectives(
            cfg, args.tp, args.dp, sequence_parallel=sp, lora=lora_cfg, remat=args.remat,
            micro_batches=args.micro_batches, mlp_tiles=tiles, ce_chunks=chunks,
            tokens=local_batch * local_seq,
            padded_tokens=local_batch * layout.padded_len, dtype_bytes=dtype_bytes)

    expected = formula(layout.sp)
    # the replicated layout of the same step, for the bytes comparison (its CE chunks)
    rep_chunks = forward_options(cfg, tp=args.tp, sequence_parallel=False,
                                 mlp_chunk_tokens=args.mlp_chunk_tokens,
                                 ce_chunk_tokens=args.ce_chunk_tokens).tile_counts(
                                     local_seq, local_batch)
    replicated = formula(False, *rep_chunks)
    meas = hlo.measured(census, lora_cfg.rank)

    cp_text = f"cp={args.cp} ({args.cp_impl}) " if args.cp > 1 else ""
    compiled_for = plan.compiled_for(mesh, args.target, args.hosts, args.autotune_results)
    print(f"{args.model}: tp={args.tp} dp={args.dp} {cp_text}S={args.max_seq_len} batch={args.batch} "
          f"micro_batches={args.micro_batches} r={args.lora_rank} targets={','.join(lora_cfg.targets)} "
          f"{args.dtype} remat={args.remat} layout={expected['layout']} MLP tiles={mlp_tiles} "
          f"CE chunks={ce_chunks} ({plan.compiled_for_line(compiled_for)}, {compile_s:.1f} s)\n")
    print_census(census)
    print("\nper step, by kind and axis ('self' = size-1 groups, no traffic):")
    for s in summary:
        cpu = (f"  (as compiled here: {_fmt_bytes(s['bytes'])})"
               if s["bytes"] != s["program_bytes"] else "")
        print(f"  {s['kind']:<18} {s['axis']:<9} ops {s['ops']:>6}  arrays {s['operands']:>6}  "
              f"bytes {_fmt_bytes(s['program_bytes']):>11}  ring bytes sent/device "
              f"{_fmt_bytes(s['program_wire_bytes']):>11}{cpu}")
    flags = []
    print("\nactivation collectives over tp per step (arrays; see hlo.expected_collectives):")
    rows = [("all-reduce", meas["tp_activation_reductions"], expected["all_reduce"]),
            ("all-gather", meas["tp_all_gathers"], expected["all_gather"]),
            ("reduce-scatter", meas["tp_reduce_scatters"], expected["reduce_scatter"])]
    mega = expected["megatron"]
    for kind, got, want in rows:
        minimum = sum(v for (k, _), v in mega.items() if k == kind)
        print(f"  {kind:<15} measured {got:>6}   formula {want:>6}   "
              f"Megatron{'-SP' if layout.sp else ''} minimum {minimum:>6}")
        if got != want:
            flags.append(f"{kind}: census {got} differs from the formula {want} in "
                         "spmd_lora/hlo.py: update one of them")
    print(f"  in the layers: {meas['tp_layer_activation_reductions']} activation all-reduces "
          f"(the rest are the cross-entropy's softmax statistics)")
    print(f"  ring bytes sent per device: measured {_fmt_bytes(meas['tp_wire_bytes'])}, formula "
          f"{_fmt_bytes(expected.get('tp_wire_bytes', 0))}, minimum "
          f"{_fmt_bytes(expected.get('megatron_tp_wire_bytes', 0))}; the replicated layout's "
          f"all-reduces would send {_fmt_bytes(replicated.get('tp_wire_bytes', 0))}")
    if layout.sp and meas["tp_layer_activation_reductions"]:
        flags.append(f"{meas['tp_layer_activation_reductions']} activation all-reduces inside "
                     "the layers under sequence parallelism")
    if expected["extra_tp"]:
        flags.append(f"{expected['extra_tp']} all-reduces per step beyond Megatron's (MLP tiles)")
    odd = sorted({f"{r['kind']}@{r['source']}" for r in census
                  if r["kind"] in ("all-gather", "reduce-scatter")
                  and r["source"].split()[-1:] not in (["gather"], ["scatter"])})
    if odd or meas["other_ops"]:
        flags.append("collectives that are not the activation layout's (a weight gathered?): "
                     + ", ".join(odd) + (f" and {meas['other_ops']} others" if meas["other_ops"] else ""))
    if meas["lora_grad_bytes"] > expected["lora_grad_bytes_minimum"] > 0:
        flags.append(f"LoRA gradient reductions move {_fmt_bytes(meas['lora_grad_bytes'])}/step "
                     f"({meas['lora_grad_reductions']} arrays) vs "
                     f"{_fmt_bytes(expected['lora_grad_bytes_minimum'])} for one reduction of all "
                     "LoRA gradients per step")
    cp_expected = {}
    if args.cp > 1:
        cp_expected = {impl: hlo.expected_cp_collectives(
            cfg, args.tp, args.cp, cp_impl=impl, remat=args.remat,
            micro_batches=args.micro_batches, local_batch=local_batch, seq_len=s_pad,
            dtype_bytes=dtype_bytes) for impl in ("ring", "allgather")}
        want = cp_expected[args.cp_impl]
        print("\ncollectives over cp per step (arrays; ring attention, one call per layer and "
              "micro-batch; see hlo.expected_cp_collectives):")
        for kind, key in (("collective-permute", "permute"), ("all-gather", "all_gather"),
                          ("reduce-scatter", "reduce_scatter")):
            got = meas[f"cp_{key}_operands"]
            print(f"  {kind:<19} measured {got:>6}   formula {want[f'{key}_operands']:>6}")
            if got != want[f"{key}_operands"]:
                flags.append(f"cp {kind}: census {got} differs from the formula "
                             f"{want[f'{key}_operands']}")
        print(f"  bytes sent over cp per device: measured {_fmt_bytes(meas['cp_wire_bytes'])}, "
              f"formula {_fmt_bytes(want['wire_bytes'])}; by impl: ring "
              f"{_fmt_bytes(cp_expected['ring']['wire_bytes'])}, allgather "
              f"{_fmt_bytes(cp_expected['allgather']['wire_bytes'])} -> fewer bytes: "
              f"{min(cp_expected, key=lambda k: cp_expected[k]['wire_bytes'])}")
        if meas["cp_other_ops"]:
            flags.append(f"{meas['cp_other_ops']} collectives over cp that are not ring "
                         "attention's (a weight collective over cp?)")
    for f in flags:
        print("  ! " + f)
    if kernels is not None:
        print_kernels(kernels)

    result = {"args": vars(args), "compile_s": compile_s, "census": census, "summary": summary,
              "measured": meas, "expected": _jsonable(expected),
              "replicated_expected": _jsonable(replicated), "cp_expected": cp_expected,
              "flags": flags, "compiled_for": compiled_for,
              "backend": mesh.devices.flat[0].platform}
    if kernels is not None:
        import dataclasses
        result["kernels"] = [dataclasses.asdict(k) for k in kernels]
        result["kernel_summary"] = gpu_kernels.summarize(kernels)
    if args.time:
        import jax
        backend = jax.default_backend()
        note = ("CPU: fake host devices share the CPU cores; times are XLA:CPU in-process "
                "collectives, not a network" if backend == "cpu" else f"{backend} micro-benchmarks")
        print(f"\ncollective micro-benchmarks ({note}):")
        timings = time_collectives(census, mesh, iters=args.time_iters, max_bytes=args.time_max_bytes)
        total = 0.0
        for t in timings:
            if "skipped" in t:
                print(f"  {t['kind']:<14} {t['axis']:<6} {_shape_str(t['shapes']):<34} skipped: {t['skipped']}")
            else:
                total += t["seconds_per_step"]
                print(f"  {t['kind']:<14} {t['axis']:<6} {_shape_str(t['shapes']):<34} "
                      f"{t['seconds'] * 1e3:9.3f} ms x {t['count']:>5} = {t['seconds_per_step'] * 1e3:10.1f} ms/step")
        print(f"  total (timed shapes): {total * 1e3:.1f} ms/step")
        result["timings"] = {"backend": backend, "note": note, "rows": timings,
                             "total_seconds_per_step": total}
        if backend == "gpu" and not args.trace:
            args.trace = "profile_trace"
    if args.trace:
        # GPU path (runs on CPU too for small models): real steps under jax.profiler.trace.
        res = trace_steps(args, cfg, lora_cfg, mesh, args.trace, args.trace_steps)
        print(f"\njax.profiler trace of {args.trace_steps} steps in {res['trace_dir']} "
              f"(median step {statistics.median(res['step_seconds']) * 1e3:.1f} ms); open with "
              "TensorBoard's profile plugin / XProf to read each collective's device time")
        result["trace"] = res
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=1, default=str))
        print(f"\nwrote {args.json}")
    return 0


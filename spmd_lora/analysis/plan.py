"""Per-device memory plan of a LoRA train step, without weights: ``spmd-lora plan``.

The real train step (``step.make_train_step``) is lowered on abstract shapes
(``jax.ShapeDtypeStruct`` with the sharding plan's shardings) and compiled; XLA's
``compiled.memory_analysis()`` then gives the per-device argument, output, alias (donated) and
temporary sizes (and, for remat ``offload``, the pinned host temporaries). The argument part is
split analytically into base weights, LoRA factors, optimizer state and the batch.
``peak = arguments + outputs - aliased + temporaries``.

Where it compiles:

* ``target="h100"`` (``--target``; any name of :mod:`spmd_lora.analysis.gpu_targets`): for that GPU,
  with JAX's CUDA plugin, on any machine ("deviceless compile"): the real XLA:GPU pipeline
  with our Pallas kernels compiled by ptxas, over ``hosts`` hosts. This is the plan to trust
  for a GPU: it is XLA:GPU's own buffer assignment. It has no autotuning (GEMMs get default
  configs; ``autotune_results`` loads results dumped on a real GPU by tools/gpu_suite.py).
* otherwise on the default backend when it has tp*dp*cp devices, else on the host CPU with
  that many fake devices: an *estimate* of a GPU run. The CPU device count is fixed when JAX
  initialises its backends, so :func:`main` (and :func:`ensure_host_devices`) set
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` if JAX has not initialised yet; a
  process that already initialised JAX with fewer devices gets a clear error instead.

On CPU, loop-invariant code motion is disabled for the plan compile: XLA:CPU upcasts bf16
matmuls to f32 and LICM would hoist an f32 copy of every layer's weights out of the layer scan
(+25 GiB on a 7B plan); what remains (a layer's weights and the LM head in f32) is reported as
``cpu_upcast_allowance`` and subtracted in ``peak_gpu_estimate``. Verdicts use ``peak``
(conservative) unless ``--gpu-estimate``. A CPU compile also differs from a GPU one in fusion
and in the attention kernel ("blockwise" is the CPU stand-in of the fused kernel): docs/
benchmarks.md ("Compiled for GPUs") sets the two side by side.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

GiB = 1024 ** 3


# ----------------------------------------------------------------------------- devices

def ensure_host_devices(n: int) -> None:
    """Ask for >= n fake CPU devices if JAX has not initialised its backends yet."""
    flags = os.environ.get("XLA_FLAGS", "")
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if m and int(m.group(1)) >= n:
        return
    if "jax" in sys.modules:
        from jax._src import xla_bridge
        if xla_bridge.backends_are_initialized():
            return                       # too late; plan_devices() reports what is missing
    if m:
        print(f"note: XLA_FLAGS asks for {m.group(1)} host devices; using {n} (tp*dp = {n}) "
              f"for this compile", file=sys.stderr)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n}").strip()


def plan_devices(n: int, target: str | None = None, hosts: int = 1):
    """n devices to compile for: compile-only GPUs of ``target`` over ``hosts`` hosts, else the
    default backend's, else fake CPU devices."""
    import jax
    from ..errors import ConfigError

    if target is not None:
        from .gpu_targets import target_devices
        return target_devices(target, n, hosts=hosts)

    devices = jax.devices()
    if len(devices) >= n:
        return devices[:n]
    cpus = jax.devices("cpu")
    if len(cpus) >= n:
        return cpus[:n]
    raise ConfigError(
        f"planning tp*dp = {n} devices needs {n} devices but only {len(devices)} "
        f"{devices[0].platform} and {len(cpus)} CPU device(s) exist: set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX initialises "
        f"(spmd-lora plan does this itself when run as a fresh process)")


def plan_mesh(dp: int, tp: int, cp: int = 1, target: str | None = None, hosts: int = 1):
    from ..parallel.mesh import mesh_over
    return mesh_over(plan_devices(dp * cp * tp, target, hosts), dp, tp, cp)


# ----------------------------------------------------------------------------- lowering

def abstract_train_args(cfg, mesh, *, max_seq_len: int, batch: int = 1, lora=None,
                        dtype="bfloat16", micro_batches: int = 1, optimizer=None,
                        base_quant="none"):
    """(params, lora, opt_state, batches, key) as ShapeDtypeStructs with their shardings.
    ``batch`` is the GLOBAL batch (rows per micro-batch, split over dp). With cp > 1 in the
    mesh, the batch has the zig-zag fields of the batch preparation, S padded to a multiple of
    2*cp*tp."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from ..config.lora_config import LoraConfig
    from ..weights.lora import init_lora
    from ..weights.shapes import abstract_params
    from ..parallel.placement import MICRO_BATCH_SPEC
    from ..engine.step import OptimizerConfig, make_optimizer

    lora = lora or LoraConfig()
    optimizer = optimizer or make_optimizer(OptimizerConfig())
    rep = NamedSharding(mesh, P())

    def put(tree, sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)

    params = abstract_params(cfg, mesh, dtype, base_quant)
    lora_p = put(jax.eval_shape(lambda: init_lora(cfg, lora, jax.random.key(0))), rep)
    opt_state = put(jax.eval_shape(optimizer.init, lora_p), rep)
    bs = NamedSharding(mesh, MICRO_BATCH_SPEC)
    cp, tp = mesh.shape["cp"], mesh.shape["tp"]
    from ..parallel.zigzag import BATCH_FIELDS, padded_seq_len
    seq = padded_seq_len(max_seq_len, cp, tp) if cp > 1 else max_seq_len
    batches = {k: jax.ShapeDtypeStruct((micro_batches, batch, seq), jnp.int32, sharding=bs)
               for k in BATCH_FIELDS}
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    return params, lora_p, opt_state, batches, key


def lower_train_step(cfg, tp: int, dp: int = 1, *, max_seq_len: int, batch: int = 1, lora=None,
                     dtype="bfloat16", remat="full", attention="blockwise", micro_batches=1,
                     ce_chunk_tokens: int = 4096, sequence_parallel: bool = True,
                     mlp_chunk_tokens: int = 0, mesh=None, optimizer=None,
                     base_quant="none", cp: int = 1, cp_impl: str = "ring"):
    """Lower the real train step on abstract inputs on a (dp, cp, tp) mesh. Returns
    (lowered, mesh, args)."""
    from ..config.lora_config import LoraConfig
    from ..model import ForwardOptions
    from ..engine.step import OptimizerConfig, make_optimizer, make_train_step

    cfg.check_tp(tp)
    lora = lora or LoraConfig()
    mesh = mesh or plan_mesh(dp, tp, cp)
    optimizer = optimizer or make_optimizer(OptimizerConfig())
    opts = ForwardOptions(cfg=cfg, tp=tp, lora=lora, attention_impl=attention, remat=remat,
                          ce_chunk_tokens=ce_chunk_tokens, sequence_parallel=sequence_parallel,
                          mlp_chunk_tokens=mlp_chunk_tokens, cp=cp, cp_impl=cp_impl)
    args = abstract_train_args(cfg, mesh, max_seq_len=max_seq_len, batch=batch, lora=lora,
                               dtype=dtype, micro_batches=micro_batches, optimizer=optimizer,
                               base_quant=base_quant)
    return make_train_step(opts, mesh, optimizer).lower(*args), mesh, args


# XLA:CPU up to jaxlib 0.10 has no bf16 matmul: it converts bf16 weights to f32 first, and
# loop-invariant code motion then hoists those converts out of the layer scan, i.e. an f32 copy
# of ALL layers' weights appears in the temporaries (a 7B plan grew by ~25 GiB). A GPU compile
# has neither, nor has XLA:CPU 0.12 (native bf16 dots). With LICM off, the copies stay per
# layer (see cpu_upcast_allowance, which checks the compiled program for them).
CPU_PLAN_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def compile_train_step(cfg, tp: int, dp: int = 1, *, compiler_options=None, **kw):
    """Lower + compile the real train step on abstract inputs (keywords as
    :func:`lower_train_step`). Returns (compiled, mesh, args)."""
    lowered, mesh, args = lower_train_step(cfg, tp, dp, **kw)
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    return compiled, mesh, args


_LOW_PRECISION_DOT = re.compile(r"=\s*(?:bf16|f16)\[[\d,]*\](?:\{[^}]*\})?\s+dot\(")


def upcasts_matmuls(compiled_text: str) -> bool:
    """Whether a compiled program runs its bf16/f16 matmuls in f32: none of its ``dot`` ops
    has a 16-bit result (XLA:CPU 0.10 upcasts every one; XLA:CPU 0.12 and GPUs keep them).
    Call it on a program that has 16-bit weights."""
    return _LOW_PRECISION_DOT.search(compiled_text) is None


def cpu_upcast_allowance(params, dtype, compiled_text: str | None = None) -> int:
    """Bytes of the f32 weight copies XLA:CPU makes for bf16/f16 matmuls (with LICM off):
    two sets of one layer's local weights (the rematerialised forward and the backward convert
    their own) or the f32 LM head, whichever is larger. An estimate of what a CPU plan
    overstates against a GPU compile; 0 for float32, and 0 when ``compiled_text`` (the plan's
    compiled program) shows the matmuls run natively in 16 bits (:func:`upcasts_matmuls`)."""
    import jax
    import numpy as np

    from ..weights.quant import is_quantised
    if np.dtype(jax.numpy.dtype(dtype) if isinstance(dtype, str) else dtype).itemsize >= 4:
        return 0
    if compiled_text is not None and not upcasts_matmuls(compiled_text):
        return 0

    def local(a, drop_layer=False):
        if is_quantised(a):                # dequantised dense shard: split over tp along N
            leaf = next(iter(a.leaves.values()))
            n = int(np.prod(a.shape[1:] if drop_layer else a.shape, dtype=np.int64))
            return n * leaf.sharding.shard_shape(leaf.shape)[1] // leaf.shape[1] * 4
        shape = a.sharding.shard_shape(a.shape)
        return int(np.prod(shape[1:] if drop_layer else shape, dtype=np.int64)) * 4

    layer = sum(local(a, True) for k, a in params["layers"].items() if "norm" not in k)
    head = local(params["lm_head"]) if "lm_head" in params else local(params["embed"])
    return max(2 * layer, head)


def _local_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree (shard shape x itemsize)."""
    import jax
    import numpy as np
    total = 0
    for a in jax.tree.leaves(tree):
        shape = a.sharding.shard_shape(a.shape) if getattr(a, "sharding", None) is not None else a.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return total


def offloaded_bytes(cfg, tp: int, dp: int, *, max_seq_len: int, batch: int, dtype,
                    sequence_parallel: bool, cp: int = 1) -> int:
    """Host bytes per device that remat ``offload`` keeps per step (computed, not compiled): the
    two half-layer inputs [B/dp, R, D] of every layer (the layer input and the residual after
    attention), R = S_cp/tp under sequence parallelism or S_cp, where S_cp is the cp rank's
    share of the (padded) sequence."""
    import numpy as np

    from ..parallel.zigzag import padded_seq_len
    from ..model import ForwardOptions
    from ..weights.shapes import resolve_dtype
    local_seq = padded_seq_len(max_seq_len, cp, tp) // cp if cp > 1 else max_seq_len
    layout = ForwardOptions(cfg=cfg, tp=tp, sequence_parallel=sequence_parallel).layout(local_seq)
    per_layer = (batch // dp) * layout.local_rows * cfg.hidden_size
    itemsize = np.dtype(resolve_dtype(dtype)).itemsize
    return cfg.num_layers * per_layer * itemsize * 2


def quant_weight_bytes(params) -> dict:
    """Per-device bytes of a quantised base, split into packed weights (int8 values / NF4 codes),
    quantisation constants (scales; NF4 absmax codes + double-quant group scale and offset) and
    the rest (embeddings, norms, LM head), plus bytes per parameter of the quantised linears
    (global). Empty for a dense base."""
    import numpy as np

    from ..weights.quant import is_quantised
    linears = [w for w in params["layers"].values() if is_quantised(w)]
    if not linears:
        return {}
    packed = sum(_local_bytes(getattr(w, "packed", getattr(w, "values", None))) for w in linears)
    total = sum(_local_bytes(w) for w in linears)
    glob = sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
               for w in linears for a in w.leaves.values())
    n_params = sum(int(np.prod(w.shape, dtype=np.int64)) for w in linears)
    return {"base_quant": linears[0].kind, "weights_packed": packed,
            "weights_quant_constants": total - packed, "weights_other": _local_bytes(params) - total,
            "quant_bytes_per_param": glob / n_params}


def gpu_compiler_options(autotune_results: str | None = None) -> dict:
    """XLA options of a GPU plan compile: load autotune results dumped on a real GPU
    (``--xla_gpu_dump_autotune_results_to``, which tools/gpu_suite.py sets) when given. XLA
    reads such a file once per process: the first one a process loads applies to all its
    later compiles."""
    if not autotune_results:
        return {}
    if not os.path.isfile(autotune_results):
        from ..errors import ConfigError
        raise ConfigError(f"--autotune-results: no file {autotune_results!r} (tools/gpu_suite.py "
                          f"writes one on a GPU: OUT/autotune_results.textproto)")
    return {"xla_gpu_load_autotune_results_from": os.path.abspath(autotune_results)}


def plan_memory(cfg, tp: int, dp: int = 1, max_seq_len: int = 4096, batch: int = 1, lora=None,
                dtype="bfloat16", remat="full", attention="auto", micro_batches: int = 1,
                ce_chunk_tokens: int = 4096, sequence_parallel: bool = True,
                mlp_chunk_tokens: int | None = None, devices_per_host: int = 8,
                base_quant: str = "none", cp: int = 1, cp_impl: str = "ring",
                target: str | None = None, hosts: int = 1,
                autotune_results: str | None = None) -> dict:
    """Per-device memory (bytes) of one train step. Keys: weights, lora, optimizer, batch
    (analytic, per device), arguments, outputs, aliased, temporaries (XLA memory analysis),
    activations (= temporaries: activations, saved residuals, attention/CE workspaces,
    gradients), peak (= arguments + outputs - aliased + temporaries), compile_s, the inputs,
    and ``compiled_for`` ({"platform", "device_kind", "devices", "hosts", "deviceless"}).

    ``target`` (a GPU name, :mod:`spmd_lora.analysis.gpu_targets`): compiled for that GPU without one,
    over ``hosts`` hosts of (tp*dp*cp)/hosts devices; ``autotune_results`` loads XLA autotune
    results dumped on a real GPU. ``estimate`` is False: the numbers are XLA:GPU's.

    Without a target it compiles on the default backend or on fake CPU devices
    (``estimate`` True when that is not a GPU): with loop-invariant code motion off
    (``CPU_PLAN_OPTIONS``), plus cpu_upcast_allowance (XLA:CPU's f32 copies of bf16 weights,
    absent on GPU and when the compiled program shows native 16-bit matmuls) and
    peak_gpu_estimate = peak - cpu_upcast_allowance. ``peak`` is the conservative figure.

    remat ``offload``: ``host_offload`` is what the saved layer inputs need in pinned host
    memory per device, ``host_offload_formula`` the same computed from the shapes
    (:func:`offloaded_bytes`), ``host_offload_per_host`` for the devices of one host
    (``devices_per_host``, or the target's devices per host). A GPU compile reports its
    pinned host temporaries itself (``host_offload_source`` "compiled"); a CPU compile keeps
    them in its one memory, inside ``temporaries``, so there ``peak`` is the compiled peak
    (``compiled_peak``) minus the formula's bytes (``host_offload_source`` "formula").

    ``cp`` > 1: the sequence is split over cp devices (ring attention ``cp_impl``);
    ``cp_wire_bytes`` is what one device sends over cp per step for the chosen impl and
    ``cp_wire_bytes_by_impl`` for both, so the cheaper one shows (formula:
    ``hlo.expected_cp_collectives``).
    """
    if mlp_chunk_tokens is None:
        from ..config.train_config import DEFAULT_MLP_CHUNK_TOKENS as mlp_chunk_tokens
    t0 = time.perf_counter()
    mesh = plan_mesh(dp, tp, cp, target, hosts)
    device = mesh.devices.flat[0]
    on_cpu = device.platform == "cpu"
    if target is not None:
        options = gpu_compiler_options(autotune_results)
        devices_per_host = (tp * dp * cp) // hosts
    else:
        options = CPU_PLAN_OPTIONS if on_cpu else None
    try:
        compiled, mesh, (params, lora_p, opt_state, batches, key) = compile_train_step(
            cfg, tp, dp, max_seq_len=max_seq_len, batch=batch, lora=lora, dtype=dtype,
            remat=remat, attention=attention, micro_batches=micro_batches,
            ce_chunk_tokens=ce_chunk_tokens, sequence_parallel=sequence_parallel,
            mlp_chunk_tokens=mlp_chunk_tokens, mesh=mesh, compiler_options=options or None,
            base_quant=base_quant, cp=cp, cp_impl=cp_impl)
    except Exception as e:  # noqa: BLE001 - XLA reports a bad autotune file as a runtime error
        if autotune_results and "autotune" in str(e).lower():
            from ..errors import ConfigError
            raise ConfigError(f"--autotune-results {autotune_results}: XLA cannot use it "
                              f"({str(e).splitlines()[0]})") from None
        raise
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    out = {
        "tp": tp, "dp": dp, "cp": cp, "cp_impl": cp_impl, "max_seq_len": max_seq_len, "batch": batch, "dtype": str(dtype),
        "remat": remat, "attention": attention, "micro_batches": micro_batches,
        "sequence_parallel": bool(sequence_parallel and tp > 1),
        "mlp_chunk_tokens": mlp_chunk_tokens, "ce_chunk_tokens": ce_chunk_tokens,
        "lora_rank": (lora.rank if lora else None),
        "lora_targets": list(lora.targets) if lora else None,
        "backend": device.platform,
        "compiled_for": compiled_for(mesh, target, hosts, autotune_results),
        "estimate": device.platform != "gpu",
        "weights": _local_bytes(params), "lora": _local_bytes(lora_p),
        "optimizer": _local_bytes(opt_state), "batch_bytes": _local_bytes(batches),
        "arguments": int(ma.argument_size_in_bytes), "outputs": int(ma.output_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes), "temporaries": int(ma.temp_size_in_bytes),
        "host_temporaries": int(getattr(ma, "host_temp_size_in_bytes", 0) or 0),
        "code": int(getattr(ma, "generated_code_size_in_bytes", 0) or 0),
        "compile_s": round(compile_s, 2), "base_quant": base_quant,
        **quant_weight_bytes(params),
    }
    out["activations"] = out["temporaries"]
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    # an estimate of copies inside the temporaries: never more than the temporaries themselves
    out["cpu_upcast_allowance"] = (min(cpu_upcast_allowance(params, dtype, compiled.as_text()),
                                       out["temporaries"]) if on_cpu else 0)
    out["host_offload"] = out["host_offload_formula"] = 0
    if remat == "offload":
        out["host_offload_formula"] = offloaded_bytes(
            cfg, tp, dp, max_seq_len=max_seq_len, batch=batch, dtype=dtype,
            sequence_parallel=sequence_parallel, cp=cp)
        compiled_host = not on_cpu and out["host_temporaries"] > 0
        out["host_offload"] = out["host_temporaries"] if compiled_host else out["host_offload_formula"]
        out["host_offload_source"] = "compiled" if compiled_host else "formula"
    out["host_offload_per_host"] = out["host_offload"] * min(devices_per_host, tp * dp * cp)
    if cp > 1:
        from ..parallel.zigzag import padded_seq_len
        from .hlo import expected_cp_collectives
        from ..weights.shapes import resolve_dtype
        import numpy as np
        by_impl = {impl: expected_cp_collectives(
            cfg, tp, cp, cp_impl=impl, remat=remat, micro_batches=micro_batches,
            local_batch=batch // dp, seq_len=padded_seq_len(max_seq_len, cp, tp),
            dtype_bytes=np.dtype(resolve_dtype(dtype)).itemsize)["wire_bytes"]
            for impl in ("ring", "allgather")}
        out["cp_wire_bytes_by_impl"] = by_impl
        out["cp_wire_bytes"] = by_impl[cp_impl]
    if on_cpu:       # the CPU compile kept the offloaded residuals in its one memory
        out["compiled_peak"] = out["peak"]
        out["peak"] -= out["host_offload"]
    out["peak_gpu_estimate"] = out["peak"] - out["cpu_upcast_allowance"]
    return out


# ----------------------------------------------------------------------------- CLI

def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '80G', '81920MB', '8.5e10' -> bytes (GB = GiB = 2**30, as GPU specs
    quote 80 GB for 80 GiB-class cards' 79.x GiB usable; use MB/GiB explicitly if it matters)."""
    m = re.fullmatch(r"\s*([\d.eE+]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 80GB, 40GiB, 24000MB)")
    mult = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def _fmt(n: int) -> str:
    return f"{n / GiB:9.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 1024 ** 2:9.1f} MiB"


def compiled_for(mesh, target: str | None = None, hosts: int = 1,
                 autotune_results: str | None = None) -> dict:
    """What a program on ``mesh`` was compiled for: {platform, device_kind, devices, hosts,
    target, deviceless, autotune_results}."""
    device = mesh.devices.flat[0]
    return {"platform": device.platform, "device_kind": device.device_kind,
            "devices": int(mesh.devices.size), "hosts": hosts, "target": target,
            "deviceless": target is not None, "autotune_results": autotune_results}


def compiled_for_line(c: dict) -> str:
    """What a program was compiled for (:func:`compiled_for`), and how far to trust it."""
    if c.get("deviceless"):
        hosts = f" on {c['hosts']} hosts" if c.get("hosts", 1) > 1 else ""
        tuned = (f"autotune results from {c['autotune_results']}" if c.get("autotune_results")
                 else "no autotuning")
        return (f"compiled for {c['devices']} x {c['device_kind']}{hosts} "
                f"(XLA:GPU, deviceless compile, {tuned})")
    if c["platform"] == "gpu":
        return f"compiled for {c['devices']} x {c.get('device_kind', 'GPU')} (this machine's GPUs)"
    return (f"compiled on {c['devices']} {c['platform']} device(s): an ESTIMATE of a GPU run "
            f"(XLA:CPU buffers; --target h100|h200|... compiles for the GPU itself)")


def print_plan(p: dict, budget: int | None, file=None, key: str = "peak") -> None:
    file = file or sys.stdout
    rows = [("base weights (per device)", p["weights"])]
    if p.get("weights_packed") is not None:
        rows += [(f"  {p['base_quant']} packed linears", p["weights_packed"]),
                 ("  quantisation constants", p["weights_quant_constants"]),
                 ("  embeddings, norms, LM head", p["weights_other"])]
    rows += [("LoRA params (fp32)", p["lora"]),
            ("optimizer state (AdamW, fp32)", p["optimizer"]), ("batch", p["batch_bytes"]),
            ("arguments (XLA)", p["arguments"]), ("outputs (XLA)", p["outputs"]),
            ("  of which aliased/donated", -p["aliased"]),
            ("activations + temporaries (XLA)", p["temporaries"]), ("peak per device", p["peak"])]
    if p.get("host_offload") and "compiled_peak" in p:
        rows = rows[:-1] + [("compiled peak (incl. host residuals)", p["compiled_peak"]),
                            ("  minus offloaded to host (computed)", -p["host_offload"]),
                            ("peak per device", p["peak"])]
    if p.get("cpu_upcast_allowance"):
        rows += [("  of which CPU-only f32 weight copies", -p["cpu_upcast_allowance"]),
                 ("peak per device, GPU estimate", p["peak_gpu_estimate"])]
    if p.get("host_offload"):
        how = p.get("host_offload_source", "formula")
        rows += [(f"pinned host memory per device ({how})", p["host_offload"]),
                 (f"pinned host memory per host ({how})", p["host_offload_per_host"])]
    cp = f"cp={p['cp']} ({p['cp_impl']}) " if p.get("cp", 1) > 1 else ""
    print(f"tp={p['tp']} dp={p['dp']} {cp}max_seq_len={p['max_seq_len']} batch={p['batch']} "
          f"dtype={p['dtype']} remat={p['remat']} attention={p['attention']} "
          f"sequence_parallel={'on' if p.get('sequence_parallel') else 'off'} "
          f"mlp_chunk_tokens={p.get('mlp_chunk_tokens')} "
          f"lora r={p['lora_rank']} on {','.join(p['lora_targets'] or [])}", file=file)
    print(f"  {compiled_for_line(p['compiled_for'])}, {p['compile_s']} s", file=file)
    if p.get("weights_packed") is not None:
        print(f"  base_quant={p['base_quant']}: {p['quant_bytes_per_param']:.4f} bytes per "
              f"parameter of the quantised linears", file=file)
    for name, n in rows:
        print(f"  {name:34s} {_fmt(n)}", file=file)
    if p.get("cp_wire_bytes_by_impl"):
        by = p["cp_wire_bytes_by_impl"]
        best = min(by, key=by.get)
        print(f"  sent over cp per step and device: ring {_fmt(by['ring'])}, allgather "
              f"{_fmt(by['allgather'])} -> fewer bytes: {best}", file=file)
    if budget:
        verdict = "fits" if p[key] <= budget else "does NOT fit"
        print(f"  usable device memory               {_fmt(budget)}  -> {verdict} (by {key})",
              file=file)


def find_max_seq_len(plan_at, budget: int, start: int = 1024, limit: int = 1 << 25,
                     step: int = 1024, rel_tol: float = 0.01, log=None, key: str = "peak"):
    """Largest multiple of ``step`` whose plan fits ``budget``, to within ``rel_tol`` (the
    answer is at most 1 % + one step below the true limit by default): double from ``start``
    until it does not fit (or ``limit``, 32M tokens), then bisect between the last fit and the
    first miss on multiples of ``step`` until they are that close. ``plan_at(S) -> plan dict``.
    Returns (S or None, {S: plan})."""
    tried = {}

    def fits(s):
        if s not in tried:
            tried[s] = plan_at(s)
            if log:
                log(s, tried[s])
        return tried[s][key] <= budget

    if not fits(start):
        lo, hi = 0, start
    else:
        lo, hi = start, None
        s = start * 2
        while s <= limit:
            if not fits(s):
                hi = s
                break
            lo, s = s, s * 2
        if hi is None:
            return lo, tried
    while hi - lo > max(step, rel_tol * lo):
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return (lo or None), tried


def train_defaults() -> dict:
    """``TrainConfig``'s defaults: plan, like train, assumes them for flags not given."""
    import dataclasses

    from ..config.train_config import TrainConfig
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)
            if f.default is not dataclasses.MISSING}


def _target_names() -> list[str]:
    from .gpu_targets import target_names
    return target_names()


def build_parser() -> argparse.ArgumentParser:
    from ..cli.parser import OneLineErrorParser
    ap = OneLineErrorParser(
        prog="spmd-lora plan",
        description="Per-device memory of a LoRA train step (no weights needed): compiles the "
                    "real step on abstract shapes and reads XLA's memory analysis.")
    ap.add_argument("--model", required=True, help="HF model directory or preset "
                    "(llama2-7b, llama2-13b, llama2-70b, llama3-8b)")
    d = train_defaults()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=d["cp"],
                    help="context-parallel degree: the sequence split over cp devices")
    ap.add_argument("--cp-impl", default=d["cp_impl"], choices=["ring", "allgather"],
                    help="ring attention's exchange (default %(default)s)")
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", dest="batch", type=int, default=d["batch_size"],
                    help="global batch per micro-batch (split over dp)")
    ap.add_argument("--grad-accum-steps", dest="micro_batches", type=int,
                    default=d["grad_accum_steps"], help="micro-batches per optimizer step")
    ap.add_argument("--lora-rank", type=int, default=d["lora_rank"])
    ap.add_argument("--lora-alpha", type=float, default=d["lora_alpha"])
    ap.add_argument("--lora-targets", dest="targets", default=",".join(d["lora_targets"]),
                    help="comma list of projections, or 'all'")
    ap.add_argument("--dtype", default=d["dtype"], choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--remat", default=d["remat"], choices=["none", "full", "save-dots", "offload"],
                    help="offload: full remat with the saved layer inputs in pinned host memory")
    ap.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction,
                    default=d["sequence_parallel"],
                    help="shard activations along the sequence over tp (default on)")
    ap.add_argument("--mlp-chunk-tokens", type=int, default=d["mlp_chunk_tokens"],
                    help="tile the MLP (and, with sequence parallelism, the attention "
                         "projections) above this many tokens; 0 = never (default %(default)s)")
    ap.add_argument("--devices-per-host", type=int, default=8,
                    help="devices sharing one host's memory, for the offload host total")
    ap.add_argument("--attention", default=d["attention"],
                    help="attention impl compiled into the step (auto|pallas|blockwise|xla|cudnn); "
                         "auto: our Pallas kernel on a GPU (--target), blockwise on CPU")
    ap.add_argument("--target", default=None, metavar="GPU",
                    help="compile for this GPU without one (XLA:GPU's own memory plan; needs "
                         "the CUDA plugin: pip install -e \".[cuda12]\"): "
                         + ", ".join(_target_names()))
    ap.add_argument("--hosts", type=int, default=1,
                    help="with --target: hosts the tp*dp*cp devices are spread over "
                         "(multi-host plans; default 1)")
    ap.add_argument("--autotune-results", default=None, metavar="FILE",
                    help="with --target: XLA autotune results dumped on a real GPU "
                         "(tools/gpu_suite.py writes OUT/autotune_results.textproto)")
    for old, dest, kind in (("--batch", "batch", int), ("--micro-batches", "micro_batches", int),
                            ("--targets", "targets", str)):   # names before they matched train's
        ap.add_argument(old, dest=dest, type=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ap.add_argument("--ce-chunk-tokens", type=int, default=4096)
    ap.add_argument("--base-quant", default="none", choices=["none", "int8", "nf4"],
                    help="quantised frozen base linears (QLoRA); default %(default)s")
    ap.add_argument("--device-memory", type=parse_bytes, default=None,
                    help="device memory, e.g. 80GB (GB means GiB); enables the fits verdict "
                         "(default with --target: that GPU's memory)")
    ap.add_argument("--usable-fraction", type=float, default=0.9,
                    help="fraction of --device-memory the step may use (the rest: CUDA "
                         "context, allocator fragmentation, NCCL buffers); default 0.9")
    ap.add_argument("--gpu-estimate", action="store_true",
                    help="on CPU, judge fit by peak minus XLA:CPU's f32 weight copies (absent "
                         "on GPU) instead of the conservative raw peak")
    ap.add_argument("--find-max-seq-len", action="store_true",
                    help="search the longest --max-seq-len that fits (powers of two up to "
                         "32M, then bisection on multiples of 1024 to within 1 %%); needs "
                         "--device-memory")
    ap.add_argument("--json", default=None, help="also write the plan(s) as JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``spmd-lora plan``: print the per-device breakdown and whether it fits. Returns 0, or
    1 when it does not fit, 2 on a usage/config error."""
    args = build_parser().parse_args(argv)
    if args.target is None:
        ensure_host_devices(args.tp * args.dp * args.cp)
    else:
        from .gpu_targets import ensure_plugin_can_start, quiet_xla_warnings
        ensure_plugin_can_start()
        quiet_xla_warnings()
    import json

    from ..config.model_config import resolve_model_config
    from ..errors import SpmdLoraError
    from ..config.lora_config import LoraConfig

    try:
        cfg = resolve_model_config(args.model)
        cfg.check_tp(args.tp)
        if args.cp < 1:
            raise SpmdLoraError(f"--cp must be >= 1, got {args.cp}")
        lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, targets=args.targets)
        if args.target is not None:
            from .gpu_targets import require_cuda_plugin, resolve_target
            gpu = resolve_target(args.target)
            require_cuda_plugin()
            if args.device_memory is None:
                args.device_memory = gpu.memory_bytes
        elif args.hosts != 1 or args.autotune_results:
            raise SpmdLoraError("--hosts and --autotune-results need --target (a GPU to "
                                "compile for, e.g. --target h100)")
        if args.find_max_seq_len and not args.device_memory:
            raise SpmdLoraError("--find-max-seq-len needs --device-memory (e.g. 80GB) or "
                                "--target")
        budget = int(args.device_memory * args.usable_fraction) if args.device_memory else None
        key = "peak_gpu_estimate" if args.gpu_estimate else "peak"

        def plan_at(s):
            return plan_memory(cfg, args.tp, args.dp, s, batch=args.batch, lora=lora,
                               dtype=args.dtype, remat=args.remat, attention=args.attention,
                               micro_batches=args.micro_batches,
                               ce_chunk_tokens=args.ce_chunk_tokens,
                               sequence_parallel=args.sequence_parallel,
                               mlp_chunk_tokens=args.mlp_chunk_tokens,
                               devices_per_host=args.devices_per_host,
                               base_quant=args.base_quant, cp=args.cp, cp_impl=args.cp_impl,
                               target=args.target, hosts=args.hosts,
                               autotune_results=args.autotune_results)

        print(f"model {args.model}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
              f"heads {cfg.num_heads}/{cfg.num_kv_heads} kv, vocab {cfg.vocab_size}")
        print(f"settings (spmd-lora train's defaults unless given): --dtype {args.dtype} "
              f"--remat {args.remat} --lora-rank {lora.rank} --lora-targets "
              f"{','.join(lora.targets)} --batch-size {args.batch} --grad-accum-steps "
              f"{args.micro_batches} --attention {args.attention}"
              + (f" --target {args.target}" + (f" --hosts {args.hosts}" if args.hosts > 1 else "")
                 if args.target else ""))
        if not args.find_max_seq_len:
            p = plan_at(args.max_seq_len)
            print_plan(p, budget, key=key)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(p, f, indent=1)
            return 0 if budget is None or p[key] <= budget else 1

        def log(s, p):
            mark = "fits" if p[key] <= budget else "too big"
            host = f", host {_fmt(p['host_offload'])}" if p.get("host_offload") else ""
            est = (f"GPU estimate {_fmt(p['peak_gpu_estimate'])}, " if p["cpu_upcast_allowance"]
                   else "")
            print(f"  S={s:8d}: peak {_fmt(p['peak'])} ({est}activations+temp "
                  f"{_fmt(p['temporaries'])}{host}, compile {p['compile_s']} s) {mark}",
                  flush=True)

        best, tried = find_max_seq_len(plan_at, budget, log=log, key=key)
        if best is None:
            print(f"no max_seq_len >= 1024 fits in {_fmt(budget)} per device")
        else:
            print(f"longest trainable max_seq_len: {best} (multiple of 1024, within 1 %) "
                  f"within {_fmt(budget)} per device")
            print_plan(tried[best], budget, key=key)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"max_seq_len": best, "budget": budget,
                           "plans": {str(k): v for k, v in sorted(tried.items())}}, f, indent=1)
        return 0 if best else 1
    except SpmdLoraError as e:
        from ..config.fields import with_flag_names
        print(f"error: {with_flag_names(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

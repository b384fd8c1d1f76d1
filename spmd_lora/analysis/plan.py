"""Per-device memory plan of a LoRA train step, without weights: ``spmd-lora plan``.

The real train step (built by :mod:`spmd_lora.engine.factory`) is lowered on abstract shapes
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
  initialises its backends, so the command (:mod:`spmd_lora.cli.plan`, through
  :func:`ensure_host_devices`) sets
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` if JAX has not initialised yet; a
  process that already initialised JAX with fewer devices gets a clear error instead.

On CPU, loop-invariant code motion is disabled for the plan compile: XLA:CPU upcasts bf16
matmuls to f32 and LICM would hoist an f32 copy of every layer's weights out of the layer scan
(+25 GiB on a 7B plan); what remains (a layer's weights and the LM head in f32) is reported as
``cpu_upcast_allowance`` and subtracted in ``peak_gpu_estimate``. Verdicts use ``peak``
(conservative) unless ``--gpu-estimate``. A CPU compile also differs from a GPU one in fusion
and in the attention kernel ("blockwise" is the CPU stand-in of the fused kernel): docs/
benchmarks.md ("GPU compile") sets the two side by side.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from ..config.sizes import GiB, format_size, parse_size
from ..config.train_config import DEFAULT_MLP_CHUNK_TOKENS
from ..engine.factory import build_train_step
from ..errors import ConfigError
from ..parallel.mesh import mesh_over
from ..parallel.zigzag import padded_seq_len
from ..weights.quant import is_quantised
from ..weights.shapes import resolve_dtype
from .budgets import offloaded_bytes
from .buffers import dump_options, maybe_dump, read_peak
from .gpu_targets import target_devices
from .hlo import expected_cp_collectives


__all__ = ["GiB", "ensure_host_devices", "plan_devices", "plan_mesh", "abstract_train_args",
           "lower_train_step", "CPU_PLAN_OPTIONS", "compile_train_step", "upcasts_matmuls",
           "cpu_upcast_allowance", "offloaded_bytes", "quant_weight_bytes",
           "gpu_compiler_options", "plan_memory", "parse_bytes", "format_bytes", "compiled_for",
           "compiled_for_line", "print_plan", "find_max_seq_len", "REMAT_BY_COST", "Budgets",
           "fit_offload_layers", "choose_remat", "remat_label"]


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

    if target is not None:
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
    return mesh_over(plan_devices(dp * cp * tp, target, hosts), dp, tp, cp)


# ----------------------------------------------------------------------------- lowering

def abstract_train_args(cfg, mesh, *, max_seq_len: int, batch: int = 1, lora=None,
                        dtype="bfloat16", micro_batches: int = 1, optimizer=None,
                        base_quant="none"):
    """(params, lora, opt_state, batches, key) as ShapeDtypeStructs with their shardings
    (:meth:`spmd_lora.engine.factory.TrainStep.abstract_args`). ``batch`` is the GLOBAL batch
    (rows per micro-batch, split over dp)."""
    return build_train_step(cfg, mesh=mesh, lora=lora, optimizer=optimizer).abstract_args(
        max_seq_len=max_seq_len, batch=batch, micro_batches=micro_batches, dtype=dtype,
        base_quant=base_quant)


def lower_train_step(cfg, tp: int, dp: int = 1, *, max_seq_len: int, batch: int = 1, lora=None,
                     dtype="bfloat16", remat="full", attention="blockwise", micro_batches=1,
                     ce_chunk_tokens: int = 4096, sequence_parallel: bool = True,
                     mlp_chunk_tokens: int = 0, mesh=None, optimizer=None,
                     base_quant="none", cp: int = 1, cp_impl: str = "ring",
                     offload_layers: int | None = None, preference=None,
                     segments: bool = False):
    """Lower the real train step (:func:`spmd_lora.engine.factory.build_train_step`) on
    abstract inputs on a (dp, cp, tp) mesh. ``preference``: a
    :class:`~spmd_lora.model.PreferenceLoss` for the DPO step (objective dpo; ``batch`` rows
    then hold its pairs, :mod:`spmd_lora.analysis.plan_dpo`); ``segments``: the batch has
    ``segment_ids`` too (packed rows, DPO's shared prefix). Returns (lowered, mesh, args)."""

    cfg.check_tp(tp)
    mesh = mesh or plan_mesh(dp, tp, cp)
    step = build_train_step(cfg, mesh=mesh, optimizer=optimizer, lora=lora, tp=tp, cp=cp,
                            cp_impl=cp_impl, attention=attention, remat=remat,
                            ce_chunk_tokens=ce_chunk_tokens, sequence_parallel=sequence_parallel,
                            mlp_chunk_tokens=mlp_chunk_tokens, offload_layers=offload_layers,
                            preference=preference)
    params, lora_p, opt_state, batches, key = step.abstract_args(
        max_seq_len=max_seq_len, batch=batch, micro_batches=micro_batches, dtype=dtype,
        base_quant=base_quant)
    if segments:                                 # int32 [A, B, S] as the other fields
        batches = {**batches, "segment_ids": batches["tokens"]}
    args = (params, lora_p, opt_state, batches, key)
    return step.lower(*args), mesh, args


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


def quant_weight_bytes(params) -> dict:
    """Per-device bytes of a quantised base, split into packed weights (int8 values / NF4 codes),
    quantisation constants (scales; NF4 absmax codes + double-quant group scale and offset) and
    the rest (embeddings, norms, LM head), plus bytes per parameter of the quantised linears
    (global). Empty for a dense base."""
    import numpy as np

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
        raise ConfigError(f"--autotune-results: no file {autotune_results!r} (tools/gpu_suite.py "
                          f"writes one on a GPU: OUT/autotune_results.textproto)")
    return {"xla_gpu_load_autotune_results_from": os.path.abspath(autotune_results)}


def plan_memory(cfg, tp: int, dp: int = 1, max_seq_len: int = 4096, batch: int = 1, lora=None,
                dtype="bfloat16", remat="full", attention="auto", micro_batches: int = 1,
                ce_chunk_tokens: int = 4096, sequence_parallel: bool = True,
                mlp_chunk_tokens: int | None = None, devices_per_host: int = 8,
                base_quant: str = "none", cp: int = 1, cp_impl: str = "ring",
                target: str | None = None, hosts: int = 1,
                autotune_results: str | None = None, offload_layers: int | None = None,
                buffers: int = 0, preference=None, segments: bool = False) -> dict:
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

    remat ``offload`` / ``offload-input`` (with ``offload_layers``: only the first K layers'):
    ``host_offload`` is what the saved layer inputs need in pinned host memory per device,
    ``host_offload_formula`` the same computed from the shapes (:func:`offloaded_bytes`), ``host_offload_per_host`` for the devices of one host
    (``devices_per_host``, or the target's devices per host). A GPU compile reports its
    pinned host temporaries itself (``host_offload_source`` "compiled"); a CPU compile keeps
    them in its one memory, inside ``temporaries``, so there ``peak`` is the compiled peak
    (``compiled_peak``) minus the formula's bytes (``host_offload_source`` "formula").

    ``cp`` > 1: the sequence is split over cp devices (ring attention ``cp_impl``);
    ``cp_wire_bytes`` is what one device sends over cp per step for the chosen impl and
    ``cp_wire_bytes_by_impl`` for both, so the cheaper one shows (formula:
    ``hlo.expected_cp_collectives``).

    ``buffers`` N > 0: the compile also dumps XLA's buffer assignment (into a temporary
    folder) and ``buffers`` holds the device temporaries' peak and the N largest buffers live
    at it (:meth:`spmd_lora.analysis.buffers.Peak.to_dict`).

    ``preference`` (a :class:`~spmd_lora.model.PreferenceLoss`): the DPO step instead of the
    SFT one, on ``batch`` rows of ``max_seq_len`` tokens (``objective`` "dpo";
    :func:`spmd_lora.analysis.plan_dpo.plan_dpo_memory` plans it by prompt length), with
    ``segment_ids`` in the batch when ``segments``.
    """
    if mlp_chunk_tokens is None:
        mlp_chunk_tokens = DEFAULT_MLP_CHUNK_TOKENS
    t0 = time.perf_counter()
    mesh = plan_mesh(dp, tp, cp, target, hosts)
    device = mesh.devices.flat[0]
    on_cpu = device.platform == "cpu"
    if target is not None:
        options = gpu_compiler_options(autotune_results)
        devices_per_host = (tp * dp * cp) // hosts
    else:
        options = CPU_PLAN_OPTIONS if on_cpu else None
    with maybe_dump(buffers > 0) as dump:
        if dump:
            options = {**(options or {}), **dump_options(dump)}
        try:
            compiled, mesh, (params, lora_p, opt_state, batches, key) = compile_train_step(
                cfg, tp, dp, max_seq_len=max_seq_len, batch=batch, lora=lora, dtype=dtype,
                remat=remat, attention=attention, micro_batches=micro_batches,
                ce_chunk_tokens=ce_chunk_tokens, sequence_parallel=sequence_parallel,
                mlp_chunk_tokens=mlp_chunk_tokens, mesh=mesh, compiler_options=options or None,
                base_quant=base_quant, cp=cp, cp_impl=cp_impl, offload_layers=offload_layers,
                preference=preference, segments=segments)
        except Exception as e:  # noqa: BLE001 - XLA reports a bad autotune file as a runtime error
            if autotune_results and "autotune" in str(e).lower():
                raise ConfigError(f"--autotune-results {autotune_results}: XLA cannot use it "
                                  f"({str(e).splitlines()[0]})") from None
            raise
        peak = read_peak(dump) if dump else None
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    out = {
        "tp": tp, "dp": dp, "cp": cp, "cp_impl": cp_impl, "max_seq_len": max_seq_len, "batch": batch, "dtype": str(dtype),
        "remat": remat, "offload_layers": offload_layers, "attention": attention, "micro_batches": micro_batches,
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
        "objective": "sft" if preference is None else "dpo",
        **quant_weight_bytes(params),
    }
    out["activations"] = out["temporaries"]
    if peak is not None:
        out["buffers"] = peak.to_dict(top=buffers)
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    # an estimate of copies inside the temporaries: never more than the temporaries themselves
    out["cpu_upcast_allowance"] = (min(cpu_upcast_allowance(params, dtype, compiled.as_text()),
                                       out["temporaries"]) if on_cpu else 0)
    out["host_offload_formula"] = offloaded_bytes(
        cfg, tp, dp, max_seq_len=max_seq_len, batch=batch, dtype=dtype, remat=remat,
        offload_layers=offload_layers, sequence_parallel=sequence_parallel, cp=cp)
    compiled_host = not on_cpu and out["host_temporaries"] > 0
    out["host_offload"] = out["host_temporaries"] if compiled_host else out["host_offload_formula"]
    out["host_offload_source"] = "compiled" if compiled_host else "formula"
    out["host_offload_per_host"] = out["host_offload"] * min(devices_per_host, tp * dp * cp)
    if cp > 1:
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


# ----------------------------------------------------------------------------- budgets, remat auto

#: The remat policies by recomputed FLOPs, cheapest first (analysis/flops.py): none, save-dots
#: (attention forward again), full and offload (the layer forward again, offload one half at a
#: time), offload-input (and the attention forward once more). Each keeps on the device no more
#: than the one before it, except that the offload policies move saved values to the host.
REMAT_BY_COST = ("none", "save-dots", "full", "offload", "offload-input")


@dataclasses.dataclass(frozen=True)
class Budgets:
    """What a plan must fit: ``device`` bytes per device (judged by ``plan[key]``) and
    ``host`` bytes of pinned host memory per host (None: no host limit)."""

    device: int
    host: int | None = None
    key: str = "peak"

    def device_fits(self, p: dict) -> bool:
        return p[self.key] <= self.device

    def host_fits(self, p: dict) -> bool:
        return self.host is None or p["host_offload_per_host"] <= self.host

    def fits(self, p: dict) -> bool:
        return self.device_fits(p) and self.host_fits(p)


def fit_offload_layers(plan_at, policy: str, num_layers: int, budgets: Budgets, max_tries=4):
    """The plan of ``policy`` (offload or offload-input) with the fewest layers offloaded
    (``offload_layers`` K) that fits both budgets, or the plan with all L layers offloaded
    when none does. Compiles K = L first (``offload_layers`` None: the least device memory); its device slack, divided
    by what one layer's saved inputs take on the device, gives the first K to try; K then grows
    until the compiled plan fits (XLA's own rematerialisation makes the device peak only
    roughly linear in K). ``plan_at(remat, offload_layers) -> plan``."""
    full = plan_at(policy, None)                                  # every layer offloaded
    if not budgets.device_fits(full):
        return full
    per_layer = full["host_offload_formula"] // num_layers       # saved values of one layer
    k = num_layers
    if per_layer > 0:
        k = max(0, num_layers - (budgets.device - full[budgets.key]) // per_layer)
    for _ in range(max_tries):
        if k >= num_layers:
            break
        p = plan_at(policy, int(k))
        if budgets.fits(p):
            return p
        if budgets.device_fits(p):   # the host is short: more layers on it would not help
            return p
        k += max(1, (num_layers - k) // 4)
    return full


def choose_remat(plan_at, num_layers: int, budgets: Budgets, log=None):
    """remat ``auto``: the plan of the cheapest policy (:data:`REMAT_BY_COST`; for the offload
    policies the fewest offloaded layers, :func:`fit_offload_layers`) that fits ``budgets``,
    or None when none does. ``plan_at(remat, offload_layers) -> plan``; ``log(plan)`` sees
    every plan compiled."""
    def at(remat, k=None):
        p = plan_at(remat, k)
        if log:
            log(p)
        return p

    for policy in REMAT_BY_COST:
        if policy in ("offload", "offload-input"):
            p = fit_offload_layers(at, policy, num_layers, budgets)
        else:
            p = at(policy)
        if budgets.fits(p):
            return p
    return None


# ----------------------------------------------------------------------------- report

def parse_bytes(text: str) -> int:
    """A size flag's value ('80GB', '1.9TB', '512MiB'; binary units): bytes, or the
    argparse error of a bad one (:func:`spmd_lora.config.sizes.parse_size`)."""
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("size is ")) from None


def format_bytes(n: int) -> str:
    return format_size(n)


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


def remat_label(p: dict) -> str:
    """The plan's remat policy as flags would give it: ``offload-input`` or ``offload-input
    --offload-layers 20``."""
    k = p.get("offload_layers")
    return p["remat"] + (f" --offload-layers {k}" if k is not None else "")


def print_plan(p: dict, budget: int | None, file=None, key: str = "peak",
               host_budget: int | None = None) -> None:
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
          f"dtype={p['dtype']} remat={remat_label(p)} attention={p['attention']} "
          f"sequence_parallel={'on' if p.get('sequence_parallel') else 'off'} "
          f"mlp_chunk_tokens={p.get('mlp_chunk_tokens')} "
          f"lora r={p['lora_rank']} on {','.join(p['lora_targets'] or [])}", file=file)
    if p.get("objective") == "dpo" and "prompt_len" in p:
        print(f"  objective dpo, layout {p['dpo_layout']}: {p['pairs']} pair(s) per "
              f"micro-batch, a prompt of {p['prompt_len']} + answers of "
              f"{p['completion_len']} tokens in {p['rows_per_pair']} row(s) of "
              f"{p['max_seq_len']} per pair; policy and reference forwards", file=file)
    print(f"  {compiled_for_line(p['compiled_for'])}, {p['compile_s']} s", file=file)
    if p.get("weights_packed") is not None:
        print(f"  base_quant={p['base_quant']}: {p['quant_bytes_per_param']:.4f} bytes per "
              f"parameter of the quantised linears", file=file)
    for name, n in rows:
        print(f"  {name:34s} {format_bytes(n)}", file=file)
    if p.get("cp_wire_bytes_by_impl"):
        by = p["cp_wire_bytes_by_impl"]
        best = min(by, key=by.get)
        print(f"  sent over cp per step and device: ring {format_bytes(by['ring'])}, allgather "
              f"{format_bytes(by['allgather'])} -> fewer bytes: {best}", file=file)
    if budget:
        verdict = "fits" if p[key] <= budget else "does NOT fit"
        print(f"  usable device memory               {format_bytes(budget)}  -> {verdict} (by {key})",
              file=file)
    if host_budget is not None:
        need = p.get("host_offload_per_host", 0)
        verdict = "fits" if need <= host_budget else "does NOT fit"
        print(f"  host memory budget per host        {format_bytes(host_budget)}  -> {verdict} "
              f"(needs {format_bytes(need).strip()})", file=file)


def find_max_seq_len(plan_at, budget, start: int = 1024, limit: int = 1 << 25,
                     step: int = 1024, rel_tol: float = 0.01, log=None, key: str = "peak"):
    """Largest multiple of ``step`` whose plan fits ``budget``, to within ``rel_tol`` (the
    answer is at most 1 % + one step below the true limit by default): double from ``start``
    until it does not fit (or ``limit``, 32M tokens), then bisect between the last fit and the
    first miss on multiples of ``step`` until they are that close. ``plan_at(S) -> plan dict``;
    ``budget``: device bytes (compared with ``plan[key]``) or a predicate ``plan -> bool``
    (e.g. :meth:`Budgets.fits`). Returns (S or None, {S: plan})."""
    tried = {}
    within = budget if callable(budget) else (lambda p: p[key] <= budget)

    def fits(s):
        if s not in tried:
            tried[s] = plan_at(s)
            if log:
                log(s, tried[s])
        return within(tried[s])

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

#!/usr/bin/env python
"""One command that validates, tunes and benchmarks the engine on whatever GPU it finds.

One script of ~850 lines, on purpose: a lent GPU is reached with one prepared command and
one file to carry, so every section (a-f below) and its worker processes live here.

    python tools/gpu_suite.py [--out gpu_suite_out] [--table PATH] [--budget-s 540]
    python tools/gpu_suite.py --dry-run          # CPU, tiny shapes, Pallas interpreted

Writes ``OUT/gpu_suite.json`` and ``OUT/gpu_suite.md`` and the measured kernel table (``--table``,
default ``OUT/kernel_table.json``; use it with ``SPMD_LORA_KERNEL_TABLE=...``). Sections, in
the order they run (each gets a share of ``--budget-s`` and records what it had to skip):

a. correctness: every attention impl (pallas, blockwise, xla, cudnn, tokamax when installed)
   against the fp32 XLA oracle on the same inputs, compiled on the device: forward and dq/dk/dv
   of a random-cotangent loss; causal / non-causal, GQA, packed segments, odd lengths;
   bf16 / fp16 / fp32. Max |a - b| / max |b|; limits 2e-2 (16-bit) and 5e-3 (fp32: TF32
   matmuls on GPU). An impl that fails a case is left out of the ranking.
c. block-size sweep of our Pallas kernel (hd 128, bf16, causal): forward tiles timed on the
   forward, backward tiles on forward+backward; winners go to the kernel table.
b. attention TFLOP/s per impl at S = 4k, 16k, 32k (B=1, 32 heads, hd 128, bf16, causal):
   forward, backward and forward+backward, with causal FLOPs halved (forward 4*B*H*S^2*D/2,
   backward 2.5x forward), next to the H100 anchors (FlashAttention-3 fwd ~650 / bwd ~560,
   cuDNN bwd ~516 TFLOP/s). The fwd+bwd ranking at the longest S goes to the kernel table,
   which the registry's "auto" then follows on this GPU kind.
d. LoRA train step, llama2-7b / llama3-8b shapes (random bf16 weights, r=16 on all linear
   projections, remat full, tp=1), S = 4096 and 16384: tokens/s, useful-FLOP MFU against the
   bf16 matmul peak measured here (8192^3 matmuls), and peak device memory against
   ``spmd-lora plan``'s prediction (the same step compiled on abstract shapes). Useful FLOPs
   per step: 4*T*(linear weights) (forward + input gradients; the base is frozen) + 6*T*(LoRA
   weights) + 3.5 * causal attention forward FLOPs (``spmd_lora.analysis.flops``); rematerialisation
   is not useful work: it is in the "hardware FLOP" utilisation next to it.
e. the same steps with HF transformers + PEFT (SDPA attention, with and without gradient
   checkpointing; when torch with CUDA is present): tokens/s and our speed-up.

Every section, and each train step of (d) and (e), runs in its own worker process (this
script with ``--worker SPEC``): a process that allocates GPU memory keeps it (JAX preallocates
75 % of the device, and its allocator never returns memory), so no section shares a device
with another's leftovers. The parent never allocates on the GPU (it reads the device kind
from a worker). ``--dry-run`` runs the same workers on CPU at tiny shapes, to test the suite.
On a GPU the train workers also dump XLA's autotune results; they are merged into
``OUT/autotune_results.textproto`` for ``spmd-lora plan --target ... --autotune-results``.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# Run as a script, this folder is sys.path[0], where profile.py would shadow the standard
# library's `profile` (imported by cProfile, e.g. through transformers): drop it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

ANCHORS_H100 = {"FlashAttention-3 fwd": 650, "FlashAttention-3 bwd": 560, "cuDNN bwd": 516}
WORKER_MARK = "GPU_SUITE_RESULT "
TOL = {"bfloat16": 2e-2, "float16": 2e-2, "float32": 5e-3}
BUDGET_SHARE = {"a": 0.08, "c": 0.17, "b": 0.17, "d": 0.38, "e": 0.20}


@dataclasses.dataclass
class Plan:
    """Shapes of one suite run (full on a GPU, tiny for --dry-run)."""
    dry: bool
    corr_cases: list            # (name, b, s, h, kv, d, causal, segments)
    dtypes: list
    bench_seqs: list
    bench_heads: int
    bench_dim: int
    sweep_seq: int
    sweep_fwd: list             # (block_q, block_k, num_warps, num_stages)
    sweep_bwd: list             # (block_q_bwd, block_k_bwd, num_warps_bwd, num_stages_bwd)
    models: list                # preset names, or "tiny"
    train_seqs: list
    matmul_n: int
    iters: int


def make_plan(dry: bool) -> Plan:
    if dry:
        return Plan(dry=True,
                    corr_cases=[("causal-gqa2-seg-S40", 1, 40, 4, 2, 16, True, True)],
                    dtypes=["bfloat16", "float32"], bench_seqs=[64], bench_heads=2,
                    bench_dim=16, sweep_seq=64,
                    sweep_fwd=[(32, 16, 4, 2), (16, 16, 4, 2)], sweep_bwd=[(16, 16, 4, 1)],
                    models=["tiny"], train_seqs=[32], matmul_n=256, iters=1)
    return Plan(dry=False,
                corr_cases=[("causal-gqa4-seg-S1000", 2, 1000, 16, 4, 128, True, True),
                            ("causal-mha-S2048", 1, 2048, 8, 8, 128, True, False),
                            ("noncausal-gqa8-S777-d64", 1, 777, 16, 2, 64, False, False),
                            ("causal-seg-S4096-d128", 1, 4096, 8, 8, 128, True, True)],
                dtypes=["bfloat16", "float16", "float32"],
                bench_seqs=[4096, 16384, 32768], bench_heads=32, bench_dim=128,
                sweep_seq=8192,
                sweep_fwd=[(bq, bk, w, st) for bq in (64, 128) for bk in (64, 128)
                           for w in (4, 8) for st in (2, 3)],
                sweep_bwd=[(bq, bk, w, st) for bq, bk in ((32, 64), (64, 64), (64, 128),
                                                          (128, 64))
                           for w in (4, 8) for st in (1, 2)],
                models=["llama2-7b", "llama3-8b"], train_seqs=[4096, 16384],
                matmul_n=8192, iters=5)


class Budget:
    """Splits the total time over the sections still to run, in proportion to their shares;
    time a section leaves unused goes to the ones after it."""

    def __init__(self, total_s: float, sections):
        self.start, self.total = time.perf_counter(), total_s
        self.pending = [s for s in "acbde" if s in sections]

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)

    def section(self, name: str) -> float:
        """Deadline (a perf_counter value) for section ``name``, which starts now."""
        return time.perf_counter() + self.left_for(name)

    def left_for(self, name: str) -> float:
        """Seconds section ``name``, which starts now, may take."""
        share = BUDGET_SHARE[name] / sum(BUDGET_SHARE[s] for s in self.pending)
        self.pending.remove(name)
        return max(0.0, self.left() * share)


def _timeit(fn, iters: int) -> float:
    """Median wall seconds of ``fn()`` (which blocks) after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _err(a, b) -> float:
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def available_impls(gpu: bool) -> list:
    from spmd_lora.kernels import tokamax_attention
    impls = ["pallas", "blockwise", "xla"]
    if gpu:
        impls.append("cudnn")
        if tokamax_attention.available():
            impls.append("tokamax")
    return impls


def _attention_fn(impl, causal, seg, block_sizes=None):
    from spmd_lora.kernels import attention
    return lambda q, k, v: attention(q, k, v, causal=causal, segment_ids=seg, impl=impl,
                                     block_sizes=block_sizes)


def _inputs(b, s, h, kv, d, dtype, segments, seed=0):
    import jax
    import jax.numpy as jnp
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, kv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, kv, d), jnp.float32).astype(dtype)
    ct = jax.random.normal(ks[3], (b, s, h, d), jnp.float32)
    seg = None
    if segments:  # 1-4 contiguous documents per row
        cuts = jax.random.randint(ks[4], (b, 3), 0, s)
        seg = jnp.sum(jnp.arange(s)[None, :, None] >= cuts[:, None, :], axis=-1).astype(jnp.int32)
    return q, k, v, ct, seg


def _fwd_bwd(fn):
    import jax

    def f(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct.astype(out.dtype))
    return jax.jit(f)


# ----------------------------------------------------------------------------- (a) correctness

def section_correctness(plan: Plan, impls, deadline) -> dict:
    import jax.numpy as jnp

    from spmd_lora.kernels import registry
    cc = registry.device_info()[2]
    rows = []
    for name, b, s, h, kv, d, causal, segments in plan.corr_cases:
        for dt in plan.dtypes:
            q, k, v, ct, seg = _inputs(b, s, h, kv, d, getattr(jnp, dt), segments)
            f32 = [x.astype(jnp.float32) for x in (q, k, v)]
            ref = _fwd_bwd(_attention_fn("xla", causal, seg))(*f32, ct)
            for impl in impls:
                row = {"case": name, "dtype": dt, "impl": impl}
                if time.perf_counter() > deadline:
                    rows.append({**row, "status": "skipped: out of time"})
                    continue
                ok, why = registry.supports(impl, dtype=dt, head_dim=d, seq_len=s,
                                            segments=segments, compute_capability=cc)
                if not ok:
                    rows.append({**row, "status": f"unsupported: {why}"})
                    continue
                try:
                    out, grads = _fwd_bwd(_attention_fn(impl, causal, seg))(q, k, v, ct)
                    errs = [_err(out, ref[0])] + [_err(g, r) for g, r in zip(grads, ref[1])]
                except Exception as e:  # noqa: BLE001 - a kernel that breaks is a finding
                    rows.append({**row, "status": f"error: {type(e).__name__}: "
                                                  f"{str(e).splitlines()[0][:200]}"})
                    continue
                ok = all(math.isfinite(x) for x in errs) and max(errs) <= TOL[dt]
                rows.append({**row, "status": "pass" if ok else "FAIL",
                             "fwd": errs[0], "dq": errs[1], "dk": errs[2], "dv": errs[3]})
    failed = sorted({r["impl"] for r in rows if r["status"] == "FAIL" or
                     r["status"].startswith("error")})
    return {"rows": rows, "failed_impls": failed, "tolerance": TOL}


# ----------------------------------------------------------------------------- FLOPs + timing

def attention_flops(b, s, h, d, causal=True) -> dict:
    """Matmul FLOPs of attention (QK^T and PV), causal halved; backward = 2.5 x forward."""
    fwd = 4.0 * b * h * s * s * d / (2.0 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}


def time_attention(impl, s, h, d, dtype, iters, block_sizes=None, b=1, backward=True) -> dict:
    """Median seconds of the forward and of forward+backward, causal, MHA."""
    import jax
    q, k, v, ct, _ = _inputs(b, s, h, h, d, dtype, False, seed=1)
    fn = _attention_fn(impl, True, None, block_sizes)
    fwd = jax.jit(fn)
    t_fwd = _timeit(lambda: fwd(q, k, v).block_until_ready(), iters)
    out = {"fwd_s": t_fwd}
    if backward:
        fb = _fwd_bwd(fn)
        out["fwd_bwd_s"] = _timeit(lambda: jax.block_until_ready(fb(q, k, v, ct)), iters)
    return out


def _tflops(flops, seconds):
    return flops / seconds / 1e12 if seconds and seconds > 0 else None


# ----------------------------------------------------------------------------- (c) sweep

def section_sweep(plan: Plan, deadline, base_blocks) -> dict:
    import jax.numpy as jnp
    s, h, d = plan.sweep_seq, plan.bench_heads, plan.bench_dim
    rows, best_fwd, best = [], None, None
    for bq, bk, w, st in plan.sweep_fwd:
        if time.perf_counter() > deadline:
            rows.append({"pass": "fwd", "config": [bq, bk, w, st], "status": "skipped: out of time"})
            continue
        bs = dataclasses.replace(base_blocks, block_q=bq, block_k=bk, num_warps=w, num_stages=st)
        try:
            t = time_attention("pallas", s, h, d, jnp.bfloat16, plan.iters, bs, backward=False)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: skip the config
            rows.append({"pass": "fwd", "config": [bq, bk, w, st],
                         "status": f"error: {str(e).splitlines()[0][:160]}"})
            continue
        rows.append({"pass": "fwd", "config": [bq, bk, w, st], "status": "ok", "fwd_s": t["fwd_s"]})
        if best_fwd is None or t["fwd_s"] < best_fwd[1]:
            best_fwd = (bs, t["fwd_s"])
    base = best_fwd[0] if best_fwd else base_blocks
    for bq, bk, w, st in plan.sweep_bwd:
        if time.perf_counter() > deadline:
            rows.append({"pass": "bwd", "config": [bq, bk, w, st], "status": "skipped: out of time"})
            continue
        bs = dataclasses.replace(base, block_q_bwd=bq, block_k_bwd=bk, num_warps_bwd=w,
                                 num_stages_bwd=st)
        try:
            t = time_attention("pallas", s, h, d, jnp.bfloat16, plan.iters, bs)
        except Exception as e:  # noqa: BLE001
            rows.append({"pass": "bwd", "config": [bq, bk, w, st],
                         "status": f"error: {str(e).splitlines()[0][:160]}"})
            continue
        rows.append({"pass": "bwd", "config": [bq, bk, w, st], "status": "ok",
                     "fwd_bwd_s": t["fwd_bwd_s"]})
        if best is None or t["fwd_bwd_s"] < best[1]:
            best = (bs, t["fwd_bwd_s"])
    winner = best[0] if best else (best_fwd[0] if best_fwd else None)
    return {"seq_len": s, "heads": h, "head_dim": d, "rows": rows,
            "best": dataclasses.asdict(winner) if winner else None,
            "best_block_sizes": winner, "base": dataclasses.asdict(base_blocks)}


# ----------------------------------------------------------------------------- (b) throughput

def section_throughput(plan: Plan, impls, deadline, pallas_blocks) -> dict:
    import jax.numpy as jnp
    rows = []
    h, d = plan.bench_heads, plan.bench_dim
    for s in plan.bench_seqs:
        fl = attention_flops(1, s, h, d)
        for impl in impls:
            if impl == "xla" and s > 4096:   # O(S^2) fp32 scores: 32 heads x 16k^2 x 4 B = 32 GiB
                rows.append({"impl": impl, "seq_len": s, "status": "skipped: O(S^2) memory"})
                continue
            if time.perf_counter() > deadline:
                rows.append({"impl": impl, "seq_len": s, "status": "skipped: out of time"})
                continue
            bs = pallas_blocks if impl == "pallas" else None
            try:
                t = time_attention(impl, s, h, d, jnp.bfloat16, plan.iters, bs)
            except Exception as e:  # noqa: BLE001
                rows.append({"impl": impl, "seq_len": s,
                             "status": f"error: {str(e).splitlines()[0][:160]}"})
                continue
            bwd_s = t["fwd_bwd_s"] - t["fwd_s"]
            rows.append({"impl": impl, "seq_len": s, "status": "ok", **t,
                         "fwd_tflops": _tflops(fl["fwd"], t["fwd_s"]),
                         "bwd_tflops": _tflops(fl["bwd"], bwd_s),
                         "fwd_bwd_tflops": _tflops(fl["fwd_bwd"], t["fwd_bwd_s"])})
    return {"heads": h, "head_dim": d, "batch": 1, "dtype": "bfloat16", "causal": True,
            "rows": rows, "anchors_h100_tflops": ANCHORS_H100}


def ranking_from(throughput: dict, excluded) -> list:
    """Impls by fwd+bwd TFLOP/s at the longest length where they ran, fastest first."""
    best = {}
    for r in throughput["rows"]:
        if r["status"] != "ok" or r["impl"] in excluded:
            continue
        key = (r["seq_len"], r["fwd_bwd_tflops"])
        if r["impl"] not in best or key > best[r["impl"]]:
            best[r["impl"]] = key
    return sorted(best, key=lambda i: best[i], reverse=True)


# ----------------------------------------------------------------------------- matmul peak

def measure_matmul_peak(n: int, iters: int) -> dict:
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    t = _timeit(lambda: f(a, a).block_until_ready(), max(iters, 3))
    return {"n": n, "seconds": t, "tflops": 2.0 * n ** 3 / t / 1e12}


# ----------------------------------------------------------------------------- (d) train step

def model_config(name: str, seq_len: int):
    from spmd_lora.config.model_config import PRESETS, ModelConfig
    if name == "tiny":
        cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16)
    else:
        cfg = PRESETS[name]
    return dataclasses.replace(cfg, max_position_embeddings=max(seq_len,
                                                                cfg.max_position_embeddings))


def useful_flops(cfg, lora_rank: int, tokens: int, seq_len: int) -> float:
    """Per train step (batch of ``tokens`` in rows of ``seq_len``): spmd_lora.analysis.flops.step_flops."""
    from spmd_lora.analysis.flops import step_flops
    return step_flops(cfg, seq_len, tokens // seq_len, lora_rank=lora_rank).useful


def hardware_flops(cfg, lora_rank: int, tokens: int, seq_len: int, remat: str, impl: str) -> float:
    """What the step computes (useful + recomputation), for remat ``remat``; attention counted
    as the whole square for ``xla``, else as the causal triangle (fused kernels skip masked
    tiles)."""
    from spmd_lora.analysis.flops import step_flops
    return step_flops(cfg, seq_len, tokens // seq_len, lora_rank=lora_rank, remat=remat,
                      attention="xla" if impl == "xla" else "causal").hardware


def train_worker(spec: dict) -> dict:
    """One spmd_lora train step config: compile (after the plan's prediction), time, memory."""
    import jax
    import numpy as np

    from spmd_lora.analysis import plan as plan_mod
    from spmd_lora.config.lora_config import LoraConfig
    from spmd_lora.engine.factory import build_train_step
    from spmd_lora.engine.step import OptimizerConfig
    from spmd_lora.parallel.placement import shard_micro_batches

    if spec.get("cache_dir"):  # the plan's compile of the same step fills it for the run
        jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    s, dtype, impl = spec["seq_len"], spec["dtype"], spec["attention"]
    cfg = model_config(spec["model"], s)
    lora_cfg = LoraConfig(rank=spec["rank"], alpha=2.0 * spec["rank"], targets="all")
    predicted = plan_mod.plan_memory(cfg, 1, 1, s, lora=lora_cfg, dtype=dtype, remat="full",
                                     attention=impl)
    step = build_train_step(cfg, lora=lora_cfg, attention=impl, remat="full",
                            optimizer=OptimizerConfig(learning_rate=2e-4, weight_decay=0.0,
                                                      max_grad_norm=None, total_steps=10 ** 6))
    mesh = step.mesh
    params = step.random_params(dtype)
    state = dict(zip(("lora", "opt"), step.init_state(jax.random.key(0))))
    rng = np.random.default_rng(0)
    shape = (1, 1, s)
    batches = shard_micro_batches({"tokens": rng.integers(0, cfg.vocab_size, shape),
                                   "loss_mask": np.ones(shape, np.int32)}, mesh)
    key = jax.random.key(1)

    def one():
        state["lora"], state["opt"], m = step(params, state["lora"], state["opt"], batches, key)
        return float(m["loss"])

    t0 = time.perf_counter()
    loss = one()
    compile_s = time.perf_counter() - t0
    step_s = _timeit(one, spec["iters"])
    stats = jax.devices()[0].memory_stats() or {}
    tokens = s
    return {"model": spec["model"], "seq_len": s, "attention": impl, "dtype": dtype,
            "loss": loss, "first_step_s": compile_s, "step_s": step_s,
            "tokens_per_s": tokens / step_s,
            "useful_flops": useful_flops(cfg, spec["rank"], tokens, s),
            "hardware_flops": hardware_flops(cfg, spec["rank"], tokens, s, "full", impl),
            "peak_bytes": stats.get("peak_bytes_in_use"),
            "plan_peak_bytes": predicted["peak"],
            "plan_peak_gpu_estimate_bytes": predicted["peak_gpu_estimate"]}


def peft_worker(spec: dict) -> dict:
    """The same step in HF transformers + PEFT (SDPA), optionally gradient checkpointing."""
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = spec["seq_len"]
    cfg = model_config(spec["model"], s)
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                         max_position_embeddings=cfg.max_position_embeddings,
                         rope_theta=cfg.rope_theta, use_cache=False,
                         attn_implementation="sdpa")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype (no fp32 copy of 7B first)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    if spec["grad_ckpt"]:  # renamed activation_checkpointing_enable in transformers 5.x
        getattr(model, "activation_checkpointing_enable",
                getattr(model, "gradient_checkpointing_enable", None))()
        model.enable_input_require_grads()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(model, peft.LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"],
                                                       lora_dropout=0.0, target_modules=targets))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4,
                            weight_decay=0.0)
    ids = torch.randint(0, cfg.vocab_size, (1, s), generator=torch.Generator().manual_seed(0))
    ids = ids.to(dev)

    def one():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        return float(out.loss.detach())

    step_s = _timeit(one, spec["iters"])
    return {"model": spec["model"], "seq_len": s, "grad_ckpt": spec["grad_ckpt"],
            "step_s": step_s, "tokens_per_s": s / step_s,
            "peak_bytes": torch.cuda.max_memory_allocated() if gpu else None,
            "attn_implementation": model.config._attn_implementation}


def worker_env(extra_xla_flags: str = "") -> dict:
    """The environment of a worker process: the parent's, with JAX's default GPU memory
    preallocation back (the parent turns it off for itself) and ``extra_xla_flags`` added."""
    env = dict(os.environ)
    env.pop(PREALLOCATE, None)
    if _USER_PREALLOCATE.get(PREALLOCATE) is not None:
        env[PREALLOCATE] = _USER_PREALLOCATE[PREALLOCATE]
    if extra_xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + extra_xla_flags).strip()
    return env


# What the user set for JAX's preallocation, for the workers (the parent turns it off).
_USER_PREALLOCATE: dict = {}


def _run_spec(spec: dict, timeout: float, xla_flags: str = "") -> dict:
    """Run one worker (``--worker SPEC``) in its own process; its result, or a status saying
    why there is none (out of time, out of memory, an error with the last lines it printed)."""
    if timeout < 10:
        return {"status": "skipped: out of time"}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=worker_env(xla_flags))
    except subprocess.TimeoutExpired:
        return {"status": f"skipped: timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(WORKER_MARK):
            return json.loads(line[len(WORKER_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    oom = any("out of memory" in t.lower() or "resource_exhausted" in t.lower() for t in tail)
    return {"status": ("OOM: " if oom else "error: ") + " | ".join(tail)[:300]}


def merge_autotune_results(paths, out_path) -> int:
    """Merge XLA autotune result files (protobuf text: a ``version`` line, then top-level
    ``results { device: ... hlo: ... result { ... } }`` blocks) into one file XLA can load:
    one version line, each (device, hlo) once (steps of several lengths share GEMMs). Returns
    the number of blocks written; writes nothing when there are none."""
    version, blocks, seen = None, [], set()
    for path in paths:
        with open(path) as f:
            lines = f.read().splitlines(keepends=True)
        block = None
        for line in lines:
            if block is None:
                if line.startswith("version:"):
                    version = version or line
                elif line.startswith("results {"):
                    block = [line]
                continue
            block.append(line)
            if line.rstrip() == "}":              # the block's own closing brace (column 0)
                key = tuple(b.strip() for b in block if b.lstrip().startswith(("device:", "hlo:")))
                if key not in seen:
                    seen.add(key)
                    blocks.append("".join(block))
                block = None
    if blocks:
        _atomic_write(out_path, (version or "version: 3\n") + "".join(blocks))
    return len(blocks)


def section_train(plan: Plan, deadline, impl, peak_tflops, cache_dir, autotune_dir=None,
                  rank=16) -> dict:
    dtype = "float32" if plan.dry else "bfloat16"
    rows = []
    for model in plan.models:
        for s in plan.train_seqs:
            spec = {"kind": "train", "model": model, "seq_len": s, "dtype": dtype,
                    "attention": impl, "rank": rank, "iters": plan.iters,
                    "cache_dir": None if plan.dry else cache_dir}
            flags = ""
            if autotune_dir:   # XLA writes what it autotuned for this step's GEMMs
                os.makedirs(autotune_dir, exist_ok=True)
                flags = ("--xla_gpu_dump_autotune_results_to="
                         + os.path.join(autotune_dir, f"{model}_{s}.textproto"))
            res = _run_spec(spec, deadline - time.perf_counter(), flags)
            row = {"model": model, "seq_len": s, **res}
            if res.get("status") == "ok":
                row["mfu"] = res["useful_flops"] / res["step_s"] / (peak_tflops * 1e12)
                row["hfu"] = res["hardware_flops"] / res["step_s"] / (peak_tflops * 1e12)
                if res.get("peak_bytes"):
                    row["peak_vs_plan"] = res["peak_bytes"] / res["plan_peak_bytes"]
            rows.append(row)
    return {"rank": rank, "targets": "all", "remat": "full", "dtype": dtype,
            "attention": impl, "matmul_peak_tflops": peak_tflops, "rows": rows}


def section_peft(plan: Plan, deadline, train: dict) -> dict:
    try:
        import peft  # noqa: F401
        import torch
    except ImportError:
        return {"status": "skipped: torch/peft not installed", "rows": []}
    if not plan.dry and not torch.cuda.is_available():
        return {"status": "skipped: torch has no CUDA here", "rows": []}
    ours = {(r["model"], r["seq_len"]): r for r in train["rows"] if r.get("status") == "ok"}
    rows = []
    for model in plan.models:
        for s in plan.train_seqs:
            for ckpt in (False, True):
                spec = {"kind": "peft", "model": model, "seq_len": s, "grad_ckpt": ckpt,
                        "dtype": train["dtype"], "rank": train["rank"], "iters": plan.iters}
                res = _run_spec(spec, deadline - time.perf_counter())
                row = {"model": model, "seq_len": s, "grad_ckpt": ckpt, **res}
                if res.get("status") == "ok" and (model, s) in ours:
                    row["ours_over_peft"] = ours[(model, s)]["tokens_per_s"] / res["tokens_per_s"]
                rows.append(row)
    return {"status": "ok", "rows": rows}


# ----------------------------------------------------------------------------- report

def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    env = report["environment"]
    out = [f"# GPU suite report{' (DRY RUN: CPU, tiny shapes)' if report['dry_run'] else ''}",
           "", f"device: {env['device_kind']} ({env['backend']}), jax {env['jax']}, "
           f"python {env['python']}; command: `{report['command']}`; "
           f"wall {report['wall_s']:.0f} s (per section: {report.get('section_s')})", ""]
    a = report.get("correctness")
    if a:
        out += ["## (a) correctness vs the fp32 XLA oracle (max rel err)", "",
                "| case | dtype | impl | status | fwd | dq | dk | dv |", "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['case']} | {r['dtype']} | {r['impl']} | {r['status']} | "
                f"{_fmt(r.get('fwd'), '.1e')} | {_fmt(r.get('dq'), '.1e')} | "
                f"{_fmt(r.get('dk'), '.1e')} | {_fmt(r.get('dv'), '.1e')} |" for r in a["rows"]]
        out += ["", f"failed impls (left out of the ranking): {a['failed_impls'] or 'none'}", ""]
    c = report.get("sweep")
    if c:
        out += [f"## (c) Pallas block-size sweep (S={c['seq_len']}, {c['heads']} heads, "
                f"hd {c['head_dim']}, bf16, causal)", "",
                "| pass | config (bq, bk, warps, stages) | status | seconds |", "|---|---|---|---|"]
        out += [f"| {r['pass']} | {r['config']} | {r['status']} | "
                f"{_fmt(r.get('fwd_s', r.get('fwd_bwd_s')), '.4g')} |" for r in c["rows"]]
        out += ["", f"winner: {c['best']}", ""]
    b = report.get("throughput")
    if b:
        out += [f"## (b) attention TFLOP/s (B=1, {b['heads']} heads, hd {b['head_dim']}, bf16, "
                f"causal FLOPs halved)", "",
                "| impl | S | status | fwd | bwd | fwd+bwd |", "|---|---|---|---|---|---|"]
        out += [f"| {r['impl']} | {r['seq_len']} | {r['status']} | {_fmt(r.get('fwd_tflops'))} | "
                f"{_fmt(r.get('bwd_tflops'))} | {_fmt(r.get('fwd_bwd_tflops'))} |"
                for r in b["rows"]]
        out += ["", "H100 anchors (TFLOP/s): " + ", ".join(f"{k} ~{v}" for k, v in
                                                             b["anchors_h100_tflops"].items()),
                "", f"ranking written to the kernel table: {report.get('ranking')}", ""]
    d = report.get("train")
    if d:
        out += [f"## (d) LoRA train step (r={d['rank']} all linear, remat {d['remat']}, "
                f"{d['dtype']}, attention {d['attention']}); bf16 matmul peak "
                f"{d['matmul_peak_tflops']:.1f} TFLOP/s measured", "",
                "| model | S | status | tokens/s | MFU (useful) | hardware FLOP util. | peak GiB | "
                "plan GiB | peak/plan |",
                "|---|---|---|---|---|---|---|---|---|"]
        gib = lambda x: None if x is None else x / 2 ** 30  # noqa: E731
        out += [f"| {r['model']} | {r['seq_len']} | {r['status']} | "
                f"{_fmt(r.get('tokens_per_s'), '.1f')} | {_fmt(r.get('mfu'), '.1%')} | "
                f"{_fmt(r.get('hfu'), '.1%')} | {_fmt(gib(r.get('peak_bytes')), '.2f')} | "
                f"{_fmt(gib(r.get('plan_peak_bytes')), '.2f')} | "
                f"{_fmt(r.get('peak_vs_plan'), '.2f')} |" for r in d["rows"]]
        out += [""]
    e = report.get("peft")
    if e:
        out += ["## (e) HF transformers + PEFT (SDPA)", "", f"status: {e['status']}", ""]
        if e["rows"]:
            out += ["| model | S | grad ckpt | status | tokens/s | ours / PEFT |",
                    "|---|---|---|---|---|---|"]
            out += [f"| {r['model']} | {r['seq_len']} | {r['grad_ckpt']} | {r['status']} | "
                    f"{_fmt(r.get('tokens_per_s'), '.1f')} | {_fmt(r.get('ours_over_peft'), '.2f')} |"
                    for r in e["rows"]]
    return "\n".join(out) + "\n"


def _atomic_write(path, text):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".gpu_suite.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def environment() -> dict:
    import jax
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "jaxlib": importlib.metadata.version("jaxlib"),
            "python": platform.python_version(), "host": platform.node(), "pid": os.getpid()}


def _section_worker(spec: dict) -> dict:
    """A section (a, c, b), the matmul peak or the environment, inside a worker process."""
    plan = make_plan(spec.get("dry", False))
    deadline = time.perf_counter() + spec.get("budget_s", 0.0)
    kind = spec["kind"]
    if kind == "environment":
        return environment()
    if kind == "correctness":
        return section_correctness(plan, spec["impls"], deadline)
    if kind == "sweep":
        from spmd_lora.kernels import BlockSizes
        out = section_sweep(plan, deadline, BlockSizes(**spec["base"]))
        out.pop("best_block_sizes")            # "best" holds the same, as a dict
        return out
    if kind == "throughput":
        from spmd_lora.kernels import BlockSizes
        return section_throughput(plan, spec["impls"], deadline, BlockSizes(**spec["blocks"]))
    if kind == "matmul":
        return measure_matmul_peak(plan.matmul_n, plan.iters)
    raise ValueError(f"unknown worker kind {kind!r}")


WORKERS = {"train": train_worker, "peft": peft_worker}
PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"


def _timed(report, name, key, fn, *args):
    """``report[key] = fn(*args)``, with its wall time in ``report["section_s"][name]``."""
    t = time.perf_counter()
    report[key] = fn(*args)
    report.setdefault("section_s", {})[name] = round(time.perf_counter() - t, 1)
    return report[key]


def _section(report, name, key, spec, budget_s):
    """Section ``name`` in a worker process with ``budget_s`` seconds, into ``report[key]``
    (a dict whose "status" is not "ok" when it produced nothing)."""
    return _timed(report, name, key, _run_spec, {**spec, "budget_s": budget_s}, budget_s + 120)


def run(args) -> dict:
    from spmd_lora.kernels import BlockSizes, registry
    t0 = time.perf_counter()
    env = _run_spec({"kind": "environment"}, 300)
    if env.get("status") != "ok":
        raise SystemExit(f"error: the suite's first worker failed: {env.get('status')}")
    env.pop("status")
    gpu = env["backend"] == "gpu"
    if not gpu and not args.dry_run:
        raise SystemExit(f"error: no GPU found (JAX backend is {env['backend']!r}); use "
                         f"--dry-run to test the suite on CPU")
    plan = make_plan(args.dry_run)
    dry = {"dry": args.dry_run}
    sections = set(args.sections.split(","))
    budget = Budget(args.budget_s, sections)
    impls = available_impls(gpu)
    report = {"dry_run": args.dry_run, "environment": env, "command": " ".join(sys.argv),
              "impls": impls}
    excluded = set()
    if "a" in sections:
        a = _section(report, "a", "correctness", {"kind": "correctness", **dry, "impls": impls},
                     budget.left_for("a"))
        excluded = set(a.get("failed_impls", impls if a.get("status") != "ok" else []))
    base = registry.choose("pallas", seq_len=plan.sweep_seq, head_dim=plan.bench_dim,
                           backend="gpu", device_kind=env["device_kind"]).block_sizes
    pallas_blocks = base
    if "c" in sections:
        c = _section(report, "c", "sweep", {"kind": "sweep", **dry,
                                             "base": dataclasses.asdict(base)},
                     budget.left_for("c"))
        if c.get("best"):
            pallas_blocks = BlockSizes(**c["best"])
    if "b" in sections:
        b = _section(report, "b", "throughput", {"kind": "throughput", **dry, "impls": impls,
                                                 "blocks": dataclasses.asdict(pallas_blocks)},
                     budget.left_for("b"))
        report["ranking"] = ranking_from(b, excluded) if b.get("status") == "ok" else []
    table_path = args.table or os.path.join(args.out, "kernel_table.json")
    if "c" in sections or "b" in sections:
        registry.write_table(
            table_path, env["device_kind"],
            block_sizes=[(plan.bench_dim, pallas_blocks)] if "c" in sections else None,
            ranking=report.get("ranking") or None,
            measurements={"jax": env["jax"], "date": time.strftime("%Y-%m-%d"),
                          "dry_run": args.dry_run,
                          "throughput": report.get("throughput", {}).get("rows")})
        report["kernel_table"] = table_path
    if report.get("kernel_table"):  # the train steps below (and their workers) use it
        os.environ[registry.TABLE_ENV] = os.path.abspath(report["kernel_table"])
    if "d" in sections or "e" in sections:
        report["matmul_peak"] = _run_spec({"kind": "matmul", **dry}, 300)
    if "d" in sections:
        auto = registry.choose("auto", seq_len=plan.train_seqs[0], head_dim=128,
                               dtype="bfloat16", backend="gpu",
                               device_kind=env["device_kind"]).impl if gpu else "pallas"
        out = os.path.abspath(args.out)
        _timed(report, "d", "train", section_train, plan, budget.section("d"), auto,
               report["matmul_peak"].get("tflops") or float("nan"),
               os.path.join(out, "jax_cache"),
               None if args.dry_run else os.path.join(out, "autotune"))
        dumps = sorted(glob.glob(os.path.join(out, "autotune", "*.textproto")))
        merged = os.path.join(out, "autotune_results.textproto")
        if dumps and merge_autotune_results(dumps, merged):
            report["autotune_results"] = merged
    if "e" in sections:
        train = report.get("train") or {"rows": [], "dtype": "bfloat16", "rank": 16}
        _timed(report, "e", "peft", section_peft, plan, budget.section("e"), train)
    report["wall_s"] = time.perf_counter() - t0
    return report


def registry_env() -> str:
    from spmd_lora.kernels import registry
    return registry.TABLE_ENV


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_suite_out", help="folder for the JSON + markdown")
    ap.add_argument("--table", default=None,
                    help="kernel table to write/merge (default OUT/kernel_table.json)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny shapes, Pallas interpreted: tests the suite itself")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="total time budget in seconds (default 540 = 9 minutes)")
    ap.add_argument("--sections", default="a,b,c,d,e", help="comma list of a,b,c,d,e")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        res = WORKERS.get(spec["kind"], _section_worker)(spec)
        print(WORKER_MARK + json.dumps({"status": "ok", **res}, default=str), flush=True)
        return 0
    bad = set(args.sections.split(",")) - set("abcde")
    if bad:
        print(f"error: --sections: unknown section(s) {sorted(bad)}; use a comma list of "
              f"a,b,c,d,e", file=sys.stderr)
        return 2
    saved = {key: os.environ.get(key) for key in (registry_env(), PREALLOCATE)}
    _USER_PREALLOCATE[PREALLOCATE] = saved[PREALLOCATE]
    # The parent allocates nothing on the GPU; should JAX start a GPU backend here anyway, it
    # must not preallocate 75 % of the device under the workers.
    os.environ[PREALLOCATE] = "false"
    try:
        report = run(args)
    finally:  # run() points the registry at the table it wrote; undo both for the caller
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    json_path = os.path.join(args.out, "gpu_suite.json")
    md_path = os.path.join(args.out, "gpu_suite.md")
    _atomic_write(json_path, json.dumps(report, indent=1, default=str))
    _atomic_write(md_path, markdown(report))
    print(markdown(report))
    print(f"wrote {json_path}, {md_path} and {report.get('kernel_table')}; use the table with "
          f"SPMD_LORA_KERNEL_TABLE={report.get('kernel_table')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Side-by-side LoRA train-step speed and peak memory: spmd_lora (JAX) vs HF transformers+PEFT.

    python tools/bench.py --config tiny|small|long|long8k|all [--steps 5] [--warmup 2]

Same model and step on both sides: a random Llama (``CONFIGS`` below: 2-4 layers, heads =
d/64, intermediate = 2.6875 d as Llama-2, vocab 32000), LoRA r=8 alpha=16 on all linear
projections (``--lora-targets``), no dropout, AdamW (lr 2e-4, no weight decay, no clipping),
batch 1, loss on every token. CPU: fp32; GPU: bf16 base weights (LoRA and optimizer fp32).

Each measurement runs in its own subprocess (``--worker``), so peak memory (the process's
``ru_maxrss``, which includes the framework's own footprint) and thread pools never mix.
After ``--warmup`` steps (compilation for JAX), ``--steps`` steps are timed one by one;
tokens/s uses the median step. Ours runs at ``--tp`` (default 1; fake host devices on CPU)
with attention ``--attention``
(default auto) under each ``--remat`` policy (default: none, as ``TrainConfig`` and the CLI
default to; give several, e.g. ``none,full``, and the fastest is reported). HF runs in eager mode with its default attention (sdpa) and no gradient
checkpointing.

Before the configs, a timed large matmul (``--worker ceiling``: 2048^3 fp32 on CPU, 8192^3
bf16 on GPU, best of 5) measures the machine's ceiling in the same run; each run then prints
its useful FLOP/s (``spmd_lora.analysis.flops.step_flops``: the same work for both frameworks) as a
share of that ceiling, and the "hardware" share (useful + what that configuration recomputes:
remat, chunked-CE logits, whole diagonal attention tiles). The load average is printed at the
start and at the end: on a shared machine, write it next to any number taken from here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

# Run as a script, this folder is sys.path[0], where profile.py would shadow the standard
# library's `profile` (imported by cProfile, e.g. through transformers): drop it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

CONFIGS = {
    "tiny": dict(layers=2, d=256, seq=256),
    "small": dict(layers=4, d=512, seq=512),
    "long": dict(layers=4, d=512, seq=2048),
    "long8k": dict(layers=4, d=512, seq=8192),
}
VOCAB = 32000
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MARK = "BENCH_RESULT "


def model_dims(name):
    c = CONFIGS[name]
    d = c["d"]
    return dict(layers=c["layers"], hidden=d, heads=d // 64, intermediate=int(d * 2.6875),
                vocab=VOCAB, seq=c["seq"])


def _targets(text):
    return TARGETS if text in ("all", "all-linear") else tuple(t for t in text.split(",") if t)


def _peak_rss_bytes():
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _timed(step_fn, warmup, steps):
    t0 = time.perf_counter()
    for _ in range(warmup):
        step_fn()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step_fn()
        times.append(time.perf_counter() - t)
    return warm, times, loss


# ----------------------------------------------------------------------------- workers

def worker_ours(args):
    import jax
    import numpy as np

    from spmd_lora.config.lora_config import LoraConfig
    from spmd_lora.engine.factory import build_train_step
    from spmd_lora.engine.step import OptimizerConfig
    from spmd_lora.parallel.placement import shard_micro_batches

    m = model_dims(args.config)
    gpu = jax.default_backend() != "cpu"
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    cfg = _model_config(m)
    lora_cfg = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=_targets(args.targets))
    step = build_train_step(
        cfg, lora=lora_cfg, tp=args.tp, attention=args.attention, remat=args.remat,
        ce_chunk_tokens=args.ce_chunk_tokens, sequence_parallel=args.sequence_parallel,
        optimizer=OptimizerConfig(learning_rate=2e-4, weight_decay=0.0, max_grad_norm=None,
                                  total_steps=10 ** 6))
    mesh, opts = step.mesh, step.opts
    params = step.random_params(dtype)
    state = dict(zip(("lora", "opt"), step.init_state(jax.random.key(0))))
    rng = np.random.default_rng(0)
    shape = (1, args.batch, m["seq"])
    batches = shard_micro_batches({"tokens": rng.integers(0, m["vocab"], shape),
                                   "loss_mask": np.ones(shape, np.int32)}, mesh)
    key = jax.random.key(1)

    def one():
        state["lora"], state["opt"], metrics = step(params, state["lora"], state["opt"], batches, key)
        return float(metrics["loss"])                       # blocks until done

    warm, times, loss = _timed(one, args.warmup, args.steps)
    flops = _our_flops(cfg, opts, m["seq"], args.batch)
    return {"framework": "ours", "remat": args.remat, "attention": args.attention, **flops,
            "tp": args.tp, "sequence_parallel": args.sequence_parallel,
            "dtype": dtype, "backend": jax.default_backend(), "warmup_s": warm,
            "step_s": times, "loss": loss, "jax": jax.__version__}


def _our_flops(cfg, opts, seq, batch):
    """Useful and hardware FLOPs of our step as configured (spmd_lora.analysis.flops)."""
    from spmd_lora.analysis.flops import step_flops
    from spmd_lora.kernels.registry import choose
    kc = choose(opts.attention_impl, seq_len=seq, head_dim=cfg.head_dim)
    kw = {"attention": "causal"}
    if kc.impl == "blockwise":
        kw = {"attention": "blockwise", "block_q": kc.block_sizes.block_q,
              "block_k": kc.block_sizes.block_k}
    elif kc.impl == "xla":
        kw = {"attention": "xla"}
    _, chunks = opts.tile_counts(seq, batch)
    f = step_flops(cfg, seq, batch, lora_rank=opts.lora.rank, lora_targets=opts.lora.targets,
                   remat=opts.remat, **kw)
    return {"useful_flops": f.useful, "hardware_flops": f.hardware, "ce_chunks": chunks,
            "attention_kernel": kc.reason}


def _peft_flops(m, args):
    """PEFT: the same useful work; no remat, full logits once, SDPA's causal kernel (counted
    as the exact triangle)."""
    from spmd_lora.analysis.flops import step_flops
    f = step_flops(_model_config(m), m["seq"], args.batch, lora_rank=args.rank,
                   lora_targets=_targets(args.targets), attention="causal")
    return {"useful_flops": f.useful, "hardware_flops": f.hardware}


def _model_config(m):
    from spmd_lora.config.model_config import ModelConfig
    return ModelConfig(vocab_size=m["vocab"], hidden_size=m["hidden"],
                       intermediate_size=m["intermediate"], num_layers=m["layers"],
                       num_heads=m["heads"], num_kv_heads=m["heads"], head_dim=64,
                       max_position_embeddings=max(4096, m["seq"]))


def worker_ceiling(args):
    """The machine's matmul ceiling in this run: best of timed n^3 matmuls (JAX, the run's
    dtype: fp32 on CPU, bf16 on GPU)."""
    import jax

    from spmd_lora.analysis.flops import measure_matmul_ceiling
    gpu = jax.default_backend() != "cpu"
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    res = measure_matmul_ceiling(8192 if gpu else 2048, dtype, repeats=5)
    return {"framework": "ceiling", **res}


def worker_peft(args):
    import peft
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    m = model_dims(args.config)
    gpu = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    dev = "cuda" if gpu else "cpu"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=m["vocab"], hidden_size=m["hidden"],
                      intermediate_size=m["intermediate"], num_hidden_layers=m["layers"],
                      num_attention_heads=m["heads"], num_key_value_heads=m["heads"],
                      max_position_embeddings=max(4096, m["seq"]), use_cache=False)
    model = LlamaForCausalLM(cfg).to(device=dev, dtype=getattr(torch, dtype))
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=list(_targets(args.targets))))
    for n, p in model.named_parameters():               # LoRA params in fp32, as ours
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4,
                            weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m["vocab"], (args.batch, m["seq"]), generator=g).to(dev)

    def one():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss)
        if gpu:
            torch.cuda.synchronize()
        return loss

    warm, times, loss = _timed(one, args.warmup, args.steps)
    res = {"framework": "peft", "dtype": dtype, "backend": dev, "warmup_s": warm, "step_s": times,
           "loss": loss, "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "attn_implementation": model.config._attn_implementation,
           "torch_threads": torch.get_num_threads(), **_peft_flops(m, args)}
    if gpu:
        res["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return res


def run_worker(args):
    fn = {"ours": worker_ours, "peft": worker_peft, "ceiling": worker_ceiling}[args.worker]
    try:
        res = fn(args)
        if args.worker == "ceiling":
            print(MARK + json.dumps(res), flush=True)
            return 0
        res["median_step_s"] = statistics.median(res["step_s"])
        m = model_dims(args.config)
        res["tokens_per_s"] = args.batch * m["seq"] / res["median_step_s"]
        res["peak_rss_bytes"] = _peak_rss_bytes()
        if res["framework"] == "ours":
            try:
                import jax
                stats = jax.devices()[0].memory_stats() or {}
                if "peak_bytes_in_use" in stats:
                    res["device_peak_bytes"] = stats["peak_bytes_in_use"]
            except Exception:                             # noqa: BLE001 - optional detail
                pass
    except Exception as e:                                # noqa: BLE001 - reported to the parent
        res = {"framework": args.worker, "error": f"{type(e).__name__}: {e}"[:2000],
               "peak_rss_bytes": _peak_rss_bytes()}
    print(MARK + json.dumps(res), flush=True)
    return 0


# ----------------------------------------------------------------------------- parent

def spawn(config, framework, args, remat=None, timeout=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--config", config,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--lora-targets", args.targets,
           "--lora-rank", str(args.rank), "--batch-size", str(args.batch), "--attention", args.attention,
           "--ce-chunk-tokens", str(args.ce_chunk_tokens), "--tp", str(args.tp),
           "--sequence-parallel" if args.sequence_parallel else "--no-sequence-parallel"]
    if remat:
        cmd += ["--remat", remat]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # tp host devices for ours (fake ones on CPU): not a test harness's fake-device count.
    env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split()
                                 if not f.startswith("--xla_force_host_platform_device_count")]
                                + ([f"--xla_force_host_platform_device_count={args.tp}"]
                                   if args.tp > 1 else []))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"framework": framework, "remat": remat, "error": f"timed out after {timeout} s"}
    for line in p.stdout.splitlines():
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
            res["wall_s"] = time.perf_counter() - t0
            return res
    tail = (p.stderr or p.stdout)[-1500:]
    return {"framework": framework, "remat": remat,
            "error": f"worker exited {p.returncode} without a result: {tail}"}


def _mib(n):
    return f"{n / 2 ** 20:,.0f} MiB" if n else "-"


def bench_config(config, args, log=print, ceiling=None):
    """``ceiling``: the measured matmul FLOP/s (utilisation = useful FLOP/s / ceiling)."""
    m = model_dims(config)
    log(f"== {config}: {m['layers']} layers, d={m['hidden']}, heads={m['heads']}, "
        f"F={m['intermediate']}, V={m['vocab']}, S={m['seq']}, batch {args.batch}, "
        f"LoRA r={args.rank} on {args.targets}")
    runs = []
    if "ours" in args.frameworks:
        for remat in args.remat.split(","):
            r = spawn(config, "ours", args, remat=remat, timeout=args.timeout)
            runs.append(r)
            log("  " + _line(r, ceiling))
    if "peft" in args.frameworks:
        r = spawn(config, "peft", args, timeout=args.timeout)
        runs.append(r)
        log("  " + _line(r, ceiling))
    for r in runs:
        if "error" not in r and ceiling:
            r["utilisation"] = r["useful_flops"] / r["median_step_s"] / ceiling
            r["hardware_utilisation"] = r["hardware_flops"] / r["median_step_s"] / ceiling
    ours = [r for r in runs if r["framework"] == "ours" and "error" not in r]
    theirs = next((r for r in runs if r["framework"] == "peft" and "error" not in r), None)
    best = max(ours, key=lambda r: r["tokens_per_s"]) if ours else None
    out = {"config": config, "dims": m, "runs": runs, "best_ours": best, "peft": theirs}
    if best and theirs:
        out["speed_ratio"] = best["tokens_per_s"] / theirs["tokens_per_s"]
        out["memory_ratio"] = best["peak_rss_bytes"] / theirs["peak_rss_bytes"]
        log(f"  ours (remat={best['remat']}) / PEFT: speed x{out['speed_ratio']:.2f}, "
            f"peak RSS x{out['memory_ratio']:.2f}")
    return out


def _line(r, ceiling=None):
    name = r["framework"] + (f"[remat={r['remat']}]" if r.get("remat") else "")
    if "error" in r:
        return f"{name:24s} FAILED: {r['error'][:300]}"
    util = ""
    if ceiling:
        util = (f"  useful {r['useful_flops'] / r['median_step_s'] / 1e9:6.1f} GFLOP/s = "
                f"{r['useful_flops'] / r['median_step_s'] / ceiling:5.1%} of ceiling "
                f"(hardware {r['hardware_flops'] / r['median_step_s'] / ceiling:5.1%})")
    return (f"{name:24s} {r['tokens_per_s']:9.0f} tokens/s{util}  median step "
            f"{r['median_step_s'] * 1e3:8.1f} ms  peak RSS {_mib(r['peak_rss_bytes']):>10}  "
            f"(warm-up {r['warmup_s']:.1f} s, loss {r['loss']:.3f})")


def _loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def machine_info():
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "loadavg_start": _loadavg()}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return info


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny", choices=[*CONFIGS, "all"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora-targets", dest="targets", default="all")
    ap.add_argument("--lora-rank", dest="rank", type=int, default=8)
    ap.add_argument("--batch-size", dest="batch", type=int, default=1)
    for old, dest, kind in (("--targets", "targets", str), ("--rank", "rank", int),
                            ("--batch", "batch", int)):   # names before they matched train's
        ap.add_argument(old, dest=dest, type=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--remat", default="none",
                    help="comma list of remat policies to run for ours (best is reported); "
                         "default: none, TrainConfig's default (what a user runs)")
    ap.add_argument("--ce-chunk-tokens", type=int, default=4096)
    ap.add_argument("--tp", type=int, default=1,
                    help="tensor parallelism of ours (fake host devices on CPU, sharing its cores)")
    ap.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=True,
                    help="with --tp > 1: shard activations along the sequence (default on)")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--frameworks", default="ours,peft")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    ap.add_argument("--json", default=None)
    ap.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                    help="time a large matmul first (the ceiling utilisation is measured against)")
    ap.add_argument("--worker", choices=["ours", "peft", "ceiling"], help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        if args.remat is None or "," in args.remat:
            args.remat = args.remat.split(",")[0] if args.remat else "full"
        return run_worker(args)
    configs = list(CONFIGS) if args.config == "all" else [args.config]
    info = machine_info()
    print(f"machine: {info}")
    ceiling = None
    if args.ceiling:
        c = spawn(configs[0], "ceiling", args, timeout=args.timeout)
        if "error" in c:
            print(f"matmul ceiling FAILED: {c['error'][:300]}")
        else:
            ceiling = c["flops_per_s"]
            info["matmul_ceiling"] = c
            print(f"matmul ceiling: {c['n']}^3 {c['dtype']} matmul, best of 5: "
                  f"{ceiling / 1e9:.1f} GFLOP/s (load average {info.get('loadavg_start')})")
    results = [bench_config(c, args, ceiling=ceiling) for c in configs]
    info["loadavg_end"] = _loadavg()
    print(f"load average at the end: {info['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "argv": sys.argv, "results": results}, f, indent=1)
    failed = any("error" in r for res in results for r in res["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

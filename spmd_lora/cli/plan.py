"""``spmd-lora plan``: the per-device memory plan of a LoRA train step, without weights.

The command line of :mod:`spmd_lora.analysis.plan` (which does the planning, and whose API this
module also offers under the command's name). Its flags that are ``TrainConfig`` fields take
their type, choices, help and defaults from the field table (``spmd_lora.config.fields``), as
``spmd-lora train``'s do; only ``--max-seq-len`` defaults otherwise (4096). The rest are the
plan's own (the GPU to compile for, the memory budget, the search), their help from
``spmd_lora.config.cli_flags``.
"""
from __future__ import annotations

import argparse
import sys

from ..analysis.plan import *  # noqa: F401,F403 - the planning API, under the command's name
from ..analysis.plan import (Budgets, choose_remat, ensure_host_devices, find_max_seq_len,
                             fit_offload_layers, format_bytes, parse_bytes, plan_memory,
                             print_plan, remat_label)
from .parser import OneLineErrorParser, add_cli_flag, add_field_flag
from ..analysis.buffers import format_peak
from ..analysis.plan_dpo import dpo_prompt_len, dpo_row_len, plan_dpo_memory
from ..kernels.registry import GPU_ONLY
from ..analysis.gpu_targets import (ensure_plugin_can_start, quiet_xla_warnings,
                                    require_cuda_plugin, resolve_target, target_names)
from ..config.fields import with_flag_names
from ..config.lora_config import LoraConfig
from ..config.model_config import PRESETS, resolve_model_config
from ..config.train_config import check_offload_layers
from ..errors import SpmdLoraError


def build_parser() -> argparse.ArgumentParser:
    """``spmd-lora plan``'s parser: train's flags of the fields a plan uses (help, choices and
    defaults from the field table; --max-seq-len defaults to 4096), and the plan's own."""
    ap = OneLineErrorParser(
        prog="spmd-lora plan",
        description="Per-device memory of a LoRA train step (no weights needed): compiles the "
                    "real step on abstract shapes and reads XLA's memory analysis.")
    add_field_flag(ap, "model", required=True, help_suffix=f", or a preset: {', '.join(PRESETS)}")
    for name in ("tp", "dp", "cp", "cp_impl"):
        add_field_flag(ap, name)
    add_field_flag(ap, "max_seq_len", default=4096)
    add_field_flag(ap, "batch_size", dest="batch")
    add_field_flag(ap, "grad_accum_steps", dest="micro_batches")
    for name in ("lora_rank", "lora_alpha"):
        add_field_flag(ap, name)
    add_field_flag(ap, "lora_targets", dest="targets")
    for name in ("dtype", "remat", "offload_layers", "sequence_parallel", "mlp_chunk_tokens"):
        add_field_flag(ap, name)
    add_cli_flag(ap, "--devices-per-host", type=int, default=8)
    add_field_flag(ap, "attention", help_suffix="; in a plan, auto compiles our Pallas kernel "
                                                "for a GPU (--target), blockwise on CPU")
    add_cli_flag(ap, "--target", default=None, metavar="GPU",
                 help_suffix=": " + ", ".join(target_names()))
    add_cli_flag(ap, "--hosts", type=int, default=1)
    add_cli_flag(ap, "--autotune-results", default=None, metavar="FILE")
    for old, dest, kind in (("--batch", "batch", int), ("--micro-batches", "micro_batches", int),
                            ("--targets", "targets", str)):   # names before they matched train's
        ap.add_argument(old, dest=dest, type=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for name in ("ce_chunk_tokens", "base_quant"):
        add_field_flag(ap, name)
    add_cli_flag(ap, "--device-memory", type=parse_bytes, default=None)
    add_field_flag(ap, "host_memory", type=parse_bytes, default=None)
    add_cli_flag(ap, "--usable-fraction", type=float, default=0.9)
    add_cli_flag(ap, "--gpu-estimate", action="store_true")
    add_cli_flag(ap, "--find-max-seq-len", action="store_true")
    add_cli_flag(ap, "--buffers", type=int, default=0, metavar="N")
    add_cli_flag(ap, "--json", default=None)
    add_field_flag(ap, "objective")
    add_field_flag(ap, "dpo_layout")
    add_cli_flag(ap, "--completion-len", type=int, default=512, metavar="N")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``spmd-lora plan``: print the per-device breakdown and whether it fits. Returns 0, or
    1 when it does not fit, 2 on a usage/config error."""
    args = build_parser().parse_args(argv)
    if args.target is None:
        ensure_host_devices(args.tp * args.dp * args.cp)
    else:
        ensure_plugin_can_start()
        quiet_xla_warnings()
    import json

    try:
        cfg = resolve_model_config(args.model)
        cfg.check_tp(args.tp)
        if args.cp < 1:
            raise SpmdLoraError(f"--cp must be >= 1, got {args.cp}")
        lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, targets=args.targets)
        if args.target is not None:
            gpu = resolve_target(args.target)
            require_cuda_plugin()
            if args.device_memory is None:
                args.device_memory = gpu.memory_bytes
        elif args.attention in GPU_ONLY:
            raise SpmdLoraError(f"--attention {args.attention} runs on CUDA GPUs only: plan it "
                                f"for one with --target (e.g. --target h100), or use attention "
                                f"auto, pallas, blockwise or xla")
        elif args.hosts != 1 or args.autotune_results:
            raise SpmdLoraError("--hosts and --autotune-results need --target (a GPU to "
                                "compile for, e.g. --target h100)")
        if args.buffers < 0:
            raise SpmdLoraError(f"--buffers N: the rows to list, N >= 1; got {args.buffers}")
        if args.buffers and args.find_max_seq_len:
            raise SpmdLoraError("--buffers lists the buffers of one plan: give --max-seq-len "
                                "instead of --find-max-seq-len")
        if (args.find_max_seq_len or args.remat == "auto") and not args.device_memory:
            raise SpmdLoraError(f"{'--find-max-seq-len' if args.find_max_seq_len else '--remat auto'}"
                                f" needs --device-memory (e.g. 80GB) or --target")
        check_offload_layers(args.offload_layers, args.remat, cfg.num_layers)
        budget = int(args.device_memory * args.usable_fraction) if args.device_memory else None
        key = "peak_gpu_estimate" if args.gpu_estimate else "peak"
        budgets = Budgets(device=budget, host=args.host_memory, key=key) if budget else None
        dpo = args.objective == "dpo"
        if dpo:                    # bad DPO settings: one error line before any compile
            if args.batch % args.dp:
                raise SpmdLoraError(f"--objective dpo splits whole pairs over dp: --batch-size "
                                    f"{args.batch} (pairs) must be a multiple of --dp {args.dp}")
            if args.completion_len < 1:
                raise SpmdLoraError(f"--completion-len must be >= 1 (tokens of each answer, "
                                    f"EOS included), got {args.completion_len}")
            if not args.find_max_seq_len:
                dpo_prompt_len(args.max_seq_len, args.completion_len, args.dpo_layout)

        def plan_at(s, remat=args.remat, offload_layers=args.offload_layers):
            """The plan at rows of s tokens (objective dpo: the prompt that fills them)."""
            kw = dict(lora=lora, dtype=args.dtype, remat=remat, attention=args.attention,
                      micro_batches=args.micro_batches, ce_chunk_tokens=args.ce_chunk_tokens,
                      sequence_parallel=args.sequence_parallel,
                      mlp_chunk_tokens=args.mlp_chunk_tokens,
                      devices_per_host=args.devices_per_host, base_quant=args.base_quant,
                      cp=args.cp, cp_impl=args.cp_impl, target=args.target, hosts=args.hosts,
                      autotune_results=args.autotune_results, offload_layers=offload_layers,
                      buffers=args.buffers)
            if dpo:
                return plan_dpo_memory(
                    cfg, args.tp, args.dp, dpo_prompt_len(s, args.completion_len, args.dpo_layout),
                    completion_len=args.completion_len, layout=args.dpo_layout, pairs=args.batch,
                    **kw)
            return plan_memory(cfg, args.tp, args.dp, s, batch=args.batch, **kw)

        def line(p):
            mark = "fits" if budgets.fits(p) else "too big"
            host = (f", host {format_bytes(p['host_offload_per_host']).strip()} per host"
                    if p.get("host_offload") else "")
            est = (f"GPU estimate {format_bytes(p['peak_gpu_estimate'])}, "
                   if p["cpu_upcast_allowance"] else "")
            prompt = f"prompt={p['prompt_len']:8d} " if dpo else ""
            return (f"{prompt}S={p['max_seq_len']:8d} {remat_label(p):32s}: peak "
                    f"{format_bytes(p['peak'])} ({est}activations+temp "
                    f"{format_bytes(p['temporaries'])}{host}, compile {p['compile_s']} s) {mark}")

        def chosen_at(s):
            """remat auto at length s: the cheapest policy that fits, or None."""
            return choose_remat(lambda remat, k: plan_at(s, remat, k), cfg.num_layers, budgets,
                                log=lambda p: print(f"  {line(p)}", flush=True))

        print(f"model {args.model}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
              f"heads {cfg.num_heads}/{cfg.num_kv_heads} kv, vocab {cfg.vocab_size}")
        print(f"settings (spmd-lora train's defaults unless given): --dtype {args.dtype} "
              f"--remat {args.remat} --lora-rank {lora.rank} --lora-targets "
              f"{','.join(lora.targets)} --batch-size {args.batch} --grad-accum-steps "
              f"{args.micro_batches} --attention {args.attention}"
              + (f" --target {args.target}" + (f" --hosts {args.hosts}" if args.hosts > 1 else "")
                 if args.target else "")
              + (f" --host-memory {format_bytes(args.host_memory).strip()}"
                 if args.host_memory is not None else "")
              + (f" --objective dpo --dpo-layout {args.dpo_layout} --completion-len "
                 f"{args.completion_len} (--batch-size counts pairs)" if dpo else ""))
        host_budget = args.host_memory
        if not args.find_max_seq_len:
            if args.remat == "auto":
                p = chosen_at(args.max_seq_len)
                if p is None:
                    print(f"remat auto: no policy fits max_seq_len={args.max_seq_len}")
                    return 1
                print(f"remat auto chose: --remat {remat_label(p)} (the fewest recomputed "
                      f"FLOPs that fit)")
            else:
                p = plan_at(args.max_seq_len)
            print_plan(p, budget, key=key, host_budget=host_budget)
            if p.get("buffers"):
                print("\n".join(format_peak(p["buffers"])))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(p, f, indent=1)
            return 0 if budgets is None or budgets.fits(p) else 1

        # objective dpo searches the prompt length n, on rows of its pair (row_of(n) tokens)
        row_of = ((lambda n: dpo_row_len(n, args.completion_len, args.dpo_layout)) if dpo
                  else (lambda n: n))
        if args.remat == "auto":   # the longest length any policy fits: the leanest one's
            search_at = lambda n: fit_offload_layers(  # noqa: E731
                lambda remat, k: plan_at(row_of(n), remat, k), "offload-input", cfg.num_layers,
                budgets)
        else:
            search_at = lambda n: plan_at(row_of(n))  # noqa: E731
        best, tried = find_max_seq_len(search_at, budgets.fits,
                                       log=lambda s, p: print(f"  {line(p)}", flush=True))
        what = "prompt" if dpo else "max_seq_len"
        within = (f"within {format_bytes(budget)} per device"
                  + (f" and {format_bytes(host_budget).strip()} of host memory per host"
                     if host_budget is not None else ""))
        if best is None:
            print(f"no {what} >= 1024 fits {within}")
        else:
            result = tried[best]
            if args.remat == "auto":
                print(f"remat auto at {what} {best}: the cheapest policy that fits")
                result = chosen_at(row_of(best)) or result
            if dpo:
                print(f"longest prompt: {best} tokens (multiple of 1024, within 1 %) with two "
                      f"answers of {args.completion_len} tokens, layout {args.dpo_layout} "
                      f"(--max-seq-len {row_of(best)}), {within}, remat {remat_label(result)}")
            else:
                print(f"longest trainable max_seq_len: {best} (multiple of 1024, within 1 %) "
                      f"{within}, remat {remat_label(result)}")
            print_plan(result, budget, key=key, host_budget=host_budget)
            tried[best] = result
        if args.json:
            found = {"max_seq_len": best}
            if dpo:
                found = {"max_seq_len": best and row_of(best), "max_prompt_len": best,
                         "dpo_layout": args.dpo_layout, "completion_len": args.completion_len}
            with open(args.json, "w") as f:
                json.dump({**found, "budget": budget, "host_budget": host_budget,
                           "plans": {str(k): v for k, v in sorted(tried.items())}}, f, indent=1)
        return 0 if best else 1
    except SpmdLoraError as e:
        print(f"error: {with_flag_names(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Collective census (and optional per-collective timing) of the real LoRA train step.

    python tools/profile.py --model llama2-7b --tp 4 --max-seq-len 4096 --lora-rank 16 \
        --lora-targets all --dtype bfloat16 --json census.json [--time]

The command line of ``spmd_lora.analysis.profile``, where what it does is described (census,
``--time``, ``--trace``, ``--target``) and done.
"""
from __future__ import annotations

import argparse
import os
import sys

# Run as a script, this folder is sys.path[0], where this file would shadow the standard
# library's `profile` (imported by cProfile, e.g. through transformers): drop it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def build_parser():
    from spmd_lora.config.train_config import DEFAULT_MLP_CHUNK_TOKENS  # jax backends start later, lazily
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model dir (config.json) or preset")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1,
                    help="context-parallel degree (the sequence split over cp devices)")
    ap.add_argument("--cp-impl", default="ring", choices=["ring", "allgather"])
    ap.add_argument("--max-seq-len", type=int, required=True)
    ap.add_argument("--batch-size", dest="batch", type=int, default=1,
                    help="global rows per micro-batch")
    ap.add_argument("--grad-accum-steps", dest="micro_batches", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-targets", dest="targets", default="all")
    for old, dest, kind in (("--batch", "batch", int), ("--micro-batches", "micro_batches", int),
                            ("--targets", "targets", str)):   # names before they matched train's
        ap.add_argument(old, dest=dest, type=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--remat", default="full", choices=["none", "full", "save-dots", "offload"])
    ap.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=True,
                    help="shard activations along the sequence over tp (default on)")
    ap.add_argument("--mlp-chunk-tokens", type=int, default=DEFAULT_MLP_CHUNK_TOKENS,
                    help="tile the MLP above this many tokens; 0 = never (default %(default)s)")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--ce-chunk-tokens", type=int, default=4096)
    ap.add_argument("--base-quant", default="none", choices=["none", "int8", "nf4"],
                    help="quantised frozen base linears (QLoRA); default %(default)s")
    ap.add_argument("--target", default=None, metavar="GPU",
                    help="compile for this GPU without one and add the kernel table (needs "
                         "the CUDA plugin: pip install -e \".[cuda12]\")")
    ap.add_argument("--hosts", type=int, default=1, help="with --target: hosts (default 1)")
    ap.add_argument("--autotune-results", default=None, metavar="FILE",
                    help="with --target: XLA autotune results dumped on a real GPU")
    ap.add_argument("--json", default=None, help="write census, totals and timings here")
    ap.add_argument("--time", action="store_true", help="time each distinct collective")
    ap.add_argument("--time-iters", type=int, default=5)
    ap.add_argument("--time-max-bytes", type=float, default=2 ** 30,
                    help="skip timing shapes whose arrays (all devices together) exceed this")
    ap.add_argument("--trace", default=None, metavar="DIR",
                    help="record a jax.profiler trace of --trace-steps real steps (random "
                         "weights; meant for GPUs) into DIR")
    ap.add_argument("--trace-steps", type=int, default=3)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from spmd_lora.analysis.profile import run      # sets up the devices before JAX starts
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

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
    """The tool's parser: train's flags of the fields a census uses (help and choices from the
    field table; a GPU run's defaults --dtype bfloat16 --remat full --lora-targets all, and a
    required --max-seq-len), and the tool's own flags (help from spmd_lora.config.cli_flags)."""
    from spmd_lora.analysis.gpu_targets import target_names    # jax backends start later, lazily
    from spmd_lora.cli.parser import OneLineErrorParser, add_cli_flag, add_field_flag
    from spmd_lora.config.model_config import PRESETS
    ap = OneLineErrorParser(prog="tools/profile.py", description=__doc__.split("\n\n")[0])
    add_field_flag(ap, "model", required=True, help_suffix=f", or a preset: {', '.join(PRESETS)}")
    for name in ("tp", "dp", "cp", "cp_impl"):
        add_field_flag(ap, name)
    add_field_flag(ap, "max_seq_len", default=None, required=True)
    add_field_flag(ap, "batch_size", dest="batch")
    add_field_flag(ap, "grad_accum_steps", dest="micro_batches")
    add_field_flag(ap, "lora_rank")
    add_field_flag(ap, "lora_targets", dest="targets", default="all")
    for old, dest, kind in (("--batch", "batch", int), ("--micro-batches", "micro_batches", int),
                            ("--targets", "targets", str)):   # names before they matched train's
        ap.add_argument(old, dest=dest, type=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add_field_flag(ap, "dtype", default="bfloat16")
    add_field_flag(ap, "remat", default="full")
    for name in ("sequence_parallel", "mlp_chunk_tokens", "attention", "ce_chunk_tokens",
                 "base_quant"):
        add_field_flag(ap, name)
    add_cli_flag(ap, "--target", default=None, metavar="GPU",
                 help_suffix="; adds the kernel table: " + ", ".join(target_names()))
    add_cli_flag(ap, "--hosts", type=int, default=1)
    add_cli_flag(ap, "--autotune-results", default=None, metavar="FILE")
    add_cli_flag(ap, "--json", default=None)
    add_cli_flag(ap, "--time", action="store_true")
    add_cli_flag(ap, "--time-iters", type=int, default=5)
    add_cli_flag(ap, "--time-max-bytes", type=float, default=2 ** 30)
    add_cli_flag(ap, "--trace", default=None, metavar="DIR")
    add_cli_flag(ap, "--trace-steps", type=int, default=3)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from spmd_lora.analysis.profile import run      # sets up the devices before JAX starts
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

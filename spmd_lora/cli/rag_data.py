"""``spmd-lora rag-data``: RAFT-style RAG training rows from a passage collection and QA rows
(:mod:`spmd_lora.data.rag_build`); prints a one-line JSON summary."""
from __future__ import annotations

import json

from .parser import add_cli_flag


def add_parser(sub) -> None:
    """Register the ``rag-data`` subcommand on ``sub`` (argparse subparsers)."""
    p = sub.add_parser("rag-data", help="build RAFT-style RAG training data (oracle + "
                                        "distractor passages) from passages and QA rows")
    add_cli_flag(p, "--passages", required=True, metavar="FILE|DIR")
    add_cli_flag(p, "--qa", required=True, metavar="FILE")
    add_cli_flag(p, "--output", required=True, metavar="FILE")
    add_cli_flag(p, "--distractors", type=int, default=3, metavar="K")
    add_cli_flag(p, "--hard-distractors", action="store_true")
    add_cli_flag(p, "--oracle-prob", type=float, default=0.8, metavar="P")
    add_cli_flag(p, "--seed", type=int, default=0)
    add_cli_flag(p, "--eval-fraction", type=float, default=0.0, metavar="F")
    add_cli_flag(p, "--chunk-tokens", type=int, default=None, metavar="N")
    add_cli_flag(p, "--model", default=None, metavar="DIR")
    add_cli_flag(p, "--overwrite", action="store_true")
    p.set_defaults(func=cmd_rag_data)


def cmd_rag_data(args) -> int:
    """Build the rows; returns the exit status (errors raise, ``_guard`` prints them)."""
    from ..data.rag_build import build_rag_data
    from ..errors import ConfigError
    from ..tokenizer import load_tokenizer

    if args.model is not None and args.chunk_tokens is None:
        raise ConfigError("--model is only used with --chunk-tokens (a --passages directory); "
                          "drop it or add --chunk-tokens N")
    tok = load_tokenizer(args.model) if args.model is not None else None
    summary = build_rag_data(args.passages, args.qa, args.output,
                             distractors=args.distractors, hard=args.hard_distractors,
                             oracle_prob=args.oracle_prob, seed=args.seed,
                             eval_fraction=args.eval_fraction, chunk_tokens=args.chunk_tokens,
                             tokenizer=tok, overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0

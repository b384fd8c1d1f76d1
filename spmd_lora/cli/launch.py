"""``spmd-lora launch``'s command line; the launcher itself is :mod:`spmd_lora.runtime.launch`."""
from __future__ import annotations

import argparse

from ..runtime.launch import run
from .parser import OneLineErrorParser


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="spmd-lora launch",
                           description="run a spmd-lora command as several JAX processes on "
                                       "this machine",
                           usage="spmd-lora launch --nprocs N [options] -- COMMAND [ARGS ...]")
    p.add_argument("--nprocs", type=int, required=True, help="number of processes")
    p.add_argument("--devices-per-process", type=int, default=None,
                   help="CPU: devices each process gets (default 1); GPU: local GPUs per "
                        "process (default: all GPUs split evenly)")
    p.add_argument("--port", type=int, default=0,
                   help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--grace", type=float, default=3.0,
                   help="seconds between SIGTERM and SIGKILL when the launcher is stopped "
                        "(default: %(default)s)")
    p.add_argument("--peer-timeout", type=float, default=None,
                   help="seconds without a peer's heartbeat before the others stop "
                        "($SPMD_LORA_PEER_TIMEOUT, default 60)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="the spmd-lora command and its flags, after --")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return run(args.command, args.nprocs, args.devices_per_process, args.port, args.grace,
               args.peer_timeout)

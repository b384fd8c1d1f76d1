"""Time ``spmd-lora export --format gguf`` / ``gguf-lora`` on a random Llama (issue 27).

Builds a random float32 Llama of the given size (``spmd_lora.tiny.build_tiny_llama``, with the
bundled sentencepiece tokenizer) and a rank-16 PEFT adapter on all seven projections in a temp
dir, then runs each export as a child process (``python -m spmd_lora export ...``) and prints
one JSON line per export: wall time, peak RSS of that child (``ru_maxrss`` from ``os.wait4``;
the model is built in another child, so this process stays small: a forked child's maxrss
starts at its parent's),
the output's size, and the largest single tensor of the base (the streamed writer holds about
one merged tensor at a time, so peak RSS should grow with it, not with the model).

    python tools/bench_gguf_export.py --hidden 1024 --layers 12 --intermediate 2816
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_child(argv: list[str]) -> dict:
    """Run ``python -m spmd_lora *argv``; its wall time (s) and peak RSS (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "spmd_lora", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export failed: {' '.join(argv)}\n{err}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def build(d: Path, args) -> None:
    """The random model (``d/model``) and a rank-16 adapter on all projections (``d/adapter``)."""
    import jax

    from spmd_lora.config.lora_config import LoraConfig
    from spmd_lora.config.model_config import ModelConfig
    from spmd_lora.tiny import build_tiny_llama
    from spmd_lora.weights.lora import init_lora
    from spmd_lora.weights.peft import save_adapter

    model = build_tiny_llama(d / "model", hidden_size=args.hidden,
                             intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                             vocab_size=args.vocab)
    lcfg = LoraConfig(rank=16, alpha=32.0, targets="all")
    save_adapter(d / "adapter", init_lora(ModelConfig.from_pretrained(model), lcfg,
                                          jax.random.key(0)), lcfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--build-into", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_into:
        return build(Path(args.build_into), args)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--build-into", str(d)],
                       check=True)
        model = d / "model"
        params = sum(f.stat().st_size for f in model.glob("*.safetensors")) // 4
        largest = max(args.vocab * args.hidden, args.hidden * args.intermediate) * 4
        print(json.dumps({"model": {"params": params, "hidden": args.hidden,
                                    "layers": args.layers, "vocab": args.vocab,
                                    "largest_tensor_mib": round(largest / 2**20, 1)}}))
        adapter = ["--adapter", str(d / "adapter")]
        runs = [("gguf", t, adapter) for t in ("f32", "f16", "q8_0")]
        runs += [("gguf", "f16", []), ("gguf-lora", "f32", adapter)]
        for fmt, outtype, extra in runs:
            out = d / f"{fmt}-{outtype}.gguf"
            res = run_child(["export", "--format", fmt, "--outtype", outtype, "--model",
                             str(model), *extra, "--output", str(out)])
            print(json.dumps({"format": fmt, "outtype": outtype, "merged": bool(extra), **res,
                              "file_mib": round(out.stat().st_size / 2**20, 1)}), flush=True)
            out.unlink()


if __name__ == "__main__":
    main()

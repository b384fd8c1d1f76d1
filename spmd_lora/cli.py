"""``spmd-lora train | eval | export | generate | demo | plan`` (also ``python -m spmd_lora``).

User mistakes (bad paths, malformed data, impossible configs, NaN loss) print one clear
``error:`` line and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from . import data
from .errors import SpmdLoraError

DEMO_DIR = "spmd_lora_demo"


def _ensure_host_devices(n: int) -> None:
    """Give the CPU backend n fake devices (no effect on GPU runs). JAX reads XLA_FLAGS when
    its backend starts, which is after this (backends start lazily)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _add_train_flags(parser: argparse.ArgumentParser, skip=()) -> None:
    from .train import TrainConfig
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        required = field.default is dataclasses.MISSING
        hint = hints[field.name]
        if field.name == "output_dir":
            parser.add_argument(flag, "--output", dest="output_dir", required=True)
        elif hint is bool:
            parser.add_argument(flag, action="store_true", default=field.default)
        elif field.name == "lora_targets":
            parser.add_argument(flag, default=",".join(field.default),
                                help="comma-separated projections or 'all' (default %(default)s)")
        else:
            kind = {int: int, float: float, str: str}.get(hint, int if "int" in str(hint) else str)
            parser.add_argument(flag, type=kind, required=required,
                                default=None if required else field.default,
                                help=None if required else "default %(default)s")


def _train_config(args, **overrides):
    from .train import TrainConfig
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if hasattr(args, f.name)}
    return TrainConfig(**{**values, **overrides})


def cmd_train(args) -> int:
    from .train import train
    result = train(_train_config(args))
    print(json.dumps(result))
    return 0


def cmd_demo(args) -> int:
    """The embedded default: a tiny Llama + tokenizer built on the spot, the bundled Alpaca
    sample, tp=2 on (fake) devices."""
    from pathlib import Path

    from .tiny import asset_path, build_tiny_llama
    from .train import train

    out = Path(args.output)
    model_dir = out / "tiny_llama"
    if not (model_dir / "config.json").exists():
        build_tiny_llama(model_dir)
    cfg = _train_config(
        args, model=str(model_dir), data=str(asset_path("alpaca_sample.jsonl")),
        output_dir=str(out / "run"), template="alpaca")
    if not args.resume and (out / "run").exists():
        import shutil
        shutil.rmtree(out / "run")
    result = train(cfg)
    print(json.dumps(result))
    print(f"demo done: adapter in {out / 'run' / 'adapter'}, loss curve in "
          f"{out / 'run' / 'metrics.jsonl'}")
    return 0


def cmd_eval(args) -> int:
    from .api import load_model
    from .evaluate import evaluate
    from .tokenizer import load_tokenizer
    model = load_model(args.model, tp=args.tp, dp=args.dp, dtype=args.dtype, adapter=args.adapter,
                       base_quant=args.base_quant)
    tokenizer = load_tokenizer(args.model)
    examples = data.tokenize_records(data.load_records(args.data), tokenizer, args.template,
                                     args.max_seq_len, train_on_inputs=args.train_on_inputs)
    print(json.dumps(evaluate(model, examples, batch_size=args.batch_size)))
    return 0


def cmd_export(args) -> int:
    from .export import export_merged
    path = export_merged(args.model, args.adapter, args.output, overwrite=args.overwrite,
                         base_quant=args.base_quant)
    into = "" if args.base_quant == "none" else f" (merged into the {args.base_quant}-dequantised base)"
    print(f"merged checkpoint written to {path}{into}")
    return 0


def cmd_generate(args) -> int:
    from .api import load_model
    from .generate import generate_text
    from .tokenizer import load_tokenizer
    model = load_model(args.model, tp=args.tp, dp=args.dp, dtype=args.dtype, adapter=args.adapter,
                       base_quant=args.base_quant)
    tokenizer = load_tokenizer(args.model)
    outputs = generate_text(model, tokenizer, args.prompt, template=args.template,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for prompt, text in zip(args.prompt, outputs):
        print(json.dumps({"prompt": prompt, "completion": text}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spmd-lora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune LoRA adapters")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="train a tiny built-in Llama on the bundled Alpaca sample")
    p.add_argument("--output", default=DEMO_DIR, help="default %(default)s")
    _add_train_flags(p, skip=("model", "data", "output_dir", "template"))
    p.set_defaults(func=cmd_demo, tp=2, max_seq_len=256, lora_rank=8, lora_targets="all",
                   learning_rate=1e-2, batch_size=4, epochs=5, lora_dropout=0.0, warmup_steps=2,
                   eval_fraction=0.1)

    def model_flags(p, adapter=True):
        p.add_argument("--model", required=True)
        if adapter:
            p.add_argument("--adapter", default=None)
        p.add_argument("--tp", type=int, default=1)
        p.add_argument("--dp", type=int, default=1)
        p.add_argument("--dtype", default="float32")
        base_quant_flag(p)

    def base_quant_flag(p):
        p.add_argument("--base-quant", default="none", choices=["none", "int8", "nf4"],
                       help="quantise the frozen base linears (QLoRA); default %(default)s")

    p = sub.add_parser("eval", help="mean token loss / perplexity of a dataset")
    model_flags(p)
    p.add_argument("--data", required=True)
    p.add_argument("--template", default="auto")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--train-on-inputs", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="merge an adapter into a HF checkpoint")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    base_quant_flag(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="sample from the model (+ adapter)")
    model_flags(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--template", default=None, help="alpaca | rag: wrap the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plan", help="per-device memory plan (no weights needed)", add_help=False)
    p.set_defaults(func=None)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        _ensure_host_devices(8)
        from .plan import main as plan_main
        return _guard(lambda: plan_main(argv[1:]))
    args = build_parser().parse_args(argv)
    if args.command in ("train", "eval", "generate"):
        from .mesh import initialize_distributed
        initialize_distributed()
    _ensure_host_devices(max(8, getattr(args, "tp", 1) * getattr(args, "dp", 1)))
    return _guard(lambda: args.func(args))


def _guard(fn) -> int:
    try:
        return fn()
    except SpmdLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``spmd-lora train | eval | export | generate | demo | plan | plot | dashboard | rag-data | launch`` (also ``python -m spmd_lora``).

User mistakes (bad paths, malformed data, impossible configs, NaN loss) print one clear
``error:`` line and exit with status 2; no traceback. In a multi-process run (``spmd-lora
launch``, or several hosts) train / eval / generate print their results on process 0 only,
and a process that fails exits at once and tells its peers (``spmd_lora.runtime.distributed``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings

import jax

from .. import data
from .parser import OneLineErrorParser, add_cli_flag, add_field_flag
from ..errors import ConfigError, SpmdLoraError
from ..api import load_model
from ..config.cli_flags import MANY_CPU_DEVICES
from ..config.fields import flag, with_flag_names
from ..config.files import ConfigFileError, read_config_file
from ..config.train_config import TrainConfig, check_preference_settings
from ..dashboard.server import serve
from ..engine.generate import generate_text
from ..engine.factory import preference_loss
from ..evaluate import evaluate, evaluate_preference
from ..data.templates import resolve_template
from ..rag_eval import (EVAL_MAX_NEW_TOKENS, check_eval_generate, evaluate_generation,
                        records_of_examples)
from ..paths import check_writable_dir, ensure_writable_dir
from ..export import export_merged
from ..gguf_export import OUTTYPES, export_gguf, export_gguf_lora
from ..plots import write_loss_plot
from ..reporting import read_metrics
from ..runtime.distributed import await_watchdog, finish, initialize_distributed, stand_down
from ..tiny import asset_path, build_tiny_llama
from ..tokenizer import load_tokenizer
from ..train import train
from .launch import main as launch_main
from .plan import main as plan_main
from .rag_data import add_parser as add_rag_data_parser

DEMO_DIR = "spmd_lora_demo"


def _ensure_host_devices(n: int) -> bool:
    """Give the CPU backend n fake devices (no effect on GPU runs), unless XLA_FLAGS already
    names a count (the user's, kept as it is). JAX reads XLA_FLAGS when its backend starts,
    which is after this (backends start lazily). Returns whether it set the count."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    return True


def _mesh_degrees(args) -> dict[str, int]:
    """tp, dp and cp of the run: the flags, and for ``train`` the --config file's values of
    those not given as flags."""
    degrees = {name: getattr(args, name, 1) for name in ("tp", "dp", "cp")}
    if getattr(args, "file_values", None):
        degrees.update({name: args.file_values[name] for name in degrees
                        if name in args.file_values and name not in args.given})
    return degrees


def _run_on_mesh(args, set_devices: bool) -> int:
    """Run train / eval / generate / demo, whose mesh is tp x dp x cp devices. With
    ``set_devices`` (one process, before JAX's backend starts) the CPU backend gets the
    devices first (at least 8), more than MANY_CPU_DEVICES only with --allow-many-cpu-devices
    (the check follows once the backend shows whether this is a CPU run)."""
    if args.command == "train":
        args.file_values = read_config_file(args.config) if args.config else None
    degrees = _mesh_degrees(args)
    n = math.prod(degrees.values())
    allowed = n <= MANY_CPU_DEVICES or args.allow_many_cpu_devices
    chosen_here = set_devices and _ensure_host_devices(max(8, n) if allowed else 8)
    if n > 1 and min(degrees.values()) >= 1:           # else one device, or TrainConfig's error
        _say_simulated_devices(degrees, refuse=chosen_here and not allowed)
    return args.func(args)


def _say_simulated_devices(degrees: dict[str, int], refuse: bool) -> None:
    """On CPU, say in one ``note:`` line (process 0) how many simulated devices the mesh of
    these degrees uses, or with ``refuse`` raise the error that asks for
    --allow-many-cpu-devices. Starts JAX's backend: call it after the device count is set."""
    if jax.devices()[0].platform != "cpu":
        return
    n = math.prod(degrees.values())
    shape = " x ".join(f"{k}={v}" for k, v in degrees.items() if v > 1)
    if refuse:
        raise ConfigError(f"the mesh ({shape}) needs {n} devices, which a CPU run simulates on "
                          f"this machine's {_cores()} cores (slow): pass --allow-many-cpu-devices "
                          f"to run more than {MANY_CPU_DEVICES} anyway, or run on GPUs")
    procs = jax.process_count()
    if jax.process_index() == 0:
        print(f"note: CPU run: the mesh uses {n} simulated devices ({shape})"
              + (f" in {procs} processes" if procs > 1 else "")
              + f" on {_cores()} cores; a GPU run uses real ones", file=sys.stderr)


def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _add_train_flags(parser: argparse.ArgumentParser, skip=()) -> None:
    """One flag per TrainConfig field, its help and choices from the field table."""
    for field in dataclasses.fields(TrainConfig):
        if field.name not in skip:
            add_field_flag(parser, field.name)


def _train_config(args, file_values=None, given=None, **overrides):
    """TrainConfig from the flags; with a config file, its values under the flags ``given``
    on the command line (defaults of the flags not given do not override the file)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if hasattr(args, f.name)}
    if file_values is not None:
        values = {**values, **file_values, **{k: v for k, v in values.items() if k in given}}
    values.update(overrides)
    missing = [f.name for f in dataclasses.fields(TrainConfig)
               if f.default is dataclasses.MISSING and values.get(f.name) is None]
    if missing:
        raise ConfigError(f"{flag(missing[0])} is required (or set {missing[0]}: in the "
                          f"--config file)")
    return TrainConfig(**values)


def _given_flags(argv) -> set[str]:
    """The TrainConfig fields set by flags on a ``train`` command line."""
    p = OneLineErrorParser(add_help=False)
    _add_train_flags(p)
    p.add_argument("--config")
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_known_args(argv)[0]))


def cmd_train(args) -> int:
    result = train(_train_config(args, args.file_values, args.given))
    _print_main(json.dumps(result))
    return 0


def cmd_demo(args) -> int:
    """The embedded default: a tiny Llama + tokenizer built on the spot, the bundled Alpaca
    sample, tp=2 on (fake) devices. A previous demo run is never deleted silently.

    ``--output`` is created and checked writable before anything else. ``--output/tiny_llama``
    appears whole or not at all (``build_tiny_llama``); a complete one is a cache that every
    later demo in the same ``--output`` reuses, so it stays when training fails. A
    ``tiny_llama`` without ``config.json`` (an older version's interrupted build) is refused,
    not trained on."""
    import shutil
    from pathlib import Path


    out = Path(args.output)
    model_dir = out / "tiny_llama"
    run = out / "run"
    cfg = _train_config(args, model=str(model_dir), data=str(asset_path("alpaca_sample.jsonl")),
                        output_dir=str(run), template="alpaca")
    if run.exists() and not args.resume:
        if not args.overwrite:
            raise ConfigError(f"{run} holds a previous demo run: pass --resume to continue it, "
                              f"--overwrite to replace it, or --output DIR for a new one")
    if model_dir.exists() and not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} is not a complete tiny model (no config.json); remove "
                          f"it, or pass --output DIR for a new demo")
    ensure_writable_dir(out, "--output")
    if run.exists() and not args.resume:
        shutil.rmtree(run)
    if not model_dir.exists():
        build_tiny_llama(model_dir)
    result = train(cfg)
    print(json.dumps(result))
    before = [m["eval_loss"] for m in read_metrics(run) if m.get("step") == 0 and "eval_loss" in m]
    if before and "eval_loss" in result:
        print(f"eval loss {before[0]:.3f} -> {result['eval_loss']:.3f} (held-out "
              f"{cfg.eval_fraction:.0%} of the sample, before -> after training)")
    plot = run / "loss.png"
    print(f"demo done: adapter in {run / 'adapter'}, metrics in {run / 'metrics.jsonl'}"
          + (f", loss plot in {plot}" if plot.exists() else ""))
    print(f"see it: spmd-lora dashboard {run}")
    return 0


def cmd_plot(args) -> int:
    output = args.output if len(args.run_dir) == 1 else None
    if output is not None:
        check_writable_dir(os.path.dirname(os.path.abspath(output)), "--output's directory")
    for run_dir in args.run_dir:
        path = write_loss_plot(run_dir, output)
        if path is not None:
            print(f"wrote {path}")
    return 0


def cmd_dashboard(args) -> int:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 1..65535 (0 picks a free one), got {args.port}")
    return serve(args.run_dir, host=args.host, port=args.port, new_runs_dir=args.new_runs_dir)


def cmd_eval(args) -> int:
    """Loss / perplexity of ``--data``; with ``--generate N`` (rag) also the generated answers'
    metrics of its first N examples, as training's ``--eval-generate`` computes them. With
    ``--objective dpo``: :func:`_eval_preference`."""
    if args.objective == "dpo":
        return _eval_preference(args)
    check_eval_generate(args.generate, "rag", flag="--generate")        # >= 0
    records = None
    if args.generate:
        if args.cp > 1:
            raise ConfigError(f"--generate needs --cp 1 (generation holds whole sequences), got "
                              f"--cp {args.cp}")
        records = data.load_records(args.data)
        check_eval_generate(args.generate, resolve_template(args.template, records),
                            flag="--generate")
    model = _eval_model(args)
    tokenizer = load_tokenizer(args.model)
    examples = data.tokenize_records(data.load_records(args.data), tokenizer, args.template,
                                     args.max_seq_len, train_on_inputs=args.train_on_inputs,
                                     chat_template=args.chat_template)
    result = evaluate(model, examples, batch_size=args.batch_size)
    if records is not None:
        chosen = records_of_examples(args.data, range(min(args.generate, len(examples))),
                                     tokenizer, args.max_seq_len, args.train_on_inputs,
                                     args.chat_template)
        metrics, samples = evaluate_generation(model, tokenizer, chosen,
                                               max_new_tokens=args.max_new_tokens,
                                               max_prompt_tokens=args.max_seq_len,
                                               chat_template=args.chat_template)
        result.update(metrics, samples=samples)
    _print_main(json.dumps(result))
    return 0


def _eval_model(args):
    """The model ``eval`` scores: the base and ``--adapter`` on the flags' mesh and layout."""
    return load_model(args.model, tp=args.tp, dp=args.dp, dtype=args.dtype, adapter=args.adapter,
                      sequence_parallel=args.sequence_parallel,
                      mlp_chunk_tokens=args.mlp_chunk_tokens,
                      base_quant=args.base_quant, cp=args.cp, cp_impl=args.cp_impl)


def _eval_preference(args) -> int:
    """``eval --objective dpo``: the DPO loss and TRL's metrics (``rewards/*``, ``logps/*``,
    means over pairs) of ``--data``'s preference pairs, policy = the base + ``--adapter``,
    reference = the base: training's held-out evaluation (:func:`evaluate_preference`), on a
    file. Pairs too long for ``--max-seq-len`` are skipped with a warning, as in training."""
    check_preference_settings(args.beta, args.loss_type, args.label_smoothing)
    for given, what in ((args.generate, "--generate (DPO scores pairs, it generates nothing)"),
                        (args.train_on_inputs, "--train-on-inputs (the loss is on the answers)"),
                        (args.template != "auto", "--template (a preference row's fields "
                                                  "choose its prompt)")):
        if given:
            raise ConfigError(f"--objective dpo takes no {what}")
    model = _eval_model(args)
    tokenizer = load_tokenizer(args.model)
    pairs = data.tokenize_pairs(data.load_records(args.data), tokenizer, args.max_seq_len,
                                args.dpo_layout == "shared-prefix", args.chat_template)
    result = evaluate_preference(model, pairs, preference_loss(args), batch_size=args.batch_size,
                                 pad_id=data.pad_token_id(tokenizer))
    _print_main(json.dumps(result))
    return 0


def cmd_export(args) -> int:
    """``--format hf`` (merged safetensors), ``gguf`` (merged GGUF) or ``gguf-lora``."""
    if args.outtype is not None and args.format == "hf":
        raise ConfigError("--outtype applies to --format gguf and gguf-lora; an hf export keeps "
                          "the base's dtype")
    if args.adapter is None and args.format != "gguf":
        raise ConfigError(f"--adapter is required for --format {args.format}")
    quant = f"{args.base_quant}-dequantised base" if args.base_quant != "none" else ""
    if args.format == "hf":
        path = export_merged(args.model, args.adapter, args.output, overwrite=args.overwrite,
                             base_quant=args.base_quant)
        print(f"merged checkpoint written to {path}" + (f" (merged into the {quant})" if quant else ""))
    elif args.format == "gguf":
        path = export_gguf(args.model, args.adapter, args.output, outtype=args.outtype or "f16",
                           base_quant=args.base_quant, overwrite=args.overwrite)
        what = "merged model" if args.adapter else "base model"
        print(f"GGUF of the {what} written to {path} ({args.outtype or 'f16'}"
              + (f", the {quant}" if quant else "") + ")")
    else:
        path = export_gguf_lora(args.model, args.adapter, args.output,
                                outtype=args.outtype or "f32", overwrite=args.overwrite)
        print(f"GGUF LoRA adapter written to {path} ({args.outtype or 'f32'})")
        if quant:
            print(f"note: the adapter was trained on the {quant}: run it on a GGUF of that base "
                  f"(spmd-lora export --format gguf --base-quant {args.base_quant} --model "
                  f"{args.model} --output base.gguf)", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    model = load_model(args.model, tp=args.tp, dp=args.dp, dtype=args.dtype, adapter=args.adapter,
                       base_quant=args.base_quant)
    tokenizer = load_tokenizer(args.model)
    outputs = generate_text(model, tokenizer, args.prompt, template=args.template,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            chat_template=args.chat_template)
    for prompt, text in zip(args.prompt, outputs):
        _print_main(json.dumps({"prompt": prompt, "completion": text}))
    return 0


def _print_main(text: str) -> None:
    """Print on process 0 only (every process of a multi-process run has the same result)."""
    if jax.process_index() == 0:
        print(text)


def build_parser() -> argparse.ArgumentParser:
    """The ``spmd-lora`` parser: one subparser per command, every flag's help from the field
    table or the table of the other flags (``plan`` and ``launch`` have their own parsers)."""
    parser = OneLineErrorParser(prog="spmd-lora", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune LoRA adapters")
    _add_train_flags(p)
    add_cli_flag(p, "--config")
    add_cli_flag(p, "--allow-many-cpu-devices", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="train a tiny built-in Llama on the bundled Alpaca sample")
    add_cli_flag(p, "--output", default=DEMO_DIR)
    add_cli_flag(p, "--overwrite", action="store_true")
    _add_train_flags(p, skip=("model", "data", "output_dir", "template"))
    add_cli_flag(p, "--allow-many-cpu-devices", action="store_true")
    p.set_defaults(func=cmd_demo, tp=2, max_seq_len=256, lora_rank=8, lora_targets="all",
                   learning_rate=1e-2, batch_size=4, epochs=5, lora_dropout=0.0, warmup_steps=2,
                   eval_fraction=0.1, eval_every=10)

    def model_flags(p):
        add_field_flag(p, "model", required=True)
        add_cli_flag(p, "--adapter", default=None, help_suffix=" (default: none, the base model "
                                                             "alone)")
        for name in ("tp", "dp", "dtype", "base_quant"):
            add_field_flag(p, name)
        add_cli_flag(p, "--allow-many-cpu-devices", action="store_true")

    p = sub.add_parser("eval", help="mean token loss / perplexity of a dataset (objective dpo: "
                                    "the DPO loss and reward metrics of preference pairs)")
    model_flags(p)
    add_field_flag(p, "data", required=True)
    for name in ("template", "max_seq_len", "batch_size", "train_on_inputs", "sequence_parallel",
                 "mlp_chunk_tokens", "chat_template", "cp", "cp_impl", "objective", "beta",
                 "loss_type", "label_smoothing", "dpo_layout"):
        add_field_flag(p, name)
    add_cli_flag(p, "--generate", type=int, default=0)
    add_cli_flag(p, "--max-new-tokens", type=int, default=EVAL_MAX_NEW_TOKENS)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="merge an adapter into a HF checkpoint, or write "
                                             "GGUF for llama.cpp / Ollama")
    add_field_flag(p, "model", required=True)
    add_cli_flag(p, "--adapter", default=None)
    add_cli_flag(p, "--output", required=True)
    add_cli_flag(p, "--format", default="hf", choices=("hf", "gguf", "gguf-lora"))
    add_cli_flag(p, "--outtype", default=None, choices=OUTTYPES)
    add_cli_flag(p, "--overwrite", action="store_true")
    add_field_flag(p, "base_quant")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="sample from the model (+ adapter)")
    model_flags(p)
    add_cli_flag(p, "--prompt", action="append", required=True)
    add_field_flag(p, "template", default=None,
                   help_suffix="; each --prompt is wrapped in it as training does, as the "
                               "instruction (alpaca), question (rag), user turn (chat) or text "
                               "(default: the raw prompt)")
    add_cli_flag(p, "--max-new-tokens", type=int, default=64)
    add_cli_flag(p, "--temperature", type=float, default=0.0)
    add_cli_flag(p, "--top-k", type=int, default=0)
    add_cli_flag(p, "--top-p", type=float, default=1.0)
    add_field_flag(p, "seed")
    add_field_flag(p, "chat_template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plot", help="write RUN_DIR/loss.png (train and eval loss; needs matplotlib)")
    add_cli_flag(p, "run_dir", nargs="+", metavar="RUN_DIR")
    add_cli_flag(p, "--output", default=None)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("dashboard", help="live local web page of one or more runs")
    add_cli_flag(p, "run_dir", nargs="*", metavar="RUN_DIR")
    add_cli_flag(p, "--host", default="127.0.0.1", help_suffix=" (default: %(default)s, this "
                                                              "machine only)")
    add_cli_flag(p, "--port", type=int, default=8050)
    add_cli_flag(p, "--new-runs-dir", default="spmd_lora_runs")
    p.set_defaults(func=cmd_dashboard)

    add_rag_data_parser(sub)
    p = sub.add_parser("plan", help="per-device memory plan (no weights needed)", add_help=False)
    p.set_defaults(func=None)
    p = sub.add_parser("launch", add_help=False,
                       help="run train / eval / generate as several JAX processes on this "
                            "machine (spmd-lora launch --nprocs N -- train ...)")
    p.set_defaults(func=None)
    return parser


def _show_data_warnings_plainly() -> None:
    """A DataWarning (skipped or shortened rows: the user's data) prints as one ``warning:``
    line, without the internal source line Python's default format quotes."""
    shown = warnings.showwarning
    if getattr(shown, "plain_data_warnings", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, data.DataWarning):
            print(f"warning: {message}", file=file or sys.stderr)
            return
        shown(message, category, filename, lineno, file, line)
    show.plain_data_warnings = True
    warnings.showwarning = show


def main(argv=None) -> int:
    # transformers' import-time "PyTorch was not found" advice is noise here: JAX does the work.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _show_data_warnings_plainly()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        return _guard(lambda: plan_main(argv[1:]))
    if argv[:1] == ["launch"]:
        return _guard(lambda: launch_main(argv[1:]))
    args = build_parser().parse_args(argv)
    if args.command not in ("train", "eval", "generate", "demo"):   # no mesh
        return _guard(lambda: args.func(args))
    if args.command == "train":
        args.given = _given_flags(argv[1:])
    if args.command != "demo":
        multi = _guard(initialize_distributed)
        if multi not in (True, False):               # the environment was wrong: exit status
            return multi
        if multi:
            return finish(*_guard_multi(lambda: _run_on_mesh(args, set_devices=False)))
    return _guard(lambda: _run_on_mesh(args, set_devices=True))


def _guard_multi(fn) -> tuple[int, str]:
    """(exit status, its error line) of ``fn`` in a multi-process run: a user error (also an
    OSError naming a file) is ``_guard``'s one line and status 2; a bug's traceback is printed
    here, since the failed process then exits without unwinding (see finish)."""
    import traceback

    errors = []

    def own_error(text: str) -> None:
        stand_down()                             # a peer's failure no longer replaces this one
        errors.append(text)

    try:
        status = _guard(fn, own_error)
    except BaseException as e:                   # noqa: BLE001 - reported to the peers too
        await_watchdog(e)                        # a dead peer: the watchdog names it, exits
        stand_down()
        traceback.print_exc()
        return 1, f"{type(e).__name__}: {e}".splitlines()[0]
    return status, (errors[-1] if errors else "")


def _guard(fn, on_error=None) -> int:
    """``fn()``'s exit status; a user error prints one ``error:`` line (passed to
    ``on_error`` too) and returns 2. Besides SpmdLoraError, so is an OSError about a named file
    (a path that cannot be read or written: no space left, a read-only file system...): the
    path and the system's reason, no traceback. An OSError without a file name is a bug and
    propagates."""
    try:
        return fn()
    except SpmdLoraError as e:
        return _user_error(str(e) if isinstance(e, ConfigFileError) else with_flag_names(str(e)),
                           on_error)
    except OSError as e:
        if e.filename is None:
            raise
        where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        return _user_error(f"{where}: {e.strerror or e}", on_error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _user_error(text: str, on_error) -> int:
    if on_error is not None:
        on_error(text)
    sys.stderr.write(f"error: {text}\n")        # one write: no other thread's line cuts it
    sys.stderr.flush()
    return 2


if __name__ == "__main__":
    sys.exit(main())

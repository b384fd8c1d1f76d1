"""LoRA fine-tuning: ``from spmd_lora.train import train, TrainConfig``.

``train(cfg)`` loads the frozen base model sharded over a (dp, tp) mesh, reads the dataset from
the tokenized-data cache (``spmd_lora.data.cache``; built on first use), and runs the jitted
step of ``step.py`` (token-weighted gradient accumulation, AdamW on the replicated fp32 LoRA
factors only). The next batch is assembled and transferred while a step runs; a step's metrics
are read after the next step is dispatched. It writes into ``cfg.output_dir``:

* ``adapter/`` - the final adapter in PEFT format (written atomically, last);
* ``config.yaml`` - the resolved ``TrainConfig`` (``config_file.py``);
* ``metrics.jsonl`` - one JSON line per step (step, loss, lr, grad_norm, tokens, tokens_per_s;
  with ``objective="dpo"`` also TRL's rewards/chosen, rewards/rejected, rewards/accuracies,
  rewards/margins, logps/chosen, logps/rejected, means over the step's pairs)
  and per evaluation (eval_loss, eval_perplexity; with ``eval_generate`` on rag data also
  eval_em, eval_f1, eval_cite_rate, eval_citation_accuracy and their oracle splits,
  ``rag_eval.py``; with ``objective="dpo"`` eval_loss, the DPO loss over the held-out pairs,
  and eval_rewards/chosen, ..., eval_logps/rejected);
* ``eval_samples.jsonl`` - with ``eval_generate``: per evaluation its step, the generation
  metrics and a few (question, generated answer, reference) rows;
* ``checkpoints/step_N/`` - LoRA params, optimizer state, step, data position, RNG seed;
  ``resume=True`` continues from the newest complete one, ending bit-for-bit where an
  uninterrupted run would (refused when a result-changing field or the data differ).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax

from . import checkpoints, data, reporting
from .config.model_config import ModelConfig
from .config.files import check_resume_config, write_resolved_config
from .errors import ConfigError, DataError
from .health import DivergenceGuard, lora_norm
from .paths import check_writable_dir, write_text_atomic
from .config.train_config import TrainConfig
from .weights.lora import init_lora
from .engine.factory import (build_train_step, check_attention_devices, mesh_for,
                             optimizer_config, preference_loss)
from .tokenizer import load_tokenizer
from .parallel.placement import place_micro_batches, replicate
from .engine.step import lr_schedule
from .analysis.run_budget import resolve_run_memory
from .api import Model
from .evaluate import evaluate, evaluate_preference
from .rag_eval import (EVAL_MAX_NEW_TOKENS, check_eval_generate, evaluate_generation,
                       records_of_examples)
from .plots import write_loss_plot
from .weights.hf import load_hf_params
from .weights.peft import save_adapter
from .model import PREFERENCE_METRICS


class Progress:
    """A one-line progress bar on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, log_every: int, stream=None):
        self.total, self.start, self.log_every = total, start, log_every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, m: dict):
        done = step - self.start
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
        text = (f"step {step}/{self.total} loss {m['loss']:.4f} lr {m['lr']:.2e} "
                f"tok/s {m['tokens_per_s']:.0f} eta {eta:.0f}s")
        if self.tty:
            width = 24
            filled = int(width * step / max(self.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}")
            if step == self.total:
                self.stream.write("\n")
        elif step % self.log_every == 0 or step == self.total:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str):
        self.stream.write(("\n" if self.tty else "") + text + "\n")
        self.stream.flush()


def _prepare_data(cfg: TrainConfig, tokenizer):
    """(train, eval) examples memory-mapped from the tokenized-data cache, and the cache
    entry's key fields (``data_digest`` among them)."""
    examples = data.load_or_build(cfg.data, tokenizer, cfg.template, cfg.max_seq_len,
                                  cfg.train_on_inputs, cfg.chat_template, cfg.data_cache_dir,
                                  cfg.data_workers)
    train_ex, eval_ex = data.split_train_eval(examples, cfg.eval_fraction, cfg.seed)
    return train_ex, eval_ex, examples.meta


def _eval_records(cfg: TrainConfig, tokenizer, n_examples: int, template: str) -> list:
    """The raw records of the first ``eval_generate`` held-out examples (the same split as
    :func:`_prepare_data`'s: the same permutation of the example positions), or [] when
    ``eval_generate`` is 0."""
    if not cfg.eval_generate:
        return []
    check_eval_generate(cfg.eval_generate, template)
    _, eval_idx = data.split_train_eval(list(range(n_examples)), cfg.eval_fraction, cfg.seed)
    return records_of_examples(cfg.data, eval_idx[:cfg.eval_generate], tokenizer,
                               cfg.max_seq_len, cfg.train_on_inputs, cfg.chat_template)


def _check_output_dir(cfg: TrainConfig) -> Path:
    """``output_dir``, refused when it holds another run's checkpoints (without ``resume``) or
    when this process, if it is the one that writes there (process 0), cannot create or write
    it; the check leaves nothing behind."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a directory")
    if not cfg.resume and (out / "checkpoints").is_dir() and checkpoints.list_checkpoints(out / "checkpoints"):
        raise ConfigError(f"{out} already holds checkpoints of a run: pass resume=True (--resume) "
                          f"to continue it, or choose a new output_dir")
    if jax.process_index() == 0:
        check_writable_dir(out, "output_dir")
    return out


def train(cfg: TrainConfig, progress_stream=None) -> dict:
    """Fine-tune; returns the final metrics dict (also the last line of metrics.jsonl)."""

    # Validate everything before writing anything.
    model_cfg = ModelConfig.from_pretrained(cfg.model)
    model_cfg.check_tp(cfg.tp)
    lora_cfg = cfg.lora_config
    out = _check_output_dir(cfg)
    reporting.check_report_to(cfg.report_to)
    tokenizer = load_tokenizer(cfg.model)
    dpo = cfg.objective == "dpo"
    if dpo:     # preference pairs from the tokenized-data cache (spmd_lora.data.pair_cache),
        # split into train / eval pairs as SFT splits its examples (the same seed, a pair whole)
        pairs = data.load_pairs(cfg.data, tokenizer, cfg.max_seq_len,
                                cfg.dpo_layout == "shared-prefix", cfg.chat_template,
                                cfg.data_cache_dir, cfg.data_workers)
        train_ex, eval_ex = data.split_train_eval(pairs, cfg.eval_fraction, cfg.seed)
        data_meta = {"data_digest": pairs.meta["data_digest"], "template": "dpo"}
        eval_records = []
    else:
        train_ex, eval_ex, data_meta = _prepare_data(cfg, tokenizer)
        eval_records = _eval_records(cfg, tokenizer, len(train_ex) + len(eval_ex),
                                     data_meta.get("template", cfg.template))
    mesh = mesh_for(cfg)
    check_attention_devices(cfg.attention, mesh)
    notes = []
    cfg = resolve_run_memory(cfg, model_cfg, mesh, say=notes.append)
    if dpo:
        batches = data.PairBatchIterator(train_ex, batch_size=cfg.batch_size,
                                         max_seq_len=cfg.max_seq_len, pack=cfg.pack,
                                         seed=cfg.seed, pad_id=data.pad_token_id(tokenizer))
    else:
        batches = data.BatchIterator(train_ex, batch_size=cfg.batch_size,
                                     max_seq_len=cfg.max_seq_len, pack=cfg.pack, seed=cfg.seed,
                                     pad_id=data.pad_token_id(tokenizer))
    steps_per_epoch = batches.steps_per_epoch // cfg.grad_accum_steps
    if steps_per_epoch < 1 and cfg.max_steps is None:
        raise DataError(f"{cfg.data}: {batches.steps_per_epoch} batches per epoch is fewer than "
                        f"grad_accum_steps={cfg.grad_accum_steps}; lower batch_size or "
                        f"grad_accum_steps, or set max_steps")
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs

    params = load_hf_params(cfg.model, model_cfg, mesh, cfg.dtype, allow_pickle=cfg.allow_pickle,
                            base_quant=cfg.base_quant)
    opt_cfg = optimizer_config(cfg, total_steps)
    built = build_train_step(model_cfg, cfg, mesh=mesh, optimizer=opt_cfg,
                             preference=preference_loss(cfg, getattr(batches, "pairs_per_row", 1)))
    optimizer, step_fn = built.optimizer, built.step
    schedule = lr_schedule(opt_cfg)
    base_key = jax.random.key(cfg.seed)
    lora = init_lora(model_cfg, lora_cfg, jax.random.fold_in(base_key, 0))
    opt_state = optimizer.init(lora)

    start_step = 0
    ckpt_root = out / "checkpoints"
    checkpoints.remove_stale_temporaries(ckpt_root)
    found = (checkpoints.resume_checkpoint(ckpt_root, lora, opt_state, say=notes.append)
             if cfg.resume else None)
    if found:
        _, lora, opt_state, state = found
        check_resume_config(state.get("config", {}), cfg, state.get("data_digest"),
                            data_meta["data_digest"])
        start_step = state["step"]
        batches.restore(state["data"])
    lora, opt_state = replicate(lora, mesh), replicate(opt_state, mesh)

    model = Model(config=model_cfg, mesh=mesh, params=params, lora=lora, lora_config=lora_cfg,
                  attention=cfg.attention, sequence_parallel=cfg.sequence_parallel,
                  mlp_chunk_tokens=cfg.mlp_chunk_tokens, cp_impl=cfg.cp_impl)
    # With several processes (multi-host) only process 0 writes metrics, checkpoints and adapter.
    is_main = jax.process_index() == 0
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl" if is_main else Path(os.devnull)
    if is_main:
        _truncate_metrics(metrics_path, start_step)
        write_resolved_config(out, cfg)
        reporting.write_run_config(out, cfg, model_cfg, mesh, len(train_ex), len(eval_ex),
                                   total_steps)
    progress = Progress(total_steps, start_step, cfg.log_every,
                        progress_stream if is_main else open(os.devnull, "w"))
    progress.message(f"training {lora_cfg.targets} r={lora_cfg.rank} on {len(train_ex)} examples, "
                     f"{total_steps} steps, mesh dp={cfg.dp} tp={cfg.tp}"
                     + (f" cp={cfg.cp} ({cfg.cp_impl})" if cfg.cp > 1 else "")
                     + (f", resumed at step {start_step}" if start_step else ""))
    for note in notes:
        progress.message(note)
    if cfg.resume and not found:
        progress.message(f"no checkpoint in {ckpt_root}; starting from step 0")

    last = {}
    guard = DivergenceGuard()
    with _no_empty_file(metrics_path), open(metrics_path, "a") as metrics_file:
        reporter = reporting.MetricsReporter(metrics_file, out, cfg.report_to if is_main else "none")
        log = reporter.log
        samples = _SamplesFile(out / SAMPLES_FILE if is_main else None, start_step)

        def _eval(step):
            return _evaluate(model, eval_ex, cfg, tokenizer, eval_records, samples, step)

        if eval_ex and start_step == 0:
            log({"step": 0, **_eval(0)})          # the "before" of the curve

        def prepare():
            """The next step's micro-batches on the devices, their token count and the data
            position after them (host work that overlaps the running step)."""
            where = [batches.take() for _ in range(cfg.grad_accum_steps)]
            micro = place_micro_batches(batches, where, mesh)      # this process's rows only
            return micro, sum(batches.batch_tokens(*w) for w in where), batches.state()

        clock = [time.perf_counter()]

        def finish(step, m, seq_tokens):
            """Read a dispatched step's metrics (blocks until it is done), check and log them."""
            nonlocal last
            m = {k: float(v) for k, v in m.items()}
            now = time.perf_counter()
            elapsed, clock[0] = now - clock[0], now
            guard.check(step, m["loss"], m["grad_norm"], float(lora_norm(lora)),
                        lambda: str((checkpoints.list_checkpoints(ckpt_root) or ["none"])[-1]))
            last = {"step": step, "loss": m["loss"], "lr": float(schedule(step - 1)),
                    "grad_norm": m["grad_norm"], "tokens": int(m["tokens"]),
                    "tokens_per_s": seq_tokens / elapsed}
            last.update((k, m[k]) for k in ("pairs", *PREFERENCE_METRICS) if k in m)   # dpo
            peak = reporting.device_peak_bytes(mesh)
            if peak is not None:
                last["peak_bytes"] = peak
            log(last)
            progress.update(step, last)

        # Step N+1's batch is prepared and transferred while step N runs on the devices; step
        # N's metrics are read after step N+1 is dispatched (one step late), or at once when
        # step N evaluates or checkpoints.
        pending = None
        nxt = prepare() if start_step < total_steps else None
        for step in range(start_step + 1, total_steps + 1):
            micro, seq_tokens, data_state = nxt
            step_key = jax.random.fold_in(base_key, step)
            if cfg.census and is_main and step == start_step + 1:
                reporting.write_census(out, step_fn, (params, lora, opt_state, micro, step_key),
                                       mesh, lora_cfg.rank, note=progress.message)
                clock[0] = time.perf_counter()          # the census compile is not step 1's
            lora, opt_state, m = step_fn(params, lora, opt_state, micro, step_key)
            if step < total_steps:
                nxt = prepare()
            if pending is not None:
                finish(*pending)
            pending = (step, m, seq_tokens)
            do_eval = bool(eval_ex) and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps
            do_save = (cfg.save_every and step % cfg.save_every == 0) or step == total_steps
            if do_eval or do_save:
                finish(*pending)
                pending = None
            if do_eval:
                model.lora = lora
                log({"step": step, **_eval(step)})
            if do_save:
                checkpoints.save_checkpoint(ckpt_root, step, lora, opt_state,
                                            {"data": data_state, "seed": cfg.seed,
                                             "config": dataclasses.asdict(cfg),
                                             "data_digest": data_meta["data_digest"]},
                                            keep=cfg.keep_checkpoints)
        if eval_ex:
            model.lora = lora
            ev = _eval(total_steps)
            log({"step": total_steps, **ev})
            last = {**last, **ev}
        reporter.close()
    save_adapter(out / "adapter", lora, lora_cfg, base_model_path=str(cfg.model))
    progress.message(f"adapter written to {out / 'adapter'}")
    if is_main:
        write_loss_plot(out, note=progress.message)
    return last


@contextlib.contextmanager
def _no_empty_file(path: Path):
    """Remove ``path`` when the block fails before anything was written to it (a run stopped
    at its first step leaves no empty metrics.jsonl)."""
    try:
        yield
    except BaseException:
        if path != Path(os.devnull) and path.is_file() and path.stat().st_size == 0:
            path.unlink()
        raise


def _evaluate(model, examples, cfg: TrainConfig, tokenizer, records: list, samples,
              step: int) -> dict:
    """The eval metrics of the model as it is now: ``eval_loss`` / ``eval_perplexity`` over the
    held-out ``examples``; with ``records`` (``eval_generate``) also the generated answers'
    ``eval_em``, ``eval_f1``, ``eval_cite_rate``, ``eval_citation_accuracy`` and their
    oracle present / absent splits (``spmd_lora.rag_eval``), the sample table going to
    ``samples``. With objective dpo (``examples`` are preference pairs): ``eval_loss``, the
    DPO loss (mean over the held-out pairs), and TRL's metrics as TRL names them in
    evaluation, ``eval_rewards/chosen``, ..., ``eval_logps/rejected``."""
    if cfg.objective == "dpo":
        result = evaluate_preference(model, examples, preference_loss(cfg),
                                     batch_size=cfg.batch_size,
                                     pad_id=data.pad_token_id(tokenizer))
        return {"eval_loss": result["loss"],
                **{f"eval_{k}": result[k] for k in PREFERENCE_METRICS}}
    result = evaluate(model, examples, batch_size=cfg.batch_size)
    out = {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"]}
    if records:
        metrics, table = evaluate_generation(model, tokenizer, records,
                                             max_new_tokens=EVAL_MAX_NEW_TOKENS,
                                             max_prompt_tokens=cfg.max_seq_len,
                                             chat_template=cfg.chat_template)
        out.update({f"eval_{k}": v for k, v in metrics.items() if not k.startswith("n")})
        samples.add({"step": step, **metrics, "samples": table})
    return out


SAMPLES_FILE = "eval_samples.jsonl"


class _SamplesFile:
    """``eval_samples.jsonl``: one JSON line per evaluation with generation (step, metrics, the
    sample table), rewritten atomically after each; on resume the lines of steps after the
    checkpoint are dropped. ``path`` None (not process 0): nothing is written."""

    def __init__(self, path: Path | None, start_step: int):
        self.path, self.lines = path, []
        if path is not None and path.is_file():
            self.lines = [line for line in path.read_text().splitlines()
                          if line.strip() and json.loads(line).get("step", 0) <= start_step]

    def add(self, entry: dict) -> None:
        if self.path is None:
            return
        self.lines = [line for line in self.lines if json.loads(line)["step"] != entry["step"]]
        self.lines.append(json.dumps(entry))
        write_text_atomic(self.path, "".join(line + "\n" for line in self.lines))


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))

"""What each ``TrainConfig`` field means, and the values a choice-valued field accepts.

This table is the single source of the help (and choices) of every command's flag that is a
``TrainConfig`` field: ``spmd-lora train`` / ``demo`` have one flag per field, ``eval``,
``generate``, ``export``, ``plan`` and ``tools/profile.py`` the fields they use
(``spmd_lora.cli.parser.add_field_flag``; the other flags' help is in
``spmd_lora.config.cli_flags``). It is also the API documentation: a test checks that every
``TrainConfig`` field has an entry here and every entry is a field, so the flags and the API
cannot drift apart. ``CHOICES`` is checked by ``TrainConfig`` itself, so a typo such as
``attention="flash"`` fails before anything is loaded or written.
"""
from __future__ import annotations

import re
from ..errors import ConfigError

from .projections import TARGETS

#: Values accepted by the choice-valued fields (first entry of each is not necessarily the default).
CHOICES: dict[str, tuple[str, ...]] = {
    "template": ("auto", "alpaca", "rag", "text", "chat"),
    "dtype": ("float32", "bfloat16", "float16"),
    "remat": ("none", "full", "save-dots", "offload", "offload-input", "auto"),
    "attention": ("auto", "pallas", "blockwise", "xla", "cudnn", "tokamax"),
    "report_to": ("none", "tensorboard"),
    "base_quant": ("none", "int8", "nf4"),
    "cp_impl": ("ring", "allgather"),
    "objective": ("sft", "dpo"),
    "loss_type": ("sigmoid", "ipo"),
    "dpo_layout": ("shared-prefix", "separate"),
}

#: One sentence per field: what it does (units, when it applies). Defaults are added by the CLI.
FIELD_HELP: dict[str, str] = {
    "model": "HF Llama checkpoint directory (config.json, model.safetensors, tokenizer)",
    "data": "the records: a .json list, .jsonl, .parquet or .arrow file, or a HF "
            "save_to_disk directory",
    "output_dir": "run directory: adapter/, metrics.jsonl, checkpoints/, loss.png",
    "template": "record format: alpaca (instruction/input/output), rag (question/contexts/"
                "answer), text (text), chat (messages), or auto (detected from the first "
                "record)",
    "tp": "tensor-parallel degree (devices per model replica); must divide the attention heads",
    "dp": "data-parallel degree (model replicas); dp*cp*tp devices are used",
    "cp": "context-parallel degree: each sequence is split over cp devices (zig-zag chunks, "
          "ring attention); generation needs cp=1",
    "cp_impl": "how attention sees the other cp ranks' keys and values: ring (K/V blocks "
               "passed around a ring, overlapped with compute) or allgather (all-gather K/V: "
               "fewer bytes for GQA models with few kv heads)",
    "max_seq_len": "tokens per sequence; longer examples are skipped (rag: passages trimmed)",
    "lora_rank": "LoRA rank r",
    "lora_alpha": "LoRA alpha; the update is scaled by alpha/r",
    "lora_dropout": "dropout on the LoRA input during training",
    "lora_targets": f"comma-separated projections to adapt ({','.join(TARGETS)}) or 'all'",
    "use_rslora": "scale by alpha/sqrt(r) instead of alpha/r (rank-stabilised LoRA)",
    "learning_rate": "peak AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear warm-up steps before the cosine decay",
    "min_lr_ratio": "final learning rate as a fraction of the peak",
    "max_grad_norm": "clip the global gradient norm to this (0 disables clipping)",
    "batch_size": "rows per micro-batch, global (split over dp)",
    "grad_accum_steps": "micro-batches per optimizer step (weighted by their target tokens)",
    "max_steps": "optimizer steps to run; overrides epochs when set",
    "epochs": "passes over the training data",
    "seed": "seed of the data order, the train/eval split, LoRA init and dropout",
    "dtype": "base weights and compute dtype (LoRA factors and optimizer state stay float32)",
    "base_quant": "quantise the frozen base linears while loading (QLoRA): none, int8 "
                  "(per-channel absmax) or nf4 (blocks of 64, double-quantised absmax)",
    "remat": "activation recomputation per layer: none, full (least device memory without "
             "host memory), save-dots, offload (the two half-layer inputs in pinned host "
             "memory, each half recomputed on its own), offload-input (only the layer input in "
             "host memory: half of offload's, one more attention forward per layer), or auto "
             "(the cheapest that fits the device and --host-memory, chosen by compiling each)",
    "offload_layers": "with remat offload / offload-input: send the saved inputs of only the "
                      "first K layers to the host and keep the rest on the device (default: "
                      "all layers)",
    "host_memory": "pinned host memory budget per host (e.g. 1.9TB, 512GiB; binary units) for "
                   "remat offload; checked before compiling, together with this machine's "
                   "available RAM (default: the RAM only)",
    "attention": "attention kernel: auto (fastest measured on the GPU, else Pallas on GPU, "
                 "blockwise elsewhere), pallas, blockwise, xla, cudnn or tokamax",
    "pack": "pack several examples per sequence (attention never crosses examples)",
    "train_on_inputs": "the loss also covers the prompt tokens, not only the response",
    "eval_fraction": "fraction of the data held out for evaluation (0 = no eval)",
    "eval_every": "evaluate every N steps (0 = before and after training only)",
    "eval_generate": "rag only: at each evaluation also answer the first N held-out examples "
                     "by greedy generation and log their exact match, token F1 and citation "
                     "accuracy (eval_em, eval_f1, ...; samples in OUTPUT/eval_samples.jsonl; "
                     "0 = off)",
    "save_every": "write a checkpoint every N steps (0 = only at the end)",
    "keep_checkpoints": "how many of the newest checkpoints to keep",
    "resume": "continue from the newest complete checkpoint in the output directory",
    "log_every": "print a progress line every N steps (when not on a terminal)",
    "ce_chunk_tokens": "tokens per chunk of the vocab-parallel cross-entropy (memory bound)",
    "allow_pickle": "allow loading pickle .bin checkpoints (unpickling can run arbitrary code)",
    "report_to": "also log metrics to: none, or tensorboard (event files in "
                 "OUTPUT/tensorboard; needs the tensorboard extra)",
    "census": "at start-up, write census.json: the compiled step's collectives and "
              "per-device memory (the step compiles once either way)",
    "sequence_parallel": "with tp > 1, shard the activations along the sequence over tp "
                         "(Megatron-SP: the same function, tp x less activation memory)",
    "mlp_chunk_tokens": "run the MLP and the attention projections over tiles of this many "
                        "tokens when the sequence is longer (0 = never)",
    "chat_template": "chat template for template=chat (or rag as a chat): llama2, llama3, "
                     "chatml or a Jinja file; default: the tokenizer's",
    "data_cache_dir": "tokenized-data cache directory (default: $SPMD_LORA_CACHE or "
                      "~/.cache/spmd_lora/tokenized)",
    "data_workers": "tokenizer processes that build the cache (0 = min(cpus, 8))",
    "objective": "sft (next-token loss on the responses) or dpo (Direct Preference "
                 "Optimization on prompt/chosen/rejected rows against the base model without "
                 "LoRA as the reference)",
    "beta": "dpo: the inverse temperature of the implicit reward beta*log(pi/pi_ref); larger "
            "keeps the policy closer to the reference",
    "loss_type": "dpo loss: sigmoid (DPO) or ipo (squared margin of per-token mean log-ratios)",
    "dpo_layout": "dpo batch rows: shared-prefix (one row per pair, the prompt computed once, "
                  "each answer attending to the prompt and itself) or separate (prompt+chosen "
                  "and prompt+rejected rows)",
    "label_smoothing": "dpo sigmoid: assumed probability that a pair's preference is flipped "
                       "(conservative DPO), in [0, 0.5)",
}


def flag(field: str) -> str:
    """The CLI flag of a TrainConfig field: ``lora_rank`` -> ``--lora-rank``."""
    return "--" + field.replace("_", "-")


def check_choice(field: str, value) -> None:
    """Raise ConfigError naming the field and its choices when ``value`` is not one of them."""
    if value not in CHOICES[field]:
        raise ConfigError(f"{field} {value!r} unknown; choose from {', '.join(CHOICES[field])}")


def with_flag_names(message: str) -> str:
    """Rewrite TrainConfig field names in an error message as the CLI flags a user typed
    (``lora_rank must be >= 1`` -> ``--lora-rank must be >= 1``; ``resume=True (--resume)``
    -> ``--resume``). Single-word fields (tp, dp, seed, ...) read the same either way. A field
    written as a config-file key, ``name:``, stays one (``--output-dir is required (or set
    output_dir: in the --config file)``)."""
    every = "|".join(sorted(FIELD_HELP, key=len, reverse=True))
    message = re.sub(rf"(?<![\w-])({every})=True \(--[\w-]+\)", lambda m: flag(m.group(1)), message)
    fields = "|".join(sorted((f for f in FIELD_HELP if "_" in f), key=len, reverse=True))
    return re.sub(rf"(?<![\w-])({fields})(?![\w:])", lambda m: flag(m.group(1)), message)

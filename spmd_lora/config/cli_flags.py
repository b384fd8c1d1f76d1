"""What each command-line flag that is not a ``TrainConfig`` field means (and a field's flag in
a command that gives it another meaning).

The flags of ``TrainConfig`` fields take their help from :data:`spmd_lora.config.fields.FIELD_HELP`
in every command that has them; this table is the same for the other flags of ``spmd-lora``'s
subcommands, ``spmd-lora plan`` and ``tools/profile.py`` (``spmd-lora launch`` keeps its own
flags beside the launcher). A key is a flag (``--adapter``) or a positional's name
(``run_dir``), with one text wherever the flag appears. A key ``COMMAND --flag`` is the flag's
meaning in one command where it differs: ``export --output`` is a directory, ``plot --output``
a PNG file; for a field's flag it replaces the field's help in that command (``generate
--seed`` seeds the sampling, ``plan --host-memory`` bounds only the plan).
The CLI adds the defaults (``spmd_lora.cli.parser``).
"""
from __future__ import annotations

#: On CPU, a mesh of more simulated devices than this needs ``--allow-many-cpu-devices``.
MANY_CPU_DEVICES = 16

CLI_HELP: dict[str, str] = {
    # train / demo / eval / generate / export
    "--config": "YAML or JSON file of TrainConfig fields; flags override it",
    "--allow-many-cpu-devices": f"on CPU, allow a mesh of more than {MANY_CPU_DEVICES} "
                                "simulated devices (tp*dp*cp of them share this machine's "
                                "cores: slow)",
    "--adapter": "PEFT adapter directory (adapter_config.json, adapter_model.safetensors)",
    "--overwrite": "replace what --output already holds",
    "demo --output": "demo directory: the tiny model it builds and the run",
    "export --output": "the merged HF checkpoint's directory (--format hf), or the .gguf file "
                       "(gguf, gguf-lora)",
    "export --adapter": "PEFT adapter directory to merge or convert (--format gguf without it: "
                        "the base alone, to run a gguf-lora adapter on)",
    "--format": "hf: merged safetensors checkpoint (transformers, vLLM); gguf: the merged model "
                "as one GGUF file (llama.cpp, Ollama, LM Studio); gguf-lora: the adapter alone "
                "as a GGUF LoRA (llama-cli --lora, Ollama ADAPTER)",
    "--outtype": "GGUF type of the 2-D weights: f32, f16, bf16 or q8_0 (default: f16 for gguf, "
                 "f32 for gguf-lora)",
    "--prompt": "prompt text; repeat for a batch",
    "--max-new-tokens": "tokens to generate per prompt (eval --generate: per answer, as "
                        "training's --eval-generate)",
    "--generate": "rag only: also answer the first N examples by greedy generation and print "
                  "their exact match, token F1, citation accuracy and a few samples (0 = off)",
    "--temperature": "sampling temperature; 0 = greedy",
    "--top-k": "sample only from the k most likely tokens; 0 = off",
    "--top-p": "nucleus sampling: only from the most likely tokens whose probabilities add up "
               "to p; 1 = off",
    "generate --seed": "seed of the sampling",
    # plot / dashboard
    "run_dir": "training output directory (metrics.jsonl)",
    "plot --output": "PNG path (default: RUN_DIR/loss.png)",
    "--host": "address to bind",
    "--port": "0 picks a free port",
    "--new-runs-dir": "where runs started from the page's form go",
    # rag-data
    "--passages": "passage collection: a .jsonl file of {\"id\", \"text\"} objects (optional "
                  "\"title\"), or a directory of .txt / .md files cut into --chunk-tokens "
                  "passages (ids FILE#i)",
    "--qa": "QA rows (.jsonl): question, answer, oracle (a passage id or a list of ids), "
            "optional id and cot_answer (the training answer when present)",
    "rag-data --output": "JSONL file of rag-template rows (question, contexts, answer, "
                         "oracle_index, id); the eval split goes beside it with .eval before "
                         "the suffix",
    "--distractors": "non-oracle passages per row",
    "--hard-distractors": "distractors are the BM25 best non-oracle passages for the question "
                          "instead of random ones",
    "--oracle-prob": "probability that a row includes its oracle passages (else distractors "
                     "only, as in RAFT)",
    "rag-data --seed": "seed of the distractors, the oracle draw, the passage order and the "
                       "eval split",
    "rag-data --eval-fraction": "fraction of the rows written to the eval file instead "
                                "(0 = none)",
    "--chunk-tokens": "with a --passages directory: tokens (of --model's tokenizer) per passage",
    "rag-data --model": "model directory whose tokenizer cuts a --passages directory into "
                        "passages",
    # plan / tools/profile.py
    "--target": "compile for this GPU without one (deviceless XLA:GPU; needs the CUDA plugin: "
                "pip install -e \".[cuda12]\")",
    "--hosts": "with --target: hosts the tp*dp*cp devices are spread over",
    "--autotune-results": "with --target: XLA autotune results dumped on a real GPU "
                          "(tools/gpu_suite.py writes OUT/autotune_results.textproto)",
    "--devices-per-host": "devices sharing one host's memory, for the offload host total",
    "--device-memory": "device memory, e.g. 80GB (GB means GiB); enables the fits verdict "
                       "(default with --target: that GPU's memory)",
    "--usable-fraction": "fraction of --device-memory the step may use (the rest: CUDA "
                         "context, allocator fragmentation, NCCL buffers)",
    "--gpu-estimate": "on CPU, judge fit by peak minus XLA:CPU's f32 weight copies (absent on "
                      "GPU) instead of the conservative raw peak",
    "--find-max-seq-len": "search the longest --max-seq-len (objective dpo: the longest "
                          "prompt) that fits (powers of two up to "
                          "32M, then bisection on multiples of 1024 to within 1 %%); needs "
                          "--device-memory",
    "--buffers": "after the plan, the N largest device buffers live at the temporaries' peak, "
                 "from XLA's buffer assignment (size, shape, live range in the schedule, named "
                 "scope); with one --max-seq-len, not --find-max-seq-len",
    "plan --host-memory": "pinned host memory per host, e.g. 1.9TB (binary units): the plan "
                          "must fit it too (remat offload / offload-input keep the saved layer "
                          "inputs there); default: no host limit",
    "plan --json": "also write the plan(s) as JSON here",
    "--completion-len": "objective dpo: tokens of each answer (chosen and rejected, EOS "
                        "included); the prompt is what --max-seq-len leaves, or with "
                        "--find-max-seq-len the longest that fits",
    "plan --max-seq-len": "tokens per row; objective dpo: a pair's row (shared-prefix) or "
                          "longer row (separate), as in training: the prompt takes what the "
                          "answers leave",
    "plan --batch-size": "rows per micro-batch, global (split over dp); objective dpo: "
                         "preference pairs",
    "eval --batch-size": "examples per batch, global (split over dp); objective dpo: "
                         "preference pairs",
    "profile --json": "write census, totals and timings here",
    "--time": "time each distinct collective",
    "--time-iters": "timed runs of each collective",
    "--time-max-bytes": "skip timing shapes whose arrays (all devices together) exceed this",
    "--trace": "record a jax.profiler trace of --trace-steps real steps (random weights; meant "
               "for GPUs) into DIR",
    "--trace-steps": "steps the --trace records",
}


def cli_help(command: str, key: str) -> str | None:
    """The help of flag (or positional) ``key`` in ``command``: its ``COMMAND --flag`` entry,
    else its general one; None when the table has neither."""
    return CLI_HELP.get(f"{command} {key}", CLI_HELP.get(key))

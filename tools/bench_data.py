#!/usr/bin/env python
"""Data-pipeline benchmarks: the tokenized-data cache at scale, and host/device overlap.

    python tools/bench_data.py scale --rows 20000 200000 [--workers 0] [--dir DIR] [--dpo]
    python tools/bench_data.py overlap [--steps 10] [--rounds 5]

``scale`` writes synthetic RAG rows (a question, five titled passages of bundled-corpus
sentences, an answer; about 1.5k tokens each with the bundled tokenizer) as JSONL, then for
each row count, each phase in a fresh subprocess:

* ``build``: first run, tokenization into the cache (``load_or_build``; worker processes):
  wall time and peak RSS (this process and, separately, the largest worker);
* ``start``: second run, start-up from the cache: time from calling ``load_or_build`` to the
  first batch of a shuffled ``BatchIterator`` (data digest, memmap open, batch assembly), and
  the process's RSS split into anonymous memory and file-backed (memmap) pages after 200
  batches. The growth of anonymous RSS from the smallest to the largest row count is what the
  cache is meant to keep flat.

With ``--dpo`` the rows are RAG preference pairs (the same prompt, the answer as ``chosen``,
"The passages do not say." as ``rejected``), read by ``load_pairs`` and ``PairBatchIterator``
(shared-prefix layout), and a third phase, ``memory``, times the path without the cache (every
run tokenizes the pairs in memory: ``tokenize_pairs`` in this process), to the first batch,
with its RSS.

``overlap`` times the train step of the ``tiny`` config of ``tools/bench.py`` (2 layers,
d=256, vocab 32000, S=256, batch 1, LoRA r=8 on all projections, fp32, tp=1) three ways:
``device``: pre-placed batches dispatched back to back (the device step alone); ``before``:
the old loop (assemble and transfer the batch, run the step, read the metrics, every step
blocking); ``after``: the loop ``train()`` runs now (batch N+1 assembled and transferred while
step N runs, step N's metrics read one step late); and ``host``: batch assembly + transfer alone. The
modes are interleaved for ``--rounds`` rounds of ``--steps`` steps and the median per mode is
reported. Host fraction = 1 - device / loop time per step: the share of a step's wall time the
host spends outside the device step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

MARK = "BENCH_RESULT "
MAX_SEQ_LEN = 2048


def _maxrss(who) -> int:
    return resource.getrusage(who).ru_maxrss * 1024          # Linux: KiB


def _rss_split() -> dict:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(rest.split()[0]) * 1024
    return fields


def write_rows(path: Path, n: int, seed: int = 0, passage_sentences: int = 8,
               dpo: bool = False) -> None:
    """``n`` synthetic RAG rows (``dpo``: preference pairs) as JSONL (deterministic)."""
    import numpy as np

    from spmd_lora.tiny import asset_text
    sentences = [s.strip() + "." for line in asset_text("corpus.txt").splitlines()
                 for s in line.split(".") if len(s.strip()) > 20]
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            pick = rng.integers(0, len(sentences), size=(5, passage_sentences))
            contexts = [{"title": f"Town {i % 977} part {j}",
                         "text": " ".join(sentences[k] for k in row)}
                        for j, row in enumerate(pick)]
            answer = f"It was founded in {1000 + i % 997}."
            row = {"question": f"In which year was town {i % 977} founded?",
                   "contexts": contexts}
            row.update({"chosen": answer, "rejected": "The passages do not say."} if dpo
                       else {"answer": answer})
            f.write(json.dumps(row) + "\n")


def _tokenizer(work: Path):
    from transformers import AutoTokenizer

    from spmd_lora.tiny import build_tokenizer
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        build_tokenizer(tok_dir)
    return AutoTokenizer.from_pretrained(str(tok_dir))


def _load(args, tok):
    """The cached examples (pairs with ``--dpo``) and their batch iterator."""
    from spmd_lora.data import BatchIterator, PairBatchIterator, load_or_build, load_pairs
    if args.dpo:
        data = load_pairs(args.data, tok, MAX_SEQ_LEN, cache_dir=args.cache,
                          workers=args.workers)
        return data, PairBatchIterator(data, batch_size=4, max_seq_len=MAX_SEQ_LEN, seed=0)
    data = load_or_build(args.data, tok, "rag", MAX_SEQ_LEN, cache_dir=args.cache,
                         workers=args.workers)
    return data, BatchIterator(data, batch_size=4, max_seq_len=MAX_SEQ_LEN, seed=0)


def phase_build(args) -> dict:
    tok = _tokenizer(Path(args.dir))
    t0 = time.perf_counter()
    data, _ = _load(args, tok)
    seconds = time.perf_counter() - t0
    return {"rows": data.meta["examples"], "tokens": data.meta["tokens"],
            "tokens_per_row": data.meta["tokens"] / max(1, data.meta["examples"]),
            "build_s": seconds, "peak_rss_main": _maxrss(resource.RUSAGE_SELF),
            "peak_rss_largest_worker": _maxrss(resource.RUSAGE_CHILDREN)}


def phase_start(args) -> dict:
    import numpy as np

    tok = _tokenizer(Path(args.dir))
    rss0 = _rss_split()
    t0 = time.perf_counter()
    data, it = _load(args, tok)
    first = next(it)
    seconds = time.perf_counter() - t0
    for _ in range(199):
        next(it)
    assert int(np.count_nonzero(first["loss_mask"])) > 0
    return {"rows": len(data), "start_to_first_batch_s": seconds, "rss_before": rss0,
            "rss_after_200_batches": _rss_split()}


def phase_memory(args) -> dict:
    """The pairs without the cache (``--dpo``): tokenized in this process on every run."""
    import warnings

    from spmd_lora.data import PairBatchIterator, load_records, tokenize_pairs
    tok = _tokenizer(Path(args.dir))
    rss0 = _rss_split()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = tokenize_pairs(load_records(args.data), tok, MAX_SEQ_LEN)
    next(PairBatchIterator(pairs, batch_size=4, max_seq_len=MAX_SEQ_LEN, seed=0))
    return {"rows": len(pairs), "memory_start_to_first_batch_s": time.perf_counter() - t0,
            "memory_rss_before": rss0, "memory_rss_after_first_batch": _rss_split()}


def run_phase(phase: str, **kw) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "_phase", phase]
    for k, v in kw.items():
        if isinstance(v, bool):
            cmd += [f"--{k}"] if v else []
        else:
            cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{out.stderr[-3000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith(MARK))
    return json.loads(line[len(MARK):])


def cmd_scale(args) -> dict:
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    _tokenizer(work)
    results = []
    for n in args.rows:
        data = work / f"{'dpo' if args.dpo else 'rag'}_{n}.jsonl"
        if not data.exists():
            t0 = time.perf_counter()
            write_rows(data, n, dpo=args.dpo)
            print(f"wrote {n} rows ({data.stat().st_size / 2**20:.0f} MiB) in "
                  f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
        cache = work / f"cache_{n}"
        common = dict(dir=work, data=data, cache=cache, workers=args.workers, dpo=args.dpo)
        phases = {}
        for phase in ("build", "start") + (("memory",) if args.dpo else ()):
            phases.update(run_phase(phase, **common))
            print(json.dumps(phases), file=sys.stderr)
        results.append({"rows": n, "data_mib": data.stat().st_size / 2**20, **phases})
    return {"scale": results}


def cmd_overlap(args) -> dict:
    import jax
    import numpy as np

    from spmd_lora.config.model_config import ModelConfig
    from spmd_lora.data import BatchIterator, load_dataset
    from spmd_lora.weights.hf import load_hf_params
    from spmd_lora.config.lora_config import LoraConfig
    from spmd_lora.engine.factory import build_train_step, mesh_for
    from spmd_lora.engine.step import OptimizerConfig
    from spmd_lora.parallel.placement import shard_micro_batches
    from spmd_lora.tiny import build_tiny_llama, sample_data_path
    from spmd_lora.tokenizer import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_overlap_"))
    model_dir = build_tiny_llama(work / "tiny", vocab_size=32000, tokenizer_vocab_size=512,
                                 hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4)
    cfg = ModelConfig.from_pretrained(model_dir)
    mesh = mesh_for()
    lora_cfg = LoraConfig(rank=8, alpha=16.0, dropout=0.0, targets=("all",))
    params = load_hf_params(model_dir, cfg, mesh, "float32")
    tok = load_tokenizer(model_dir)
    examples = load_dataset(sample_data_path("alpaca"), tok, "alpaca", 256)
    batches = BatchIterator(examples, batch_size=1, max_seq_len=256, pack=True, seed=0)
    step_fn = build_train_step(cfg, mesh=mesh, lora=lora_cfg,
                               optimizer=OptimizerConfig(learning_rate=2e-4, total_steps=10 ** 6))
    lora, opt_state = step_fn.init_state(jax.random.key(0))
    key = jax.random.key(1)

    def prepare():
        rows = [next(batches)]
        return shard_micro_batches({k: np.stack([r[k] for r in rows]) for k in rows[0]}, mesh)

    state = [lora, opt_state]

    def step(micro, i):
        state[0], state[1], m = step_fn(params, state[0], state[1], micro,
                                        jax.random.fold_in(key, i))
        return m

    for i in range(3):                                               # compile + warm up
        jax.block_until_ready(step(prepare(), i))

    def device_only(n):
        placed = [prepare() for _ in range(n)]
        t0 = time.perf_counter()
        for i in range(n):
            m = step(placed[i], i)
        jax.block_until_ready((m, state))
        return time.perf_counter() - t0

    def before(n):                                                   # all in line, blocking
        t0 = time.perf_counter()
        for i in range(n):
            m = step(prepare(), i)
            {k: float(v) for k, v in m.items()}
        return time.perf_counter() - t0

    def after(n):                                                    # as train() does now
        t0 = time.perf_counter()
        nxt, pending = prepare(), None
        for i in range(n):
            m = step(nxt, i)
            nxt = prepare()
            if pending is not None:
                {k: float(v) for k, v in pending.items()}
            pending = m
        {k: float(v) for k, v in pending.items()}
        return time.perf_counter() - t0

    def host_only(n):                                                # batch assembly + transfer
        t0 = time.perf_counter()
        for _ in range(n):
            jax.block_until_ready(prepare())
        return time.perf_counter() - t0

    # Interleaved rounds, median per mode: a shared machine's load drifts between modes.
    modes = {"device": device_only, "before": before, "after": after, "host": host_only}
    times = {k: [] for k in modes}
    n = args.steps
    for _ in range(args.rounds):
        for name, fn in modes.items():
            times[name].append(fn(n) / n)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"overlap": {"steps_per_round": n, "rounds": args.rounds,
                        **{f"{k}_step_s": v for k, v in med.items()},
                        "host_fraction_before": 1 - med["device"] / med["before"],
                        "host_fraction_after": 1 - med["device"] / med["after"]}}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_phase"]:
        ap = argparse.ArgumentParser()
        ap.add_argument("phase", choices=("build", "start", "memory"))
        for name in ("dir", "data", "cache"):
            ap.add_argument(f"--{name}", required=True)
        ap.add_argument("--workers", type=int, default=0)
        ap.add_argument("--dpo", action="store_true")
        args = ap.parse_args(argv[1:])
        phase = {"build": phase_build, "start": phase_start, "memory": phase_memory}
        result = phase[args.phase](args)
        print(MARK + json.dumps(result))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("scale")
    p.add_argument("--rows", type=int, nargs="+", default=[20000, 200000])
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: auto)")
    p.add_argument("--dir", default=None, help="work dir (data, caches); default a temp dir")
    p.add_argument("--dpo", action="store_true",
                   help="preference pairs (load_pairs), and the in-memory path to compare")
    p = sub.add_parser("overlap")
    p.add_argument("--steps", type=int, default=10, help="steps per mode and round")
    p.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    import jax
    import numpy
    import transformers
    result = cmd_scale(args) if args.cmd == "scale" else cmd_overlap(args)
    result["machine"] = {"cpu": platform.processor() or platform.machine(),
                         "cpus": os.cpu_count(), "python": platform.python_version(),
                         "jax": jax.__version__, "numpy": numpy.__version__,
                         "transformers": transformers.__version__}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time ``spmd-lora rag-data`` on a synthetic collection (issue 28).

Writes PASSAGES synthetic passages (``--words`` words each, drawn Zipf-like from a
``--vocab``-word vocabulary) and QUESTIONS QA rows (each question: words of its oracle passage
plus a few random ones) into a temp dir, then runs ``python -m spmd_lora rag-data`` as a child
process with random and with hard (BM25) distractors and reports each run's wall time and
peak RSS (``ru_maxrss`` of that child, from ``os.wait4``) as one JSON line per run.

    python tools/bench_rag_data.py --passages 1000000 --questions 10000
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

import numpy as np


def write_inputs(d: Path, n_passages: int, n_questions: int, words: int, vocab: int,
                 seed: int = 0) -> tuple[Path, Path]:
    """Write ``passages.jsonl`` and ``qa.jsonl`` under ``d``; returns their paths."""
    rng = np.random.default_rng(seed)
    names = np.array([f"w{j}" for j in range(vocab)])
    p = 1.0 / np.arange(1, vocab + 1)          # Zipf-like word frequencies
    p /= p.sum()
    oracles = rng.choice(n_passages, size=n_questions, replace=False)
    oracle_words = {}
    want = set(oracles.tolist())
    passages = d / "passages.jsonl"
    with open(passages, "w") as f:
        for start in range(0, n_passages, 10000):
            n = min(10000, n_passages - start)
            ids = rng.choice(vocab, size=(n, words), p=p)
            for j in range(n):
                text = " ".join(names[ids[j]])
                if start + j in want:
                    oracle_words[start + j] = ids[j]
                f.write(json.dumps({"id": f"d{start + j}", "title": f"Doc {start + j}",
                                    "text": text}) + "\n")
    qa = d / "qa.jsonl"
    with open(qa, "w") as f:
        for i, o in enumerate(oracles.tolist()):
            own = rng.choice(oracle_words[o], size=6, replace=False)
            noise = rng.choice(vocab, size=2, p=p)
            q = " ".join(names[np.concatenate([own, noise])]) + "?"
            f.write(json.dumps({"question": q, "answer": f"answer {i}", "oracle": f"d{o}"})
                    + "\n")
    return passages, qa


def run(argv: list[str]) -> dict:
    """Run ``python -m spmd_lora`` + ``argv`` as a child; its wall time, peak RSS, summary."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "spmd_lora", *argv], stdout=subprocess.PIPE,
                            text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"rag-data failed with status {proc.returncode}")
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "summary": json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=1_000_000)
    ap.add_argument("--questions", type=int, default=10_000)
    ap.add_argument("--words", type=int, default=60, help="words per passage")
    ap.add_argument("--vocab", type=int, default=50_000)
    ap.add_argument("--distractors", type=int, default=4)
    ap.add_argument("--skip-hard", action="store_true", help="time random distractors only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_rag_data_") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        passages, qa = write_inputs(d, args.passages, args.questions, args.words, args.vocab)
        print(json.dumps({"inputs": {"passages": args.passages, "questions": args.questions,
                                     "passages_mib": round(passages.stat().st_size / 2**20, 1),
                                     "generate_s": round(time.perf_counter() - t0, 1)}}),
              flush=True)
        modes = [("random", [])] + ([] if args.skip_hard else [("hard", ["--hard-distractors"])])
        for name, extra in modes:
            res = run(["rag-data", "--passages", str(passages), "--qa", str(qa), "--output",
                       str(d / f"{name}.jsonl"), "--distractors", str(args.distractors),
                       "--seed", "0", "--overwrite", *extra])
            print(json.dumps({"distractors": name, **res}), flush=True)


if __name__ == "__main__":
    main()

"""RAG training data (issue 28): BM25, ``spmd-lora rag-data`` (RAFT-style rows: oracle
probability, random / hard distractors, determinism, eval split, directory chunking, errors)
and the rag template keeping the oracle passage when the prompt is too long."""
import json
import math
from collections import Counter

import numpy as np
import pytest

from spmd_lora import cli
from spmd_lora.data import DataWarning, bm25, tokenize_records
from spmd_lora.data.rag_build import build_rag_data, eval_path
from spmd_lora.errors import ConfigError, DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------ BM25

def test_bm25_matches_hand_computed_scores():
    # N = 3 passages of 2, 3 and 1 tokens: avgdl = 2; k1 = 1.5, b = 0.75
    docs = ["A, b.", "a C-c", "B"]
    assert [bm25.tokenize(d) for d in docs] == [["a", "b"], ["a", "c", "c"], ["b"]]
    q = bm25.QuerySet(["c", "a b"])
    stats = bm25.collect_stats(docs, q)
    assert stats.n_docs == 3 and stats.avgdl == 2.0 and stats.lengths.tolist() == [2, 3, 1]
    # idf(c): df 1 -> ln(1 + 2.5/1.5) = ln(8/3); idf(a) = idf(b): df 2 -> ln(1 + 1.5/2.5) = ln 1.6
    # length norms K = k1 (1 - b + b dl/avgdl): dl 2 -> 1.5, dl 3 -> 2.0625, dl 1 -> 0.9375
    # "c" in d1 (tf 2): 2 * 2.5 / (2 + 2.0625) = 16/13
    # "a b": d0 = 2 * 2.5/(1 + 1.5) = 2 terms of 1; d1 = 2.5/3.0625 = 40/49; d2 = 2.5/1.9375 = 40/31
    expected = np.array([[0.0, math.log(8 / 3) * 16 / 13, 0.0],
                         [2 * math.log(1.6), math.log(1.6) * 40 / 49, math.log(1.6) * 40 / 31]])
    np.testing.assert_allclose(bm25.score_matrix(docs, q, stats), expected, rtol=1e-12)
    # streamed top-k over blocks of one passage: the same scores, best first
    top = bm25.top_k(iter(docs), q, stats, k=2, block=1)
    assert [d for d, _ in top[0]] == [1]                      # only d1 shares a word with "c"
    assert [d for d, _ in top[1]] == [0, 2]
    np.testing.assert_allclose([s for _, s in top[1]], [expected[1, 0], expected[1, 2]])
    assert bm25.idf(2, 3) == pytest.approx(math.log(1.6))


# ------------------------------------------------------------------------------------ builder

def collection(tmp_path, n=20):
    rows = [{"id": f"p{i}", "title": f"Title {i}", "text": f"passage number {i} text"}
            for i in range(n)]
    return write_jsonl(tmp_path / "passages.jsonl", rows)


def test_oracle_probability_distractors_and_positions_are_statistically_right(tmp_path):
    n, rows, k, p = 20, 2000, 3, 0.3
    passages = collection(tmp_path, n)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}",
                                              "oracle": "p0"} for i in range(rows)])
    out = tmp_path / "out.jsonl"
    summary = build_rag_data(passages, qa, out, distractors=k, oracle_prob=p, seed=7)
    got = read_jsonl(out)
    assert summary["rows"] == rows and len(got) == rows
    present = [r for r in got if r["oracle_index"]]
    frac = len(present) / rows
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / rows)           # binomial, 4 sigma
    assert summary["oracle_present_fraction"] == pytest.approx(frac, abs=1e-4)
    picks = Counter()
    positions = Counter()
    for r in got:
        texts = [c["text"] for c in r["contexts"]]
        assert len(texts) == k + bool(r["oracle_index"]) and len(set(texts)) == len(texts)
        oracle_at = [j for j, t in enumerate(texts) if t == "passage number 0 text"]
        assert oracle_at == r["oracle_index"]              # the oracle only when flagged
        positions.update(oracle_at)
        picks.update(t for t in texts if t != "passage number 0 text")
    # random distractors: never the oracle, each of the 19 others about equally often
    assert len(picks) == n - 1
    mean = rows * k / (n - 1)
    sd = math.sqrt(mean * (1 - k / (n - 1)))
    assert all(abs(c - mean) < 5 * sd for c in picks.values()), picks
    # the oracle's position is uniform over the k + 1 slots
    m = len(present) / (k + 1)
    assert set(positions) == set(range(k + 1))
    assert all(abs(c - m) < 5 * math.sqrt(m) for c in positions.values()), positions


def test_hard_distractors_are_the_bm25_best_non_oracle_passages(tmp_path):
    texts = {"gold": "apple banana cherry orchard harvest", "near1": "apple banana orchard",
             "near2": "apple banana", "near3": "banana split", "far1": "river boat sailing",
             "far2": "mountain snow", "far3": "city lights night"}
    passages = write_jsonl(tmp_path / "p.jsonl", [{"id": k, "text": v} for k, v in texts.items()])
    qa = write_jsonl(tmp_path / "qa.jsonl", [
        {"question": "Which orchard grows apple and banana?", "answer": "x", "oracle": "gold"},
        {"question": "Where is snow on a mountain?", "answer": "y", "oracle": "far2"}])
    out = tmp_path / "hard.jsonl"
    build_rag_data(passages, qa, out, distractors=2, hard=True, oracle_prob=1.0, seed=3)
    rows = read_jsonl(out)
    ids = {v: k for k, v in texts.items()}
    # independent check: dense BM25 over the whole collection, best non-oracle first
    q = bm25.QuerySet([r["question"] for r in rows])
    stats = bm25.collect_stats(texts.values(), q)
    scores = bm25.score_matrix(list(texts.values()), q, stats)
    names = list(texts)
    for i, (row, oracle) in enumerate(zip(rows, ["gold", "far2"])):
        ranked = [names[j] for j in np.argsort(-scores[i], kind="stable")
                  if names[j] != oracle and scores[i, j] > 0]
        got = {ids[t] for t in row["contexts"]}
        assert ids[row["contexts"][row["oracle_index"][0]]] == oracle
        assert set(ranked[:2]) <= got - {oracle} and len(got) == 3
    assert {ids[t] for t in rows[0]["contexts"]} == {"gold", "near1", "near2"}
    # "mountain snow": only far2 (the oracle) shares words: topped up with random passages
    assert len(rows[1]["contexts"]) == 3


def test_same_seed_same_bytes_and_the_eval_split(tmp_path):
    passages = collection(tmp_path, 30)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"id": f"r{i}", "question": f"question {i}",
                                              "answer": "plain", "cot_answer": f"because {i}",
                                              "oracle": [f"p{i % 30}", f"p{(i + 1) % 30}"]}
                                             for i in range(50)])
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    kw = dict(distractors=4, hard=True, oracle_prob=0.6, seed=11, eval_fraction=0.2)
    sa = build_rag_data(passages, qa, a, **kw)
    build_rag_data(passages, qa, b, **kw)
    assert a.read_bytes() == b.read_bytes()
    assert eval_path(a).read_bytes() == eval_path(b).read_bytes()
    assert eval_path(a).name == "a.eval.jsonl" and eval_path(tmp_path / "x").name == "x.eval"
    train, held = read_jsonl(a), read_jsonl(eval_path(a))
    assert (len(train), len(held)) == (40, 10) == (sa["rows"], sa["eval_rows"])
    ids = [r["id"] for r in train + held]
    assert sorted(ids) == sorted(f"r{i}" for i in range(50))         # a partition
    assert [r["id"] for r in train] == sorted((r["id"] for r in train), key=lambda s: int(s[1:]))
    assert all(r["answer"].startswith("because ") for r in train)     # cot_answer preferred
    assert all(len(r["oracle_index"]) in (0, 2) for r in train)
    # another seed: another split and other rows; no temporaries left behind
    c = tmp_path / "c.jsonl"
    build_rag_data(passages, qa, c, **dict(kw, seed=12))
    assert c.read_bytes() != a.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        build_rag_data(passages, qa, a, **kw)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from spmd_lora.tiny import build_tiny_llama
    return build_tiny_llama(tmp_path_factory.mktemp("m") / "tiny")


def test_directory_passages_are_chunked_with_the_models_tokenizer(tmp_path, tiny_model):
    from spmd_lora.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_model)
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    text_a = " ".join(f"word{i} river town" for i in range(40))
    (docs / "a.md").write_text(text_a)
    (docs / "sub" / "b.txt").write_text("the bakery opened in 1800 near the river")
    (docs / "skip.csv").write_text("not,a,passage")
    text_b = "the bakery opened in 1800 near the river"
    (docs / "sub" / "b.txt").write_text(text_b)
    (docs / "skip.csv").write_text("not,a,passage")
    chunk = 16
    n_tok = {n: len(tok(t, add_special_tokens=False)["input_ids"])
             for n, t in (("a.md", text_a), ("sub/b.txt", text_b))}
    n_chunks = sum(-(-n // chunk) for n in n_tok.values())
    assert n_tok["sub/b.txt"] > chunk                 # several chunks in each file
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "When did the bakery open?",
                                              "answer": "1800", "oracle": "sub/b.txt#0"}])
    out = tmp_path / "o.jsonl"
    rc = cli.main(["rag-data", "--passages", str(docs), "--qa", str(qa), "--output", str(out),
                   "--chunk-tokens", str(chunk), "--model", str(tiny_model),
                   "--distractors", str(n_chunks - 1), "--oracle-prob", "1"])
    assert rc == 0
    (row,) = read_jsonl(out)
    ctx = row["contexts"]
    assert len(ctx) == n_chunks                   # every chunk of the collection in the row
    oracle = ctx[row["oracle_index"][0]]
    assert oracle["title"] == "sub/b.txt" and text_b.startswith(oracle["text"])
    for name, text in (("a.md", text_a), ("sub/b.txt", text_b)):
        parts = [c["text"] for c in ctx if c["title"] == name]
        assert len(parts) == -(-n_tok[name] // chunk)
        assert all(len(tok(t, add_special_tokens=False)["input_ids"]) <= chunk + 2
                   for t in parts)
        flat = text.replace(" ", "")
        parts.sort(key=lambda t: flat.index(t.replace(" ", "")))
        assert "".join(parts).replace(" ", "") == flat        # the chunks tile the file


# ------------------------------------------------------------------------------------ template

def oracle_record(n=6, oracle=4):
    ctx = [{"title": f"Town {i}", "text": f"Town {i} lies on a quiet river. " * 5 +
            f"Its bakery opened in {1800 + i}."} for i in range(n)]
    return {"question": f"In which year did the bakery of Town {oracle} open?", "contexts": ctx,
            "answer": f"It opened in {1800 + oracle}.", "oracle_index": [oracle]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from spmd_lora.tiny import build_tokenizer
    return AutoTokenizer.from_pretrained(str(build_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_long_prompts_drop_distractors_before_the_oracle(tok):
    rec = oracle_record()
    oracle_text = rec["contexts"][4]["text"]
    full = len(tokenize_records([rec], tok, "rag", 4096)[0])
    seen = []
    for max_len in range(full - 5, 90, -9):
        with pytest.warns(DataWarning):
            (ex,) = tokenize_records([rec], tok, "rag", max_len)
        text = tok.decode(ex.input_ids, skip_special_tokens=True)
        assert len(ex) <= max_len
        assert rec["question"] in text and text.rstrip().endswith(rec["answer"])
        towns = [i for i in range(6) if f"Town {i}\nTown {i} lies" in text]
        numbers = [i for i in range(1, 7) if f"[{i}] Town" in text]
        if oracle_text in text:             # the oracle whole: distractors kept = a prefix
            assert towns == [i for i in range(4) if i < len(towns) - 1] + [4], towns
            seen.append(len(towns))
        else:                               # oracle cut (or gone): no distractor left
            assert set(towns) <= {4} and numbers in ([], [1]), (towns, numbers)
            seen.append(0 if numbers else -1)
        assert numbers == list(range(1, len(numbers) + 1))            # renumbered [1..n]
    # the budgets walk through: all but the last distractor, ..., oracle alone, oracle cut
    # (leading tokens kept, renumbered [1]), no passage
    assert seen[0] == 5 and 1 in seen and 0 in seen and seen == sorted(seen, reverse=True), seen
    # without oracle_index the old rule: passages dropped from the end, the oracle goes early
    plain = dict(rec)
    del plain["oracle_index"]
    with pytest.warns(DataWarning):
        (ex,) = tokenize_records([plain], tok, "rag", full // 2)
    assert oracle_text not in tok.decode(ex.input_ids, skip_special_tokens=True)


@pytest.mark.parametrize("bad", [[7], "0", [0, 0], [True]])
def test_a_bad_oracle_index_names_the_record(tok, bad):
    rec = dict(oracle_record(), oracle_index=bad)
    with pytest.raises(DataError, match="field 'oracle_index'"):
        tokenize_records([rec], tok, "rag", 4096)


# ------------------------------------------------------------------------------------ CLI

def test_the_cli_as_a_user_runs_it(tmp_path, capsys):
    passages = collection(tmp_path, 10)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "oracle": "p1"}])
    out = tmp_path / "rows.jsonl"
    argv = ["rag-data", "--passages", str(passages), "--qa", str(qa), "--output", str(out),
            "--distractors", "2", "--seed", "1"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 1 and summary["passages"] == 10
    assert cli.main(argv + ["--overwrite", "--hard-distractors"]) == 0
    capsys.readouterr()
    (row,) = read_jsonl(out)
    assert set(row) == {"question", "contexts", "answer", "oracle_index", "id"}


@pytest.mark.parametrize("case,message", [
    ("missing", "passages not found"),
    ("malformed", "qa.jsonl, line 2: malformed JSON"),
    ("no_field", "qa.jsonl, line 1 (record 0): missing required field 'oracle'"),
    ("bad_oracle", "field 'oracle': passage id 'p99' is not in the passage collection"),
    ("too_many", "--distractors 50 is more than the 9 non-oracle passages"),
    ("prob", "--oracle-prob must be in [0, 1], got 1.5"),
    ("dir_no_model", "needs --chunk-tokens N and --model DIR"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, case, message):
    passages = collection(tmp_path, 10)
    qa = tmp_path / "qa.jsonl"
    good = json.dumps({"question": "q", "answer": "a", "oracle": "p1"})
    qa.write_text({"malformed": good + "\n{\"question\": \n",
                   "no_field": json.dumps({"question": "q", "answer": "a"}) + "\n",
                   "bad_oracle": json.dumps({"question": "q", "answer": "a", "oracle": ["p99"]})
                   }.get(case, good) + "\n")
    argv = ["rag-data", "--passages", str(passages), "--qa", str(qa),
            "--output", str(tmp_path / "o.jsonl")]
    if case == "missing":
        argv[2] = str(tmp_path / "nope.jsonl")
    if case == "too_many":
        argv += ["--distractors", "50"]
    if case == "prob":
        argv += ["--oracle-prob", "1.5"]
    if case == "dir_no_model":
        argv[2] = str(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "o.jsonl").exists()

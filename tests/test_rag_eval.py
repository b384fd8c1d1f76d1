"""RAG answer quality with generation (issue 28): SQuAD EM / F1 against an independent
reference of the official v1.1 metric, citation parsing and accuracy, the eval's generation
equal to ``spmd-lora generate``, ``train --eval-generate`` and ``eval --generate``."""
import io
import json
import re
import string
import sys
from collections import Counter
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from spmd_lora import cli, data
from spmd_lora.rag_eval import (citation_correct, citations, exact_match, normalize_answer,
                                score_answers, token_f1)


# --------------------------------------------------------------- the official SQuAD v1.1 logic

def ref_normalize(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def ref_f1(prediction, ground_truth):
    p, g = ref_normalize(prediction).split(), ref_normalize(ground_truth).split()
    common = Counter(p) & Counter(g)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision, recall = 1.0 * num_same / len(p), 1.0 * num_same / len(g)
    return (2 * precision * recall) / (precision + recall)


def ref_em(prediction, ground_truth):
    return ref_normalize(prediction) == ref_normalize(ground_truth)


def ref_max(fn, prediction, ground_truths):
    return max(fn(prediction, gt) for gt in ground_truths)


TRICKY = [
    ("The Eiffel Tower", ["Eiffel Tower"]),
    ("an apple a day", ["apple day", "An Apple"]),
    ("theater", ["the ater"]),                         # "the" inside a word stays
    ("Paris, France.", ["paris france"]),
    ("U.S.A.", ["USA", "U.S."]),
    ("  lots   of\tspace\n", ["lots of space"]),
    ("Café Müller", ["café müller", "cafe muller"]),   # unicode: lower-cased, accents kept
    ("naïve — approach", ["naive approach", "naïve approach"]),  # em dash is not ASCII punct.
    ("", [""]),                                        # empty vs empty: EM 1, F1 0 (v1.1)
    ("", ["something"]),
    ("something", [""]),
    ("a an the", ["the"]),                             # normalises to empty
    ("1,234 people", ["1234 people", "1,234"]),
    ("red red blue", ["red blue blue", "red"]),        # bag-of-tokens overlap
    ("Ünïcödé ÀÉ", ["üNÏCÖDÉ àé"]),
    ("It's 5 o'clock", ["its 5 oclock"]),
    ("the the", ["a"]),
]


@pytest.mark.parametrize("pred,refs", TRICKY)
def test_em_and_f1_equal_the_official_squad_v11_logic(pred, refs):
    assert normalize_answer(pred) == ref_normalize(pred)
    assert exact_match(pred, refs) == float(ref_max(ref_em, pred, refs))
    assert token_f1(pred, refs) == pytest.approx(ref_max(ref_f1, pred, refs), abs=1e-12)
    assert token_f1(pred, refs[0]) == pytest.approx(ref_f1(pred, refs[0]), abs=1e-12)


def test_citation_markers_do_not_count_as_answer_text():
    assert exact_match("Paris [1]", ["Paris"]) == 1.0
    assert exact_match("Paris [1, 3][2]", ["paris"]) == 1.0
    assert token_f1("Paris [2]", ["Paris France"]) == pytest.approx(ref_f1("Paris", "Paris France"))


# ------------------------------------------------------------------------------------ citations

def test_citation_parsing():
    assert citations("no citations") == []
    assert citations("It was 1275 [2].") == [2]
    assert citations("see [3][1] and [1, 4] and [ 2 ]") == [1, 2, 3, 4]
    assert citations("[a] [] [1.5] [-1]") == []
    assert citations("[10]") == [10]


def test_citation_correct():
    assert citation_correct([2], [1], 3)                # [2] is contexts[1]
    assert not citation_correct([1], [1], 3)            # cites a non-oracle passage only
    assert citation_correct([1, 2], [1], 3)             # one oracle among them is enough
    assert not citation_correct([2, 7], [1], 3)         # [7] names no passage of the row
    assert not citation_correct([], [1], 3)


def _row(answer, oracle=..., n=3):
    row = {"question": "q?", "contexts": [f"passage {i}" for i in range(n)], "answer": answer}
    if oracle is not ...:
        row["oracle_index"] = oracle
    return row


def test_score_answers_splits_by_oracle_present_and_absent():
    records = [_row("Paris", [0]), _row("Paris", [1]), _row("Rome", [2]), _row("Oslo", []),
               _row("Bern", [])]
    answers = ["Paris [1]",      # present, correct answer, cites the oracle
               "Paris [1]",      # present, correct answer, cites a non-oracle passage
               "Milan",          # present, wrong, cites nothing
               "Oslo [2]",       # absent, right, cites
               "I don't know"]   # absent, wrong, no citation
    m = score_answers(records, answers)
    assert m["n"] == 5
    assert m["em"] == pytest.approx(3 / 5)
    assert m["cite_rate"] == pytest.approx(3 / 5)
    assert m["citation_accuracy"] == pytest.approx(1 / 2) and m["n_citation"] == 2
    assert m["em_oracle_present"] == pytest.approx(2 / 3)
    assert m["em_oracle_absent"] == pytest.approx(1 / 2)
    assert m["cite_rate_oracle_present"] == pytest.approx(2 / 3)
    assert m["cite_rate_oracle_absent"] == pytest.approx(1 / 2)
    assert m["f1_oracle_absent"] == pytest.approx(1 / 2)

    plain = score_answers([_row("x"), _row("y")], ["x", "z [1]"])   # no oracle_index anywhere
    assert plain["citation_accuracy"] is None and plain["n_citation"] == 0
    assert not any(k.endswith(("_oracle_present", "_oracle_absent")) for k in plain)
    multi = score_answers([_row(["New York", "NYC"], [0])], ["nyc"])
    assert multi["em"] == 1.0 and multi["em_oracle_absent"] is None


def test_bad_rows_are_data_errors():
    from spmd_lora.errors import DataError
    with pytest.raises(DataError, match="oracle_index"):
        score_answers([_row("x", ["first"])], ["x"])
    with pytest.raises(DataError, match="answer"):
        score_answers([{"question": "q", "contexts": []}], ["x"])


# ---------------------------------------------------------- generation, train and eval runs

TOWNS = [("Corholt", 1275), ("Yardale", 1399), ("Galmoor", 1502), ("Dunridge", 1620),
         ("Elmstead", 1188), ("Fenwick", 1710), ("Harrow", 1333), ("Ivel", 1455)]


def _rag_rows():
    rows = []
    for i, (town, year) in enumerate(TOWNS):
        other, oyear = TOWNS[(i + 1) % len(TOWNS)]
        ctx = [{"title": other, "text": f"{other} was founded in {oyear}."},
               {"title": town, "text": f"{town} was founded in {year}."}]
        if i % 3 == 2:                                  # oracle absent
            ctx, oracle, answer = ctx[:1], [], "unknown"
        else:
            oracle, answer = [1], f"{year} [2]"
        rows.append({"question": f"When was {town} founded?", "contexts": ctx,
                     "answer": answer, "oracle_index": oracle})
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model, a rag JSONL and a 2-step training run with --eval-generate 2."""
    from spmd_lora.tiny import build_tiny_llama
    root = tmp_path_factory.mktemp("rag_eval")
    model = build_tiny_llama(root / "tiny", num_hidden_layers=1)
    rows = _rag_rows()
    path = root / "rag.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "out"
    rc = cli.main(["train", "--model", str(model), "--data", str(path), "--output-dir", str(out),
                   "--template", "rag", "--max-seq-len", "256", "--lora-rank", "4",
                   "--lora-targets", "all", "--lora-dropout", "0", "--learning-rate", "1e-2",
                   "--batch-size", "2", "--max-steps", "2", "--eval-fraction", "0.25",
                   "--eval-every", "1", "--eval-generate", "2", "--tp", "2"])
    assert rc == 0
    return {"model": model, "data": path, "rows": rows, "out": out}


def _main_json(argv):
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(argv)
    assert rc == 0
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.startswith("{")]


GEN_KEYS = ("eval_em", "eval_f1", "eval_cite_rate", "eval_em_oracle_present",
            "eval_em_oracle_absent", "eval_f1_oracle_present", "eval_f1_oracle_absent",
            "eval_cite_rate_oracle_present", "eval_cite_rate_oracle_absent")


def test_train_eval_generate_writes_metrics_and_samples(run):
    rows = [json.loads(line) for line in (run["out"] / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]     # before, every step (eval_every 1), end
    for r in evals:
        assert "eval_citation_accuracy" in r
        acc = r["eval_citation_accuracy"]
        assert acc is None or 0.0 <= acc <= 1.0
        for key in GEN_KEYS:
            assert key in r, key
            assert r[key] is None or 0.0 <= r[key] <= 1.0, (key, r[key])
        assert r["eval_em"] is not None and r["eval_f1"] is not None
    samples = [json.loads(line)
               for line in (run["out"] / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 1, 2]
    held_out = _held_out(run["rows"])[:2]
    for s, r in zip(samples, evals):
        assert s["n"] == 2 and s["em"] == r["eval_em"] and s["f1"] == r["eval_f1"]
        assert [x["question"] for x in s["samples"]] == [h["question"] for h in held_out]
        assert [x["reference"] for x in s["samples"]] == [h["answer"] for h in held_out]
        assert all(isinstance(x["generated"], str) for x in s["samples"])
    # the dashboard's run panel shows the newest table
    from spmd_lora.dashboard import runs
    assert runs.summary(run["out"])["eval_samples"] == {"step": 2, "samples": samples[-1]["samples"]}


def _held_out(rows):
    _, idx = data.split_train_eval(list(range(len(rows))), 0.25, 0)
    return [rows[i] for i in idx]


def test_eval_generate_cli_gives_the_training_numbers(run, tmp_path):
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in _held_out(run["rows"])))
    (result,) = _main_json(["eval", "--model", str(run["model"]), "--adapter",
                            str(run["out"] / "adapter"), "--data", str(held), "--template", "rag",
                            "--max-seq-len", "256", "--tp", "2", "--generate", "2"])
    for key in ("loss", "perplexity", "em", "f1", "cite_rate", "citation_accuracy"):
        assert key in result
    last = [json.loads(line) for line in
            (run["out"] / "metrics.jsonl").read_text().splitlines()][-1]
    for key in GEN_KEYS + ("eval_citation_accuracy",):
        assert result[key[len("eval_"):]] == last[key], key
    samples = [json.loads(line)
               for line in (run["out"] / "eval_samples.jsonl").read_text().splitlines()][-1]
    assert [s["generated"] for s in result["samples"]] == [
        s["generated"] for s in samples["samples"]]


def test_eval_generation_equals_spmd_lora_generate(run):
    from spmd_lora import load_model
    from spmd_lora.rag_eval import evaluate_generation
    from spmd_lora.tokenizer import load_tokenizer
    questions = [r["question"] for r in run["rows"][:3]]
    adapter = str(run["out"] / "adapter")
    printed = _main_json(["generate", "--model", str(run["model"]), "--adapter", adapter,
                          "--template", "rag", "--max-new-tokens", "12", "--tp", "2"]
                         + [a for q in questions for a in ("--prompt", q)])
    model = load_model(str(run["model"]), tp=2, adapter=adapter)
    tok = load_tokenizer(str(run["model"]))
    records = [{"question": q, "contexts": [], "answer": "x"} for q in questions]
    _, table = evaluate_generation(model, tok, records, max_new_tokens=12)
    assert [p["completion"] for p in printed] == [t["generated"] for t in table]
    ids = [tok(p["completion"], add_special_tokens=False)["input_ids"] for p in printed]
    assert ids == [tok(t["generated"], add_special_tokens=False)["input_ids"] for t in table]


def _one_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        sys.exit(cli.main(argv))
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and not line.startswith(("warning: ", "note: "))]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_eval_generate_is_one_error_line(run, tmp_path, capsys):
    base = ["train", "--model", str(run["model"]), "--data", str(run["data"]), "--output-dir",
            str(tmp_path / "o"), "--max-steps", "1", "--eval-fraction", "0.25"]
    line = _one_error(capsys, base + ["--template", "rag", "--eval-generate", "-1"])
    assert "--eval-generate" in line and ">= 0" in line
    line = _one_error(capsys, base + ["--template", "alpaca", "--eval-generate", "2"])
    assert "--eval-generate" in line and "rag" in line
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text((json.dumps({"instruction": "hi", "output": "there"}) + "\n") * 4)
    line = _one_error(capsys, ["train", "--model", str(run["model"]), "--data", str(alpaca),
                               "--output-dir", str(tmp_path / "o2"), "--max-steps", "1",
                               "--eval-fraction", "0.25", "--eval-generate", "2"])
    assert "--eval-generate" in line and "alpaca" in line             # template auto
    line = _one_error(capsys, base + ["--template", "rag", "--eval-generate", "2",
                                      "--eval-fraction", "0"])
    assert "--eval-generate" in line and "--eval-fraction" in line
    ev = ["eval", "--model", str(run["model"]), "--data", str(alpaca)]
    line = _one_error(capsys, ev + ["--generate", "-1"])
    assert "--generate" in line and ">= 0" in line
    line = _one_error(capsys, ev + ["--generate", "2"])
    assert "--generate" in line and "rag" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_readme_worked_example_runs_on_the_bundled_collection(tmp_path):
    """The README's RAG loop on the bundled rag_passages / rag_qa (fewer steps): rag-data ->
    train --eval-generate -> eval --generate, each as a user types it."""
    from spmd_lora.tiny import asset_path, build_tiny_llama

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("### Worked example: RAG data")[1].split("```bash")[1].split("```")[0]
    commands = [c.split() for c in re.sub(r"\\\n\s*", "", block).splitlines()
                if c.startswith("spmd-lora ")]
    assert [c[1] for c in commands] == ["demo", "rag-data", "train", "eval"]
    model = build_tiny_llama(tmp_path / "demo" / "tiny_llama", num_hidden_layers=1)
    swap = {"spmd_lora/assets/rag_passages.jsonl": str(asset_path("rag_passages.jsonl")),
            "spmd_lora/assets/rag_qa.jsonl": str(asset_path("rag_qa.jsonl")),
            "demo/tiny_llama": str(model), "40": "2", "20": "1"}
    for argv in commands[1:]:
        argv = [swap.get(a, a) for a in argv[1:]]
        argv = [str(tmp_path / a) if a.startswith("rag/") else a for a in argv]
        got = _main_json(argv)
        if argv[0] == "rag-data":
            assert got[-1]["rows"] == 72 and got[-1]["eval_rows"] == 8
        elif argv[0] == "eval":
            assert got[-1]["n"] == 8 and 0.0 <= got[-1]["f1"] <= 1.0 and got[-1]["samples"]
    rows = [json.loads(x) for x in (tmp_path / "rag" / "run" / "metrics.jsonl").open()]
    assert all(k in rows[-1] for k in GEN_KEYS)

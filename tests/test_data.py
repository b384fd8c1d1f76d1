"""Data pipeline: templates, loss masks, RAG truncation, packing, batching, resume, errors."""
import json
import warnings

import numpy as np
import pytest

from spmd_lora.data import (PROMPT_TEMPLATES, BatchIterator, DataWarning, Example, collate,
                            encode_prompt, eval_batches, format_prompt, load_dataset,
                            load_records, pad_token_id, split_train_eval, tokenize_records)
from spmd_lora.errors import ConfigError, DataError
from spmd_lora.tiny import sample_data_path

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from spmd_lora.tiny import build_tokenizer
    return AutoTokenizer.from_pretrained(str(build_tokenizer(tmp_path_factory.mktemp("tok"))))


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------ alpaca

def test_alpaca_prompt_text_exact():
    assert format_prompt({"instruction": "Add the numbers.", "input": "2 and 3",
                          "output": "5"}, "alpaca") == ALPACA_INPUT
    assert format_prompt({"instruction": "Name a colour.", "output": "Red."}) == ALPACA_NO_INPUT
    for empty in ("", "  ", None):
        assert format_prompt({"instruction": "Name a colour.", "input": empty},
                             "alpaca") == ALPACA_NO_INPUT
    assert PROMPT_TEMPLATES["alpaca"]["prompt_no_input"].format(
        instruction="Name a colour.") == ALPACA_NO_INPUT


@pytest.mark.parametrize("rec,prompt", [
    ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
     ALPACA_INPUT),
    ({"instruction": "Name a colour.", "output": "Red, like a ripe tomato."}, ALPACA_NO_INPUT),
])
def test_alpaca_loss_only_on_response(tok, rec, prompt):
    (ex,) = tokenize_records([rec], tok, "alpaca", 512)
    ids, mask = ex.input_ids.tolist(), ex.loss_mask.tolist()
    assert ex.input_ids.dtype == np.int32 and ex.loss_mask.dtype == np.int32
    p, r = enc(tok, prompt), enc(tok, rec["output"])
    assert ids == [tok.bos_token_id] + p + r + [tok.eos_token_id]
    assert mask == [0] * (1 + len(p)) + [1] * (len(r) + 1)
    assert tok.decode(ex.input_ids[ex.loss_mask == 0], skip_special_tokens=True) == prompt
    assert tok.decode(ex.input_ids[ex.loss_mask == 1], skip_special_tokens=True).strip() == \
        rec["output"]
    # generation sees exactly the training prompt
    assert encode_prompt(rec, tok) == ids[:1 + len(p)]


def test_train_on_inputs(tok):
    rec = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    (ex,) = tokenize_records([rec], tok, "alpaca", 512, train_on_inputs=True)
    assert ex.loss_mask.tolist() == [0] + [1] * (len(ex) - 1)
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[-1] == tok.eos_token_id


def test_alpaca_too_long_skipped_with_warning(tok):
    recs = [{"instruction": "Name a colour.", "output": "Red."},
            {"instruction": "Write a lot. " * 40, "output": "x"}]
    n_short = len(tokenize_records(recs[:1], tok, "alpaca", 512)[0])
    with pytest.warns(DataWarning, match="skipped 1 of 2"):
        out = tokenize_records(recs, tok, "alpaca", n_short)
    assert len(out) == 1 and len(out[0]) == n_short


# ------------------------------------------------------------------------------------ rag

def rag_record(n_passages=6):
    passages = [{"title": f"Town {i}",
                 "text": f"Town {i} lies on a quiet river. " * 6 + f"Its bakery opened in {1800 + i}."}
                for i in range(n_passages)]
    if n_passages > 1:
        passages[1] = passages[1]["text"]  # mixed plain-string passage
    return {"question": "In which year did the bakery of Town 0 open?", "contexts": passages,
            "answer": "The bakery of Town 0 opened in 1800."}


def test_rag_prompt_format():
    rec = rag_record(2)
    p = format_prompt(rec)
    assert p.startswith(PROMPT_TEMPLATES["rag"]["header"])
    assert "[1] Town 0\nTown 0 lies" in p and "[2] Town 1 lies" in p
    assert p.endswith("### Question:\n" + rec["question"] + "\n\n### Answer:\n")
    assert "### Passages" not in format_prompt({"question": "Q?", "contexts": [], "answer": "A"})


def test_rag_fits_whole(tok):
    rec = rag_record()
    (ex,) = tokenize_records([rec], tok, "rag", 4096)
    assert tok.decode(ex.input_ids, skip_special_tokens=True).startswith(format_prompt(rec).strip())
    a = enc(tok, rec["answer"])
    assert ex.loss_mask.sum() == len(a) + 1 and ex.loss_mask[-len(a) - 1:].all()


def test_rag_truncation_drops_passages_keeps_question_and_answer(tok):
    rec = rag_record()
    full = len(tokenize_records([rec], tok, "rag", 4096)[0])
    for max_len in (full - 5, full // 2, full // 4):
        with pytest.warns(DataWarning, match="passages were dropped"):
            (ex,) = tokenize_records([rec], tok, "rag", max_len)
        text = tok.decode(ex.input_ids, skip_special_tokens=True)
        assert len(ex) <= max_len
        assert rec["question"] in text and text.rstrip().endswith(rec["answer"])
        kept = [i for i in range(1, 7) if f"[{i}]" in text]
        assert kept == list(range(1, len(kept) + 1)) and kept  # dropped from the end
        assert rec["contexts"][-1]["text"] not in text
        assert ex.input_ids[-1] == tok.eos_token_id
        a = enc(tok, rec["answer"])
        assert ex.loss_mask.tolist() == [0] * (len(ex) - len(a) - 1) + [1] * (len(a) + 1)
        assert encode_prompt(rec, tok, max_len=max_len - len(a) - 1) == \
            ex.input_ids[:len(ex) - len(a) - 1].tolist()
    # a budget between passages keeps the next passage truncated
    with pytest.warns(DataWarning):
        (ex,) = tokenize_records([rec], tok, "rag", full // 2)
    text = tok.decode(ex.input_ids, skip_special_tokens=True)
    kept = [i for i in range(1, 7) if f"[{i}]" in text]
    last = rec["contexts"][kept[-1] - 1]
    assert (last["text"] if isinstance(last, dict) else last) not in text  # truncated
    assert len(ex) >= full // 2 - 12


def test_rag_question_answer_too_long_is_skipped(tok):
    ok = rag_record(1)
    big = {"question": "Why? " * 200, "contexts": ["short"], "answer": "Because."}
    with pytest.warns(DataWarning) as record:
        out = tokenize_records([ok, big], tok, "rag", 200)
    assert any("skipped 1 of 2" in str(w.message) for w in record)
    assert len(out) == 1 and ok["question"] in tok.decode(out[0].input_ids)
    with pytest.raises(DataError, match="every example is longer than max_seq_len=200"):
        tokenize_records([big], tok, "rag", 200)


# ------------------------------------------------------------------------------------ text

def test_text_loss_everywhere_and_chunking(tok):
    text = "The heart pumps blood through a closed loop of arteries and veins. " * 20
    (ex,) = tokenize_records([{"text": "Ice floats."}], tok, "text", 64)
    assert ex.loss_mask.tolist() == [0] + [1] * (len(ex) - 1)
    assert ex.input_ids.tolist() == [tok.bos_token_id] + enc(tok, "Ice floats.") + [tok.eos_token_id]
    chunks = tokenize_records([{"text": text}], tok, "text", 64)
    assert len(chunks) > 1
    assert all(len(c) <= 64 and c.input_ids[0] == tok.bos_token_id for c in chunks)
    assert all(c.loss_mask.tolist() == [0] + [1] * (len(c) - 1) for c in chunks)
    body = sum((c.input_ids[1:].tolist() for c in chunks), [])
    assert body == enc(tok, text) + [tok.eos_token_id]


def test_auto_template_and_samples(tok):
    for name in ("alpaca", "rag", "text"):
        recs = load_records(sample_data_path(name))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            exs = tokenize_records(recs, tok, "auto", 512)
            assert len(exs) > 0
            assert all(e.loss_mask[0] == 0 and e.loss_mask.sum() > 0 for e in exs)
    assert len(load_records(sample_data_path("alpaca"))) == 64
    with pytest.raises(ConfigError):
        tokenize_records([{"text": "x"}], tok, "chat", 64)


# ------------------------------------------------------------------------------------ batching

def fake_examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = np.concatenate([[1], rng.integers(3, 500, n - 1)]).astype(np.int32)
        mask = np.zeros(n, np.int32)
        mask[n // 2:] = 1
        out.append(Example(ids, mask, f"ex{i}"))
    return out


def segments(batch):
    """(tokens, loss_mask) of every packed example in a batch, checking positions."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        ids = [s for s in np.unique(seg) if s != 0]
        assert ids == list(range(1, len(ids) + 1))
        for s in ids:
            where = np.flatnonzero(seg == s)
            assert (np.diff(where) == 1).all()  # contiguous: never split
            assert batch["positions"][r, where].tolist() == list(range(len(where)))
            assert batch["loss_mask"][r, where[0]] == 0
            out.append((tuple(batch["tokens"][r, where]), tuple(batch["loss_mask"][r, where])))
        pad = seg == 0
        assert (batch["tokens"][r, pad] == 7).all() and not batch["loss_mask"][r, pad].any()
        assert not batch["positions"][r, pad].any()
        if ids:
            assert not pad[:np.flatnonzero(~pad)[-1]].any()  # padding only at the end
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_batches_cover_every_example_once(pack):
    exs = fake_examples([5, 17, 30, 3, 64, 12, 40, 8, 25, 9, 33, 2])
    it = BatchIterator(exs, 3, 64, pad_id=7, pack=pack, seed=1, epochs=1, drop_last=False)
    batches = list(it)
    assert len(batches) == it.steps_per_epoch
    for b in batches:
        assert set(b) == {"tokens", "loss_mask", "segment_ids", "positions"}
        assert all(v.shape == (3, 64) and v.dtype == np.int32 for v in b.values())
    got = sorted(s for b in batches for s in segments(b))
    want = sorted((tuple(e.input_ids), tuple(e.loss_mask)) for e in exs)
    assert got == want
    if pack:
        assert it.num_rows < len(exs)
        assert max(b["segment_ids"].max() for b in batches) > 1
    else:
        assert it.num_rows == len(exs) and max(b["segment_ids"].max() for b in batches) == 1


def test_packing_is_first_fit():
    exs = fake_examples([40, 30, 20, 10, 5])
    it = BatchIterator(exs, 1, 64, pack=True, shuffle=False)
    assert it.rows == [[0, 2], [1, 3, 4]]


def test_shuffle_deterministic_by_seed():
    exs = fake_examples(range(2, 42))

    def run(seed, n=12):
        it = BatchIterator(exs, 4, 48, seed=seed)
        return [next(it)["tokens"] for _ in range(n)]

    a, b, c = run(0), run(0), run(1)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))
    # epoch 0 and epoch 1 use different orders (10 steps per epoch)
    assert not (a[0] == a[10]).all()
    it = BatchIterator(exs, 4, 48, seed=0)
    assert it.steps_per_epoch == 10
    first = {tuple(r) for b in a[:10] for r in b}
    assert len(first) == 40  # one epoch sees every row once


@pytest.mark.parametrize("pack", [False, True])
def test_resume_gives_identical_batches(pack):
    exs = fake_examples(range(3, 50, 2))
    kw = dict(pad_id=0, pack=pack, seed=3, epochs=3)
    ref = BatchIterator(exs, 2, 64, **kw)
    all_batches = list(ref)
    assert len(all_batches) == 3 * ref.steps_per_epoch
    for k in (0, 1, ref.steps_per_epoch - 1, ref.steps_per_epoch + 2):
        it = BatchIterator(exs, 2, 64, **kw)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.state()))  # survives a checkpoint round trip
        resumed = BatchIterator.from_state(state, exs, 2, 64, **kw)
        rest = list(resumed)
        assert len(rest) == len(all_batches) - k
        for x, y in zip(rest, all_batches[k:]):
            assert all((x[key] == y[key]).all() for key in x)
    with pytest.raises(DataError, match="seed"):
        BatchIterator(exs, 2, 64, pack=pack, seed=4).restore(state)


def test_drop_last_and_batch_too_large():
    exs = fake_examples([4] * 10)
    assert BatchIterator(exs, 3, 8).steps_per_epoch == 3
    assert len(list(eval_batches(exs, 3, 8))) == 4
    last = list(eval_batches(exs, 3, 8))[-1]
    assert last["segment_ids"][1:].sum() == 0 and last["loss_mask"][1:].sum() == 0
    with pytest.raises(DataError, match="batch_size=11 is larger than the 10 examples"):
        BatchIterator(exs, 11, 8)
    with pytest.raises(DataError, match="more than max_seq_len"):
        BatchIterator(exs, 1, 3)


def test_collate_and_pad_id(tok):
    b = collate([[Example(np.array([1, 5, 6], np.int32), np.array([0, 1, 1], np.int32))]], 5,
                pad_id=pad_token_id(tok), batch_size=2)
    assert b["tokens"].tolist() == [[1, 5, 6, 0, 0], [0] * 5]
    assert b["positions"].tolist() == [[0, 1, 2, 0, 0], [0] * 5]


def test_split_train_eval():
    exs = list(range(100))
    tr, ev = split_train_eval(exs, 0.1, seed=0)
    assert len(ev) == 10 and len(tr) == 90 and sorted(tr + ev) == exs
    assert split_train_eval(exs, 0.1, seed=0) == (tr, ev)
    assert split_train_eval(exs, 0.1, seed=1)[1] != ev
    assert split_train_eval(exs, 0.0, seed=0) == (exs, [])
    assert len(split_train_eval(exs[:5], 0.01, seed=0)[1]) == 1
    with pytest.raises(ConfigError):
        split_train_eval(exs, 1.0, seed=0)


# ------------------------------------------------------------------------------------ errors

def test_load_json_list_and_jsonl(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    p = tmp_path / "d.json"
    p.write_text(json.dumps(rows, indent=2))
    recs = load_records(p)
    assert recs == rows and recs[1].line == 6 and "d.json, line 6" in recs[1].where
    q = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.jsonl").write_text(q.read_text() + "\n\n")
    assert load_records(q) == rows


def test_malformed_json_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: malformed JSON.*fix or remove"):
        load_records(p)
    p = tmp_path / "bad.json"
    p.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(DataError, match=r"bad\.json, line 3: malformed JSON"):
        load_records(p)
    p = tmp_path / "notobj.jsonl"
    p.write_text('{"text": "a"}\n["text"]\n')
    with pytest.raises(DataError, match=r"notobj\.jsonl, line 2: expected a JSON object"):
        load_records(p)


def test_missing_and_wrong_field(tmp_path, tok):
    p = write_jsonl(tmp_path / "m.jsonl", [{"instruction": "a", "output": "b"},
                                           {"instruction": "c"}])
    with pytest.raises(DataError, match=r"m\.jsonl, line 2.*missing required field 'output'"):
        load_dataset(p, tok, "alpaca", 64)
    p = write_jsonl(tmp_path / "w.jsonl", [{"instruction": "a", "output": "b"},
                                           {"instruction": "a", "input": 3, "output": "b"}])
    with pytest.raises(DataError, match=r"w\.jsonl, line 2.*field 'input' must be a string, got a "
                                        "number"):
        load_dataset(p, tok, "auto", 64)
    p = write_jsonl(tmp_path / "r.jsonl", [{"question": "q", "contexts": "one", "answer": "a"}])
    with pytest.raises(DataError, match=r"r\.jsonl, line 1.*field 'contexts' must be a list"):
        load_dataset(p, tok, "auto", 64)
    p = write_jsonl(tmp_path / "r2.jsonl", [{"question": "q", "contexts": [{"title": "t"}],
                                             "answer": "a"}])
    with pytest.raises(DataError, match=r"r2\.jsonl, line 1.*'contexts\[0\]\.text'"):
        load_dataset(p, tok, "rag", 64)
    p = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"u\.jsonl, line 1.*cannot infer the data template"):
        load_dataset(p, tok, "auto", 64)


def test_empty_and_missing_file(tmp_path, tok):
    for content in ("", "\n  \n", "[]"):
        p = tmp_path / "empty.jsonl"
        p.write_text(content)
        with pytest.raises(DataError, match=r"empty\.jsonl.*empty"):
            load_records(p)
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="empty"):
        tokenize_records([], tok, "alpaca", 64)


def test_all_examples_too_long(tmp_path, tok):
    p = write_jsonl(tmp_path / "long.jsonl",
                    [{"instruction": "Tell a long story about rivers.", "output": "Once."}] * 3)
    with pytest.raises(DataError, match=r"every example is longer than max_seq_len=16 .*"
                                        r"long\.jsonl, line 1.*raise max_seq_len"):
        load_dataset(p, tok, "alpaca", 16)

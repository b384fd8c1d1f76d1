"""Preference pairs through the tokenized-data cache (spmd_lora.data.pair_cache), against the
pairs tokenized in memory (tokenize_pairs): the same tokens, masks and prompt lengths, the same
batches in both layouts (packed too) and the same train / eval split; a second load reuses the
entry and repeats its warnings; a build that fails half way leaves nothing behind."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from spmd_lora.data import PairBatchIterator, TokenizedPairs, load_pairs, split_train_eval
from spmd_lora.data import cache as cache_mod
from spmd_lora.data import pair_cache
from spmd_lora.data.preference import tokenize_pairs
from spmd_lora.data.records import load_records
from spmd_lora.errors import DataError
from spmd_lora.tiny import asset_path

MAX = 256
CONVERSATION = [{"role": "user", "content": "Where is the lighthouse?"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from spmd_lora.tiny import build_tiny_llama
    from spmd_lora.tokenizer import load_tokenizer
    return load_tokenizer(build_tiny_llama(tmp_path_factory.mktemp("tiny"), num_hidden_layers=1))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Every kind of preference row: the bundled prompt rows, chat rows, rag rows (one too long,
    fitted), and a pair too long for MAX (skipped)."""
    rows = [json.loads(x) for x in asset_path("dpo_sample.jsonl").read_text().splitlines()][:12]
    filler = "the harbour master logs every ship that enters the bay at dawn " * 5
    for i in range(6):
        passages = [{"title": f"Log {k}", "text": filler if i == 3 else f"Log {k} is short."}
                    for k in range(4)]
        rows.append({"question": f"How tall is tower {i}?", "contexts": passages,
                     "oracle_index": [1], "chosen": f"{i} metres.",
                     "rejected": "The passages do not say."})
        rows.append({"messages": CONVERSATION, "chosen": f"On cape {i}.",
                     "rejected": [{"role": "assistant", "content": "Nowhere."}]})
    rows.append({"prompt": "word " * 300, "chosen": "a", "rejected": "b"})
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(path, tok, shared, cdir, workers=1):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = load_pairs(path, tok, MAX, shared, "chatml", cache_dir=cdir, workers=workers)
    return pairs, sorted(str(w.message) for w in caught)


def _same_pairs(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.prompt_len == w.prompt_len and g.shared_prefix == w.shared_prefix
        for a, b in ((g.chosen, w.chosen), (g.rejected, w.rejected)):
            np.testing.assert_array_equal(a.input_ids, b.input_ids)
            np.testing.assert_array_equal(a.loss_mask, b.loss_mask)


@pytest.mark.parametrize("shared", [True, False])
def test_cached_pairs_equal_pairs_tokenized_in_memory(tok, mixed, tmp_path, shared, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK_ROWS", 5)          # several chunks, merged summaries
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want = tokenize_pairs(load_records(mixed), tok, MAX, shared, "chatml")
    want_warnings = sorted(str(w.message) for w in caught)
    assert any("skipped 1 of 25 preference pairs" in m for m in want_warnings)
    assert any("shortened the passages of 1 of 25" in m for m in want_warnings)
    got, said = _load(mixed, tok, shared, tmp_path / "c")
    assert isinstance(got, TokenizedPairs) and said == want_warnings
    _same_pairs(got, want)
    np.testing.assert_array_equal(got.lengths, [len(p) for p in want])
    # worker processes build the same entry
    pooled, _ = _load(mixed, tok, shared, tmp_path / "pool", workers=2)
    _same_pairs(pooled, want)
    # batches (packed too, shared prefix only) and the train / eval split
    for pack in ((False, True) if shared else (False,)):
        its = [PairBatchIterator(p, 3, MAX, pack=pack, seed=4, epochs=2) for p in (got, want)]
        assert its[0].pairs_per_row == its[1].pairs_per_row
        runs = [list(it) for it in its]
        assert len(runs[0]) == len(runs[1]) > 0
        for a, b in zip(*runs):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    (tr, ev), (tr_ref, ev_ref) = (split_train_eval(p, 0.25, seed=3) for p in (got, want))
    assert isinstance(ev, TokenizedPairs)
    _same_pairs(tr, tr_ref)
    _same_pairs(ev, ev_ref)


def test_second_load_reuses_the_entry_and_keys_separate_layouts(tok, mixed, tmp_path,
                                                                monkeypatch):
    cdir = tmp_path / "c"
    first, said = _load(mixed, tok, True, cdir)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cached entry was tokenized again")
    monkeypatch.setattr(pair_cache, "tokenize_pair_chunk", no_tokenizing)
    again, said_again = _load(mixed, tok, True, cdir)
    assert said_again == said and said                        # warnings repeat on every load
    _same_pairs(again, first)
    with pytest.raises(AssertionError, match="tokenized again"):   # another layout: its own entry
        _load(mixed, tok, False, cdir)
    assert len([p for p in cdir.iterdir() if p.is_dir()]) == 1


def test_a_failed_build_leaves_nothing_and_errors_name_the_row(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK_ROWS", 2)
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(5)]
    rows[3] = {"prompt": "p", "chosen": 7, "rejected": "b"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cdir = tmp_path / "c"
    with pytest.raises(DataError, match=r"bad\.jsonl, line 4 \(record 3\): field 'chosen'"):
        load_pairs(bad, tok, MAX, cache_dir=cdir, workers=1)
    assert [p.name for p in cdir.iterdir() if p.is_dir()] == []
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 300, "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"every preference pair is longer than max_seq_len=256 "
                                        r"\(first: .*long\.jsonl, line 1"):
        load_pairs(long, tok, MAX, cache_dir=cdir, workers=1)
    assert [p.name for p in cdir.iterdir() if p.is_dir()] == []

"""Parquet / Arrow / save_to_disk inputs and the memory-mapped tokenized-data cache."""
import json
import os
import warnings

import numpy as np
import pytest

from spmd_lora.data import (BatchIterator, DataWarning, load_or_build, load_records,
                            split_train_eval, tokenize_records)
from spmd_lora.data import cache as cache_mod
from spmd_lora.errors import DataError
from spmd_lora.tiny import sample_data_path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from spmd_lora.tiny import build_tokenizer
    return AutoTokenizer.from_pretrained(str(build_tokenizer(tmp_path_factory.mktemp("tok"))))


def rows_of(name):
    return [json.loads(x) for x in sample_data_path(name).read_text().splitlines() if x.strip()]


def columnar_rows(name):
    """The sample's rows with every RAG passage an object (Arrow columns have one type; a
    passage string and {"title": null, "text": string} give the same prompt)."""
    rows = rows_of(name)
    for r in rows:
        if "contexts" in r:
            r["contexts"] = [c if isinstance(c, dict) else {"title": None, "text": c}
                             for c in r["contexts"]]
    return rows


def batches(examples, tok_pad=0, pack=False):
    it = BatchIterator(examples, batch_size=4, max_seq_len=512, pad_id=tok_pad, pack=pack,
                       seed=1, epochs=2)
    return list(it)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("name", ["rag", "alpaca"])
def test_parquet_arrow_and_save_to_disk_equal_jsonl(tok, tmp_path, name):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = sample_data_path(name)
    rows = columnar_rows(name)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=7)
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_file(str(tmp_path / "d.arrow"), table.schema) as w:
        w.write_table(table)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"), num_shards=2)

    ref = tokenize_records(load_records(jsonl), tok, "auto", 512)
    ref_cached = load_or_build(jsonl, tok, "auto", 512, cache_dir=tmp_path / "c", workers=1)
    assert_same_batches(batches(ref_cached), batches(ref))
    for src in ("d.parquet", "d.arrow", "saved"):
        assert len(load_records(tmp_path / src)) == len(rows)
        got = load_or_build(tmp_path / src, tok, "auto", 512, cache_dir=tmp_path / "c", workers=1)
        assert_same_batches(batches(got), batches(ref))
        assert_same_batches(batches(got, pack=True), batches(ref, pack=True))


def test_columnar_errors_name_file_column_and_row(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = rows_of("alpaca")[:3]
    rows[2]["output"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet, row 2: field 'output' must be a string, "
                                        r"got null"):
        tokenize_records(load_records(tmp_path / "bad.parquet"), tok, "alpaca", 512)
    pq.write_table(pa.Table.from_pylist([{"instruction": "a"}]), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match=r"nocol\.parquet, row 0: missing required field 'output'"):
        tokenize_records(load_records(tmp_path / "nocol.parquet"), tok, "alpaca", 512)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable \.parquet file"):
        load_records(tmp_path / "junk.parquet")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows_of("alpaca")[:2])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"holds a DatasetDict with splits \['train'\]; pass one "
                                        r"split's directory, e.g. --data .*dd/train"):
        load_records(tmp_path / "dd")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="is a directory without state.json"):
        load_records(tmp_path / "plain")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows_of("alpaca")[:2]).save_to_disk(str(saved))
    for f in saved.glob("*.arrow"):
        f.unlink()
    with pytest.raises(DataError, match="listed in state.json is missing"):
        load_records(saved)


def test_cache_is_reused_keyed_and_equal_to_in_memory(tok, tmp_path, monkeypatch):
    data = tmp_path / "a.jsonl"
    data.write_bytes(sample_data_path("alpaca").read_bytes())
    cdir = tmp_path / "cache"
    with pytest.warns(DataWarning, match="skipped"):
        first = load_or_build(data, tok, "alpaca", 160, cache_dir=cdir, workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        ref = tokenize_records(load_records(data), tok, "alpaca", 160)
    assert len(first) == len(ref)
    for a, b in zip(first, ref):
        assert a.input_ids.tolist() == b.input_ids.tolist()
        assert a.loss_mask.tolist() == b.loss_mask.tolist() and a.loss_mask.dtype == np.int32
    assert isinstance(first.tokens, np.memmap)
    entries = [p for p in cdir.iterdir() if p.is_dir()]
    assert len(entries) == 1

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again although cached")
    monkeypatch.setattr(cache_mod, "_work", no_tokenizing)
    with pytest.warns(DataWarning, match="skipped"):      # the same warning, from the cache
        again = load_or_build(data, tok, "alpaca", 160, cache_dir=cdir, workers=1)
    assert np.array_equal(again.lengths, first.lengths)
    # Another max_seq_len, template option or data content is another entry.
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        load_or_build(data, tok, "alpaca", 200, cache_dir=cdir, workers=1)
        load_or_build(data, tok, "alpaca", 160, train_on_inputs=True, cache_dir=cdir, workers=1)
        data.write_text(data.read_text().replace("a", "e"))
        load_or_build(data, tok, "alpaca", 160, cache_dir=cdir, workers=1)
    assert len([p for p in cdir.iterdir() if p.is_dir()]) == 4
    # The split of memory-mapped examples is a view, equal to the split of a list.
    tr, ev = split_train_eval(first, 0.25, seed=2)
    tr_ref, ev_ref = split_train_eval(list(first), 0.25, seed=2)
    assert [e.input_ids.tolist() for e in ev] == [e.input_ids.tolist() for e in ev_ref]
    assert len(tr) == len(tr_ref) and type(tr).__name__ == "TokenizedData"


def test_cache_build_is_atomic_and_uses_worker_processes(tok, tmp_path, monkeypatch):
    """A build that dies half way leaves no entry (nor temp files) a later run would trust;
    worker processes give the same cache as tokenizing in-process."""
    cdir = tmp_path / "cache"
    data = sample_data_path("rag")
    monkeypatch.setattr(cache_mod, "CHUNK_ROWS", 5)
    calls = []
    real = cache_mod._work

    def dies_on_third(chunk):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(chunk)
    monkeypatch.setattr(cache_mod, "_work", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        load_or_build(data, tok, "rag", 512, cache_dir=cdir, workers=1)
    assert [p.name for p in cdir.iterdir() if p.is_dir()] == []
    monkeypatch.setattr(cache_mod, "_work", real)
    serial = load_or_build(data, tok, "rag", 512, cache_dir=cdir, workers=1)
    # What a SIGKILLed build leaves (a temp dir) is removed by the next build of that key.
    (entry,) = [p for p in cdir.iterdir() if p.is_dir()]
    os.rename(entry, cdir / f".tmp_{entry.name}_killed")
    again = load_or_build(data, tok, "rag", 512, cache_dir=cdir, workers=1)
    assert sorted(p.name for p in cdir.iterdir() if p.is_dir()) == [entry.name]
    assert np.array_equal(again.lengths, serial.lengths)
    pooled = load_or_build(data, tok, "rag", 512, cache_dir=tmp_path / "pool", workers=2)
    assert np.array_equal(np.asarray(serial.tokens), np.asarray(pooled.tokens))
    assert np.array_equal(np.asarray(serial.loss_mask), np.asarray(pooled.loss_mask))
    assert np.array_equal(serial.lengths, pooled.lengths)


def test_cache_errors(tok, tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="the file is empty"):
        load_or_build(empty, tok, "auto", 128, cache_dir=tmp_path / "c")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "b"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl, line 2 \(record 1\): field 'instruction' "
                                        r"must be a string"):
        load_or_build(bad, tok, "auto", 128, cache_dir=tmp_path / "c", workers=1)
    with pytest.raises(DataError, match="every example is longer than max_seq_len=8"):
        load_or_build(sample_data_path("alpaca"), tok, "alpaca", 8, cache_dir=tmp_path / "c",
                      workers=1)
    assert [p.name for p in (tmp_path / "c").iterdir() if p.is_dir()] == []
    ro = tmp_path / "ro"
    ro.write_text("a file, not a directory")
    from spmd_lora.errors import ConfigError
    with pytest.raises(ConfigError, match="tokenized-data cache directory .*ro/x: cannot create the "
                                          "directory: Not a directory; set data_cache_dir"):
        load_or_build(sample_data_path("alpaca"), tok, "alpaca", 512, cache_dir=ro / "x")
    assert os.path.isfile(ro)


@pytest.mark.parametrize("dpo", [False, True])
def test_bench_data_phases(tmp_path, dpo):
    """tools/bench_data.py's synthetic rows (``dpo``: preference pairs) are ~1.5k tokens and
    its phases report (run here in-process on 30 rows; the script runs each phase in a fresh
    subprocess); with ``dpo`` the path without the cache reads the same pairs."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_data.py"
    spec = importlib.util.spec_from_file_location("bench_data", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = tmp_path / "rows.jsonl"
    bench.write_rows(data, 30, dpo=dpo)
    args = argparse.Namespace(dir=str(tmp_path), data=str(data), cache=str(tmp_path / "c"),
                              workers=1, dpo=dpo)
    built = bench.phase_build(args)
    assert built["rows"] == 30 and 1300 < built["tokens_per_row"] < 1800
    started = bench.phase_start(args)
    assert started["rows"] == 30 and started["start_to_first_batch_s"] < 5
    assert started["rss_after_200_batches"]["RssAnon"] > 0
    if dpo:
        assert bench.phase_memory(args)["rows"] == 30

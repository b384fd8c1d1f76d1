"""tools/gpu_suite.py --dry-run (issue #13): every section runs on CPU at tiny shapes with the
Pallas kernel interpreted, and writes a JSON + markdown report and a kernel table the registry
accepts. On a GPU the same command (without --dry-run) validates, tunes and benchmarks.
"""
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

from spmd_lora.kernels import registry

SUITE = Path(__file__).resolve().parents[1] / "tools" / "gpu_suite.py"


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_attention_flop_accounting():
    suite = _load_suite()
    f = suite.attention_flops(1, 4096, 32, 128)
    assert f["fwd"] == 4 * 32 * 4096 ** 2 * 128 / 2          # QK^T + PV, causal half
    assert f["fwd_bwd"] == pytest.approx(3.5 * f["fwd"])
    assert suite.attention_flops(1, 64, 1, 16, causal=False)["fwd"] == 4 * 64 * 64 * 16


def test_dry_run_writes_report_and_table(tmp_path, capsys):
    suite = _load_suite()
    out = tmp_path / "suite"
    before = {k: os.environ.get(k) for k in (registry.TABLE_ENV, suite.PREALLOCATE)}
    assert suite.main(["--dry-run", "--out", str(out)]) == 0
    # neither the suite's table nor the parent's preallocation setting leaks to the caller
    assert {k: os.environ.get(k) for k in before} == before
    report = json.loads((out / "gpu_suite.json").read_text())
    # every section ran in a worker process (the GPU path: no allocator shared between them)
    assert report["environment"]["pid"] != os.getpid()
    md = (out / "gpu_suite.md").read_text()
    assert report["dry_run"] and "DRY RUN" in md
    for key in ("correctness", "sweep", "throughput", "train", "peft", "matmul_peak"):
        assert key in report, key

    rows = report["correctness"]["rows"]
    assert {r["impl"] for r in rows} == {"pallas", "blockwise", "xla"}
    assert {r["dtype"] for r in rows} == {"bfloat16", "float32"}
    assert all(r["status"] == "pass" for r in rows), rows
    assert all(r["dq"] <= report["correctness"]["tolerance"][r["dtype"]] for r in rows)

    assert report["sweep"]["best"] is not None
    ok = [r for r in report["throughput"]["rows"] if r["status"] == "ok"]
    assert {r["impl"] for r in ok} == {"pallas", "blockwise", "xla"}
    assert all(r["fwd_tflops"] > 0 for r in ok)
    assert sorted(report["ranking"]) == ["blockwise", "pallas", "xla"]

    # the table the registry reads: the swept blocks and the ranking for this device kind
    table = registry.load_table(report["kernel_table"])
    entry = table[report["environment"]["device_kind"].lower()]
    assert entry.ranking == tuple(report["ranking"])
    assert entry.blocks_for(16).block_q == report["sweep"]["best"]["block_q"]

    (train,) = report["train"]["rows"]
    assert train["status"] == "ok", train
    assert train["tokens_per_s"] > 0 and math.isfinite(train["loss"])
    assert train["plan_peak_bytes"] > 0 and 0 < train["mfu"]
    peft_rows = report["peft"]["rows"]
    if importlib.util.find_spec("torch") and importlib.util.find_spec("peft"):
        assert [r["grad_ckpt"] for r in peft_rows] == [False, True]
        assert all(r["status"] == "ok" and r["ours_over_peft"] > 0 for r in peft_rows)
    else:
        assert report["peft"]["status"].startswith("skipped")


def test_bad_sections_flag_is_a_clear_error(capsys):
    suite = _load_suite()
    assert suite.main(["--dry-run", "--sections", "a,z"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --sections") and err.count("\n") == 1


def test_workers_get_default_preallocation_and_extra_flags(monkeypatch):
    suite = _load_suite()
    monkeypatch.setenv(suite.PREALLOCATE, "false")      # what the parent sets for itself
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setitem(suite._USER_PREALLOCATE, suite.PREALLOCATE, None)
    env = suite.worker_env("--xla_gpu_dump_autotune_results_to=/x.textproto")
    assert suite.PREALLOCATE not in env
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8",
                                        "--xla_gpu_dump_autotune_results_to=/x.textproto"]
    monkeypatch.setitem(suite._USER_PREALLOCATE, suite.PREALLOCATE, ".5")   # the user's own
    assert suite.worker_env()[suite.PREALLOCATE] == ".5"


def test_merge_autotune_results(tmp_path):
    """XLA writes one file per compiled program; XLA loads one: entries are concatenated
    under a single version line (protobuf text repeats a field by repeating it)."""
    suite = _load_suite()
    a, b = tmp_path / "a.textproto", tmp_path / "b.textproto"
    a.write_text('version: 3\nresults {\n  device: "sm_9.0"\n  hlo: "A"\n}\n')
    b.write_text('version: 3\nresults {\n  device: "sm_9.0"\n  hlo: "B"\n  result {\n'
                 '    run_time {\n      nanos: 7\n    }\n  }\n}\n'
                 'results {\n  device: "sm_9.0"\n  hlo: "C"\n}\n'
                 'results {\n  device: "sm_9.0"\n  hlo: "A"\n}\n')      # A again: kept once
    out = tmp_path / "merged.textproto"
    assert suite.merge_autotune_results([a, b], out) == 3
    text = out.read_text()
    assert text.count("version:") == 1 and text.count('hlo: "A"') == 1
    assert [h for h in "ABC" if f'hlo: "{h}"' in text] == list("ABC") and "nanos: 7" in text
    empty = tmp_path / "empty.textproto"
    empty.write_text("version: 3\n")
    assert suite.merge_autotune_results([empty], tmp_path / "none.textproto") == 0
    assert not (tmp_path / "none.textproto").exists()

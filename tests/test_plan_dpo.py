"""``spmd-lora plan --objective dpo``: the memory of the DPO step by prompt length.

The CPU tests compile the real DPO step of a tiny model on fake CPU devices (fast: a few
compiles of seconds each); the ``--target h100`` tests run where JAX's CUDA plugin is installed
(CI job 3) and skip elsewhere.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spmd_lora.analysis import gpu_targets, plan, plan_dpo
from spmd_lora.cli import plan as plan_cli
from spmd_lora.config.lora_config import LoraConfig
from spmd_lora.config.model_config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16)
LORA = LoraConfig(rank=4, alpha=4, targets="all")
KW = dict(lora=LORA, dtype="float32", remat="full", attention="blockwise")
C = 64                                                  # tokens of each answer


def _tiny_dir(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    return d


def test_rows_of_each_layout():
    """A pair's rows as training batches them (data/preference.py): separate, two rows of
    prompt + answer; shared prefix, one row of the prompt and both answers, each behind a copy
    of the prompt's last token; and back from --max-seq-len to the prompt."""
    assert plan_dpo.dpo_row_len(1000, 64, "separate") == 1064
    assert plan_dpo.dpo_row_len(1000, 64, "shared-prefix") == 999 + 65 + 65
    for layout in plan_dpo.DPO_LAYOUTS:
        assert plan_dpo.dpo_prompt_len(plan_dpo.dpo_row_len(777, 64, layout), 64, layout) == 777
    with pytest.raises(plan_dpo.ConfigError, match="leaves no room for a prompt"):
        plan_dpo.dpo_prompt_len(129, 64, "shared-prefix")


def test_dpo_plan_batch_and_memory_against_sft():
    """The DPO plan of a P-token prompt compiles the DPO step on the layout's rows; it needs
    more memory than the SFT plan of one row of P tokens (both answers come on top), and about
    what SFT needs on the same rows (the reference forward holds nothing past its log-probs)."""
    prompt = 1024 - C
    sep = plan_dpo.plan_dpo_memory(TINY, 1, 1, prompt, completion_len=C, layout="separate", **KW)
    assert (sep["objective"], sep["batch"], sep["max_seq_len"], sep["rows_per_pair"]) == (
        "dpo", 2, 1024, 2)
    assert sep["batch_bytes"] == 5 * 2 * 1024 * 4          # the 5 int32 fields of the schema
    sft_row = plan.plan_memory(TINY, 1, 1, prompt, **KW)
    sft_same = plan.plan_memory(TINY, 1, 1, 1024, batch=2, **KW)
    assert sft_row["objective"] == "sft"
    assert sep["peak"] > sft_row["peak"]
    assert abs(sep["peak"] - sft_same["peak"]) < 0.05 * sft_same["peak"]


def test_shared_prefix_plan_has_segments_and_fits_in_less():
    prompt = 1024 - C
    shared = plan_dpo.plan_dpo_memory(TINY, 1, 1, prompt, completion_len=C, **KW)
    sep = plan_dpo.plan_dpo_memory(TINY, 1, 1, prompt, completion_len=C, layout="separate",
                                   **KW)
    assert (shared["dpo_layout"], shared["batch"], shared["max_seq_len"]) == (
        "shared-prefix", 1, prompt + 2 * C + 1)
    assert shared["batch_bytes"] == 6 * (prompt + 2 * C + 1) * 4    # + segment_ids
    assert shared["peak"] < sep["peak"]


def test_dpo_plan_over_cp():
    """cp 2 splits the shared-prefix row over two devices (zig-zag, padded to 2*cp*tp): less
    memory per device than cp 1 at the same prompt."""
    prompt = 2048
    one = plan_dpo.plan_dpo_memory(TINY, 1, 1, prompt, completion_len=C, **KW)
    two = plan_dpo.plan_dpo_memory(TINY, 1, 1, prompt, completion_len=C, cp=2, **KW)
    assert two["cp"] == 2 and two["max_seq_len"] == one["max_seq_len"] == prompt + 2 * C + 1
    assert two["peak"] < one["peak"]


def _main(argv, capsys):
    rc = plan_cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_shared_prefix_fits_a_longer_prompt_than_separate(tmp_path, capsys):
    """--find-max-seq-len with --objective dpo searches the prompt: under the same budget the
    shared-prefix layout (one row per pair) fits a longer prompt than the separate one (two
    rows); the answer fits and the next prompt tried does not."""
    found = {}
    for layout in plan_dpo.DPO_LAYOUTS:
        out = tmp_path / f"{layout}.json"
        rc, text, err = _main(["--model", str(_tiny_dir(tmp_path)), "--objective", "dpo",
                               "--dpo-layout", layout, "--completion-len", str(C),
                               "--dtype", "float32", "--remat", "full", "--attention",
                               "blockwise", "--lora-rank", "4", "--lora-targets", "all",
                               "--device-memory", "42MB", "--find-max-seq-len", "--json",
                               str(out)], capsys)
        assert rc == 0, err
        res = json.loads(out.read_text())
        best = res["max_prompt_len"]
        assert f"longest prompt: {best} tokens" in text and f"layout {layout}" in text
        assert res["max_seq_len"] == plan_dpo.dpo_row_len(best, C, layout)
        plans = {int(k): v for k, v in res["plans"].items()}
        assert plans[best]["peak"] <= res["budget"] and plans[best]["prompt_len"] == best
        assert plans[min(p for p in plans if p > best)]["peak"] > res["budget"]
        found[layout] = best
    assert found["shared-prefix"] > found["separate"], found


@pytest.mark.parametrize("argv,text", [
    (["--dp", "2", "--batch-size", "3"], "--batch-size 3 (pairs) must be a multiple of --dp 2"),
    (["--completion-len", "0"], "--completion-len must be >= 1"),
    (["--max-seq-len", "100"], "leaves no room for a prompt"),
    (["--find-max-seq-len"], "needs --device-memory"),
])
def test_cli_bad_dpo_flags_give_one_error_line(argv, text, capsys):
    rc, out, err = _main(["--model", "llama3-8b", "--objective", "dpo", *argv], capsys)
    assert rc == 2 and err.startswith("error:") and text in err, err
    assert len(err.strip().splitlines()) == 1


def test_cli_bad_layout_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        plan_cli.main(["--model", "llama3-8b", "--objective", "dpo", "--dpo-layout", "both"])
    assert e.value.code == 2 and "invalid choice: 'both'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --target h100

needs_plugin = pytest.mark.skipif(
    not gpu_targets.cuda_plugin_installed(),
    reason="JAX's CUDA plugin is not installed (pip install -e \".[cuda12]\"): no deviceless "
           "GPU compiles here")

SMALL = ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=2,
                    num_heads=8, num_kv_heads=2, head_dim=128)


def _run(args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)        # what a user's shell has: the CLI copes by itself
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


@needs_plugin
def test_cli_dpo_plan_for_h100s(tmp_path):
    """The DPO step compiled by XLA:GPU for 2 abstract H100s (tp 2, our Pallas kernels), in
    both layouts at the same prompt, in a fresh process as a user runs it: the shared prefix
    needs less, and both more than the SFT step of one row of the prompt."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(SMALL.to_hf_dict()))
    peaks = {}
    for objective, layout in (("sft", None), ("dpo", "separate"), ("dpo", "shared-prefix")):
        out = tmp_path / f"{objective}-{layout}.json"
        extra = (["--objective", "dpo", "--dpo-layout", layout,
                  "--max-seq-len", str(plan_dpo.dpo_row_len(8192, 512, layout))]
                 if layout else ["--max-seq-len", "8192"])
        proc = _run(["-m", "spmd_lora", "plan", "--model", str(model), "--tp", "2", "--target",
                     "h100", "--dtype", "bfloat16", "--remat", "full", "--lora-targets", "all",
                     "--json", str(out), *extra])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "compiled for 2 x NVIDIA H100 80GB HBM3 (XLA:GPU, deviceless compile" \
            in proc.stdout
        p = json.loads(out.read_text())
        assert not p["estimate"] and p["objective"] == objective
        if layout:
            assert p["prompt_len"] == 8192 and p["completion_len"] == 512
        peaks[layout] = p["peak"]
    assert peaks[None] < peaks["shared-prefix"] < peaks["separate"], peaks

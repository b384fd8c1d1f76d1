"""DPO's shared-prefix layout (issue 29): one row per pair (prompt once, then chosen, then
rejected; an answer attends to the prompt and to itself, never to the other answer; positions
restart after the prompt).

Oracles: for the kernels, each answer run as its own sequence (prompt + answer) through the
plain XLA attention without segments; for the step, the separate two-row layout (itself
checked against TRL in tests/test_dpo.py), and tp = 1 for every parallel layout.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lora.data.examples import make_example
from spmd_lora.data.preference import Pair, collate_shared, tokenize_pairs
from spmd_lora.kernels import BlockSizes, attention, branch_segment, reference_attention
from spmd_lora.kernels.registry import choose

jax.config.update("jax_default_matmul_precision", "highest")

BLOCKS = BlockSizes(16, 16, 16, 16)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------- kernels

def _packed_inputs(seed, lens, b=2, h=4, kv=2, d=16):
    """q, k, v, ct [b, S, ...] of rows [prefix | branch 1 | branch 2], segment ids [b, S]
    (branch segments), S = sum(lens); ct is zero on the prefix rows."""
    s = sum(lens)
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, s, kv, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, s, kv, d), jnp.float32)
    ct = jax.random.normal(ks[3], (b, s, h, d), jnp.float32).at[:, :lens[0]].set(0.0)
    seg = np.concatenate([np.full(n, branch_segment(3, role), np.int32)
                          for role, n in enumerate(lens)])
    return q, k, v, ct, jnp.asarray(np.broadcast_to(seg, (b, s)))


def _separate_oracle(q, k, v, ct, lens):
    """(out, (dq, dk, dv)) of sum(out * ct) with each branch run as its own causal sequence
    prefix + branch (no segment ids), put back into the packed rows."""
    n0 = lens[0]
    out = np.zeros(q.shape, np.float64)
    grads = [np.zeros(x.shape, np.float64) for x in (q, k, v)]
    start = n0
    for n in lens[1:]:
        rows = np.r_[0:n0, start:start + n]
        sub = [x[:, rows] for x in (q, k, v, ct)]
        o, vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, causal=True), *sub[:3])
        out[:, start:start + n] = np.asarray(o[:, n0:])
        out[:, :n0] = np.asarray(o[:, :n0])
        for g, gs in zip(grads, vjp(sub[3])):
            g[:, rows] += np.asarray(gs)
        start += n
    return out, grads


@pytest.mark.parametrize("impl", ["xla", "blockwise", "pallas"])
@pytest.mark.parametrize("lens", [(9, 14, 6), (20, 3, 17)])
def test_kernels_mask_branches_like_separate_sequences(impl, lens):
    """Each kernel, on a packed row, equals the two answers run as separate sequences: the
    outputs, and dq / dk / dv (the prompt's dk / dv are the sum of both answers' shares)."""
    q, k, v, ct, seg = _packed_inputs(sum(lens), lens)
    fn = lambda q, k, v: attention(q, k, v, segment_ids=seg, impl=impl,  # noqa: E731
                                   block_sizes=BLOCKS, branch_segments=True)
    out, vjp = jax.vjp(fn, q, k, v)
    ref_out, ref_grads = _separate_oracle(q, k, v, ct, lens)
    errs = [_rel(out, ref_out)] + [_rel(g, r) for g, r in zip(vjp(ct), ref_grads)]
    assert max(errs) < 1e-5, errs


@pytest.mark.parametrize("cp,impl", [(2, "ring"), (4, "ring"), (3, "allgather")])
def test_ring_attention_masks_branches_when_the_prompt_spans_chunks(cp, impl):
    """Ring (and all-gather) attention over cp devices, zig-zag layout, the prompt spread
    over several chunks: the same as the separate sequences."""
    from test_ring_attention import _cp_mesh, _sharded_run
    lens = (23, 11, 16)
    q, k, v, ct, seg = _packed_inputs(cp, lens, b=1)
    out, grads, _ = _sharded_run(_cp_mesh(cp), q, k, v, ct, np.asarray(seg), impl=impl,
                                 zigzag=True)
    ref_out, ref_grads = _separate_oracle(q, k, v, ct, lens)
    errs = [_rel(out, ref_out)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errs) < 1e-5, errs


def test_plain_segments_keep_their_meaning():
    """Ids below the branch base stay plain segments: segment 1 does not see segment 0 (the
    rule that lets a branch see its prefix applies to branch ids only)."""
    lens = (5, 7)
    q, k, v, ct, _ = _packed_inputs(0, (*lens, 0), b=1)
    seg = jnp.asarray(np.r_[np.zeros(5, np.int32), np.ones(7, np.int32)][None])
    out = reference_attention(q, k, v, segment_ids=seg)
    alone = reference_attention(q[:, 5:], k[:, 5:], v[:, 5:])
    assert _rel(out[:, 5:], alone) < 1e-6


def test_registry_keeps_cudnn_and_tokamax_off_branch_segments():
    with pytest.raises(ValueError, match="shared-prefix"):
        choose("cudnn", seq_len=64, head_dim=16, backend="gpu", device_kind="NVIDIA H100",
               segments="branches")
    assert choose("auto", seq_len=64, head_dim=16, backend="cpu",
                  segments="branches").impl == "blockwise"


# ----------------------------------------------------------------------------- data

def test_shared_row_layout():
    """prompt less its last token, then that token + chosen + EOS, then that token + rejected
    + EOS; positions restart after the prompt; the next-token targets weighted in the row are
    exactly those of the two separate rows."""
    from spmd_lora.parallel.zigzag import next_token_targets
    prompt, chosen, rejected = [1, 5, 6, 7], [8, 9, 2], [10, 2]
    ex = lambda ans: make_example(prompt + ans, [0] * 4 + [1] * len(ans), "r")  # noqa: E731
    pair = Pair(ex(chosen), ex(rejected), 4, "r")
    row = pair.shared_row()
    assert row["tokens"].tolist() == [1, 5, 6, 7, 8, 9, 2, 7, 10, 2]
    assert row["positions"].tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4, 5]
    assert (row["segment_ids"] - branch_segment(0, 0)).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert len(pair) == 10 and Pair(ex(chosen), ex(rejected), 4, "r", False).tokens == 13
    t, w = next_token_targets(row["tokens"], row["loss_mask"])
    scored = [int(x) for x, y in zip(t, w) if y]
    assert scored == chosen + rejected
    batch = collate_shared([[pair], []], 12, pad_id=0)
    assert batch["tokens"].shape == (2, 12) and batch["segment_ids"][1].tolist() == [0] * 12
    packed = collate_shared([[pair, pair]], 20)
    assert (packed["segment_ids"][0, 10:] - branch_segment(1, 0)).tolist() == [0, 0, 0, 1, 1,
                                                                                1, 1, 2, 2, 2]
    assert packed["positions"][0, 10:].tolist() == row["positions"].tolist()


def test_tokenized_pairs_fit_max_seq_len_by_layout(tmp_path):
    """max_seq_len bounds the one shared row (prompt once), or each separate row."""
    from spmd_lora.tiny import build_tiny_llama
    from spmd_lora.tokenizer import load_tokenizer
    tok = load_tokenizer(build_tiny_llama(tmp_path / "tiny", num_hidden_layers=1))
    rec = {"prompt": "the quick brown fox jumps over the lazy dog " * 3,
           "chosen": "yes it does", "rejected": "no"}
    sep = tokenize_pairs([rec], tok, 1000, shared_prefix=False)[0]
    shared = tokenize_pairs([rec], tok, 1000)[0]
    n = len(shared)
    assert n == len(sep.chosen) + len(sep.rejected) - sep.prompt_len + 1 < sep.tokens
    with pytest.warns(Warning, match="skipped 1 of 2"):
        kept = tokenize_pairs([rec, {**rec, "chosen": "x " * 200}], tok, n)
    assert len(kept) == 1 and len(kept[0]) == n


# ----------------------------------------------------------------------------- the step

def _pair_batches(vocab, n_pairs, seq, seed):
    """The same random pairs in both layouts: (separate tokens / loss_mask [2P, S], shared
    batch dict [P, S'])."""
    from test_dpo import _pairs
    tokens, mask = _pairs(vocab, n_pairs, seq, seed)
    pairs = []
    for i in range(n_pairs):
        rows = []
        for r in (2 * i, 2 * i + 1):
            n = int(np.flatnonzero(mask[r]).max()) + 1
            rows.append(make_example(tokens[r, :n].tolist(), mask[r, :n].tolist(), "t"))
        pairs.append(Pair(*rows, int(np.flatnonzero(mask[2 * i])[0]), f"pair {i}"))
    width = max(len(p) for p in pairs) + 3          # a ragged width: padding at the end
    packed_width = max(len(a) + len(b) for a, b in zip(pairs[0::2], pairs[1::2])) + 1
    return (tokens, mask, collate_shared([[p] for p in pairs], width),
            collate_shared([pairs[0::2], pairs[1::2]], packed_width))


@pytest.fixture(scope="module")
def step_setup(hf_models, tmp_path_factory):
    from conftest import make_peft_adapter
    path, hf = hf_models("gqa4")
    adapter_dir = tmp_path_factory.mktemp("dpo_shared_adapter")
    make_peft_adapter(hf, adapter_dir)
    tokens, mask, shared, packed = _pair_batches(hf.config.vocab_size, 4, 19, 3)
    return path, adapter_dir, tokens, mask, shared, packed


def _step(path, adapter_dir, batch, shared, tp=1, dp=1, cp=1, micro=1, pairs_per_row=1,
          **options):
    """(metrics, LoRA gradients) of one DPO step (sigmoid, beta 0.5) on ``batch``."""
    import spmd_lora
    from spmd_lora.engine.step import make_train_step
    from spmd_lora.model import ForwardOptions, PreferenceLoss
    from spmd_lora.parallel.placement import replicate, shard_micro_batches
    from spmd_lora.weights.peft import load_adapter
    from test_dpo import _grad_keeper
    model = spmd_lora.load_model(path, tp=tp, dp=dp, cp=cp)
    lora, lcfg = load_adapter(adapter_dir, model.config)
    opt = _grad_keeper()
    lora = replicate(lora, model.mesh)
    state = replicate(opt.init(lora), model.mesh)
    step = make_train_step(ForwardOptions(model.config, tp, lcfg, cp=cp, **options), model.mesh,
                           opt, preference=PreferenceLoss(beta=0.5, shared_prefix=shared,
                                                          pairs_per_row=pairs_per_row))
    rows = batch["tokens"].shape[0] // micro
    batch = {k: np.asarray(v).reshape(micro, rows, -1).astype(np.int32) for k, v in batch.items()}
    _, state, m = step(model.params, lora, state, shard_micro_batches(batch, model.mesh),
                       jax.random.key(0))
    return {k: float(v) for k, v in m.items()}, jax.device_get(state)


def _assert_same(got, want, tol=1e-4):
    """Relative errors; the rewards (beta times a difference of two sequence log-probs of
    ~50 nats, float32 sums) relative to beta times the log-probs' size."""
    (m, g), (m_ref, g_ref) = got, want
    reward_scale = 0.5 * max(abs(m_ref["logps/chosen"]), abs(m_ref["logps/rejected"]))
    errs = {k: abs(m[k] - m_ref[k]) if k == "rewards/accuracies" else
            abs(m[k] - m_ref[k]) / (reward_scale if k.startswith("rewards/") else abs(m_ref[k]))
            for k in m_ref if k not in ("tokens", "grad_norm")}
    for proj, factors in g_ref["layers"].items():
        for f, ref in factors.items():
            errs[f"{proj}.{f}"] = _rel(g["layers"][proj][f], ref)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, (worst, errs)
    return errs


@pytest.fixture(scope="module")
def separate_reference(step_setup):
    path, adapter_dir, tokens, mask, _, _ = step_setup
    return _step(path, adapter_dir, {"tokens": tokens, "loss_mask": mask}, False)


@pytest.mark.parametrize("attention_impl", ["blockwise", "xla", "pallas"])
def test_shared_prefix_equals_separate_rows(step_setup, separate_reference, attention_impl):
    """One row per pair gives the separate layout's loss, TRL metrics and every LoRA
    gradient, whichever of our kernels runs the attention."""
    path, adapter_dir, _, _, shared, _ = step_setup
    got = _step(path, adapter_dir, shared, True, attention_impl=attention_impl)
    _assert_same(got, separate_reference)
    assert got[0]["pairs"] == 4 and got[0]["loss"] > 0


@pytest.mark.parametrize("layout", [
    {"tp": 2}, {"tp": 2, "sequence_parallel": False}, {"dp": 2}, {"cp": 2}, {"cp": 2, "tp": 2},
    {"cp": 2, "dp": 2}, {"micro": 2}, {"tp": 4, "ce_chunk_tokens": 8}])
def test_shared_prefix_layouts_equal_tp1(step_setup, separate_reference, layout):
    """tp (more devices than kv heads at tp 4), sequence parallelism on and off, dp, cp
    (ring attention, the prompt over several chunks), micro-batches: all equal tp = 1
    (checked through the separate layout, which equals the shared one at tp = 1)."""
    path, adapter_dir, _, _, shared, _ = step_setup
    _assert_same(_step(path, adapter_dir, shared, True, **layout), separate_reference)


@pytest.mark.parametrize("layout", [{}, {"cp": 2, "tp": 2}, {"dp": 2}])
def test_packed_pairs_equal_separate_rows(step_setup, separate_reference, layout):
    """Two pairs packed into one row (each answer sees only its own prompt), alone and under
    cp + tp and dp: the separate layout's loss, metrics and gradients."""
    path, adapter_dir, _, _, _, packed = step_setup
    got = _step(path, adapter_dir, packed, True, pairs_per_row=2, **layout)
    _assert_same(got, separate_reference)
    assert got[0]["pairs"] == 4


def test_cli_layouts_train_alike(tmp_path, capsys):
    """`train --objective dpo` with --dpo-layout shared-prefix (default) and separate: the
    same losses and rewards step by step, and the shared rows hold fewer tokens."""
    from spmd_lora import cli
    from spmd_lora.tiny import asset_path, build_tiny_llama
    model = build_tiny_llama(tmp_path / "tiny", num_hidden_layers=2)
    runs = {}
    for layout in ("shared-prefix", "separate"):
        out = tmp_path / layout
        rc = cli.main(["train", "--model", str(model), "--data",
                       str(asset_path("dpo_sample.jsonl")), "--output-dir", str(out),
                       "--objective", "dpo", "--dpo-layout", layout, "--max-seq-len", "96",
                       "--batch-size", "4", "--max-steps", "3", "--learning-rate", "1e-2",
                       "--lora-dropout", "0", "--no-census"])
        assert rc == 0, capsys.readouterr().err
        runs[layout] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs["shared-prefix"], runs["separate"]):
        for k in ("loss", "rewards/margins", "logps/chosen"):
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(b[k])), (k, a[k], b[k])
        assert a["tokens"] == b["tokens"]      # completion tokens: the same in both layouts


def test_cli_packed_pairs(tmp_path, capsys):
    """`train --objective dpo --pack`: more pairs than rows per step, TRL's metrics logged."""
    from spmd_lora import cli
    from spmd_lora.tiny import asset_path, build_tiny_llama
    model = build_tiny_llama(tmp_path / "tiny", num_hidden_layers=1)
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", str(model), "--data", str(asset_path("dpo_sample.jsonl")),
                   "--output-dir", str(out), "--objective", "dpo", "--pack", "--max-seq-len",
                   "256", "--batch-size", "2", "--max-steps", "2", "--no-census"])
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["pairs"] > 2 for m in lines) and "rewards/accuracies" in lines[0], lines
    rc = cli.main(["train", "--model", str(model), "--data", "x.jsonl", "--output-dir",
                   str(tmp_path / "o"), "--objective", "dpo", "--pack", "--dpo-layout",
                   "separate"])
    assert rc == 2 and "needs --dpo-layout shared-prefix" in capsys.readouterr().err


def test_cudnn_with_shared_prefix_is_a_config_error():
    from spmd_lora.config.train_config import TrainConfig
    from spmd_lora.errors import ConfigError
    with pytest.raises(ConfigError, match="dpo-layout separate"):
        TrainConfig(model="m", data="d", output_dir="o", objective="dpo", attention="cudnn")


def test_layout_benchmark_runs_and_counts_the_prompt_once():
    """tools/bench_dpo_layouts.py at a toy size: the shared row holds the prompt once, and
    its step's useful FLOPs are fewer than the two-row layout's."""
    import subprocess
    import sys
    from pathlib import Path
    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_dpo_layouts.py"
    p = subprocess.run([sys.executable, str(tool), "--prompt", "96", "--answer", "8",
                        "--layers", "1", "--hidden", "64", "--steps", "1", "--warmup", "0",
                        "--no-trl"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {line.split("  ")[0].strip(): line for line in p.stdout.splitlines()
            if line.startswith("ours")}
    sep, shared = rows["ours, separate"], rows["ours, shared-prefix"]
    assert " tokens    208 " in sep and " tokens    113 " in shared, p.stdout
    useful = lambda line: float(line.split("FLOPs useful")[1].split("G")[0])  # noqa: E731
    assert useful(sep) > 1.5 * useful(shared), p.stdout

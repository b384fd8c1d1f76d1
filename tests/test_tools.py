"""HLO collective census, memory plan, tools/profile.py and tools/bench.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spmd_lora.analysis import hlo
from spmd_lora.cli import plan
from spmd_lora.config.model_config import PRESETS, ModelConfig
from spmd_lora.config.lora_config import LoraConfig
from spmd_lora.model import ForwardOptions

ROOT = Path(__file__).resolve().parents[1]
# Dimensions chosen so no activation shape has the LoRA rank (4) as a dimension.
TINY = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_layers=3,
                   num_heads=4, num_kv_heads=4, head_dim=12)
S, RANK, MICRO = 40, 4, 2


def _census(tp, dp, remat="full", targets="all", micro=MICRO, batch=None, sp=False,
            mlp_chunk=0, ce_chunk=4096, seq=S):
    lora = LoraConfig(rank=RANK, alpha=8.0, targets=targets)
    lowered, mesh, _ = plan.lower_train_step(
        TINY, tp, dp, max_seq_len=seq, batch=batch or dp, lora=lora, dtype="float32", remat=remat,
        attention="xla", micro_batches=micro, sequence_parallel=sp, mlp_chunk_tokens=mlp_chunk,
        ce_chunk_tokens=ce_chunk)
    census = hlo.collective_census(lowered.compile(), mesh, lowered)
    b_local = (batch or dp) // dp
    s_pad = -(-seq // tp) * tp if sp else seq
    # independent of ForwardOptions.tile_counts: rows per device, tiles of the gathered tokens
    rows, g = (s_pad // tp, tp) if sp else (seq, 1)
    tiles = -(-rows // max(mlp_chunk // g, 1)) if mlp_chunk and mlp_chunk // g < rows else 1
    ce_chunks = -(-(b_local * rows) // max(ce_chunk // g, 1))
    assert ForwardOptions(TINY, tp, sequence_parallel=sp, mlp_chunk_tokens=mlp_chunk,
                          ce_chunk_tokens=ce_chunk).tile_counts(seq, b_local) == (tiles, ce_chunks)
    expected = hlo.expected_collectives(
        TINY, tp, dp, sequence_parallel=sp, lora=lora, remat=remat, micro_batches=micro,
        mlp_tiles=tiles, ce_chunks=ce_chunks, tokens=b_local * seq, padded_tokens=b_local * s_pad,
        dtype_bytes=4)
    return census, hlo.measured(census, RANK), expected


# ----------------------------------------------------------------------------- census on the real step

@pytest.mark.parametrize("remat,targets", [("full", "all"), ("none", "q_proj,v_proj")])
def test_census_matches_formula(remat, targets):
    census, meas, exp = _census(tp=2, dp=1, remat=remat, targets=targets)
    assert meas["tp_activation_reductions"] == exp["tp_activation_reductions"]
    for kw in ({"remat": "offload-input"}, {"remat": remat, "mlp_chunk": 16}):  # tiles too
        _, other, other_exp = _census(tp=2, dp=1, targets=targets, **kw)
        assert other["tp_activation_reductions"] == other_exp["all_reduce"], kw
    # only all-reduces: no weight is ever all-gathered, nothing else is emitted
    assert {r["kind"] for r in census} == {"all-reduce"}
    assert meas["non_all_reduce_ops"] == 0
    # exactly two forward psums per layer per micro-batch, all after the row-parallel layers
    fwd = sum(r["count"] for r in census
              if r["phase"] == "forward" and r["source"].endswith(" scatter") and r["axis"] == "tp")
    assert fwd == (2 * TINY.num_layers + 1) * MICRO                   # + the embedding's
    # layer collectives sit in the layer scan inside the accumulation scan (all but the
    # embedding's psum, which is in the accumulation scan only)
    layer = [r for r in census if r["source"].endswith((" scatter", " gather"))]
    assert sum(r["count"] for r in layer if len(r["loops"]) == 1) == MICRO
    assert all(len(r["loops"]) in (1, 2) for r in layer)
    # activation all-reduces over tp are exactly the Megatron minimum (nothing extra)
    assert exp["extra_tp"] == 0 and meas["tp_activation_reductions"] == exp["megatron_tp"]
    assert meas["lora_grad_bytes"] == exp["lora_grad_bytes_minimum"]     # once per step
    assert meas["tp_activation_bytes"] == exp["tp_bytes"]


SP_CASES = [  # remat, MLP tile tokens, CE chunk tokens, sequence length
    ("full", 0, 4096, S), ("offload", 0, 4096, S), ("none", 0, 4096, S),
    ("full", 16, 16, S), ("save-dots", 16, 4096, 39), ("offload", 16, 4096, S),
    ("offload-input", 16, 4096, S)]


@pytest.mark.parametrize("remat,mlp_chunk,ce_chunk,seq", SP_CASES)
def test_census_sequence_parallel_matches_formula(remat, mlp_chunk, ce_chunk, seq):
    """Megatron-SP: all-gathers before column blocks, reduce-scatters after row blocks, no
    activation all-reduce in the layers, nothing gathered but activations, and the bytes of the
    formula (S = 39 is padded to 40 internally)."""
    census, meas, exp = _census(tp=2, dp=1, remat=remat, sp=True, mlp_chunk=mlp_chunk,
                                ce_chunk=ce_chunk, seq=seq)
    assert meas["tp_layer_activation_reductions"] == 0
    assert meas["tp_activation_reductions"] == exp["all_reduce"]     # CE softmax statistics
    assert meas["tp_all_gathers"] == exp["all_gather"]
    assert meas["tp_reduce_scatters"] == exp["reduce_scatter"]
    assert meas["other_ops"] == 0 and meas["lora_grad_bytes"] == exp["lora_grad_bytes_minimum"]
    # every gather and scatter is of activations (our sequence layout), never of a weight
    assert {r["source"].split()[-1] for r in census if r["kind"] != "all-reduce"} <= {
        "gather", "scatter"}
    if mlp_chunk == 0:
        assert (meas["tp_all_gather_bytes"] + meas["tp_reduce_scatter_bytes"]
                + meas["tp_activation_bytes"]) == exp["tp_bytes"]
        assert meas["tp_wire_bytes"] == pytest.approx(exp["tp_wire_bytes"], rel=1e-6)


def test_sequence_parallel_moves_no_more_bytes_than_replicated():
    """Ring bytes per device over tp: SP equals the replicated layout's all-reduces with remat
    none; under remat full (the recompute's re-scatter) and offload (the replicated layout's
    recompute needs no reduction at all, SP's re-gathers the block inputs) it moves at most
    1.2x (see hlo.expected_collectives)."""
    for remat in ("none", "offload", "full"):
        _, sp, exp_sp = _census(tp=2, dp=1, remat=remat, sp=True)
        _, rep, exp_rep = _census(tp=2, dp=1, remat=remat, sp=False)
        assert sp["tp_wire_bytes"] == pytest.approx(exp_sp["tp_wire_bytes"], rel=1e-6)
        assert rep["tp_wire_bytes"] == pytest.approx(exp_rep["tp_wire_bytes"], rel=1e-6)
        if remat == "none":
            assert sp["tp_wire_bytes"] <= rep["tp_wire_bytes"]
        else:
            assert sp["tp_wire_bytes"] <= 1.2 * rep["tp_wire_bytes"]


def test_census_dp_gradient_reduction():
    census, meas, exp = _census(tp=2, dp=2, batch=2)
    assert meas["tp_activation_reductions"] == exp["tp_activation_reductions"]
    assert meas["dp_lora_grad_reductions"] > 0                 # LoRA grads summed over dp
    assert meas["dp_scalars"] == exp["dp_scalars"] == 2        # loss sum, token count: once
    # every LoRA gradient reduced exactly once per step (counts are multiplied by loop trip
    # counts, so a reduction inside the MICRO=2 accumulation scan would double the bytes)
    assert meas["lora_grad_bytes"] == exp["lora_grad_bytes_minimum"]
    axes = {r["axis"] for r in census}
    assert "tp" in axes and any("dp" in a for a in axes)
    assert {r["kind"] for r in census} == {"all-reduce"}


# ----------------------------------------------------------------------------- parser units

SYNTHETIC = """HloModule m, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %r = f32[] add(%a, %b)
}

%inner_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = (f32[8]{0}, bf16[2,3]{1,0}) all-reduce(%x, %x), channel_id=1, replica_groups=[2,2]<=[4], use_global_device_ids=true, to_apply=%add, metadata={op_name="jit(step)/transpose(jvp())/psum"}
  ROOT %t = (s32[], f32[8]) tuple(%p, %x)
}

%inner_cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%outer_body (q: (s32[], f32[8])) -> (s32[], f32[8]) {
  %q = (s32[], f32[8]) parameter(0)
  %w = (s32[], f32[8]) while(%q), condition=%inner_cond, body=%inner_body
  %y = f32[8]{0} get-tuple-element(%q), index=1
  %ags = (f32[4]{0}, f32[8]{0}) all-gather-start(%y), channel_id=2, replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}, use_global_device_ids=true
  %agd = f32[8]{0} all-gather-done(%ags)
  ROOT %t2 = (s32[], f32[8]) tuple(%q, %agd)
}

%outer_cond (q: (s32[], f32[8])) -> pred[] {
  %q = (s32[], f32[8]) parameter(0)
  ROOT %k = pred[] constant(true)
}

ENTRY %main (z: f32[8]) -> f32[8] {
  %z = f32[8]{0} parameter(0)
  %cp = f32[8]{0} collective-permute(%z), channel_id=3, source_target_pairs={{0,1},{1,0},{2,3},{3,2}}
  %ar0 = f32[8]{0} all-reduce(%cp), channel_id=4, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add
  %init = (s32[], f32[8]) tuple(%z, %ar0)
  %wl = (s32[], f32[8]) while(%init), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %o = f32[8]{0} get-tuple-element(%wl), index=1
}
"""


def test_parser_loops_groups_async():
    rows = {r["name"]: r for r in hlo.collective_census(SYNTHETIC, {"dp": 2, "tp": 2})}
    assert set(rows) == {"ar", "ags", "cp", "ar0"}          # -done not counted again
    ar = rows["ar"]
    assert ar["count"] == 15                                # 3 (known) x 5 (from the condition)
    assert ar["axis"] == "tp" and ar["operands"] == 2 and ar["bytes"] == 8 * 4 + 6 * 2
    assert ar["phase"] == "backward"
    assert rows["ags"]["count"] == 3 and rows["ags"]["axis"] == "dp"
    assert rows["ags"]["shapes"] == ["f32[8]"]              # shape of the -done result
    assert rows["cp"]["axis"] == "tp" and rows["cp"]["count"] == 1
    assert rows["ar0"]["axis"] == "dp+tp" and rows["ar0"]["group_size"] == 4
    summary = {(s["kind"], s["axis"]): s for s in hlo.summarize(list(rows.values()))}
    assert summary[("all-reduce", "tp")]["operands"] == 30


def test_program_dtypes_from_stablehlo():
    text = ('%1 = "stablehlo.all_reduce"(%0) <{replica_groups = dense<[[0, 1]]> : '
            'tensor<1x2xi64>}> ({\n  ^bb0(%a: tensor<bf16>, %b: tensor<bf16>):\n'
            '    "stablehlo.return"(%a) : (tensor<bf16>) -> ()\n'
            '  }) : (tensor<1x40x48xbf16>) -> tensor<1x40x48xbf16>\n')
    assert hlo.program_dtypes(text) == {(1, 40, 48): {"bf16"}}


# ----------------------------------------------------------------------------- plan

def test_plan_preset_sane_and_grows_with_seq_len():
    cfg = PRESETS["llama2-7b"]
    lora = LoraConfig(rank=16, targets="all")
    small = plan.plan_memory(cfg, tp=1, max_seq_len=1024, lora=lora, attention="blockwise")
    big = plan.plan_memory(cfg, tp=1, max_seq_len=2048, lora=lora, attention="blockwise")
    n_params = 6_738_415_616                                  # Llama-2-7B
    assert small["weights"] == 2 * n_params                   # bf16
    lora_params = 16 * 32 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert small["lora"] == 4 * lora_params
    assert small["optimizer"] >= 2 * small["lora"]            # Adam mu + nu
    for p in (small, big):
        assert all(p[k] > 0 for k in ("arguments", "temporaries", "peak"))
        assert p["peak"] >= p["weights"] + p["lora"] + p["optimizer"]
    assert big["temporaries"] > small["temporaries"]
    # XLA:CPU's f32 weight copies stay per layer (LICM off): far below an f32 copy of the model;
    # none where XLA:CPU runs bf16 matmuls natively (jaxlib 0.12; tests/test_plan_upcast.py)
    assert 0 <= small["cpu_upcast_allowance"] <= small["temporaries"] < small["weights"]
    assert small["peak_gpu_estimate"] == small["peak"] - small["cpu_upcast_allowance"]


def test_find_max_seq_len_search():
    # peak = 1 GiB per 1024 tokens; budget 37.5 GiB -> 37 * 1024
    calls = []

    def fake(s):
        calls.append(s)
        return {"peak": s * 2 ** 20}

    best, tried = plan.find_max_seq_len(fake, int(37.5 * 2 ** 30))
    assert best == 37 * 1024
    assert calls[:7] == [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    assert all(s % 1024 == 0 for s in calls)
    assert plan.find_max_seq_len(fake, 100)[0] is None
    assert plan.parse_bytes("80GB") == 80 * 2 ** 30 and plan.parse_bytes("512MiB") == 2 ** 29


def _tiny_dir(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    return d


def test_plan_main_on_model_dir(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = plan.main(["--model", str(_tiny_dir(tmp_path)), "--tp", "2", "--max-seq-len", "64",
                    "--device-memory", "1GB", "--lora-rank", "4", "--attention", "xla",
                    "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "fits" in text and "peak per device" in text
    p = json.loads(out.read_text())
    assert p["tp"] == 2 and p["peak"] > 0
    assert plan.main(["--model", "no-such-model", "--max-seq-len", "64"]) == 2


# ----------------------------------------------------------------------------- scripts

def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def test_profile_script_writes_json(tmp_path):
    out = tmp_path / "census.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "profile.py"), "--model", str(_tiny_dir(tmp_path)),
         "--tp", "2", "--dp", "2", "--batch", "2", "--max-seq-len", str(S), "--lora-rank", "4",
         "--dtype", "float32", "--attention", "xla", "--json", str(out)],
        capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Megatron" in p.stdout
    res = json.loads(out.read_text())
    assert res["measured"]["tp_activation_reductions"] == res["expected"]["tp_activation_reductions"]
    assert {r["axis"] for r in res["census"]} >= {"tp", "dp"}


@pytest.mark.slow
def test_profile_script_time_and_trace(tmp_path):
    out = tmp_path / "census.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "profile.py"), "--model", str(_tiny_dir(tmp_path)),
         "--tp", "2", "--max-seq-len", str(S), "--lora-rank", "4", "--dtype", "float32",
         "--json", str(out), "--time", "--time-iters", "2", "--trace", str(tmp_path / "trace"),
         "--trace-steps", "1"], capture_output=True, text=True, env=_env(), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["timings"]["rows"]
    assert rows and all(r.get("seconds", 0) > 0 or "skipped" in r for r in rows)
    assert res["trace"]["step_seconds"] and any((tmp_path / "trace").rglob("*"))


@pytest.mark.slow
def test_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--config", "tiny", "--steps", "1",
         "--warmup", "1", "--remat", "full", "--json", str(out)],
        capture_output=True, text=True, env=_env(), timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())["results"][0]
    assert res["best_ours"]["tokens_per_s"] > 0 and res["peft"]["tokens_per_s"] > 0
    assert res["best_ours"]["peak_rss_bytes"] > 0 and res["speed_ratio"] > 0


def test_step_breakdown_bound_counts_the_kernels_tiles(tmp_path):
    # The bound's attention row must count the products the blockwise kernel runs: 7 tile
    # matmuls per causal tile (flops.step_flops' hardware attention), at the CPU tile size.
    from spmd_lora.analysis import flops
    from spmd_lora.config.model_config import ModelConfig
    from spmd_lora.kernels import registry
    out = tmp_path / "breakdown.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "step_breakdown.py"), "--config", "tiny",
         "--parts", "bound", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {r["part"].split(" b")[0] if r["part"].startswith("bound: attention") else r["part"]: r
            for r in json.loads(out.read_text())["rows"]}
    cfg = ModelConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_layers=2,
                      num_heads=4, num_kv_heads=4, head_dim=64)
    b = registry.choose("auto", seq_len=256, head_dim=64, backend="cpu").block_sizes.block_q
    f = flops.step_flops(cfg, 256, lora_rank=8, attention="blockwise", block_q=b, block_k=b)
    assert rows["bound: attention tile matmuls"]["flops"] == f.attention_hw
    assert rows["bound: LM head matmuls"]["flops"] == f.lm_head
    assert rows["bound: frozen linear matmuls x2"]["flops"] == f.linears
    parts = ("bound: attention tile matmuls", "bound: LM head matmuls",
             "bound: frozen linear matmuls x2")
    total = rows["bound: matmuls only (useful)"]
    assert total["flops"] == f.useful
    assert abs(total["seconds"] - sum(rows[k]["seconds"] for k in parts)) < 1e-9
    assert "utilisation bound, matmuls + softmax" in p.stdout


@pytest.mark.parametrize("flags,flag", [(["--parts", "step,bogus"], "--parts"),
                                        (["--remat", "none,bogus"], "--remat"),
                                        (["--blocks", "0,xla"], "--blocks"),
                                        (["--config", "huge"], "--config")])
def test_step_breakdown_rejects_bad_flags(flags, flag):
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "step_breakdown.py"), *flags],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 2
    assert f"error: argument {flag}" in p.stderr or f"error: {flag}" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr

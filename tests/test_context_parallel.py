"""Context parallelism (the ``cp`` mesh axis): zig-zag batches + ring attention in the model.

Oracles: transformers + PEFT (torch autograd) for logits and every LoRA gradient, and the
unsharded (dp = cp = tp = 1) run for packing, dropout, remat offload and eval.
"""
import jax
import numpy as np
import pytest

import spmd_lora
from spmd_lora.engine import sharded
from spmd_lora.parallel.zigzag import padded_seq_len
from spmd_lora.errors import ConfigError
from spmd_lora.config.lora_config import LoraConfig
from spmd_lora.model import ForwardOptions

from conftest import CONFIGS, make_peft_adapter, peft_reference, rel_err

TOL = 1e-4
SEQ = 23            # not divisible by 2*cp: padded at the end, then zig-zagged


def _tokens(name, batch=2, seq=SEQ, seed=0):
    return np.random.RandomState(seed).randint(0, CONFIGS[name]["vocab_size"], (batch, seq))


def _grads(model, opts, batch, key=None):
    fn = sharded.loss_sum_fn(opts, model.mesh)
    prepared = model.put_batch(batch)

    def mean_loss(lora):
        total, count = fn(model.params, lora, prepared, key)
        return total / count

    return jax.jit(jax.value_and_grad(mean_loss))(model.lora)


def _options(model, **kw):
    return ForwardOptions(model.config, model.mesh.shape["tp"], model.lora_config,
                          cp=model.mesh.shape["cp"], **kw)


# (dp, cp, tp, cp_impl, MLP tile tokens); sequence parallelism on whenever tp > 1
MESHES = [(1, 2, 1, "ring", 0), (1, 4, 1, "ring", 0), (1, 2, 2, "ring", 8),
          (2, 2, 2, "ring", 0), (1, 2, 2, "allgather", 0)]


@pytest.mark.parametrize("name", ["mha", "gqa4", "llama3_rope", "tied", "odd_vocab"])
@pytest.mark.parametrize("dp,cp,tp,impl,chunk", MESHES)
def test_cp_logits_and_lora_grads_match_peft(hf_models, tmp_path, name, dp, cp, tp, impl, chunk):
    path, hf = hf_models(name)
    tokens = _tokens(name)
    mask = (np.random.RandomState(1).rand(*tokens.shape) > 0.3).astype(np.int32)
    ref_logits, ref_loss, ref_grads = peft_reference(hf, tmp_path / "adapter", tokens, mask)
    model = spmd_lora.load_model(path, tp=tp, dp=dp, cp=cp, cp_impl=impl,
                                 adapter=tmp_path / "adapter", mlp_chunk_tokens=chunk)
    assert model.mesh.shape == {"dp": dp, "cp": cp, "tp": tp}
    assert rel_err(model.logits(tokens), ref_logits) <= TOL
    loss, grads = _grads(model, _options(model, cp_impl=impl, mlp_chunk_tokens=chunk,
                                         ce_chunk_tokens=8),
                         {"tokens": tokens, "loss_mask": mask})
    assert abs(float(loss) - ref_loss) <= TOL * ref_loss
    for (proj, factor), ref in ref_grads.items():
        assert rel_err(grads["layers"][proj][factor], ref) <= TOL, (proj, factor)


def _packed():
    """Two packed rows whose segments cross the zig-zag chunk boundaries (S=22 -> 24: chunks of
    6 tokens at cp=2, of 3 at cp=4), with restarted positions and a padded tail."""
    tokens = _tokens("gqa4", seq=22, seed=3)
    seg = np.array([[1] * 9 + [2] * 13, [1] * 15 + [2] * 5 + [0] * 2])
    pos = np.array([list(range(9)) + list(range(13)), list(range(15)) + list(range(5)) + [0, 0]])
    return {"tokens": tokens, "loss_mask": (seg > 0).astype(np.int32), "positions": pos,
            "segment_ids": seg}


@pytest.mark.parametrize("remat,offload_layers", [pytest.param("none", None, marks=pytest.mark.slow),
                                                   ("offload", None), ("offload-input", 1)])
def test_cp_packing_equals_unsharded(hf_models, tmp_path, remat, offload_layers):
    """Packed segments crossing chunk boundaries, GQA with tp > kv heads (gqa4: 2 kv heads,
    tp=4 at cp=2), ring and allgather, remat none, offload and offload-input on the first of
    the two layers: loss and every LoRA gradient equal the dp = cp = tp = 1 run."""
    path, hf = hf_models("gqa4")
    make_peft_adapter(hf, tmp_path / "adapter")
    batch = _packed()
    base = None
    for dp, cp, tp, impl in ((1, 1, 1, "ring"), (1, 4, 1, "ring"), (1, 2, 4, "ring"),
                             (2, 2, 2, "allgather")):
        model = spmd_lora.load_model(path, tp=tp, dp=dp, cp=cp, adapter=tmp_path / "adapter")
        loss, grads = _grads(model, _options(model, cp_impl=impl, remat=remat,
                                             offload_layers=offload_layers,
                                             mlp_chunk_tokens=4), batch)
        if base is None:
            base = loss, grads
            continue
        assert rel_err(loss, base[0]) <= 1e-6, (dp, cp, tp, impl)
        errs = jax.tree.leaves(jax.tree.map(rel_err, grads, base[1]))
        assert max(errs) <= 1e-5, (dp, cp, tp, impl, max(errs))


@pytest.mark.slow   # fast: test_train.py trains dp2 x cp2 x tp2 with dropout against tp1
def test_cp_lora_dropout_is_layout_independent(hf_models, tmp_path):
    """Dropout masks hash (batch row, token index in the unpermuted sequence, feature): the
    zig-zag order changes nothing. cp=2 x tp=2 (SP, tiles) and dp=2 x cp=2 == dp=cp=tp=1."""
    path, hf = hf_models("gqa4")
    make_peft_adapter(hf, tmp_path / "adapter", lora_dropout=0.3)
    batch = {"tokens": _tokens("gqa4", seq=21, seed=5), "loss_mask": np.ones((2, 21), np.int32)}
    key = jax.random.key(7)
    runs = {}
    for dp, cp, tp in ((1, 1, 1), (1, 2, 2), (2, 2, 1)):
        model = spmd_lora.load_model(path, tp=tp, dp=dp, cp=cp, adapter=tmp_path / "adapter")
        runs[(dp, cp, tp)] = _grads(model, _options(model, mlp_chunk_tokens=4), batch, key)
    no_drop = _grads(model, ForwardOptions(model.config, 1, LoraConfig(
        rank=4, alpha=8.0, targets="all"), cp=2), batch, key)
    base = runs.pop((1, 1, 1))
    assert abs(float(no_drop[0]) - float(base[0])) > 1e-4          # dropout did something
    for k, (loss, grads) in runs.items():
        assert rel_err(loss, base[0]) <= 1e-6, k
        assert max(jax.tree.leaves(jax.tree.map(rel_err, grads, base[1]))) <= 1e-5, k


def test_cp_eval_equals_unsharded_and_generation_refuses(hf_models, tmp_path):
    from spmd_lora.evaluate import evaluate
    from spmd_lora.engine.generate import generate
    path, hf = hf_models("mha")
    make_peft_adapter(hf, tmp_path / "adapter")
    examples = [{"input_ids": t, "loss_mask": m} for t, m in
                zip(_tokens("mha", batch=3, seq=17), np.ones((3, 17), np.int32))]
    ref = evaluate(spmd_lora.load_model(path, adapter=tmp_path / "adapter"), examples)
    model = spmd_lora.load_model(path, cp=4, tp=2, adapter=tmp_path / "adapter")
    got = evaluate(model, examples, batch_size=2)
    assert got["tokens"] == ref["tokens"] and abs(got["loss"] - ref["loss"]) <= 1e-5 * ref["loss"]
    with pytest.raises(ConfigError, match="generation needs cp = 1"):
        generate(model, [[1, 2, 3]], 2)


def test_cp_options_are_checked():
    from spmd_lora.config.model_config import ModelConfig

    cfg = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=12)
    with pytest.raises(ConfigError, match="cp_impl"):
        ForwardOptions(cfg, 1, cp=2, cp_impl="ulysses")
    with pytest.raises(ConfigError, match="no context-parallel block kernel"):
        ForwardOptions(cfg, 1, cp=2, attention_impl="xla")
    with pytest.raises(ConfigError, match="dp, cp and tp"):
        spmd_lora.make_mesh(1, 1, 0)


# ----------------------------------------------------------------------------- census and plan

CENSUS_CASES = [  # cp, tp, cp_impl, remat, packed segments
    (2, 2, "ring", "full", False), (2, 1, "ring", "none", True), (4, 1, "ring", "none", True),
    (4, 2, "ring", "full", True), (2, 2, "allgather", "full", False),
    (2, 2, "allgather", "none", True), (4, 1, "ring", "offload", True),
    (2, 2, "ring", "offload", False), (2, 2, "allgather", "offload", True),
    (4, 1, "ring", "offload-input", True), (2, 2, "ring", "offload-input", False),
    (2, 2, "allgather", "offload-input", True)]


@pytest.mark.parametrize("cp,tp,impl,remat,segments", CENSUS_CASES)
def test_cp_census_matches_formula(cp, tp, impl, remat, segments):
    """The compiled train step's collectives over cp are exactly ring attention's (formula:
    hlo.expected_cp_collectives, arrays and wire bytes): no weight collective over cp, no
    all-gather over cp for ``ring``; the LoRA gradients are reduced once per step."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from spmd_lora.analysis import hlo, plan
    from spmd_lora.config.model_config import ModelConfig
    from spmd_lora.parallel.placement import MICRO_BATCH_SPEC
    cfg = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=12)
    lora = LoraConfig(rank=4, alpha=8.0, targets="all")
    micro, seq = 2, 37
    mesh = plan.plan_mesh(1, tp, cp)
    args = list(plan.abstract_train_args(cfg, mesh, max_seq_len=seq, batch=1, lora=lora,
                                         dtype="float32", micro_batches=micro))
    if segments:
        spec = args[3]["tokens"]
        args[3]["segment_ids"] = jax.ShapeDtypeStruct(
            spec.shape, jnp.int32, sharding=NamedSharding(mesh, MICRO_BATCH_SPEC))
    from spmd_lora.engine.step import OptimizerConfig, make_optimizer, make_train_step
    opts = ForwardOptions(cfg, tp, lora, attention_impl="blockwise", remat=remat, cp=cp,
                          cp_impl=impl)
    lowered = make_train_step(opts, mesh, make_optimizer(OptimizerConfig())).lower(*args)
    census = hlo.collective_census(lowered.compile(), mesh, lowered)
    meas = hlo.measured(census, 4)
    s_pad = padded_seq_len(seq, cp, tp)             # 37 -> a multiple of 2*cp*tp
    assert s_pad == (48 if cp * tp == 8 else 40)
    exp = hlo.expected_cp_collectives(cfg, tp, cp, cp_impl=impl, segments=segments,
                                      remat=remat, micro_batches=micro, local_batch=1,
                                      seq_len=s_pad, dtype_bytes=4)
    assert meas["cp_permute_operands"] == exp["permute_operands"]
    assert meas["cp_all_gather_operands"] == exp["all_gather_operands"]
    assert meas["cp_reduce_scatter_operands"] == exp["reduce_scatter_operands"]
    assert meas["cp_wire_bytes"] == exp["wire_bytes"]
    assert meas["cp_other_ops"] == 0
    if impl == "ring":
        assert not any(r["kind"] == "all-gather" and "cp" in r["axis"] for r in census)
    # one LoRA-gradient all-reduce per step, over the whole mesh
    grads = [r for r in census if hlo.operand_role(hlo._shape(r["shapes"][0]), 4) == "lora_grad"]
    assert grads and all(r["count"] == 1 and r["axis"] == ("cp+tp" if tp > 1 else "cp")
                         for r in grads)


def test_plan_with_cp_reports_bytes_by_impl_and_offload():
    """plan_memory on a (1, 2, 2) mesh: the compiled step fits, cp wire bytes per impl follow
    the formula (GQA with 2 kv heads: allgather sends fewer bytes in training), and remat
    offload's host bytes count only the cp rank's rows."""
    from spmd_lora.analysis import plan
    from spmd_lora.config.model_config import ModelConfig
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=8, num_kv_heads=2, head_dim=8)
    lora = LoraConfig(rank=4, alpha=8.0, targets="all")
    p = plan.plan_memory(cfg, 2, 1, 64, lora=lora, dtype="float32", remat="offload", cp=2,
                         cp_impl="ring")
    assert p["cp"] == 2 and p["peak"] > 0
    by = p["cp_wire_bytes_by_impl"]
    assert by["allgather"] < by["ring"] == p["cp_wire_bytes"]
    # offload: L layers x 2 residuals x (64 / cp / tp rows) x D x 4 bytes
    assert p["host_offload"] == 2 * 2 * 16 * 64 * 4


def test_profile_script_with_cp(tmp_path):
    """tools/profile.py --cp: the census of the compiled step over (dp, cp, tp) = (2, 2, 2)
    matches both formulas (tp on the cp rank's local sequence, cp ring attention) with no
    flag raised."""
    import json
    import subprocess
    import sys

    from test_tools import ROOT, _env, _tiny_dir
    out = tmp_path / "census.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "profile.py"), "--model", str(_tiny_dir(tmp_path)),
         "--tp", "2", "--dp", "2", "--cp", "2", "--batch-size", "2", "--max-seq-len", "37",
         "--lora-rank", "4", "--dtype", "float32", "--attention", "blockwise", "--mlp-chunk-tokens",
         "0", "--json", str(out)], capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["flags"] == [], res["flags"]
    assert "collectives over cp" in p.stdout and "fewer bytes" in p.stdout
    meas, want = res["measured"], res["cp_expected"]["ring"]
    assert meas["cp_permute_operands"] == want["permute_operands"] > 0
    assert meas["tp_all_gathers"] == res["expected"]["all_gather"]

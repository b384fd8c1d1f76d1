"""Quantised frozen base (base_quant int8 / nf4, spmd_lora/quant.py): code books and blockwise
quantisation against bitsandbytes, bounded round-trip error, model parity with a float model
built from the dequantised weights (logits and LoRA gradients, tp 1/2/4, dp x tp, GQA, tied),
an NF4 fine-tune whose adapter loads in PEFT over the dequantised base, load-time host memory,
export and plan accounting."""
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import spmd_lora
from spmd_lora.weights import quant
from spmd_lora.engine import sharded
from spmd_lora.errors import ConfigError
from spmd_lora.config.lora_config import LoraConfig
from spmd_lora.weights.lora import init_lora
from spmd_lora.parallel.mesh import BATCH_SPEC
from spmd_lora.parallel.placement import put_global
from spmd_lora.model import ForwardOptions
from spmd_lora.parallel.placement import replicate
from spmd_lora.tiny import asset_path, build_tiny_llama

# hidden 512 = 8 NF4 blocks per row, so a 256-absmax group is 32 rows: every tp <= 4 shard of
# every linear (kv heads of 64 rows, replicated at tp=4) holds whole groups.
SHAPES = {
    "gqa": dict(vocab_size=96, hidden_size=512, intermediate_size=512, num_attention_heads=8,
                num_key_value_heads=2),
    "tied": dict(vocab_size=96, hidden_size=512, intermediate_size=512, num_attention_heads=8,
                 num_key_value_heads=8, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_tiny_llama(tmp_path_factory.mktemp(name), with_tokenizer=False,
                                           init_std=0.05, **SHAPES[name])
        return cache[name]
    return get


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


# ----------------------------------------------------------------------------- code books

def test_nf4_code_book_is_the_published_one():
    # independent derivation: normal quantiles as in Dettmers et al. (QLoRA, appendix E)
    np.testing.assert_allclose(quant.NF4_CODE, quant.normal_float_code(), atol=2e-7)
    assert quant.NF4_CODE[7] == 0.0 and quant.NF4_CODE[0] == -1.0 and quant.NF4_CODE[-1] == 1.0
    dyn = quant.DYNAMIC_CODE
    assert dyn.shape == (256,) and np.all(np.diff(dyn) >= 0) and dyn[-1] == 1.0
    np.testing.assert_allclose(dyn[0], -(1 - 0.9 / 128), rtol=1e-6)   # midpoint of the last step
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    np.testing.assert_array_equal(quant.NF4_CODE, bnb_f.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(dyn, bnb_f.create_dynamic_map(signed=True).numpy())


def test_nf4_blockwise_equals_bitsandbytes_quantize_4bit():
    torch = pytest.importorskip("torch")
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    rng = np.random.default_rng(0)
    # one double-quantisation group (256 blocks of 64): offset = the tensor mean, as bitsandbytes
    w = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    ours = quant.quantize_nf4(w)
    packed, state = bnb_f.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                        compress_statistics=True)
    np.testing.assert_array_equal(ours["packed"].reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(ours["absmax_codes"].reshape(-1), state.absmax.numpy())
    np.testing.assert_array_equal(ours["group_scale"], state.state2.absmax.numpy())
    np.testing.assert_array_equal(ours["group_offset"], np.float32(state.offset.item()))
    np.testing.assert_array_equal(quant.dequantize_host("nf4", ours),
                                  bnb_f.dequantize_4bit(packed, state).numpy())
    # several groups: the first level (codes and absmax) is bitsandbytes' exactly
    w = (rng.standard_normal((96, 512)) * 0.05).astype(np.float32)
    ours = quant.quantize_nf4(w)
    packed, state = bnb_f.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(ours["packed"].reshape(-1), packed.numpy().reshape(-1))
    absmax = quant.dequantize_host("nf4", {**ours, "packed": np.full_like(ours["packed"], 0xFF)})
    np.testing.assert_allclose(absmax[:, ::64].reshape(-1), state.absmax.numpy(), rtol=2e-2)
    # a whole weight with double quantisation: as a column-parallel [out, in] weight (blocks along
    # in, as bitsandbytes) ours differs from bitsandbytes' only by the group-wise centring (far
    # below the quantisation error); as a row-parallel one (blocks along out) it is an
    # independent quantisation of the same accuracy
    w = (rng.standard_normal((1024, 1024)) * 0.02).astype(np.float32)
    packed, state = bnb_f.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                        compress_statistics=True)
    theirs = bnb_f.dequantize_4bit(packed, state).numpy()
    column = quant.dequantize_host("nf4", quant.quantize_nf4(w))
    row = quant.dequantize_host("nf4", quant.quantize_nf4(w.T)).T
    err = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(w)
    assert err(column, theirs) < 0.01 and 0.08 < err(theirs, w) < 0.1
    assert abs(err(row, w) - err(theirs, w)) < 0.01 * err(theirs, w)


def test_round_trip_error_is_bounded():
    rng = np.random.default_rng(1)
    c = (rng.standard_normal((64, 512)) * 0.02).astype(np.float32)
    c[3, 7] = 0.5                                          # an outlier only hurts its own row/block
    q8 = quant.quantize_int8(c)
    err8 = np.abs(quant.dequantize_host("int8", q8) - c)
    assert np.all(err8 <= q8["scale"][:, None] * 0.5 * (1 + 1e-5))          # half a step
    q4 = quant.quantize_nf4(c)
    deq = quant.dequantize_host("nf4", q4)
    blocks = np.abs(c).reshape(64, 8, 64).max(-1)
    half_gap = np.max(np.diff(quant.NF4_CODE)) / 2                          # 0.1385
    # per block: half the widest code gap of the block absmax, plus the double-quantised
    # absmax error (at most ~1% of the absmax here)
    err4 = np.abs(deq - c).reshape(64, 8, 64).max(-1)
    assert np.all(err4 <= blocks * (half_gap + 0.01))
    assert np.sqrt(np.mean((deq - c) ** 2)) < 0.1 * np.sqrt(np.mean(c ** 2)) + 0.1 * 0.02
    zero = quant.quantize_nf4(np.zeros((32, 512), np.float32))
    assert np.all(quant.dequantize_host("nf4", zero) == 0)


# ----------------------------------------------------------------------------- model parity

def _lora(model, seed=0):
    lcfg = LoraConfig(rank=4, alpha=8.0, targets="all")
    lora = init_lora(model.config, lcfg, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), lora)
    return lcfg, replicate(lora, model.mesh)


@pytest.mark.parametrize("kind,name,dp,tp", [
    ("nf4", "tied", 1, 1), ("nf4", "gqa", 2, 2), ("nf4", "gqa", 1, 4), ("int8", "tied", 1, 2)])
def test_quantised_model_equals_float_model_of_dequantised_weights(models, kind, name, dp, tp):
    model = spmd_lora.load_model(models(name), tp=tp, dp=dp, base_quant=kind)
    assert all(quant.is_quantised(model.params["layers"][p]) for p in quant.QUANTISED_LINEARS)
    dense = quant.dequantized_params(model.params, model.mesh)
    tokens = np.random.default_rng(0).integers(0, 96, (2 * dp, 12))
    lcfg, lora = _lora(model)
    opts = ForwardOptions(cfg=model.config, tp=tp, lora=lcfg, remat="full")
    put = lambda x: put_global(np.asarray(x, np.int32), NamedSharding(model.mesh, BATCH_SPEC))
    batch = {"tokens": put(tokens), "loss_mask": put(np.ones_like(tokens))}
    logits, loss = sharded.logits_fn(opts, model.mesh), sharded.loss_sum_fn(opts, model.mesh)
    mean_loss = lambda p, lo: (lambda t, c: t / c)(*loss(p, lo, batch))

    @jax.jit
    def logits_and_lora_grads(params, lora):
        return (logits(params, lora, {"tokens": batch["tokens"]}),
                jax.grad(mean_loss, argnums=1)(params, lora))

    (la, ga), (lb, gb) = logits_and_lora_grads(model.params, lora), logits_and_lora_grads(dense, lora)
    assert rel(la, lb) <= 1e-5
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert rel(x, y) <= 1e-5


def test_quantised_base_is_the_same_at_every_tp(models):
    """Blocks run along the hidden dimension, so the dequantised base does not depend on tp."""
    dense = [np.asarray(quant.dequantized_params(m.params, m.mesh)["layers"]["down_proj"])
             for m in (spmd_lora.load_model(models("gqa"), tp=tp, base_quant="nf4") for tp in (1, 4))]
    np.testing.assert_array_equal(dense[0], dense[1])


def test_bad_base_quant_and_unaligned_layouts_are_clear_errors(models, tmp_path):
    from spmd_lora.train import TrainConfig
    with pytest.raises(ConfigError, match="base_quant 'nf5' unknown"):
        spmd_lora.load_model(models("gqa"), base_quant="nf5")
    with pytest.raises(ConfigError, match="base_quant 'q4' unknown; choose from none, int8, nf4"):
        TrainConfig(model="m", data="d", output_dir="o", base_quant="q4")
    small = build_tiny_llama(tmp_path / "m", with_tokenizer=False, vocab_size=64, hidden_size=32,
                             intermediate_size=64)
    with pytest.raises(ConfigError, match="hidden_size divisible by 64"):
        spmd_lora.load_model(small, base_quant="nf4")
    assert np.isfinite(np.asarray(spmd_lora.load_model(small, base_quant="int8").logits([[1, 2]]))).all()


# ----------------------------------------------------------------------------- training + PEFT

def test_nf4_finetune_lowers_loss_and_adapter_loads_in_peft(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from spmd_lora import cli
    from spmd_lora.train import TrainConfig, train

    base = build_tiny_llama(tmp_path / "base", vocab_size=512, hidden_size=512,
                            intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                            init_std=0.05)
    cfg = TrainConfig(model=str(base), data=str(asset_path("alpaca_sample.jsonl")),
                      output_dir=str(tmp_path / "run"), template="alpaca", max_seq_len=128,
                      lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets=("all",),
                      learning_rate=1e-2, batch_size=4, max_steps=5, seed=0, tp=2,
                      base_quant="nf4", remat="full")
    train(cfg, progress_stream=open("/dev/null", "w"))
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and losses[-1] < losses[0]
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)

    ours = spmd_lora.load_model(base, tp=2, base_quant="nf4", adapter=adapter)
    tokens = np.random.default_rng(0).integers(0, 512, (2, 16))
    want = np.asarray(ours.logits(tokens))
    merged = tmp_path / "merged"
    assert cli.main(["export", "--model", str(base), "--adapter", str(adapter), "--output",
                     str(merged), "--base-quant", "nf4"]) == 0
    assert "merged into the nf4-dequantised base" in capsys.readouterr().out
    # PEFT over the dequantised base: every linear quantised and dequantised as NF4 does
    from spmd_lora.export import _quant_roundtrip
    hf = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            proj = name.split(".")[-2]
            if proj in quant.QUANTISED_LINEARS:
                p.copy_(torch.from_numpy(_quant_roundtrip("nf4", proj, p.numpy())))
        got = PeftModel.from_pretrained(hf, str(adapter)).eval()(torch.from_numpy(tokens)).logits.numpy()
        got_merged = LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32)(
            torch.from_numpy(tokens)).logits.numpy()
    assert rel(got, want) <= 1e-4
    assert rel(got_merged, want) <= 1e-4


# ----------------------------------------------------------------------------- load memory

_RSS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np, spmd_lora
    from spmd_lora.weights.quant import quantize_nf4
    jax.block_until_ready(jax.device_put(np.zeros(8)))     # runtime and numpy warm-up
    quantize_nf4(np.ones((64, 512), np.float32))
    def status(key):        # kB; VmHWM is this process's own peak (ru_maxrss keeps the parent's)
        line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024
    before = status("VmRSS")
    model = spmd_lora.load_model(sys.argv[1], tp=2, base_quant="nf4")
    jax.block_until_ready(jax.tree.leaves(model.params))
    peak = status("VmHWM")
    device = sum(s.data.nbytes for a in jax.tree.leaves(model.params) for s in a.addressable_shards)
    print(json.dumps({"before": before, "peak": peak, "device": device}))
""")


def test_quantised_load_peak_host_memory(tmp_path):
    """Loading an NF4 base (tp=2, a 65 MiB fp32 checkpoint in 16 MB files) grows peak host RSS by
    less than one checkpoint file in fp32 plus the quantised model itself (CPU devices live in
    host memory), and by less than half the fp32 model (a dense load grows it by ~1.6x)."""
    path = build_tiny_llama(tmp_path / "m", with_tokenizer=False, vocab_size=256, hidden_size=512,
                            intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=8, max_shard_size="16MB")
    files = sorted(path.glob("*.safetensors"))
    fp32_model = sum(f.stat().st_size for f in files)
    largest_file = max(f.stat().st_size for f in files)
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True,
                         text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    grown = m["peak"] - m["before"]
    assert m["device"] < 0.2 * fp32_model
    assert grown < largest_file + m["device"], (grown, largest_file, m["device"], fp32_model)
    assert grown < 0.5 * fp32_model


# ----------------------------------------------------------------------------- plan, census, generate

def test_plan_and_census_of_an_nf4_step(tmp_path, capsys):
    """The NF4 train step compiles from abstract shapes, adds no collective (dequantisation is
    local to each shard) and the plan counts packed weights and constants per device."""
    from spmd_lora.analysis import hlo
    from spmd_lora.cli import plan
    from spmd_lora.config.model_config import ModelConfig, PRESETS
    from spmd_lora.weights.shapes import abstract_params

    cfg = ModelConfig(vocab_size=96, hidden_size=512, intermediate_size=512, num_layers=2,
                      num_heads=8, num_kv_heads=2, head_dim=64)
    lora = LoraConfig(rank=4, alpha=8.0, targets="all")
    summaries = []
    for base_quant in ("nf4", "none"):
        lowered, mesh, _ = plan.lower_train_step(cfg, 2, 1, max_seq_len=32, lora=lora,
                                                 dtype="float32", attention="xla",
                                                 base_quant=base_quant)
        summaries.append(hlo.summarize(hlo.collective_census(lowered.compile(), mesh, lowered)))
    assert summaries[0] == summaries[1]                    # same collectives, same bytes

    p = plan.quant_weight_bytes(abstract_params(PRESETS["llama2-70b"], mesh, "bfloat16", "nf4"))
    linear_params = 80 * (8192 * (8192 + 2 * 1024 + 8192) + 3 * 8192 * 28672)
    assert p["weights_packed"] == linear_params // 2 // 2                  # 4 bits, tp=2
    assert p["weights_quant_constants"] == linear_params // 64 // 2 + linear_params // 16384 * 8 // 2
    assert p["quant_bytes_per_param"] == 0.5 + 1 / 64 + 8 / 16384
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert plan.main(["--model", str(d), "--tp", "2", "--max-seq-len", "32", "--lora-rank", "4",
                      "--attention", "xla", "--dtype", "float32", "--base-quant", "nf4"]) == 0
    assert "bytes per parameter of the quantised linears" in capsys.readouterr().out


def test_greedy_generation_on_nf4_equals_dequantised_model(models):
    from spmd_lora.engine.generate import generate

    model = spmd_lora.load_model(models("gqa"), tp=2, base_quant="nf4")
    dense = spmd_lora.load_model(models("gqa"), tp=2)
    dense.params = quant.dequantized_params(model.params, model.mesh)
    prompts = [[5, 9, 17, 3], [40, 2]]
    assert generate(model, prompts, 6) == generate(dense, prompts, 6)

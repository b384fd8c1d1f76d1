"""Quantised frozen base (base_quant int8 / nf4, spmd_lora/weights/quant.py): code books and
blockwise quantisation against bitsandbytes (also partial blocks and groups: any shape), bounded
round-trip error, model parity with a float model built from the dequantised weights (logits and
LoRA gradients, tp 1/2/4, dp x tp, GQA, tied, a hidden size that is not whole blocks), the same
base at every tp, an NF4 fine-tune whose adapter loads in PEFT over the dequantised base, the NF4
demo, load-time host memory, export and plan accounting."""
import json
import subprocess
import sys
import textwrap

import jax
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
# every linear (kv heads of 64 rows, replicated at tp=4) holds whole groups. "odd": hidden 96 =
# a block and a half per row; its NF4 units (the rows of one device at tp 4) are 24 rows of
# q/k/v/o (48 absmax: part of a group) and 150 of gate/up/down (300: a group and a part).
SHAPES = {
    "odd": dict(vocab_size=96, hidden_size=96, intermediate_size=600, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True),
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


def _dequantize(leaves):
    """float32 C [N, D] of quantize_nf4's leaves of C (one unit, D even)."""
    n, half = leaves["packed"].shape
    return np.asarray(quant.NF4Weight(**leaves, hidden=2 * half, unit_rows=n).dequantize())


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
    np.testing.assert_array_equal(_dequantize(ours), bnb_f.dequantize_4bit(packed, state).numpy())
    # several groups: the first level (codes and absmax) is bitsandbytes' exactly
    w = (rng.standard_normal((96, 512)) * 0.05).astype(np.float32)
    ours = quant.quantize_nf4(w)
    packed, state = bnb_f.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(ours["packed"].reshape(-1), packed.numpy().reshape(-1))
    absmax = _dequantize({**ours, "packed": np.full_like(ours["packed"], 0xFF)})
    np.testing.assert_allclose(absmax[:, ::64].reshape(-1), state.absmax.numpy(), rtol=2e-2)
    # a whole weight with double quantisation: as a column-parallel [out, in] weight (blocks along
    # in, as bitsandbytes) ours differs from bitsandbytes' only by the group-wise centring (far
    # below the quantisation error); as a row-parallel one (blocks along out) it is an
    # independent quantisation of the same accuracy
    w = (rng.standard_normal((1024, 1024)) * 0.02).astype(np.float32)
    packed, state = bnb_f.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                        compress_statistics=True)
    theirs = bnb_f.dequantize_4bit(packed, state).numpy()
    column = _dequantize(quant.quantize_nf4(w))
    row = _dequantize(quant.quantize_nf4(w.T)).T
    err = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(w)
    assert err(column, theirs) < 0.01 and 0.08 < err(theirs, w) < 0.1
    assert abs(err(row, w) - err(theirs, w)) < 0.01 * err(theirs, w)


@pytest.mark.parametrize("shape,unit_rows", [((7, 13), 7), ((100, 37), 100), ((3, 200), 3),
                                             ((96, 512), 48)])
def test_nf4_any_shape_equals_bitsandbytes(shape, unit_rows):
    """Rows with a partial last block (odd lengths too) and units with a partial last 256-group
    ([96, 512] in units of 48 rows, a tp=2 shard: 384 absmax, a group and a half) against
    bitsandbytes. First level row by row, bitsandbytes padding each row's last block itself:
    packed bytes and absmax bit-identical. Second level group by group (bitsandbytes on exactly
    that group's blocks): absmax codes identical, offset and scale equal up to the rounding of
    the float32 mean, dequantised weights equal within float tolerance."""
    torch = pytest.importorskip("torch")
    bnb_f = pytest.importorskip("bitsandbytes.functional")

    def bnb(x, double):
        return bnb_f.quantize_4bit(torch.from_numpy(np.ascontiguousarray(x)), blocksize=64,
                                   quant_type="nf4", compress_statistics=double)

    n, d = shape
    c = (np.random.default_rng(n * d).standard_normal(shape) * 0.05).astype(np.float32)
    ours = quant.quantize_host("nf4", c, unit_rows)
    _, absmax = quant.nf4_blocks(c)
    nb = -(-d // 64)
    assert ours.packed.shape == (n, -(-d // 2)) and ours.absmax_codes.shape == (n, nb)
    for i in range(n):
        packed, state = bnb(c[i], double=False)
        np.testing.assert_array_equal(ours.packed[i], packed.numpy().reshape(-1))
        np.testing.assert_array_equal(absmax[i], state.absmax.numpy())

    padded = np.pad(c, ((0, 0), (0, nb * 64 - d)))          # our blocks, whole
    groups = -(-unit_rows * nb // 256)
    assert ours.group_scale.shape == (n // unit_rows * groups,)
    theirs = np.empty_like(padded)
    for u in range(n // unit_rows):
        rows = slice(u * unit_rows, (u + 1) * unit_rows)
        flat, out = padded[rows].reshape(-1), theirs[rows].reshape(-1)
        codes = ours.absmax_codes[rows].reshape(-1)
        for g in range(groups):
            blocks = slice(g * 256 * 64, (g + 1) * 256 * 64)
            packed, state = bnb(flat[blocks], double=True)
            np.testing.assert_array_equal(codes[g * 256:(g + 1) * 256], state.absmax.numpy())
            k = u * groups + g
            np.testing.assert_allclose(ours.group_offset[k], state.offset.item(), rtol=3e-7)
            np.testing.assert_allclose(ours.group_scale[k], state.state2.absmax.item(), rtol=1e-6)
            out[blocks] = bnb_f.dequantize_4bit(packed, state).numpy().reshape(-1)
        theirs[rows] = out.reshape(unit_rows, -1)
    deq = np.asarray(ours.dequantize())
    assert deq.shape == shape and rel(deq, theirs[:, :d]) <= 1e-6


def test_nf4_units_are_one_device_at_the_largest_tp():
    """max_tp against ModelConfig.check_tp (the largest tp it accepts, and every other one
    divides it) and the units: every device at every valid tp holds whole units, one at the
    largest tp."""
    from spmd_lora.config.model_config import ModelConfig
    from spmd_lora.weights.shapes import param_shapes

    for heads, kv, inter in [(4, 2, 600), (12, 4, 36), (12, 4, 30), (8, 8, 12), (32, 8, 11008)]:
        cfg = ModelConfig(vocab_size=96, hidden_size=heads * 8, intermediate_size=inter,
                          num_layers=1, num_heads=heads, num_kv_heads=kv, head_dim=8)
        valid = []
        for tp in range(1, 2 * heads + 1):
            try:
                cfg.check_tp(tp)
                valid.append(tp)
            except ConfigError:
                pass
        assert max(valid) == quant.max_tp(cfg) and all(quant.max_tp(cfg) % tp == 0 for tp in valid)
        for tp in valid:
            for name in quant.QUANTISED_LINEARS:
                _, n, _ = quant.canonical_shape(name, param_shapes(cfg, tp)["layers"][name])
                units = n // tp / quant.nf4_unit_rows(cfg, name)
                assert units == int(units) and (tp < max(valid) or units == 1), (cfg, tp, name)


def test_round_trip_error_is_bounded():
    rng = np.random.default_rng(1)
    c = (rng.standard_normal((64, 512)) * 0.02).astype(np.float32)
    c[3, 7] = 0.5                                          # an outlier only hurts its own row/block
    q8 = quant.quantize_int8(c)
    err8 = np.abs(np.asarray(quant.Int8Weight(**q8).dequantize()) - c)
    assert np.all(err8 <= q8["scale"][:, None] * 0.5 * (1 + 1e-5))          # half a step
    q4 = quant.quantize_nf4(c)
    deq = _dequantize(q4)
    blocks = np.abs(c).reshape(64, 8, 64).max(-1)
    half_gap = np.max(np.diff(quant.NF4_CODE)) / 2                          # 0.1385
    # per block: half the widest code gap of the block absmax, plus the double-quantised
    # absmax error (at most ~1% of the absmax here)
    err4 = np.abs(deq - c).reshape(64, 8, 64).max(-1)
    assert np.all(err4 <= blocks * (half_gap + 0.01))
    assert np.sqrt(np.mean((deq - c) ** 2)) < 0.1 * np.sqrt(np.mean(c ** 2)) + 0.1 * 0.02
    zero = quant.quantize_nf4(np.zeros((32, 512), np.float32))
    assert np.all(_dequantize(zero) == 0)


# ----------------------------------------------------------------------------- model parity

def _lora(model, seed=0):
    lcfg = LoraConfig(rank=4, alpha=8.0, targets="all")
    lora = init_lora(model.config, lcfg, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), lora)
    return lcfg, replicate(lora, model.mesh)


@pytest.mark.parametrize("kind,name,dp,tp", [
    ("nf4", "odd", 1, 1), ("nf4", "odd", 2, 2), ("nf4", "gqa", 1, 4), ("int8", "tied", 1, 2)])
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


@jax.jit
def _dequantized_linears(layers):
    """C [L, N, D] of every quantised linear, in one program."""
    return {p: layers[p].dequantize() for p in quant.QUANTISED_LINEARS}


@pytest.mark.parametrize("name,tps", [("gqa", (1, 4)), ("odd", (1, 2, 4))])
def test_quantised_base_is_the_same_at_every_tp(models, name, tps):
    """Blocks run along the hidden dimension and every device holds whole double-quantisation
    units, so the dequantised base does not depend on tp: every linear, also with partial
    blocks and groups ("odd"), also with kv heads replicated (tp 4 > 2 kv heads). And it is the
    host quantisation of the checkpoint's weights that export merges into (up to rounding)."""
    from spmd_lora.config.projections import PROJECTIONS
    from spmd_lora.export import _quant_roundtrip
    from spmd_lora.weights.hf import hf_layer_key
    from spmd_lora.weights.safetensors import WeightFiles
    from spmd_lora.weights.shapes import kv_head_source

    dense = {}
    for tp in tps:
        model = spmd_lora.load_model(models(name), tp=tp, base_quant="nf4")
        dense[tp] = jax.tree.map(np.asarray, _dequantized_linears(model.params["layers"]))
    cfg, hd = model.config, model.config.head_dim
    for tp in tps[1:]:
        for p in quant.QUANTISED_LINEARS:
            want = dense[1][p]                                # C [L, N, D]
            if PROJECTIONS[p].kv_expanded:                    # N = KVe*hd: head e is HF head src[e]
                rows = (kv_head_source(cfg, tp)[:, None] * hd + np.arange(hd)).reshape(-1)
                want = want[:, rows]
            np.testing.assert_array_equal(dense[tp][p], want, err_msg=f"{p} tp={tp}")
    files = WeightFiles(models(name))
    for p in quant.QUANTISED_LINEARS:
        for layer in range(cfg.num_layers):
            hf = _quant_roundtrip("nf4", p, np.asarray(files.get(hf_layer_key(layer, p))), cfg)
            np.testing.assert_allclose(dense[1][p][layer], hf if PROJECTIONS[p].column else hf.T,
                                       rtol=1e-6, atol=0)     # jit vs eager: fused multiply-add


def test_bad_base_quant_is_a_clear_error_and_any_hidden_size_quantises(models, tmp_path):
    from spmd_lora.train import TrainConfig
    with pytest.raises(ConfigError, match="base_quant 'nf5' unknown"):
        spmd_lora.load_model(models("gqa"), base_quant="nf5")
    with pytest.raises(ConfigError, match="base_quant 'q4' unknown; choose from none, int8, nf4"):
        TrainConfig(model="m", data="d", output_dir="o", base_quant="q4")
    # hidden 32: half a block per row; tp=2: 16-row shards of one block each, part of a group
    small = build_tiny_llama(tmp_path / "m", with_tokenizer=False, vocab_size=64, hidden_size=32,
                             intermediate_size=64)
    model = spmd_lora.load_model(small, tp=2, base_quant="nf4")
    w = np.asarray(spmd_lora.load_model(small, tp=2).params["layers"]["q_proj"])
    assert model.params["layers"]["q_proj"].shape == w.shape == (2, 32, 32)
    assert 0 < rel(quant.dequantized_params(model.params, model.mesh)["layers"]["q_proj"], w) < 0.15
    assert np.isfinite(np.asarray(model.logits([[1, 2]]))).all()


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
    config = ours.config
    with torch.no_grad():
        for name, p in hf.named_parameters():
            proj = name.split(".")[-2]
            if proj in quant.QUANTISED_LINEARS:
                p.copy_(torch.from_numpy(_quant_roundtrip("nf4", proj, p.numpy(), config)))
        got = PeftModel.from_pretrained(hf, str(adapter)).eval()(torch.from_numpy(tokens)).logits.numpy()
        got_merged = LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32)(
            torch.from_numpy(tokens)).logits.numpy()
    assert rel(got, want) <= 1e-4
    assert rel(got_merged, want) <= 1e-4


def test_demo_trains_on_an_nf4_base(tmp_path, capsys):
    """`spmd-lora demo --base-quant nf4`: the built-in tiny Llama (hidden 64: one block per row,
    shards of 32 or 64 rows, part of a 256-group) at the demo's tp=2."""
    from spmd_lora import cli

    rc = cli.main(["demo", "--output", str(tmp_path / "d"), "--base-quant", "nf4",
                   "--max-steps", "2", "--eval-fraction", "0"])
    assert rc == 0, capsys.readouterr().err
    adapter = tmp_path / "d" / "run" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert "demo done" in capsys.readouterr().out


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


def test_plan_counts_the_nf4_padding(models):
    """The abstract NF4 tree of "odd" at tp=2 (partial blocks and groups) is the loaded one's
    (leaf shapes and static fields), and the plan counts its bytes per device by hand: rows of
    ceil(96/2) = 48 packed bytes and nb = 2 absmax codes; per unit (24 rows of q/k/v/o, 150 of
    gate/up/down) one 8-byte group (48 absmax) resp. two (300 absmax)."""
    from spmd_lora.analysis.plan import quant_weight_bytes
    from spmd_lora.weights.shapes import abstract_params

    model = spmd_lora.load_model(models("odd"), tp=2, base_quant="nf4")
    abstract = abstract_params(model.config, model.mesh, "float32", "nf4")
    assert jax.tree.structure(abstract) == jax.tree.structure(model.params)
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, model.params)
    rows = 48 + 24 + 24 + 48 + 3 * 300                   # per device per layer: q, k, v, o, gate/up/down
    groups = 2 + 1 + 1 + 2 + 3 * 2 * 2
    got = quant_weight_bytes(abstract)
    assert got["weights_packed"] == 2 * rows * 48
    assert got["weights_quant_constants"] == 2 * (rows * 2 + groups * 8)
    device = model.mesh.devices.flat[0]
    assert sum(s.data.nbytes for p in quant.QUANTISED_LINEARS
               for a in model.params["layers"][p].leaves.values()
               for s in a.addressable_shards if s.device == device) == 2 * (rows * 50 + groups * 8)


def test_greedy_generation_on_nf4_equals_dequantised_model(models):
    from spmd_lora.engine.generate import generate

    model = spmd_lora.load_model(models("gqa"), tp=2, base_quant="nf4")
    dense = spmd_lora.load_model(models("gqa"), tp=2)
    dense.params = quant.dequantized_params(model.params, model.mesh)
    prompts = [[5, 9, 17, 3], [40, 2]]
    assert generate(model, prompts, 6) == generate(dense, prompts, 6)

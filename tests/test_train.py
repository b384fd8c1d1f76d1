"""Training: parity with HF transformers + PEFT, tp/dp invariance, token-weighted accumulation,
resume after SIGKILL, CLI errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import spmd_lora
from spmd_lora import cli
from spmd_lora.config.lora_config import LoraConfig
from spmd_lora.weights.lora import init_lora
from spmd_lora.model import ForwardOptions
from spmd_lora.engine.step import OptimizerConfig, make_optimizer, make_train_step
from spmd_lora.parallel.placement import replicate, shard_micro_batches
from spmd_lora.tiny import asset_path, build_tiny_llama
from spmd_lora.train import TrainConfig, train

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _batch(vocab, rows, seq, seed):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (rows, seq))
    lengths = rng.randint(seq // 3, seq + 1, rows)          # uneven lengths
    mask = (np.arange(seq)[None] < lengths[:, None]) & (np.arange(seq)[None] >= 3)
    return tokens, mask.astype(np.int32)


def _our_steps(model, lcfg, opt_cfg, batches, lora, **options):
    tp, cp = model.mesh.shape["tp"], model.mesh.shape["cp"]
    opt = make_optimizer(opt_cfg)
    lora = replicate(lora, model.mesh)
    state = replicate(opt.init(lora), model.mesh)
    step = make_train_step(ForwardOptions(model.config, tp, lcfg, cp=cp, **options), model.mesh,
                           opt)
    losses = []
    for tokens, mask in batches:
        micro = shard_micro_batches({"tokens": tokens[None], "loss_mask": mask[None]}, model.mesh)
        lora, state, m = step(model.params, lora, state, micro, jax.random.key(0))
        losses.append(float(m["loss"]))
    return losses, jax.device_get(lora)


@pytest.mark.parametrize("tp,cp,sp,seq", [(2, 1, False, 24), (4, 1, True, 22), (2, 2, True, 22)])
def test_loss_trajectory_matches_hf_peft(hf_models, tp, cp, sp, seq):
    """Same base weights, same LoRA init, same batches, 5 AdamW steps (with weight decay and
    gradient clipping): every step's loss within 1e-4 relative of transformers + PEFT. Replicated
    layout at tp=2; sequence parallelism at tp=4 (kv heads replicated, S=22 padded to 24, MLP in
    tiles); context parallelism cp=2 x tp=2 with SP (zig-zag batches, ring attention)."""
    import peft
    path, _ = hf_models("gqa4")
    lcfg = LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    model = spmd_lora.load_model(path, tp=tp, cp=cp)
    lora0 = jax.device_get(init_lora(model.config, lcfg, jax.random.key(3)))
    lr, wd, clip = 5e-3, 0.01, 1.0
    batches = [_batch(model.config.vocab_size, 2, seq, s % 2) for s in range(5)]   # 2 batches, alternating
    ours, _ = _our_steps(model, lcfg, OptimizerConfig(learning_rate=lr, total_steps=10**6,
                                                       min_lr_ratio=1.0, weight_decay=wd,
                                                       max_grad_norm=clip), batches, lora0,
                         sequence_parallel=sp, mlp_chunk_tokens=8 if sp else 0)

    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=list(TARGETS)))
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                layer = int(name.split("layers.")[1].split(".")[0])
                proj = name.rsplit(".", 1)[1]
                mod.lora_A["default"].weight.copy_(torch.tensor(np.asarray(lora0["layers"][proj]["a"][layer]).T))
                mod.lora_B["default"].weight.zero_()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, eps=1e-8)
    theirs = []
    for tokens, mask in batches:
        labels = torch.tensor(np.where(mask, tokens, -100))
        loss = pm(input_ids=torch.tensor(tokens), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        theirs.append(loss.item())
    assert theirs[4] < theirs[2] < theirs[0] and theirs[3] < theirs[1]   # it actually learns
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_grad_accumulation_weights_micro_batches_by_tokens(hf_models):
    """4 micro-batches of 1 row == 1 batch of 4 rows, with very uneven loss-token counts."""
    path, _ = hf_models("mha")
    model = spmd_lora.load_model(path, tp=2)
    lcfg = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))
    tokens, mask = _batch(model.config.vocab_size, 4, 20, 7)
    mask[0, :] = 0
    mask[0, 5:7] = 1                                        # 2 tokens vs up to 17
    opt_cfg = OptimizerConfig(learning_rate=1e-2, total_steps=10**6, min_lr_ratio=1.0)
    lora0 = jax.device_get(init_lora(model.config, lcfg, jax.random.key(0)))
    results = []
    for shape in ((1, 4), (4, 1)):
        opt = make_optimizer(opt_cfg)
        lora = replicate(lora0, model.mesh)
        state = replicate(opt.init(lora), model.mesh)
        step = make_train_step(ForwardOptions(model.config, 2, lcfg), model.mesh, opt)
        micro = shard_micro_batches({"tokens": tokens.reshape(*shape, -1),
                                     "loss_mask": mask.reshape(*shape, -1)}, model.mesh)
        for _ in range(2):
            lora, state, m = step(model.params, lora, state, micro, jax.random.key(0))
        results.append((float(m["loss"]), jax.device_get(lora), float(m["grad_norm"])))
    assert abs(results[0][0] - results[1][0]) <= 1e-6 * abs(results[0][0])
    assert abs(results[0][2] - results[1][2]) <= 1e-5 * results[0][2]
    # Adam divides by sqrt(v): entries with near-zero gradients amplify float rounding.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 results[0][1], results[1][1])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny Llama with a sentencepiece tokenizer (4 heads, 2 kv heads: tp=4 replicates kv)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), num_hidden_layers=2)


def _cfg(tiny_model, out, **kw):
    base = dict(model=str(tiny_model), data=str(asset_path("alpaca_sample.jsonl")),
                output_dir=str(out), template="alpaca", max_seq_len=128, lora_rank=4,
                lora_alpha=8.0, lora_dropout=0.0, lora_targets=("all",), learning_rate=3e-3,
                batch_size=4, max_steps=4, seed=1)
    return TrainConfig(**{**base, **kw})


def _metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_tp_and_dp_give_the_same_training(tiny_model, tmp_path, dropout):
    """tp1, tp4, dp2 x tp2 (sequence parallelism on by default) and dp2 x cp2 x tp2 (context
    parallelism), and with dropout 0 also a CLI run at cp2 x tp2 with remat offload and MLP /
    attention tiles: the same losses and adapter. LoRA dropout masks depend only on (seed,
    batch row, token, feature), so layouts agree with it too."""
    runs = {}
    meshes = ((1, 1, 1), (1, 1, 4), (2, 1, 2), (2, 2, 2)) if dropout == 0.0 else \
        ((1, 1, 1), (2, 2, 2))
    for dp, cp, tp in meshes:
        out = tmp_path / f"dp{dp}cp{cp}tp{tp}"
        train(_cfg(tiny_model, out, dp=dp, cp=cp, tp=tp, lora_dropout=dropout))
        runs[(dp, cp, tp)] = ([m["loss"] for m in _metrics(out) if "loss" in m],
                              load_file(out / "adapter" / "adapter_model.safetensors"))
    if dropout == 0.0:
        out = tmp_path / "cli"
        assert cli.main(["train", "--model", str(tiny_model), "--data",
                         str(asset_path("alpaca_sample.jsonl")), "--output", str(out),
                         "--template", "alpaca", "--max-seq-len", "128", "--lora-rank", "4",
                         "--lora-alpha", "8", "--lora-dropout", "0", "--lora-targets", "all",
                         "--learning-rate", "3e-3", "--batch-size", "4", "--max-steps", "4",
                         "--seed", "1", "--tp", "2", "--cp", "2", "--remat", "offload",
                         "--mlp-chunk-tokens", "32", "--sequence-parallel"]) == 0
        runs["cli"] = ([m["loss"] for m in _metrics(out) if "loss" in m],
                       load_file(out / "adapter" / "adapter_model.safetensors"))
    ref_losses, ref_adapter = runs[(1, 1, 1)]
    assert len(ref_losses) == 4
    for key, (losses, adapter) in runs.items():
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        assert adapter.keys() == ref_adapter.keys()
        for name in adapter:
            # entries within 1e-5 (Adam's 1/sqrt(v) amplifies reduction-order rounding of
            # near-zero gradient entries, so no tighter elementwise bound holds)
            np.testing.assert_allclose(adapter[name], ref_adapter[name], rtol=0, atol=1e-5,
                                       err_msg=f"{key} {name}")


def test_packing_dropout_accumulation_and_eval_train(tiny_model, tmp_path):
    """Packed sequences, LoRA dropout, remat, accumulation and an eval split train finitely and
    leave a final checkpoint (remat equivalence itself: test_model_parity.py)."""
    out = tmp_path / "packed"
    result = train(_cfg(tiny_model, out, pack=True, lora_dropout=0.1, max_steps=3, eval_fraction=0.1,
                        grad_accum_steps=2, batch_size=2, remat="save-dots"))
    assert np.isfinite(result["loss"]) and np.isfinite(result["eval_loss"])
    assert (out / "checkpoints" / "step_3").is_dir()
    assert [m["step"] for m in _metrics(out) if "loss" in m] == [1, 2, 3]


def _cli_train(tiny_model, out, *extra):
    return [sys.executable, "-m", "spmd_lora", "train", "--model", str(tiny_model),
            "--data", str(asset_path("alpaca_sample.jsonl")), "--output-dir", str(out),
            "--template", "alpaca", "--max-seq-len", "128", "--lora-rank", "4",
            "--lora-targets", "all", "--batch-size", "2", "--max-steps", "14", "--save-every", "2",
            "--lora-dropout", "0.1", "--tp", "2", "--seed", "5", *extra]


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_model, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    full = tmp_path / "full"
    subprocess.run(_cli_train(tiny_model, full), check=True, env=env, capture_output=True,
                   cwd=tmp_path)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cli_train(tiny_model, cut), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "step_4").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "adapter").exists(), "killed too late to test resume"
    resumed = subprocess.run(_cli_train(tiny_model, cut, "--resume"), env=env, capture_output=True,
                             text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step" in resumed.stderr
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "adapter" / "adapter_model.safetensors")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)    # bit for bit
    steps = [m["step"] for m in _metrics(cut)]
    assert steps == sorted(steps) and steps[-1] == 14 and len(set(steps)) == len(steps)


@pytest.mark.parametrize("case,content,msg", [
    ("malformed", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n',
     r"bad\.jsonl.*line 2"),
    ("missing_field", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
     r"bad\.jsonl.*line 2.*output"),
    ("empty", "", r"bad\.jsonl.*empty"),
])
def test_cli_bad_data_is_a_clear_error(tiny_model, tmp_path, capsys, case, content, msg):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    rc = cli.main(["train", "--model", str(tiny_model), "--data", str(data), "--output-dir",
                   str(out), "--template", "alpaca"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert __import__("re").search(msg, err, __import__("re").S), err
    assert not out.exists()


@pytest.mark.parametrize("args,msg", [
    (["--model", "/nonexistent/model"], "model directory not found: /nonexistent/model"),
    (["--tp", "3"], "tp=3 does not divide num_attention_heads=4"),
    (["--lora-targets", "qproj"], "--lora-targets ['qproj'] invalid"),
    (["--data", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
])
def test_cli_bad_config_is_a_clear_error(tiny_model, tmp_path, capsys, args, msg):
    out = tmp_path / "out"
    base = {"--model": str(tiny_model), "--data": str(asset_path("alpaca_sample.jsonl")),
            "--output-dir": str(out)}
    base.update(dict(zip(args[::2], args[1::2])))
    rc = cli.main(["train", *[x for kv in base.items() for x in kv]])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and msg in err, err
    assert not out.exists()


def test_nan_loss_stops_with_a_clear_error(tiny_model, tmp_path, capsys):
    rc = cli.main(["train", "--model", str(tiny_model), "--data", str(asset_path("alpaca_sample.jsonl")),
                   "--output-dir", str(tmp_path / "o"), "--learning-rate", "1e30", "--max-steps", "3",
                   "--max-grad-norm", "0", "--lora-targets", "all", "--max-seq-len", "128"])
    err = capsys.readouterr().err
    assert rc == 2 and ("loss became" in err or "LoRA factors blew up" in err)
    assert "lower --learning-rate" in err
    assert not (tmp_path / "o" / "adapter").exists()


def test_demo_runs_and_loss_falls(tmp_path, capsys):
    """`spmd-lora demo`: tiny Llama + tokenizer built on the spot, bundled Alpaca sample, tp=2;
    the loss falls and a PEFT adapter is written."""
    rc = cli.main(["demo", "--output", str(tmp_path / "demo")])
    assert rc == 0, capsys.readouterr().err
    run = tmp_path / "demo" / "run"
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    losses = [m["loss"] for m in _metrics(run) if "loss" in m]
    assert len(losses) >= 20
    assert np.mean(losses[-7:]) < np.mean(losses[:7]) - 0.5, losses

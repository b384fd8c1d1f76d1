"""DPO (objective dpo) against TRL's definitions on a tiny HF Llama + PEFT LoRA (float32).

TRL 1.16 computes its DPO loss inside ``DPOTrainer._compute_loss`` (no standalone loss
function), so the reference here is built from TRL's own pieces: the per-token log-probs of
``trl.trainer.utils.selective_log_softmax`` on the PEFT model's logits, the reference model as
TRL gets it for a PEFT policy (``trl.trainer.utils.use_adapter(model, None)``: adapters off,
no grad), and the loss and metrics written as ``_compute_loss`` defines them (sigmoid:
``-logsigmoid(beta * delta)``, with label smoothing the cDPO form TRL's ``aot`` loss uses for a
single pair; ipo: per-token mean log-ratios); the LoRA gradients by torch autograd through the
PEFT model."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
trl_utils = pytest.importorskip("trl.trainer.utils")

import spmd_lora  # noqa: E402
from conftest import make_peft_adapter, rel_err  # noqa: E402
from spmd_lora.engine.step import make_train_step  # noqa: E402
from spmd_lora.model import ForwardOptions, PreferenceLoss  # noqa: E402
from spmd_lora.parallel.placement import replicate, shard_micro_batches  # noqa: E402
from spmd_lora.weights.peft import load_adapter  # noqa: E402

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


def _pairs(vocab, n_pairs, seq, seed):
    """tokens, loss_mask [2P, S]: pair i on rows 2i (chosen), 2i+1 (rejected), a shared random
    prompt, completions of different tokens and lengths, padding (0, mask 0) at the end."""
    rng = np.random.RandomState(seed)
    tokens = np.zeros((2 * n_pairs, seq), np.int64)
    mask = np.zeros((2 * n_pairs, seq), np.int32)
    for i in range(n_pairs):
        p = rng.randint(3, seq // 2)
        prompt = rng.randint(1, vocab, p)
        for j in range(2):
            n = rng.randint(p + 2, seq + 1)
            tokens[2 * i + j, :p] = prompt
            tokens[2 * i + j, p:n] = rng.randint(1, vocab, n - p)
            mask[2 * i + j, p:n] = 1
    return tokens, mask


def _trl_reference(pm, tokens, mask, beta, loss_type, ls):
    """(loss, metrics, {(proj, factor): [L, ...] LoRA gradient in our layout})."""
    ids = torch.tensor(tokens)
    tmask = torch.tensor(mask[:, 1:], dtype=torch.float32)

    def logps(model):
        logits = model(input_ids=ids).logits[:, :-1]
        return (trl_utils.selective_log_softmax(logits, ids[:, 1:]) * tmask).sum(dim=1)

    pm.zero_grad()
    policy = logps(pm)
    with torch.no_grad(), trl_utils.use_adapter(pm, None):
        ref = logps(pm)
    pc, pr, rc, rr = policy[0::2], policy[1::2], ref[0::2], ref[1::2]
    cr, rj = pc - rc, pr - rr
    F = torch.nn.functional
    if loss_type == "sigmoid":
        d = beta * (cr - rj)
        per_pair = -(1 - ls) * F.logsigmoid(d) - ls * F.logsigmoid(-d)
    else:
        nc, nr = tmask[0::2].sum(1).clamp(min=1.0), tmask[1::2].sum(1).clamp(min=1.0)
        per_pair = (cr / nc - rj / nr - 1 / (2 * beta)) ** 2
    loss = per_pair.mean()
    loss.backward()
    chosen_r, rejected_r = beta * cr.detach(), beta * rj.detach()
    metrics = {"rewards/chosen": chosen_r.mean().item(),
               "rewards/rejected": rejected_r.mean().item(),
               "rewards/accuracies": (chosen_r > rejected_r).float().mean().item(),
               "rewards/margins": (chosen_r - rejected_r).mean().item(),
               "logps/chosen": pc.detach().mean().item(),
               "logps/rejected": pr.detach().mean().item()}
    grads = {}
    for name, p in pm.named_parameters():
        if "lora_" in name:
            layer = int(name.split("layers.")[1].split(".")[0])
            proj = name.split(".lora_")[0].rsplit(".", 1)[1]
            grads.setdefault((proj, "a" if ".lora_A." in name else "b"), {})[layer] = \
                p.grad.numpy().T
    return loss.item(), metrics, {k: np.stack([v[i] for i in sorted(v)]) for k, v in grads.items()}


def _grad_keeper():
    """An 'optimizer' whose state after a step is that step's gradients (no update)."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda g, state, params=None: (jax.tree.map(jnp.zeros_like, g), g))


def _our_step(path, adapter_dir, tokens, mask, pref, tp=1, dp=1, micro=1, **options):
    """(metrics, gradients) of one DPO step; ``micro`` splits the pairs into micro-batches."""
    model = spmd_lora.load_model(path, tp=tp, dp=dp)
    lora, lcfg = load_adapter(adapter_dir, model.config)
    opt = _grad_keeper()
    lora = replicate(lora, model.mesh)
    state = replicate(opt.init(lora), model.mesh)
    step = make_train_step(ForwardOptions(model.config, tp, lcfg, **options), model.mesh, opt,
                           preference=pref)
    rows = tokens.shape[0] // micro
    batch = {"tokens": tokens.reshape(micro, rows, -1).astype(np.int32),
             "loss_mask": mask.reshape(micro, rows, -1)}
    _, state, m = step(model.params, lora, state, shard_micro_batches(batch, model.mesh),
                       jax.random.key(0))
    return {k: float(v) for k, v in m.items()}, jax.device_get(state)


def _compare(ours, grads, loss, metrics, ref_grads, tol=1e-4):
    errs = {"loss": rel_err(ours["loss"], loss)}
    for k in METRICS:
        errs[k] = (abs(ours[k] - metrics[k]) if k == "rewards/accuracies"
                   else rel_err(ours[k], metrics[k]))
    for (proj, factor), g in ref_grads.items():
        errs[f"{proj}.{factor}"] = rel_err(grads["layers"][proj][factor], g)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, (worst, errs[worst], errs)
    return errs


@pytest.fixture(scope="module")
def setup(hf_models, tmp_path_factory):
    path, hf = hf_models("gqa4")
    adapter_dir = tmp_path_factory.mktemp("dpo_adapter")
    pm = make_peft_adapter(hf, adapter_dir)
    tokens, mask = _pairs(hf.config.vocab_size, 4, 19, 0)      # 19: no shard count divides it
    return path, adapter_dir, pm, tokens, mask


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_first_step_matches_trl(setup, loss_type, ls):
    """The first step's loss, the six reward / logp metrics and every LoRA gradient (all
    seven projections, a and b) within 1e-4 relative of TRL's DPO on PEFT; sigmoid, sigmoid
    with label smoothing, ipo."""
    path, adapter_dir, pm, tokens, mask = setup
    beta = 0.5
    loss, metrics, ref_grads = _trl_reference(pm, tokens, mask, beta, loss_type, ls)
    ours, grads = _our_step(path, adapter_dir, tokens, mask,
                            PreferenceLoss(beta=beta, loss_type=loss_type, label_smoothing=ls))
    errs = _compare(ours, grads, loss, metrics, ref_grads)
    print(loss_type, ls, "max rel err", max(errs.values()))


@pytest.mark.parametrize("tp,dp,micro,sp", [(2, 1, 1, False), (2, 1, 1, True), (1, 2, 1, False),
                                            (2, 2, 2, True)])
def test_tp_dp_and_micro_batches_match_trl(setup, tp, dp, micro, sp):
    """tp=2 (replicated and sequence-parallel layouts, the vocab log-softmax reduced over
    tp), dp=2 (pairs on adjacent rows stay on one shard), and two micro-batches (pairs weigh
    the same in any micro-batch): the same numbers as TRL / tp=1."""
    path, adapter_dir, pm, tokens, mask = setup
    pref = PreferenceLoss(beta=0.5)
    loss, metrics, ref_grads = _trl_reference(pm, tokens, mask, 0.5, "sigmoid", 0.0)
    ours, grads = _our_step(path, adapter_dir, tokens, mask, pref, tp=tp, dp=dp, micro=micro,
                            sequence_parallel=sp, ce_chunk_tokens=16)
    errs = _compare(ours, grads, loss, metrics, ref_grads)
    print(tp, dp, micro, sp, "max rel err", max(errs.values()))


def test_cli_dpo_run_on_the_bundled_sample_raises_reward_accuracy(tmp_path, capsys):
    """`spmd-lora train --objective dpo` on the tiny model and the bundled preference sample:
    metrics.jsonl carries TRL's metric names every step, and the reward accuracy of the last
    steps is above that of the first (at step 1 LoRA's B is zero: policy = reference)."""
    from spmd_lora import cli
    from spmd_lora.tiny import asset_path, build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny", num_hidden_layers=2)
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", str(model), "--data", str(asset_path("dpo_sample.jsonl")),
                   "--output-dir", str(out), "--objective", "dpo", "--beta", "0.1",
                   "--max-seq-len", "128", "--batch-size", "8", "--max-steps", "12",
                   "--learning-rate", "1e-2", "--lora-rank", "8", "--lora-dropout", "0",
                   "--lora-targets", "all", "--no-census"])
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(set(METRICS) <= set(m) for m in lines)
    acc = [m["rewards/accuracies"] for m in lines]
    assert np.mean(acc[-4:]) > np.mean(acc[:4]), acc
    assert lines[-1]["rewards/margins"] > 0, lines[-1]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("args,msg", [
    (["--objective", "dpo", "--attention", "tokamax"], "--dpo-layout separate"),
    (["--objective", "dpo", "--batch-size", "2", "--pack", "--dpo-layout", "separate"],
     "needs --dpo-layout shared-prefix"),
    (["--beta", "0"], "beta must be > 0"),
    (["--objective", "dpo", "--batch-size", "2", "--loss-type", "ipo",
      "--label-smoothing", "0.1"],
     "--label-smoothing applies to --loss-type sigmoid"),
])
def test_cli_dpo_bad_settings_are_one_line_errors(tmp_path, capsys, args, msg):
    """Each DPO setting is checked before anything is loaded, in one line naming the flag."""
    from spmd_lora import cli
    rc = cli.main(["train", "--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl"),
                   "--output-dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    """The tiny Llama (with its tokenizer) in torch, a PEFT adapter of random non-zero B, and
    the first 8 bundled preference pairs as a file."""
    from transformers import LlamaForCausalLM

    from spmd_lora.tiny import asset_path, build_tiny_llama
    root = tmp_path_factory.mktemp("eval_dpo")
    model = build_tiny_llama(root / "tiny", num_hidden_layers=2)
    hf = LlamaForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    pm = make_peft_adapter(hf, root / "adapter")
    data = root / "pairs.jsonl"
    data.write_text("\n".join(asset_path("dpo_sample.jsonl").read_text().splitlines()[:8]) + "\n")
    return model, root / "adapter", pm, data


@pytest.mark.parametrize("layout,extra", [("separate", []), ("shared-prefix", []),
                                          ("shared-prefix", ["--tp", "2", "--batch-size", "3"])])
def test_cli_eval_dpo_matches_trl_on_a_peft_adapter(tiny_pairs, capsys, layout, extra):
    """`spmd-lora eval --objective dpo --adapter A`: the DPO loss and TRL's six metrics of a
    preference file (policy = base + A, reference = the base) within 1e-4 of TRL's pieces on
    the PEFT model, in both layouts, with tp 2 and a last batch padded with empty pairs."""
    from spmd_lora import cli
    from spmd_lora.data import load_records, tokenize_pairs
    from spmd_lora.tokenizer import load_tokenizer

    model, adapter, pm, data = tiny_pairs
    rc = cli.main(["eval", "--model", str(model), "--adapter", str(adapter), "--data", str(data),
                   "--objective", "dpo", "--beta", "0.5", "--max-seq-len", "128",
                   "--dtype", "float32", "--dpo-layout", layout, *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    ours = json.loads(out.strip().splitlines()[-1])
    pairs = tokenize_pairs(load_records(data), load_tokenizer(str(model)), 128,
                           shared_prefix=False)
    seq = max(len(p) for p in pairs)
    tokens = np.zeros((2 * len(pairs), seq), np.int64)
    mask = np.zeros((2 * len(pairs), seq), np.int32)
    for i, p in enumerate(pairs):
        for j, ex in enumerate((p.chosen, p.rejected)):
            tokens[2 * i + j, :len(ex)], mask[2 * i + j, :len(ex)] = ex.input_ids, ex.loss_mask
    loss, metrics, _ = _trl_reference(pm, tokens, mask, 0.5, "sigmoid", 0.0)
    assert ours["pairs"] == len(pairs) == 8
    errs = {"loss": rel_err(ours["loss"], loss),
            **{k: (abs(ours[k] - metrics[k]) if k == "rewards/accuracies"
                   else rel_err(ours[k], metrics[k])) for k in METRICS}}
    assert max(errs.values()) <= 1e-4, errs


def test_cli_eval_dpo_refuses_what_does_not_apply(tiny_pairs, capsys):
    from spmd_lora import cli
    model, adapter, _, data = tiny_pairs
    base = ["eval", "--model", str(model), "--data", str(data), "--objective", "dpo"]
    for args, msg in ((["--generate", "2"], "--objective dpo takes no --generate"),
                      (["--template", "alpaca"], "--objective dpo takes no --template"),
                      (["--loss-type", "ipo", "--label-smoothing", "0.1"],
                       "--label-smoothing applies to --loss-type sigmoid")):
        assert cli.main(base + args) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err

"""DPO (objective dpo) in every layout the SFT step supports, against the plain run.

The oracle of the layout tests is ONE step of our DPO step at tp=1, dp=1, remat none, one
micro-batch, unquantised, pairs on two separate rows (``tests/test_dpo.py`` checks that run
against TRL's definitions on PEFT; ``tests/test_dpo_shared_prefix.py`` the shared-prefix
layout against it): the loss, TRL's six ``rewards/*`` / ``logps/*`` metrics and every LoRA
gradient (all seven projections, a and b) must agree within 1e-4 (float32) under each remat
policy, with gradient accumulation, and with an NF4 / int8 frozen base, whose oracle is the
same model with the dequantised weights as plain float32 weights; most cases in the default
shared-prefix layout (one row per pair), some in the separate one.

Then held-out evaluation (``evaluate_preference``, ``--eval-fraction``) and CLI runs on the
bundled tiny model and preference sample: ``spmd-lora launch --nprocs 2 -- train --objective
dpo`` (dp=2 across the two processes, tp=2 within each, held-out pairs evaluated) against the
same run in this process, whose eval metrics are checked against our step's loss and metrics
on the same held-out pairs with the final adapter. Torch-free (the tiny model is numpy-built).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import spmd_lora
from conftest import rel_err
from spmd_lora import cli, data
from spmd_lora.config.lora_config import LoraConfig
from spmd_lora.data.examples import DataWarning, make_example
from spmd_lora.data.preference import Pair, collate_shared
from spmd_lora.engine.step import make_train_step
from spmd_lora.evaluate import evaluate_preference
from spmd_lora.model import PREFERENCE_METRICS, ForwardOptions, PreferenceLoss
from spmd_lora.parallel.mesh import TP
from spmd_lora.parallel.placement import replicate, shard_micro_batches
from spmd_lora.tiny import asset_path, build_tiny_llama
from spmd_lora.tokenizer import load_tokenizer
from spmd_lora.weights import quant
from spmd_lora.weights.lora import init_lora
from spmd_lora.weights.peft import load_adapter

LORA = LoraConfig(rank=4, alpha=8.0, targets="all")
BETA = 0.5
N_PAIRS, SEQ = 4, 19                # 19: no shard count divides it
TOL = 1e-4


def _pairs(vocab, n_pairs, seq, seed):
    """The same random pairs in both layouts: (separate tokens / loss_mask [2P, S], pair i on
    rows 2i (chosen), 2i+1 (rejected); shared-prefix batch [P, S'], one row per pair; the
    :class:`Pair` s of both layouts). A shared random prompt, completions of different tokens
    and lengths (so pairs weigh differently in tokens), padding at the end."""
    rng = np.random.RandomState(seed)
    tokens = np.zeros((2 * n_pairs, seq), np.int32)
    mask = np.zeros((2 * n_pairs, seq), np.int32)
    pairs = {True: [], False: []}
    for i in range(n_pairs):
        p = rng.randint(3, seq // 2)
        prompt = rng.randint(1, vocab, p)
        rows = []
        for j in range(2):
            n = rng.randint(p + 2, seq + 1)
            tokens[2 * i + j, :p] = prompt
            tokens[2 * i + j, p:n] = rng.randint(1, vocab, n - p)
            mask[2 * i + j, p:n] = 1
            rows.append(make_example(tokens[2 * i + j, :n].tolist(),
                                     mask[2 * i + j, :n].tolist(), f"pair {i}"))
        for shared in (True, False):
            pairs[shared].append(Pair(*rows, p, f"pair {i}", shared))
    shared = collate_shared([[p] for p in pairs[True]], max(len(p) for p in pairs[True]) + 3)
    return {False: {"tokens": tokens, "loss_mask": mask}, True: shared}, pairs


def _grad_keeper():
    """An 'optimizer' whose state after a step is that step's gradients (no update)."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda g, state, params=None: (jax.tree.map(jnp.zeros_like, g), g))


_STEPS = {}


def _step_fn(opts, mesh, pref):
    """One jitted DPO step per (options, mesh, loss): runs on other weights reuse its compile."""
    key = (opts, mesh, pref)
    if key not in _STEPS:
        _STEPS[key] = make_train_step(opts, mesh, _grad_keeper(), preference=pref)
    return _STEPS[key]


def _one_step(model, lora, batch, shared, micro=1, params=None, beta=BETA, **options):
    """(metrics, LoRA gradients as numpy) of one DPO step of ``model`` (its mesh, its
    ``params`` unless given) from the host LoRA tree ``lora`` on the host ``batch`` [rows, S]
    in the layout ``shared``; ``micro`` splits the rows into that many micro-batches."""
    tp = model.mesh.shape[TP]
    pref = PreferenceLoss(beta=beta, shared_prefix=shared)
    step = _step_fn(ForwardOptions(model.config, tp, LORA, **options), model.mesh, pref)
    opt = _grad_keeper()
    lora = replicate(lora, model.mesh)
    state = replicate(opt.init(lora), model.mesh)
    rows = batch["tokens"].shape[0] // micro
    batch = {k: np.asarray(v, np.int32).reshape(micro, rows, -1) for k, v in batch.items()}
    _, state, m = step(model.params if params is None else params, lora, state,
                       shard_micro_batches(batch, model.mesh), jax.random.key(0))
    return {k: float(v) for k, v in m.items()}, jax.device_get(state)


def _metric_errors(m, m0, beta) -> dict:
    """Errors of the loss and metrics: relative; rewards/accuracies absolute; the rewards
    (beta times a difference of two sequence log-probs of tens of nats, float32 sums) relative
    to beta times the log-probs' size, as tests/test_dpo_shared_prefix.py."""
    scale = beta * max(abs(m0["logps/chosen"]), abs(m0["logps/rejected"]))
    errs = {"loss": rel_err(m["loss"], m0["loss"])}
    for k in PREFERENCE_METRICS:
        d = abs(m[k] - m0[k])
        errs[k] = d if k == "rewards/accuracies" else d / (
            scale if k.startswith("rewards/") else abs(m0[k]))
    return errs


def _errors(run, ref) -> dict:
    """:func:`_metric_errors` and the relative error of every LoRA gradient."""
    (m, g), (m0, g0) = run, ref
    errs = _metric_errors(m, m0, BETA)
    for proj, factors in g0["layers"].items():
        for f, ref_g in factors.items():
            assert np.any(ref_g != 0), (proj, f)            # every gradient is exercised
            errs[f"{proj}.{f}"] = rel_err(g["layers"][proj][f], ref_g)
    assert m["pairs"] == m0["pairs"] == N_PAIRS and m["tokens"] == m0["tokens"]
    return errs


def _check(run, ref, label, tol=TOL):
    errs = _errors(run, ref)
    worst = max(errs, key=errs.get)
    grad = max((k for k in errs if "." in k), key=errs.get)
    print(f"{label}: max err {errs[worst]:.1e} ({worst}); gradients {errs[grad]:.1e} ({grad})")
    assert errs[worst] <= tol, (label, worst, errs[worst], errs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The bundled tiny model (2 layers, 4 heads, 2 kv heads, vocab 512), built once."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", num_hidden_layers=2)


@pytest.fixture(scope="module")
def setup(tiny):
    """The models by (tp, dp, base_quant, cp), random pairs in both layouts, a LoRA with non-zero
    B (so every gradient is non-zero) and the oracle step (separate rows, tp=1, remat none,
    one micro-batch)."""
    models = {}

    def model(tp=1, dp=1, base_quant="none", cp=1):
        if (tp, dp, base_quant, cp) not in models:
            models[tp, dp, base_quant, cp] = spmd_lora.load_model(tiny, tp=tp, dp=dp, cp=cp,
                                                                  base_quant=base_quant)
        return models[tp, dp, base_quant, cp]

    base = model()
    batches, pairs = _pairs(base.config.vocab_size, N_PAIRS, SEQ, 0)
    lora = jax.device_get(init_lora(base.config, LORA, jax.random.key(1)))
    rng = np.random.RandomState(2)
    for factors in lora["layers"].values():
        factors["b"] = (0.2 * rng.standard_normal(factors["b"].shape)).astype(np.float32)
    oracle = _one_step(base, lora, batches[False], False)
    return model, batches, pairs, lora, oracle


REMAT = {"full": ("full", True, {}),
         "save-dots": ("save-dots", True, {}),
         "offload": ("offload", True, {}),
         "offload-k1": ("offload", True, {"offload_layers": 1}),   # layer 0 on the host only
         "offload-input": ("offload-input", True, {"tp": 2, "dp": 2, "micro": 2}),
         "offload-input-separate": ("offload-input", False, {})}


@pytest.mark.parametrize("case", list(REMAT))
def test_remat_policies_equal_the_plain_step(setup, case):
    """Every remat policy of the SFT step (none is the oracle) in the shared-prefix layout,
    offload also with only its first layer offloaded (the layer scan split in two),
    offload-input also under tp=2 sequence-parallel x dp=2 with two micro-batches and in the
    separate layout: the oracle's loss, metrics and gradients."""
    model, batches, _, lora, oracle = setup
    remat, shared, extra = REMAT[case]
    extra = dict(extra)
    tp, dp, micro = extra.pop("tp", 1), extra.pop("dp", 1), extra.pop("micro", 1)
    if tp > 1:                      # and chunked log-probs, as test_dpo.py's layouts
        extra["ce_chunk_tokens"] = 16
    run = _one_step(model(tp, dp), lora, batches[shared], shared, micro=micro, remat=remat,
                    **extra)
    _check(run, oracle, f"remat {case} (shared_prefix={shared}, tp={tp} dp={dp} "
                        f"micro={micro})")


def test_gradient_accumulation_equals_one_big_batch(setup):
    """The pairs over 4 micro-batches, one pair (one shared-prefix row) each, of different
    token counts (2 micro-batches: the remat test above; in the separate layout:
    test_dpo.py): the step's loss and gradients are the per-pair mean over all of them, as
    in one batch."""
    model, batches, _, lora, oracle = setup
    _check(_one_step(model(), lora, batches[True], True, micro=N_PAIRS), oracle,
           f"{N_PAIRS} micro-batches (shared_prefix=True)")


@pytest.mark.parametrize("kind,tp,shared,options", [
    ("nf4", 1, True, {}), ("int8", 1, False, {}), ("nf4", 2, True, {"remat": "full"})])
def test_quantised_base_equals_its_dequantised_float_model(setup, kind, tp, shared, options):
    """An NF4 / int8 frozen base (also NF4 at tp=2 with remat full, the QLoRA setting): the
    same step as the float32 model whose weights are the dequantised ones (separate rows,
    tp=1); that float model differs from the unquantised one (the check is not vacuous)."""
    model, batches, _, lora, oracle = setup
    q1 = model(1, 1, kind)
    dense = quant.dequantized_params(q1.params, q1.mesh)
    ref = _one_step(model(), lora, batches[False], False, params=dense)
    run = _one_step(model(tp, 1, kind), lora, batches[shared], shared, **options)
    _check(run, ref, f"{kind} tp={tp} shared_prefix={shared} {options}")
    assert max(_errors(run, oracle).values()) > 10 * TOL      # not the unquantised model's


@pytest.mark.parametrize("shared,cp", [(True, 2), (False, 1)], ids=["shared-prefix-cp2",
                                                                      "separate"])
def test_evaluate_preference_equals_the_step(setup, shared, cp):
    """Held-out evaluation (``evaluate_preference``, no gradients) of the pairs at tp=2 (the
    shared-prefix rows also split over cp=2, ring attention) in batches of 3 pairs (the
    second one padded with two empty pairs, which count for nothing): the oracle step's loss
    and metrics (means over the 4 pairs)."""
    model, _, pairs, lora, oracle = setup
    m = model(2, 1, cp=cp)
    m.lora, m.lora_config = replicate(lora, m.mesh), LORA
    got = evaluate_preference(m, pairs[shared], PreferenceLoss(beta=BETA, shared_prefix=shared),
                              batch_size=3)
    assert got["pairs"] == N_PAIRS
    errs = _metric_errors(got, oracle[0], BETA)
    print(f"evaluate_preference (shared_prefix={shared}, tp=2 cp={cp}): max err "
          f"{max(errs.values()):.1e}")
    assert max(errs.values()) <= TOL, errs
    with pytest.raises(spmd_lora.SpmdLoraError, match="other layout"):
        evaluate_preference(m, pairs[not shared], PreferenceLoss(shared_prefix=shared))
    if shared:      # a packed run's loss (pairs_per_row > 1): evaluated one pair per row
        packed = PreferenceLoss(beta=BETA, shared_prefix=True, pairs_per_row=3)
        assert evaluate_preference(m, pairs[True], packed, batch_size=3) == got


# ---- CLI runs on the bundled sample: several processes, held-out evaluation -----------------

DATA = asset_path("dpo_sample.jsonl")
EVAL_FRACTION, SEED, CLI_BETA, MAX_SEQ_LEN = 0.25, 3, 0.1, 80


def _train_args(model, out) -> list[str]:
    return ["train", "--model", str(model), "--data", str(DATA), "--output-dir", str(out),
            "--objective", "dpo", "--beta", str(CLI_BETA), "--max-seq-len", str(MAX_SEQ_LEN),
            "--batch-size", "2", "--grad-accum-steps", "2", "--max-steps", "4",
            "--learning-rate", "1e-2", "--lora-rank", "4", "--lora-alpha", "8",
            "--lora-dropout", "0", "--lora-targets", "all", "--seed", str(SEED),
            "--dp", "2", "--tp", "2", "--pack", "--eval-fraction", str(EVAL_FRACTION),
            "--eval-every", "2", "--no-census"]


def _lines(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """The same DPO run (default shared-prefix layout, pairs packed, dp=2 x tp=2, two
    micro-batches of 2 rows a step, a quarter of the pairs held out and evaluated every 2
    steps) in this process, and launched as 2 processes x 2 devices (dp across the
    processes)."""
    root = tmp_path_factory.mktemp("dpo_runs")
    assert cli.main(_train_args(tiny, root / "one")) == 0
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "spmd_lora", "launch", "--nprocs", "2",
                           "--devices-per-process", "2", "--",
                           *_train_args(tiny, root / "two")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return {"one": root / "one", "two": root / "two", "wall": time.perf_counter() - t0}


def test_two_processes_equal_one_process(runs):
    """The 2-process launch: the same step losses, metrics and eval metrics, and the same
    final adapter, up to the order of the cross-process gradient all-reduce (as
    tests/test_multiprocess.py: rtol 2e-6, atol 1e-5 on the adapter). The rewards are beta
    times differences of log-probs of about -50, so their rounding is absolute, not relative:
    atol 1e-6 (beta 0.1 x 50 x a few float32 ulps)."""
    one, two = _lines(runs["one"]), _lines(runs["two"])
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        keys = [k for k in a if k in ("loss", "grad_norm", "tokens", "pairs", "eval_loss")
                or "/" in k]
        assert keys and set(keys) <= set(b)
        for k in keys:
            np.testing.assert_allclose(b[k], a[k], rtol=2e-6, atol=1e-6, err_msg=(a["step"], k))
    a, b = (load_file(Path(r) / "adapter" / "adapter_model.safetensors") for r in
            (runs["one"], runs["two"]))
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    print(f"2-process DPO launch (packed, dp=2 x tp=2, 4 steps, 3 evaluations): {runs['wall']:.1f} s "
          f"wall; adapter max abs diff {worst:.1e}")
    assert worst <= 1e-5


def test_held_out_eval_metrics_equal_our_step_on_the_eval_pairs(runs, tiny):
    """--eval-fraction 0.25: the run holds out a quarter of the PAIRS (the SFT split's seed
    logic) and logs eval_loss and TRL's metrics as eval_rewards/*, eval_logps/* before
    training (LoRA B = 0: policy = reference, loss log 2, rewards 0), every 2 steps and at
    the end (7 pairs in batches of 2 over dp=2: the last batch ends with an empty pair); the
    final ones equal our DPO step's loss and metrics (no update) on the held-out pairs with
    the final adapter, in the separate layout at tp=1 dp=1 in one batch."""
    lines = _lines(runs["one"])
    evals = [m for m in lines if "eval_loss" in m and "loss" not in m]
    names = [f"eval_{k}" for k in PREFERENCE_METRICS]
    assert [m["step"] for m in evals] == [0, 2, 4]
    assert all(set(names) <= set(m) for m in evals)
    first = evals[0]
    assert abs(first["eval_loss"] - math.log(2.0)) < 1e-6
    assert all(first[f"eval_{k}"] == 0.0 for k in PREFERENCE_METRICS if k.startswith("rewards"))
    assert evals[-1]["eval_loss"] != first["eval_loss"]       # training moved the eval loss

    with pytest.warns(DataWarning, match="skipped 5 of 32 preference pairs"):   # as the run
        pairs = data.load_pairs(DATA, load_tokenizer(str(tiny)), MAX_SEQ_LEN)
    train_pairs, eval_pairs = data.split_train_eval(pairs, EVAL_FRACTION, SEED)
    assert len(eval_pairs) == 7 and len(train_pairs) == 20
    counts = json.loads((runs["one"] / "run_config.json").read_text())["data"]
    assert counts == {"train_examples": len(train_pairs), "eval_examples": len(eval_pairs)}
    rows = [ex for p in eval_pairs for ex in (p.chosen, p.rejected)]
    seq = max(len(ex) for ex in rows)
    tokens = np.zeros((len(rows), seq), np.int32)
    mask = np.zeros((len(rows), seq), np.int32)
    for i, ex in enumerate(rows):
        tokens[i, :len(ex)], mask[i, :len(ex)] = ex.input_ids, ex.loss_mask
    model = spmd_lora.load_model(tiny)
    lora, lcfg = load_adapter(runs["one"] / "adapter", model.config)
    assert lcfg == LORA
    m, _ = _one_step(model, jax.device_get(lora), {"tokens": tokens, "loss_mask": mask}, False,
                     beta=CLI_BETA)
    assert m["pairs"] == len(eval_pairs)
    got = {k: evals[-1][f"eval_{k}"] for k in PREFERENCE_METRICS}
    errs = _metric_errors({"loss": evals[-1]["eval_loss"], **got}, m, CLI_BETA)
    print(f"held-out eval ({len(eval_pairs)} pairs) vs our step: max err "
          f"{max(errs.values()):.1e}; eval_loss {first['eval_loss']:.4f} -> "
          f"{evals[-1]['eval_loss']:.4f}")
    assert max(errs.values()) <= TOL, errs


def test_dpo_eval_generate_is_refused(tmp_path, capsys):
    """Held-out pairs are scored by the DPO loss; generation at evaluation is refused."""
    rc = cli.main(["train", "--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl"),
                   "--output-dir", str(tmp_path / "out"), "--objective", "dpo",
                   "--batch-size", "2", "--eval-fraction", "0.25", "--eval-generate", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "--eval-generate" in err and len(err.strip().splitlines()) == 1, err

#!/usr/bin/env python
"""DPO step time and FLOPs: the shared-prefix layout against the two-row layout, and against
TRL's way (HF transformers + PEFT, chosen and rejected as two rows) in the same run.

    python tools/bench_dpo_layouts.py [--prompt 2048] [--answer 128] [--steps 3] [--warmup 1]

One preference pair with a prompt of ``--prompt`` tokens and two answers of ``--answer``
tokens, on a random Llama (``--layers`` 4, ``--hidden`` 512, heads of 64, intermediate 2.6875
x hidden, vocab 32000), LoRA r=8 on every projection, fp32, AdamW, beta 0.1 (sigmoid). Per
row it prints the tokens the step computes, the median step time after ``--warmup`` steps,
and for our two layouts the step's matmul FLOPs (``spmd_lora.analysis.flops.dpo_step_flops``,
the policy's train step and the reference's forward; useful work, and what the blockwise
kernel's tiles compute; XLA's own ``cost_analysis`` counts a loop body once, so it undercounts
the tiled attention). The torch side is
TRL's DPO step written from its pieces (``selective_log_softmax`` on the PEFT model's logits
of the concatenated chosen + rejected rows, the reference as the same model with the
adapter off under ``no_grad``, ``-logsigmoid(beta * margin)``, backward, AdamW), eager, with
its default attention (sdpa); skipped when torch / peft / trl are missing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

VOCAB = 32000


def _timed(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _pair(args, seed=0):
    """A tokenized Pair (BOS-led prompt, two answers ending in EOS id 2)."""
    import numpy as np

    from spmd_lora.data.examples import make_example
    from spmd_lora.data.preference import Pair
    rng = np.random.default_rng(seed)
    prompt = [1] + rng.integers(3, VOCAB, args.prompt - 1).tolist()
    rows = [make_example(prompt + rng.integers(3, VOCAB, args.answer - 1).tolist() + [2],
                         [0] * args.prompt + [1] * args.answer, "bench") for _ in range(2)]
    return Pair(rows[0], rows[1], args.prompt, "bench")


def _model_config(args):
    from spmd_lora.config.model_config import ModelConfig
    heads = args.hidden // 64
    return ModelConfig(vocab_size=VOCAB, hidden_size=args.hidden,
                       intermediate_size=int(args.hidden * 2.6875), num_layers=args.layers,
                       num_heads=heads, num_kv_heads=heads, head_dim=64,
                       max_position_embeddings=max(4096, 2 * (args.prompt + args.answer)))


def ours(args, shared: bool) -> dict:
    import dataclasses

    import jax
    import numpy as np

    from spmd_lora.analysis.flops import dpo_step_flops
    from spmd_lora.config.lora_config import LoraConfig
    from spmd_lora.data.batching import collate
    from spmd_lora.data.preference import collate_shared
    from spmd_lora.engine.factory import build_train_step
    from spmd_lora.engine.step import OptimizerConfig
    from spmd_lora.model import PreferenceLoss
    from spmd_lora.kernels.registry import choose
    from spmd_lora.parallel.placement import shard_micro_batches

    cfg = _model_config(args)
    layout = "shared-prefix" if shared else "separate"
    step = build_train_step(cfg, lora=LoraConfig(rank=8, alpha=16.0, targets="all"),
                            preference=PreferenceLoss(beta=0.1, shared_prefix=shared),
                            optimizer=OptimizerConfig(learning_rate=1e-4, weight_decay=0.0,
                                                      max_grad_norm=None, total_steps=10 ** 6))
    pair = dataclasses.replace(_pair(args), shared_prefix=shared)
    if shared:
        batch = collate_shared([[pair]], len(pair))
    else:
        batch = collate([[pair.chosen], [pair.rejected]], len(pair))
    batch = {k: v[None] for k, v in batch.items()}
    params = step.random_params("float32")
    lora, opt = step.init_state(jax.random.key(0))
    batches = shard_micro_batches(batch, step.mesh)
    key = jax.random.key(1)
    compiled = step.lower(params, lora, opt, batches, key).compile()
    seq = batch["tokens"].shape[-1]
    blocks = choose(step.opts.attention_impl, seq_len=seq, head_dim=cfg.head_dim).block_sizes
    flops = dpo_step_flops(cfg, args.prompt, args.answer, layout=layout, lora_rank=8,
                           block_q=blocks.block_q, block_k=blocks.block_k)
    state = {"lora": lora, "opt": opt}

    def one():
        state["lora"], state["opt"], m = compiled(params, state["lora"], state["opt"], batches, key)
        return float(m["loss"])

    return {"name": f"ours, {layout}", "tokens": int(np.count_nonzero(batch["tokens"] >= 0)),
            "flops": flops, "step_s": _timed(one, args.warmup, args.steps)}


def trl_pieces(args) -> dict | None:
    try:
        import peft
        import torch
        import transformers
        from trl.trainer.utils import selective_log_softmax, use_adapter
    except ImportError as e:
        print(f"TRL side skipped: {e}")
        return None
    torch.manual_seed(0)
    heads = args.hidden // 64
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max(4096, args.prompt + args.answer)))
    model = peft.get_peft_model(hf, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_proj", "up_proj", "down_proj"]))
    pair = _pair(args)
    ids = torch.tensor([pair.chosen.input_ids.tolist(), pair.rejected.input_ids.tolist()])
    mask = torch.tensor([pair.chosen.loss_mask[1:].tolist(),
                         pair.rejected.loss_mask[1:].tolist()], dtype=torch.float32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            weight_decay=0.0)

    def logps(m):
        logits = m(input_ids=ids).logits[:, :-1]
        return (selective_log_softmax(logits, ids[:, 1:]) * mask).sum(-1)

    def one():
        opt.zero_grad()
        policy = logps(model)
        with torch.no_grad(), use_adapter(model, None):
            ref = logps(model)
        ratio = (policy - ref)
        loss = -torch.nn.functional.logsigmoid(0.1 * (ratio[0] - ratio[1]))
        loss.backward()
        opt.step()
        return loss.item()

    return {"name": "TRL pieces (HF + PEFT), two rows", "tokens": int(ids.numel()),
            "flops": None, "step_s": _timed(one, args.warmup, args.steps)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--answer", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-trl", action="store_true", help="skip the torch side")
    args = ap.parse_args(argv)
    import jax
    print(f"jax {jax.__version__} on {jax.default_backend()}, load average "
          f"{os.getloadavg()[0]:.2f}; prompt {args.prompt}, answers {args.answer}, "
          f"{args.layers} layers, hidden {args.hidden}")
    rows = [ours(args, False), ours(args, True)]
    if not args.no_trl:
        rows.append(trl_pieces(args))
    shared = rows[1]
    for r in rows:
        if r is None:
            continue
        flops = "" if r["flops"] is None else (
            f"  FLOPs useful {r['flops'].useful / 1e9:7.1f} G (x{r['flops'].useful / shared['flops'].useful:.2f})"
            f" hardware {r['flops'].hardware / 1e9:7.1f} G")
        print(f"{r['name']:36s} tokens {r['tokens']:6d}  step {r['step_s']:7.3f} s "
              f"(x{r['step_s'] / shared['step_s']:.2f} of shared-prefix){flops}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""evaluate(): token-weighted loss over batches equals the HF model's loss on the same masking."""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import spmd_lora
from spmd_lora.errors import DataError
from spmd_lora.evaluate import evaluate


def make_examples(vocab, n=7, seed=0):
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        length = rng.randint(4, 30)
        mask = (rng.rand(length) > 0.4).astype(np.int32)
        mask[-1] = 1
        out.append(SimpleNamespace(input_ids=rng.randint(0, vocab, length), loss_mask=mask))
    return out


def hf_sum_and_count(hf, examples):
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor(np.asarray(ex.input_ids)[None])
            labels = torch.tensor(np.where(np.asarray(ex.loss_mask) == 1, ex.input_ids, -100)[None])
            n = int((labels[0, 1:] != -100).sum())
            if n:
                total += hf(ids, labels=labels).loss.item() * n
                count += n
    return total, count


def test_evaluate_equals_hf_loss(hf_models):
    path, hf = hf_models("odd_vocab")
    examples = make_examples(101)
    total, count = hf_sum_and_count(hf, examples)
    model = spmd_lora.load_model(path, tp=2)
    res = evaluate(model, [{"input_ids": e.input_ids, "loss_mask": e.loss_mask} for e in examples],
                   batch_size=3)
    print(f"evaluate tp=2: rel err {abs(res['loss'] - total / count) / (total / count):.2e}")
    assert res["tokens"] == count
    assert abs(res["loss"] - total / count) / (total / count) <= 1e-5
    assert math.isclose(res["perplexity"], math.exp(res["loss"]))


def test_evaluate_with_adapter_dp2_tp2(hf_models, tmp_path):
    from peft import LoraConfig, get_peft_model
    path, hf = hf_models("gqa4")
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "a"))
    pm.eval()
    examples = make_examples(96, n=5, seed=1)
    total, count = hf_sum_and_count(pm, examples)
    model = spmd_lora.load_model(path, tp=2, dp=2, adapter=tmp_path / "a")
    res = evaluate(model, examples, batch_size=3)      # 3 -> 4 rows (dp=2), 2 batches
    print(f"evaluate dp2 tp2 + adapter: rel err {abs(res['loss'] - total / count) / (total / count):.2e}")
    assert res["tokens"] == count
    assert abs(res["loss"] - total / count) / (total / count) <= 1e-5


def test_evaluate_errors(hf_models):
    path, _ = hf_models("odd_vocab")
    model = spmd_lora.load_model(path, tp=2)
    with pytest.raises(DataError, match="no examples"):
        evaluate(model, [], 2)
    with pytest.raises(DataError, match="loss_mask"):
        evaluate(model, [{"input_ids": [1, 2, 3], "loss_mask": [1, 1]}], 2)
    with pytest.raises(DataError, match="no target tokens"):
        evaluate(model, [{"input_ids": [1, 2, 3], "loss_mask": [1, 0, 0]}], 2)

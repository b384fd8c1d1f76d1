"""Test setup: 8 fake CPU devices (before jax is imported) and tiny HF Llama builders."""
import importlib.util
import os
import re
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tokenized-data cache of every training run in the tests goes to a fresh temp dir.
os.environ.setdefault("SPMD_LORA_CACHE", tempfile.mkdtemp(prefix="spmd_lora_cache_"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

# the torch-free job (Python 3.12, newest jax) runs without torch/peft
HAVE_TORCH = importlib.util.find_spec("torch") is not None
_TORCH_IMPORT = re.compile(r"^(?:import|from)\s+(?:torch|peft)\b", re.MULTILINE)
_SKIPPED_MODULES = set()


def pytest_ignore_collect(collection_path, config):
    """Without torch, do not collect test modules that import torch or peft at the top."""
    if HAVE_TORCH or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    if _TORCH_IMPORT.search(collection_path.read_text()):
        _SKIPPED_MODULES.add(collection_path.name)
        return True
    return None


def pytest_report_header(config):
    return None if HAVE_TORCH else "torch is not installed: tests that build HF torch models skip"


def pytest_terminal_summary(terminalreporter):
    if _SKIPPED_MODULES:
        terminalreporter.write_line("not collected (they import torch/peft, not installed): "
                                    + ", ".join(sorted(_SKIPPED_MODULES)))


def _require_torch():
    if not HAVE_TORCH:
        pytest.skip("needs torch (HF reference models); not installed")

# Tiny configs the parity tests run on (HF LlamaConfig kwargs).
CONFIGS = {
    "mha": dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4),
    "gqa4": dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2),
    "llama3_rope": dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 16}),
    "tied": dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "odd_vocab": dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4),
}


def build_hf_llama(path, seed=0, max_shard_size=None, dtype="float32", **kwargs):
    """Save a random LlamaForCausalLM (weights with std 0.1, non-trivial norms) to ``path``."""
    _require_torch()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(max_position_embeddings=256, rms_norm_eps=1e-5, **kwargs)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    return model


def make_peft_adapter(hf, out_dir, seed=0, **lora_kwargs):
    """Save a PEFT LoRA adapter for the torch model ``hf`` (default: r=4, alpha=8 on all seven
    projections) with random non-zero B (std 0.2) to ``out_dir``; returns the PeftModel."""
    _require_torch()
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"])
    kw.update(lora_kwargs)
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(**kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn_like(p))
    pm.save_pretrained(str(out_dir))
    return pm.eval()


def rel_err(a, b):
    """max |a - b| / max |b| (the parity tests' relative error)."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def peft_reference(hf, adapter_dir, tokens, mask):
    """(logits, loss, {(proj, 'a'|'b'): [L, ...] gradient in our layout}) from PEFT + autograd,
    for a random adapter saved to ``adapter_dir`` (``make_peft_adapter``); ``mask`` marks the
    target tokens (others get label -100)."""
    import torch

    pm = make_peft_adapter(hf, adapter_dir)
    labels = torch.tensor(np.where(mask, tokens, -100))
    pm.zero_grad()
    out = pm(input_ids=torch.tensor(tokens), labels=labels)
    out.loss.backward()
    grads = {}
    for name, p in pm.named_parameters():
        if "lora_" in name:
            layer = int(name.split("layers.")[1].split(".")[0])
            proj = name.split(".lora_")[0].rsplit(".", 1)[1]
            factor = "a" if ".lora_A." in name else "b"
            grads.setdefault((proj, factor), {})[layer] = p.grad.numpy().T
    stacked = {k: np.stack([v[i] for i in sorted(v)]) for k, v in grads.items()}
    return out.logits.detach().numpy(), out.loss.item(), stacked


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> (directory, torch model) for every config in CONFIGS, built once per session."""
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            cache[name] = (path, build_hf_llama(path, **CONFIGS[name]))
        return cache[name]

    return get

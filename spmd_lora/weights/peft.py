"""PEFT LoRA adapters <-> our LoRA tree.

On disk (PEFT's format, loadable by ``peft.PeftModel.from_pretrained``)::

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, use_rslora, ...
    adapter_model.safetensors    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in]
                                 base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight [out, r]
                                 (mlp.{gate,up,down}_proj for the MLP)

In memory (``lora.py``): ``{"layers": {proj: {"a": [L, in, r], "b": [L, r, out]}}}`` float32, so
``a[i] = lora_A.T`` and ``b[i] = lora_B.T``. PEFT computes ``x @ A.T @ B.T * scaling`` and we
compute ``x @ a @ b * scaling``: the same numbers.

Anything the forward of this package cannot represent (DoRA, LoRA on embed_tokens / lm_head,
``modules_to_save``, per-layer rank/alpha patterns, LoRA biases, ...) is refused with a
:class:`CheckpointError`, never silently dropped.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..config.model_config import ModelConfig, read_json_config
from ..errors import CheckpointError
from ..config.projections import HF_MODULES, PROJECTIONS, TARGETS, projection_dims
from ..config.lora_config import LoraConfig
from ..parallel.placement import put_global, replicated_to_host
from .safetensors import SAFETENSORS_DTYPES, read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"


_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(" + "|".join(HF_MODULES.values())
    + r")\.(\w+)\.lora_([AB])"
    r"(?:\.default)?\.weight$")

# adapter_config.json fields that change what the adapter computes; each must be at its default.
# field -> (is-default predicate, why we refuse it)
_UNSUPPORTED_FIELDS = {
    "use_dora": (lambda v: not v, "DoRA (use_dora: true) is not supported; train a plain LoRA "
                                  "adapter or merge this one with PEFT's merge_and_unload()"),
    "bias": (lambda v: v in (None, "none"), "LoRA bias training (bias != \"none\") is not "
                                            "supported; use bias: \"none\""),
    "lora_bias": (lambda v: not v, "lora_bias: true is not supported"),
    "modules_to_save": (lambda v: not v, "modules_to_save (fully trained extra modules) is not "
                                         "supported; only LoRA factors are"),
    "rank_pattern": (lambda v: not v, "per-layer ranks (rank_pattern) are not supported; use one r"),
    "alpha_pattern": (lambda v: not v, "per-layer alphas (alpha_pattern) are not supported; use "
                                       "one lora_alpha"),
    "layer_replication": (lambda v: not v, "layer_replication is not supported"),
    "target_parameters": (lambda v: not v, "target_parameters (LoRA on nn.Parameter) is not "
                                           "supported"),
    "trainable_token_indices": (lambda v: not v, "trainable_token_indices is not supported"),
    "alora_invocation_tokens": (lambda v: not v, "activated LoRA (alora_invocation_tokens) is not "
                                                 "supported"),
    "arrow_config": (lambda v: not v, "arrow_config is not supported"),
    "use_qalora": (lambda v: not v, "QA-LoRA (use_qalora: true) is not supported"),
    "use_bdlora": (lambda v: not v, "use_bdlora is not supported"),
}
# init methods that rewrite the base weights, so the adapter alone does not describe the model
_BASE_MODIFYING_INITS = ("pissa", "olora", "loftq", "corda")


def hf_lora_key(layer: int, proj: str, factor: str) -> str:
    """PEFT's saved key, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    return f"base_model.model.model.layers.{layer}.{PROJECTIONS[proj].hf_module}.lora_{factor}.weight"


# ----------------------------------------------------------------------------- save

def _to_numpy(x) -> np.ndarray:
    """Host copy of a (replicated) jax array or array-like, float32."""
    return replicated_to_host(x).astype(np.float32)


def adapter_config_dict(lora_config: LoraConfig, base_model_path=None) -> dict:
    """adapter_config.json contents for ``lora_config`` (PEFT LoraConfig field names)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_path is None else str(base_model_path),
        "r": int(lora_config.rank),
        "lora_alpha": float(lora_config.alpha) if not float(lora_config.alpha).is_integer()
        else int(lora_config.alpha),
        "lora_dropout": float(lora_config.dropout),
        "target_modules": list(lora_config.targets),
        "use_rslora": bool(lora_config.use_rslora),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` directory to ``out``, replacing an existing ``out`` without ever
    leaving a half-written one (the old one is renamed aside first, then removed)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / out.name, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


_ADAPTER_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_PICKLE, "README.md"}


def save_adapter(out_dir, lora: dict, lora_config: LoraConfig, base_model_path=None) -> Path:
    """Write ``lora`` as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

    Atomic: everything is written into a temporary directory next to ``out_dir`` which then
    replaces it, so readers see the old adapter or the new one, never a mix. An existing
    ``out_dir`` may only hold adapter files (it is replaced); anything else there is an error.
    With several JAX processes only process 0 writes. Returns the directory.
    """
    import jax
    from safetensors.numpy import save_file

    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"adapter output {out} exists and is not a directory")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _ADAPTER_FILES)
        if foreign:
            raise CheckpointError(
                f"adapter output {out} already holds non-adapter files ({', '.join(foreign[:5])}); "
                f"choose an empty or adapter-only directory")
    layers = (lora or {}).get("layers", {})
    if set(layers) != set(lora_config.targets):
        raise CheckpointError(
            f"save_adapter: LoRA tree holds {sorted(layers)} but lora_config.targets is "
            f"{list(lora_config.targets)}")
    tensors = {}
    for proj in lora_config.targets:
        a, b = _to_numpy(layers[proj]["a"]), _to_numpy(layers[proj]["b"])   # [L, in, r], [L, r, out]
        if a.ndim != 3 or b.ndim != 3 or a.shape[2] != lora_config.rank or b.shape[1] != lora_config.rank \
                or a.shape[0] != b.shape[0]:
            raise CheckpointError(
                f"save_adapter: {proj} factors have shapes a{list(a.shape)} b{list(b.shape)}, "
                f"expected [L, in, {lora_config.rank}] and [L, {lora_config.rank}, out]")
        for i in range(a.shape[0]):
            tensors[hf_lora_key(i, proj, "A")] = np.ascontiguousarray(a[i].T)   # [r, in]
            tensors[hf_lora_key(i, proj, "B")] = np.ascontiguousarray(b[i].T)   # [out, r]
    if jax.process_index() != 0:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_file(dict(sorted(tensors.items())), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(
            json.dumps(adapter_config_dict(lora_config, base_model_path), indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- load

def read_adapter_config(adapter_dir) -> tuple[dict, LoraConfig]:
    """(raw adapter_config.json dict, validated LoraConfig); CheckpointError on anything we
    cannot represent."""
    path, raw = read_json_config(adapter_dir, ADAPTER_CONFIG, "adapter", "a PEFT adapter",
                                 CheckpointError)
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported; only LORA")
    for field, (ok, why) in _UNSUPPORTED_FIELDS.items():
        if field in raw and not ok(raw[field]):
            raise CheckpointError(f"{path}: {field}={raw[field]!r}: {why}")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise CheckpointError(
            f"{path}: init_lora_weights={init!r} changes the base weights too, so this adapter only "
            f"works on its converted base model; re-save it with PEFT's "
            f"path_initial_model_for_weight_conversion (plain LoRA) first")
    for field in ("r", "lora_alpha"):
        if field not in raw:
            raise CheckpointError(f"{path}: missing field {field!r}")
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        bad = [t for t in targets if t.split(".")[-1] not in TARGETS]
        if bad:
            raise CheckpointError(
                f"{path}: target_modules {bad} are not supported (LoRA is supported on "
                f"{', '.join(TARGETS)} only; embed_tokens / lm_head adapters are not)")
    try:
        cfg = LoraConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                         dropout=float(raw.get("lora_dropout") or 0.0),
                         targets=TARGETS, use_rslora=bool(raw.get("use_rslora", False)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return raw, cfg


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a (small) safetensors file as float32 numpy arrays (bf16/f16 included)."""
    base, header = read_safetensors_header(path)
    out = {}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for key, meta in header.items():
        dtype = SAFETENSORS_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {meta.get('dtype')}")
        start, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        if end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize or base + end > len(data):
            raise CheckpointError(f"{path}: tensor {key!r} is truncated or its size does not match "
                                  f"its shape; re-save the adapter")
        out[key] = np.frombuffer(data[base + start:base + end].tobytes(), dtype).reshape(shape) \
            .astype(np.float32)
    return out


def _read_tensors(d: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    st, pt = d / ADAPTER_WEIGHTS, d / ADAPTER_PICKLE
    if st.is_file():
        return _read_safetensors(st)
    if not pt.is_file():
        raise CheckpointError(f"{d}: no {ADAPTER_WEIGHTS} found")
    if not allow_pickle:
        raise CheckpointError(
            f"{d} holds only {ADAPTER_PICKLE} (pickle, can execute code when loaded); convert "
            f"it to {ADAPTER_WEIGHTS} or pass allow_pickle=True if you trust its source")
    import torch
    raw = torch.load(pt, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in raw.items()}


def read_adapter(adapter_dir, config: ModelConfig, allow_pickle: bool = False
                 ) -> tuple[dict, LoraConfig]:
    """Read and validate a PEFT LoRA adapter against ``config``; numpy float32 tree."""
    d = Path(adapter_dir)
    raw, cfg = read_adapter_config(d)
    weights = d / ADAPTER_WEIGHTS
    tensors = _read_tensors(d, allow_pickle)
    L, r = config.num_layers, cfg.rank
    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    unknown = []
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if (not m or m.group(3) not in TARGETS
                or PROJECTIONS[m.group(3)].hf_module != f"{m.group(2)}.{m.group(3)}"):
            unknown.append(key)
            continue
        layer, proj, factor = int(m.group(1)), m.group(3), m.group(4)
        if layer >= L:
            raise CheckpointError(
                f"{weights}: tensor {key!r} is for layer {layer} but the model has {L} layers; "
                f"this adapter belongs to a different base model")
        fan_in, fan_out = projection_dims(config, proj)
        want = (r, fan_in) if factor == "A" else (fan_out, r)
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{weights}: tensor {key!r} has shape {list(t.shape)}, expected {list(want)} "
                f"(r={r} from {ADAPTER_CONFIG} and the model's config.json); the adapter does not "
                f"match this base model")
        slot = found.setdefault(proj, {}).setdefault(layer, {})
        if factor in slot:
            raise CheckpointError(f"{weights}: {proj} layer {layer} lora_{factor} appears twice")
        slot[factor] = np.asarray(t, np.float32)
    if unknown:
        hint = ""
        joined = " ".join(unknown)
        if "lora_magnitude_vector" in joined:
            hint = " (DoRA magnitude vectors: DoRA is not supported)"
        elif "embed_tokens" in joined or "lm_head" in joined:
            hint = " (LoRA on embed_tokens / lm_head is not supported)"
        elif "modules_to_save" in joined or "original_module" in joined:
            hint = " (modules_to_save is not supported)"
        raise CheckpointError(
            f"{weights}: {len(unknown)} tensor(s) this package cannot apply{hint}: "
            f"{', '.join(sorted(unknown)[:5])}{' ...' if len(unknown) > 5 else ''}")
    if not found:
        raise CheckpointError(f"{weights}: holds no LoRA tensors")
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        missing = sorted({t.split(".")[-1] for t in targets} - set(found))
        if missing:
            raise CheckpointError(f"{weights}: target_modules lists {missing} but the file holds no "
                                  f"tensors for them")
    only_layers = raw.get("layers_to_transform")
    if isinstance(only_layers, int):
        only_layers = [only_layers]
    layers = {}
    for proj in TARGETS:
        if proj not in found:
            continue
        fan_in, fan_out = projection_dims(config, proj)
        a = np.zeros((L, fan_in, r), np.float32)
        b = np.zeros((L, r, fan_out), np.float32)
        for i in range(L):
            slot = found[proj].get(i, {})
            for factor in "AB":
                if factor not in slot and (only_layers is None or i in only_layers):
                    raise CheckpointError(
                        f"{weights}: tensor {hf_lora_key(i, proj, factor)!r} missing "
                        f"(every layer of a targeted module needs lora_A and lora_B)")
            if slot:
                if len(slot) != 2:
                    raise CheckpointError(f"{weights}: {proj} layer {i} has only lora_{next(iter(slot))}")
                a[i], b[i] = slot["A"].T, slot["B"].T
        layers[proj] = {"a": a, "b": b}
    cfg = LoraConfig(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                     targets=tuple(layers), use_rslora=cfg.use_rslora)
    return {"layers": layers}, cfg


def load_adapter(adapter_dir, config: ModelConfig, mesh=None, allow_pickle: bool = False
                 ) -> tuple[dict, LoraConfig]:
    """Read a PEFT LoRA adapter (ours or one written by PEFT) for a model with ``config``.

    Returns ``(lora_tree, LoraConfig)`` with fp32 jax arrays ``a`` [L, in, r], ``b`` [L, r, out]
    (replicated over ``mesh`` when one is given). Layers not in ``layers_to_transform`` get zero
    factors. Raises CheckpointError naming the file / key for anything unsupported or mismatched.
    """
    import jax
    import jax.numpy as jnp

    tree, cfg = read_adapter(adapter_dir, config, allow_pickle=allow_pickle)
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec
        rep = NamedSharding(mesh, PartitionSpec())
        return jax.tree.map(lambda x: put_global(x, rep), tree), cfg
    return jax.tree.map(jnp.asarray, tree), cfg

"""HF Llama checkpoint -> sharded global arrays.

Each device's shard is read straight from the memory-mapped weight files with
``jax.make_array_from_callback``: no host or device ever holds more than its own slices.
HF stores linear weights as [out, in]; we store ``x @ W`` layouts [in, out] (see mesh.py).
"""
from __future__ import annotations

import jax
import numpy as np

from .safetensors import WeightFiles
from ..config.model_config import ModelConfig
from ..config.projections import PROJECTIONS, projection_dims
from ..parallel.mesh import named
from .shapes import kv_head_source, param_shapes, param_specs, resolve_dtype
from .quant import QUANTISED_LINEARS, check_base_quant, make_quantised_weight

HF_LAYER_NAMES = {
    **{name: p.hf_module for name, p in PROJECTIONS.items()},
    "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
}


def hf_layer_key(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{HF_LAYER_NAMES[name]}.weight"


def _indices(sl: slice, n: int) -> np.ndarray:
    return np.arange(*sl.indices(n))


def _take_rows(t, rows: np.ndarray):
    """t[rows] on a memory map, as one contiguous slice when possible."""
    if len(rows) and np.all(np.diff(rows) == 1):
        return t[rows[0]:rows[-1] + 1]
    return t[rows]


def _hf_out_rows(cfg: ModelConfig, tp: int, name: str, cols: np.ndarray) -> np.ndarray:
    """HF output rows that our (possibly kv-expanded) output columns come from."""
    if PROJECTIONS[name].kv_expanded:
        hd = cfg.head_dim
        return kv_head_source(cfg, tp)[cols // hd] * hd + cols % hd
    return cols


def _check_shapes(files: WeightFiles, cfg: ModelConfig) -> None:
    d, v = cfg.hidden_size, cfg.vocab_size
    files.expect_shape("model.embed_tokens.weight", (v, d))
    files.expect_shape("model.norm.weight", (d,))
    if not cfg.tie_word_embeddings:
        files.expect_shape("lm_head.weight", (v, d))
    for layer in range(cfg.num_layers):
        for name in HF_LAYER_NAMES:
            if name.endswith("norm"):
                files.expect_shape(hf_layer_key(layer, name), (d,))
            else:
                fan_in, fan_out = projection_dims(cfg, name)
                files.expect_shape(hf_layer_key(layer, name), (fan_out, fan_in))


def load_hf_params(model_dir, cfg: ModelConfig, mesh, dtype="float32", allow_pickle=False,
                   base_quant="none") -> dict:
    """Read a HF LlamaForCausalLM checkpoint into the sharded parameter tree of mesh.py.

    ``base_quant`` int8 | nf4: the seven decoder linears are quantised while loading, each
    device's shard layer by layer from the memory map (quant.py), and computed in ``dtype``."""
    check_base_quant(base_quant)
    files = WeightFiles(model_dir, allow_pickle=allow_pickle)
    _check_shapes(files, cfg)
    tp = mesh.shape["tp"]
    dt = np.dtype(resolve_dtype(dtype))
    shapes = param_shapes(cfg, tp)
    shardings = named(mesh, param_specs(shapes))

    def make(shape, sharding, read):
        return jax.make_array_from_callback(shape, sharding, lambda idx: np.ascontiguousarray(read(idx), dt))

    def read_embed(idx):                                   # ours [Vp, D] = HF [V, D] zero-padded
        rows = _indices(idx[0], shapes["embed"][0])
        t = files.get("model.embed_tokens.weight")
        out = np.zeros((len(rows), t.shape[1]), t.dtype)
        real = rows[rows < cfg.vocab_size]
        out[:len(real)] = _take_rows(t, real)
        return out[:, idx[1]]

    def read_lm_head(idx):                                 # ours [D, Vp] = HF [V, D].T padded
        cols = _indices(idx[1], shapes["lm_head"][1])
        t = files.get("lm_head.weight")
        out = np.zeros((len(cols), t.shape[1]), t.dtype)
        real = cols[cols < cfg.vocab_size]
        out[:len(real)] = _take_rows(t, real)
        return out.T[idx[0]]

    def read_layer(name):
        def read(idx):
            layers = _indices(idx[0], cfg.num_layers)
            blocks = []
            for layer in layers:
                t = files.get(hf_layer_key(layer, name))
                if name.endswith("norm"):                  # [D]
                    blocks.append(np.asarray(t[idx[1]]))
                elif not PROJECTIONS[name].column:         # ours [in, out] = HF [out, in].T
                    blocks.append(np.asarray(t[idx[2], idx[1]]).T)
                else:                                      # column-parallel, maybe kv-expanded
                    cols = _indices(idx[2], shapes["layers"][name][2])
                    rows = _hf_out_rows(cfg, tp, name, cols)
                    blocks.append(np.asarray(_take_rows(t, rows)[:, idx[1]]).T)
            return np.stack(blocks)
        return read

    def read_rows(name):                                   # canonical C[layer, rows] (quant.py)
        def read(layer, rows):
            t = files.get(hf_layer_key(layer, name))
            if not PROJECTIONS[name].column:               # C = HF [D, in].T, rows of in
                return np.asarray(t[:, rows[0]:rows[-1] + 1]).T
            return np.asarray(_take_rows(t, _hf_out_rows(cfg, tp, name, rows)))
        return read

    def make_layer(name):
        if base_quant != "none" and name in QUANTISED_LINEARS:
            return make_quantised_weight(base_quant, cfg, name, shapes["layers"][name], mesh, dt,
                                         read_rows(name))
        return make(shapes["layers"][name], shardings["layers"][name], read_layer(name))

    params = {
        "embed": make(shapes["embed"], shardings["embed"], read_embed),
        "final_norm": make(shapes["final_norm"], shardings["final_norm"],
                           lambda idx: files.get("model.norm.weight")[idx[0]]),
        "layers": {name: make_layer(name) for name in shapes["layers"]},
    }
    if "lm_head" in shapes:
        params["lm_head"] = make(shapes["lm_head"], shardings["lm_head"], read_lm_head)
    return params

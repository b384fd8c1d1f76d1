"""Global shapes of the base parameters, abstract (ShapeDtypeStruct) trees and random init.

Used to plan memory and count collectives without weights, and to benchmark 7B/70B-shaped
models with random weights. The layout is the one documented in ``mesh.py``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..config.model_config import ModelConfig
from ..config.projections import PROJECTIONS
from ..errors import ConfigError
from ..parallel.mesh import PARAM_SPECS, named
from .quant import (QUANTISED_LINEARS, abstract_weight, check_base_quant, is_quantised,
                    quant_specs)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} unsupported; choose from {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def expanded_kv_heads(cfg: ModelConfig, tp: int) -> int:
    """kv heads stored globally: KV, or tp when tp > KV (each device keeps its own copy of the
    kv head its q heads use)."""
    return tp * cfg.kv_heads_per_device(tp)


def kv_head_source(cfg: ModelConfig, tp: int) -> np.ndarray:
    """[expanded kv heads] -> index of the HF kv head it holds. With tp > KV, device i holds kv
    head i*KV//tp, the one HF's mapping (q head h uses kv head h // (H // KV)) gives its q heads."""
    e = expanded_kv_heads(cfg, tp)
    if e == cfg.num_kv_heads:
        return np.arange(e)
    return np.arange(e) * cfg.num_kv_heads // tp


def param_shapes(cfg: ModelConfig, tp: int) -> dict:
    """Global shape of every base parameter (see mesh.py for the layout)."""
    L, D = cfg.num_layers, cfg.hidden_size
    kv = expanded_kv_heads(cfg, tp)
    vp = cfg.padded_vocab(tp)
    shapes = {
        "embed": (vp, D),
        "final_norm": (D,),
        "layers": {
            "attn_norm": (L, D), "mlp_norm": (L, D),
            **{name: (L, *p.dims(cfg, kv)) for name, p in PROJECTIONS.items()},
        },
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, vp)
    return shapes


def param_specs(params):
    """PartitionSpec tree matching ``params`` (which may omit lm_head when embeddings are tied;
    its linears may be QuantWeights, whose leaves get ``quant.QUANT_SPECS``)."""
    specs = {k: PARAM_SPECS[k] for k in params if k != "layers"}
    specs["layers"] = {k: v.with_leaves(**quant_specs(v.kind)) if is_quantised(v)
                       else PARAM_SPECS["layers"][k] for k, v in params["layers"].items()}
    return specs


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def abstract_params(cfg: ModelConfig, mesh, dtype="bfloat16", base_quant="none") -> dict:
    """ShapeDtypeStruct tree with the plan's shardings (norms kept in the same dtype); with
    ``base_quant`` int8 | nf4 the seven linears are QuantWeights of packed leaves (quant.py)."""
    check_base_quant(base_quant)
    tp = mesh.shape["tp"]
    shapes = param_shapes(cfg, tp)
    shardings = named(mesh, param_specs(shapes))
    dt = resolve_dtype(dtype)
    tree = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, dt, sharding=sh), shapes, shardings,
                        is_leaf=_is_shape)
    if base_quant != "none":
        for name in QUANTISED_LINEARS:
            tree["layers"][name] = abstract_weight(base_quant, cfg, name, shapes["layers"][name],
                                                   mesh, dt)
    return tree


def random_params(cfg: ModelConfig, mesh, dtype="float32", seed=0, std=0.02,
                  base_quant="none") -> dict:
    """Random base weights created directly in their shards (for benchmarks and plans):
    N(0, std) matrices, norms of ones. Quantised linears get uniformly random codes and
    constant scales of about std (valid weights of the right magnitude)."""
    abstract = abstract_params(cfg, mesh, dtype, base_quant)
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)

    def leaf(k, name, a):
        if "norm" in name:
            return jnp.ones(a.shape, a.dtype)
        if jnp.issubdtype(a.dtype, jnp.integer):
            lo, hi = (-127, 128) if a.dtype == jnp.int8 else (0, 256)
            return jax.random.randint(k, a.shape, lo, hi, jnp.int32).astype(a.dtype)
        if "scale" in name or "offset" in name:
            return jnp.full(a.shape, std / 64 if name.endswith(".scale") else std, a.dtype)
        return (std * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype)

    def init():
        keys = jax.random.split(jax.random.key(seed), len(paths))
        return [leaf(k, jax.tree_util.keystr(path), a) for k, (path, a) in zip(keys, paths)]

    made = jax.jit(init, out_shardings=[a.sharding for _, a in paths])()
    return jax.tree.unflatten(treedef, made)

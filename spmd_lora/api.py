"""The friendly entry point shared by users, tests and tools: ``spmd_lora.load_model``."""
from __future__ import annotations

import dataclasses
from functools import cached_property

import jax
import numpy as np

from .engine import sharded
from .engine.factory import check_attention_devices, forward_options, mesh_for
from .config.model_config import ModelConfig
from .parallel.zigzag import from_zigzag
from .weights.hf import load_hf_params
from .parallel.mesh import CP, TP
from .parallel.placement import shard_batch
from .config.train_config import DEFAULT_MLP_CHUNK_TOKENS
from .model import ForwardOptions
from .weights.peft import load_adapter


@dataclasses.dataclass
class Model:
    """A loaded, sharded model. ``params``: frozen base weights laid out by the sharding plan;
    ``lora``: replicated fp32 LoRA factors (or None); ``lora_config``: their LoraConfig.
    ``cp_impl``: context-parallel attention ("ring" | "allgather") when the mesh has cp > 1."""

    config: ModelConfig
    mesh: jax.sharding.Mesh
    params: dict
    lora: dict | None = None
    lora_config: object = None
    attention: str = "auto"
    sequence_parallel: bool = True
    mlp_chunk_tokens: int = DEFAULT_MLP_CHUNK_TOKENS
    cp_impl: str = "ring"

    @property
    def options(self) -> ForwardOptions:
        """The forward's settings: this model's fields (``lora_config`` too), tp and cp the
        mesh's."""
        return forward_options(self.config, self, tp=self.mesh.shape[TP], cp=self.mesh.shape[CP])

    def put_batch(self, batch: dict) -> dict:
        """Host arrays [B, S] (``tokens``, ``loss_mask``, optional ``positions`` /
        ``segment_ids``) -> the prepared global batch of :func:`sharded.loss_sum_fn` (zig-zag
        with cp > 1), B split over dp and S over cp."""
        return shard_batch({k: v for k, v in batch.items() if v is not None}, self.mesh)

    @cached_property
    def _logits(self):
        return jax.jit(sharded.logits_fn(self.options, self.mesh))

    @cached_property
    def _loss(self):
        return jax.jit(sharded.loss_sum_fn(self.options, self.mesh))

    def logits(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """tokens [B, S] int -> [B, S, V] float32 logits (gathered; for inspection)."""
        tokens = np.asarray(tokens)
        batch = self.put_batch({"tokens": tokens, "loss_mask": np.zeros_like(tokens),
                                "positions": positions, "segment_ids": segment_ids})
        logits = self._logits(self.params, self.lora or {}, batch)
        cp = self.mesh.shape[CP]
        return from_zigzag(logits, cp, tokens.shape[1]) if cp > 1 else logits

    def loss(self, tokens, loss_mask=None) -> jax.Array:
        """Mean next-token cross-entropy over target tokens (loss_mask[t] = 1: token t is a target;
        default: every token but the first)."""
        tokens = np.asarray(tokens)
        if loss_mask is None:
            loss_mask = np.ones_like(tokens)
        batch = self.put_batch({"tokens": tokens, "loss_mask": loss_mask})
        total, count = self._loss(self.params, self.lora or {}, batch, None)
        return total / count


def load_model(path, tp: int = 1, dp: int = 1, dtype="float32", adapter=None,
               attention="auto", allow_pickle=False, sequence_parallel: bool = True,
               mlp_chunk_tokens: int = DEFAULT_MLP_CHUNK_TOKENS, base_quant="none",
               cp: int = 1, cp_impl: str = "ring") -> Model:
    """Load a HF Llama checkpoint directory into a (dp, cp, tp) mesh.

    ``cp``: context-parallel degree (the sequence split over cp devices, ring attention of
    ``cp_impl`` "ring" | "allgather"); generation needs cp = 1.
    ``adapter``: a PEFT LoRA adapter directory to apply (see spmd_lora.weights.peft).
    ``sequence_parallel``: with tp > 1, keep activations sharded along the sequence over tp
    (the same function, less memory). ``mlp_chunk_tokens``: run the MLP and the attention
    projections over tiles of this many tokens when the sequence is longer (0 = never).
    ``base_quant``: "none" | "int8" | "nf4": quantise the seven decoder linears while loading
    (QLoRA; see spmd_lora/quant.py); ``dtype`` is then the compute dtype.
    """
    config = ModelConfig.from_pretrained(path)
    config.check_tp(tp)
    mesh = mesh_for(dp=dp, tp=tp, cp=cp)
    check_attention_devices(attention, mesh)
    params = load_hf_params(path, config, mesh, dtype, allow_pickle=allow_pickle,
                            base_quant=base_quant)
    model = Model(config=config, mesh=mesh, params=params, attention=attention,
                  sequence_parallel=sequence_parallel, mlp_chunk_tokens=mlp_chunk_tokens,
                  cp_impl=cp_impl)
    if adapter is not None:
        model.lora, model.lora_config = load_adapter(adapter, config, mesh=mesh,
                                                     allow_pickle=allow_pickle)
    return model

"""The one assembly seam of a train step: settings -> ForwardOptions, mesh, optimizer, jitted step.

Every caller that trains, plans, profiles or benchmarks a step (``train.train``, ``api.Model``,
``analysis.plan``, ``analysis.profile`` and the scripts in tools/) assembles it here, from
settings named as :class:`~spmd_lora.config.train_config.TrainConfig`'s fields:

* :func:`forward_options`: the static settings of the per-device forward;
* :func:`mesh_for`: the (dp, cp, tp) mesh;
* :func:`optimizer_config`: a TrainConfig's AdamW settings (and its step count);
* :func:`build_train_step`: all of them plus the jitted step, as a :class:`TrainStep`, which
  also makes the state the step takes: replicated LoRA factors and optimizer state
  (:meth:`TrainStep.init_state`), random base weights (:meth:`TrainStep.random_params`) or,
  for a compile without weights, abstract shapes of all five arguments
  (:meth:`TrainStep.abstract_args`).

Settings come from ``settings`` (a TrainConfig, or any object with some of the fields as
attributes, e.g. an argparse namespace or an ``api.Model``), then from keyword ``fields``; a
setting given by neither takes ForwardOptions' default (``mlp_chunk_tokens`` 0 there, unlike
TrainConfig's; a TrainConfig always gives all of them).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config.lora_config import LoraConfig
from ..errors import ConfigError
from ..kernels import resolve_impl
from ..model import ForwardOptions, PreferenceLoss
from ..parallel.mesh import CP, TP, make_mesh
from ..parallel.placement import MICRO_BATCH_SPEC, replicate
from ..parallel.zigzag import BATCH_FIELDS, padded_seq_len
from ..weights.lora import init_lora
from ..weights.shapes import abstract_params, random_params
from .step import OptimizerConfig, make_optimizer, make_train_step

#: TrainConfig field -> the ForwardOptions field it sets: the settings that shape the step.
FORWARD_FIELDS = {"tp": "tp", "cp": "cp", "cp_impl": "cp_impl", "attention": "attention_impl",
                  "remat": "remat", "ce_chunk_tokens": "ce_chunk_tokens",
                  "sequence_parallel": "sequence_parallel",
                  "mlp_chunk_tokens": "mlp_chunk_tokens", "offload_layers": "offload_layers"}
MESH_FIELDS = ("dp", "cp", "tp")


def _values(settings, fields: dict, names) -> dict:
    unknown = set(fields) - set(FORWARD_FIELDS) - set(MESH_FIELDS)
    if unknown:
        raise TypeError(f"unknown step setting(s) {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(sorted({*FORWARD_FIELDS, *MESH_FIELDS}))}")
    values = ({} if settings is None else
              {n: getattr(settings, n) for n in names if hasattr(settings, n)})
    values.update((k, v) for k, v in fields.items() if k in names)
    return values


def forward_options(model_cfg, settings=None, *, lora: LoraConfig | None = None,
                    **fields) -> ForwardOptions:
    """ForwardOptions of ``model_cfg`` (settings as in the module docstring). ``lora``: the
    LoraConfig; default ``settings.lora_config`` when settings has one, else none."""
    if lora is None and settings is not None:
        lora = getattr(settings, "lora_config", None)
    values = _values(settings, fields, FORWARD_FIELDS)
    kw = {FORWARD_FIELDS[k]: v for k, v in values.items()}
    kw.setdefault("tp", 1)
    return ForwardOptions(cfg=model_cfg, lora=lora, **kw)


def mesh_for(settings=None, **fields):
    """The (dp, cp, tp) mesh over this process's first dp*cp*tp devices (default 1 each)."""
    values = _values(settings, fields, MESH_FIELDS)
    return make_mesh(values.get("dp", 1), values.get("tp", 1), values.get("cp", 1))


def check_attention_devices(impl: str, mesh) -> None:
    """ConfigError, before any weight is loaded, when the attention ``impl`` cannot run on the
    mesh's devices (cudnn and tokamax need a CUDA GPU)."""
    platform = mesh.devices.flat[0].platform
    try:
        resolve_impl(impl, backend="gpu" if platform in ("gpu", "cuda") else platform)
    except ValueError:
        raise ConfigError(f"attention {impl!r} needs a CUDA GPU, but this run's devices are "
                          f"{platform}; use attention auto, blockwise or xla") from None


def optimizer_config(cfg, total_steps: int) -> OptimizerConfig:
    """A TrainConfig's AdamW settings over a run of ``total_steps`` optimizer steps."""
    return OptimizerConfig(learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                           total_steps=total_steps, min_lr_ratio=cfg.min_lr_ratio,
                           weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """An assembled train step: ``step(params, lora, opt_state, batches, key) -> (lora,
    opt_state, metrics)`` (:func:`spmd_lora.engine.step.make_train_step`) with what it was
    built from. Calling it, or :meth:`lower`, runs / lowers the jitted step."""

    opts: ForwardOptions
    mesh: Any
    optimizer: optax.GradientTransformation
    step: Callable

    def __call__(self, params, lora, opt_state, batches, key):
        return self.step(params, lora, opt_state, batches, key)

    def lower(self, *args):
        return self.step.lower(*args)

    def init_state(self, key=None, lora=None):
        """(LoRA factors, optimizer state), both replicated on the mesh: ``lora`` as given,
        else freshly initialised from ``key`` (default ``jax.random.key(0)``)."""
        if lora is None:
            lora = init_lora(self.opts.cfg, self.opts.lora,
                             jax.random.key(0) if key is None else key)
        lora = replicate(lora, self.mesh)
        return lora, replicate(self.optimizer.init(lora), self.mesh)

    def random_params(self, dtype="float32", base_quant: str = "none", seed: int = 0) -> dict:
        """Random base weights created in their shards on the mesh (benchmarks, traces)."""
        return random_params(self.opts.cfg, self.mesh, dtype, seed=seed, base_quant=base_quant)

    def abstract_args(self, *, max_seq_len: int, batch: int = 1, micro_batches: int = 1,
                      dtype="bfloat16", base_quant: str = "none"):
        """(params, lora, opt_state, batches, key) as ShapeDtypeStructs with their shardings,
        to lower the step without weights. ``batch`` is the GLOBAL batch (rows per
        micro-batch, split over dp). With cp > 1 the batch has the zig-zag fields of the batch
        preparation, S padded to a multiple of 2*cp*tp (the one batch schema,
        :data:`~spmd_lora.parallel.zigzag.BATCH_FIELDS`)."""


        mesh, cfg = self.mesh, self.opts.cfg
        rep = NamedSharding(mesh, P())

        def put(tree, sharding):
            return jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)

        params = abstract_params(cfg, mesh, dtype, base_quant)
        lora_p = put(jax.eval_shape(lambda: init_lora(cfg, self.opts.lora, jax.random.key(0))),
                     rep)
        opt_state = put(jax.eval_shape(self.optimizer.init, lora_p), rep)
        bs = NamedSharding(mesh, MICRO_BATCH_SPEC)
        cp, tp = mesh.shape[CP], mesh.shape[TP]
        seq = padded_seq_len(max_seq_len, cp, tp) if cp > 1 else max_seq_len
        batches = {k: jax.ShapeDtypeStruct((micro_batches, batch, seq), jnp.int32, sharding=bs)
                   for k in BATCH_FIELDS}
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
        return params, lora_p, opt_state, batches, key


def build_train_step(model_cfg, settings=None, *, mesh=None, optimizer=None,
                     lora: LoraConfig | None = None, preference=None, **fields) -> TrainStep:
    """The train step of ``model_cfg`` with its ForwardOptions (:func:`forward_options`), mesh
    (given, and then its tp and cp are the step's unless ``fields`` name them; else
    :func:`mesh_for` of the same settings) and optimizer: a
    ``GradientTransformation``, an :class:`OptimizerConfig`, or None for OptimizerConfig's
    defaults. ``lora`` defaults to ``settings.lora_config``, else ``LoraConfig()``.
    ``preference``: a :class:`~spmd_lora.model.PreferenceLoss` for the DPO step; default
    :func:`preference_loss` of the settings (None for objective sft)."""
    if mesh is None:
        mesh = mesh_for(settings, **fields)
    else:                               # the step's tp and cp are the mesh's
        fields = {"tp": mesh.shape[TP], "cp": mesh.shape[CP], **fields}
    opts = forward_options(model_cfg, settings, lora=lora, **fields)
    if opts.lora is None:
        opts = dataclasses.replace(opts, lora=LoraConfig())
    if optimizer is None or isinstance(optimizer, OptimizerConfig):
        optimizer = make_optimizer(optimizer or OptimizerConfig())
    return TrainStep(opts=opts, mesh=mesh, optimizer=optimizer,
                     step=make_train_step(opts, mesh, optimizer,
                                          preference or preference_loss(settings)))


def preference_loss(settings) -> PreferenceLoss | None:
    """The DPO loss of settings with ``objective="dpo"`` (``beta``, ``loss_type``,
    ``label_smoothing``, ``dpo_layout``), or None (objective sft, or settings without an objective)."""
    if getattr(settings, "objective", "sft") != "dpo":
        return None
    return PreferenceLoss(beta=settings.beta, loss_type=settings.loss_type,
                          label_smoothing=settings.label_smoothing,
                          shared_prefix=settings.dpo_layout == "shared-prefix")

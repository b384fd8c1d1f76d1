"""TrainConfig: every setting of a training run, validated on construction."""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from ..kernels.registry import BRANCH_SEGMENT_IMPLS_MISSING
from .fields import CHOICES, check_choice
from .lora_config import LoraConfig
from .sizes import parse_size

DEFAULT_MLP_CHUNK_TOKENS = 8192


def check_offload_layers(offload_layers: int | None, remat: str,
                         num_layers: int | None = None) -> None:
    """ConfigError unless ``offload_layers`` (None: all layers) goes with ``remat`` (an offload
    policy) and lies in 0..``num_layers`` (>= 0 while the model is not known yet). The one
    check of TrainConfig, ForwardOptions and ``spmd-lora plan``."""
    if offload_layers is None:
        return
    if not remat.startswith("offload"):
        raise ConfigError(f"offload_layers applies to remat offload or offload-input (remat auto "
                          f"chooses it itself), not remat {remat!r}")
    if offload_layers < 0 or (num_layers is not None and offload_layers > num_layers):
        span = ">= 0" if num_layers is None else f"in 0..{num_layers} (the model's layers)"
        raise ConfigError(f"offload_layers must be {span}, got {offload_layers}")


def check_preference_settings(beta: float, loss_type: str, label_smoothing: float) -> None:
    """ConfigError unless the DPO loss settings hold: ``beta`` > 0, ``label_smoothing`` in
    [0, 0.5) and only with the sigmoid loss. The one check of TrainConfig and ``spmd-lora eval
    --objective dpo``."""
    if beta <= 0:
        raise ConfigError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ConfigError(f"label_smoothing applies to loss_type sigmoid, not {loss_type}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every field is also a ``spmd-lora train`` flag (kebab-case); what each one means, and
    the values of the choice-valued ones, is in ``spmd_lora.config.fields`` (the flag help)."""

    model: str
    data: str
    output_dir: str
    template: str = "auto"                 # alpaca | rag | text | chat | auto
    tp: int = 1
    dp: int = 1
    max_seq_len: int = 2048
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 1                    # rows per micro-batch (global, split over dp)
    grad_accum_steps: int = 1
    max_steps: int | None = None           # overrides epochs when set
    epochs: int = 1
    seed: int = 0
    dtype: str = "float32"                 # base weights / compute: float32 | bfloat16
    base_quant: str = "none"               # none | int8 | nf4: quantised frozen base (QLoRA)
    remat: str = "none"                    # none | full | save-dots | offload | offload-input | auto
    offload_layers: int | None = None      # with an offload remat: layers whose saved inputs go to the host (None: all)
    host_memory: str | None = None         # pinned host memory budget per host, e.g. "1.9TB" (None: this machine's RAM)
    attention: str = "auto"                # auto | pallas | blockwise | xla | cudnn
    pack: bool = False
    train_on_inputs: bool = False
    eval_fraction: float = 0.0
    eval_every: int = 0                    # steps; 0 = only at the end (when there is eval data)
    eval_generate: int = 0                 # rag: held-out examples answered by generation at each eval; 0 = off
    save_every: int = 0                    # steps; 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    log_every: int = 1
    ce_chunk_tokens: int = 4096
    allow_pickle: bool = False
    sequence_parallel: bool = True         # shard activations along S over tp (when tp > 1)
    mlp_chunk_tokens: int = DEFAULT_MLP_CHUNK_TOKENS  # tile the MLP above this many tokens; 0 = never
    cp: int = 1                            # context parallel: the sequence split over cp devices
    cp_impl: str = "ring"                  # ring | allgather: how attention sees the other chunks
    chat_template: str | None = None       # llama2 | llama3 | chatml | a Jinja file; default: the tokenizer's
    data_cache_dir: str | None = None      # tokenized-data cache; default $SPMD_LORA_CACHE or ~/.cache/spmd_lora/tokenized
    data_workers: int = 0                  # tokenizer processes for the cache; 0 = min(cpus, 8)
    report_to: str = "none"                # none | tensorboard
    census: bool = True                    # write census.json at start-up (--no-census)
    objective: str = "sft"                 # sft | dpo (preference pairs: prompt/chosen/rejected)
    beta: float = 0.1                      # dpo: strength of the reference-model regularisation
    loss_type: str = "sigmoid"             # dpo: sigmoid | ipo
    label_smoothing: float = 0.0           # dpo sigmoid: assumed fraction of flipped labels (cDPO)
    dpo_layout: str = "shared-prefix"      # dpo: shared-prefix (one row per pair) | separate

    def __post_init__(self):
        if isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", tuple(
                t.strip() for t in self.lora_targets.split(",") if t.strip()))
        elif isinstance(self.lora_targets, list):           # e.g. from a JSON config file
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        positive = ("tp", "dp", "cp", "max_seq_len", "lora_rank", "batch_size", "grad_accum_steps",
                    "epochs", "log_every", "ce_chunk_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mlp_chunk_tokens < 0:
            raise ConfigError(f"mlp_chunk_tokens must be >= 0 (0 = never tile), got "
                              f"{self.mlp_chunk_tokens}")
        check_offload_layers(self.offload_layers, self.remat)
        if self.host_memory is not None:
            parse_size(self.host_memory, "host_memory")
        for name in ("save_every", "eval_every", "eval_generate", "warmup_steps", "data_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 = {'never' if name == 'data_workers' else 'off'}"
                                  f"), got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1 (the newest checkpoint is always "
                              f"kept), got {self.keep_checkpoints}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size % self.dp:
            raise ConfigError(f"batch_size={self.batch_size} must be a multiple of dp={self.dp} "
                              f"(each data-parallel group gets batch_size/dp rows)")
        for name in CHOICES:
            check_choice(name, getattr(self, name))
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_generate > 0:
            if self.template not in ("rag", "auto"):
                raise ConfigError(f"eval_generate {self.eval_generate} scores generated RAG "
                                  f"answers and needs template rag, not {self.template}")
            if self.eval_fraction == 0.0:
                raise ConfigError(f"eval_generate {self.eval_generate} answers held-out examples: "
                                  f"set eval_fraction > 0")
            if self.cp > 1:
                raise ConfigError(f"eval_generate {self.eval_generate} generates, which needs "
                                  f"cp = 1, got cp={self.cp}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name, ok, rule in (("weight_decay", self.weight_decay >= 0, ">= 0"),
                               ("max_grad_norm", self.max_grad_norm >= 0, ">= 0 (0 = no clipping)"),
                               ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                               ("lora_alpha", self.lora_alpha > 0, "> 0 (the update is scaled "
                                                                  "by alpha/r)")):
            if not ok:
                raise ConfigError(f"{name} must be {rule}, got {getattr(self, name)}")

        check_preference_settings(self.beta, self.loss_type, self.label_smoothing)
        if self.objective == "dpo":
            self._check_dpo()

    def _check_dpo(self):
        """objective dpo (batch_size counts pairs, whole pairs per dp shard as the batch
        check says): packing only in the shared-prefix layout, no generation at evaluation
        (held-out pairs are scored by the DPO loss); the shared-prefix layout needs one of our
        own attention kernels."""
        if self.dpo_layout == "shared-prefix" and self.attention in BRANCH_SEGMENT_IMPLS_MISSING:
            raise ConfigError(f"attention {self.attention} cannot mask the shared-prefix layout "
                              f"(answers that see the prompt but not each other); use attention "
                              f"auto, pallas, blockwise or xla, or --dpo-layout separate")
        if self.pack and self.dpo_layout != "shared-prefix":
            raise ConfigError("packing preference pairs (pack) needs dpo_layout shared-prefix")
        for name, bad, why in (("eval_generate", self.eval_generate > 0,
                                "eval_generate 0 (held-out pairs are scored by the DPO loss)"),
                               ("train_on_inputs", self.train_on_inputs,
                                "the loss on the completions only")):
            if bad:
                raise ConfigError(f"objective dpo needs {why} for now, got {name}="
                                  f"{getattr(self, name)}")

    @property
    def host_memory_bytes(self) -> int | None:
        """``host_memory`` in bytes (None: not given)."""
        return None if self.host_memory is None else parse_size(self.host_memory, "host_memory")

    @property
    def lora_config(self) -> LoraConfig:
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=self.lora_targets, use_rslora=self.use_rslora)

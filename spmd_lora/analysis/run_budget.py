"""The memory check ``spmd-lora train`` makes before it compiles: remat ``auto`` resolved to a
policy, and the pinned host memory of the offload policies against the host's budget.

* Host: what the run's offload policy keeps on the host (:func:`.budgets.offloaded_bytes`, per
  device, at ``max_seq_len``) x this process's devices x the processes on this host
  (:func:`.budgets.local_processes`), against ``--host-memory`` and the machine's available
  RAM, whichever is smaller. Short: one ConfigError saying which budget and by how much.
* Device, for remat ``auto`` only: the step is compiled for the run's own mesh and devices
  (:func:`.plan.choose_remat`: the cheapest policy whose compiled peak fits), against the
  device's memory limit (a GPU's allocator limit; on CPU the available RAM).
"""
from __future__ import annotations

import dataclasses

import jax

from ..config.sizes import format_size
from ..errors import ConfigError
from .budgets import (check_host_budget, host_budget, local_processes, machine_ram,
                      offloaded_bytes)
from .plan import Budgets, choose_remat, plan_memory, remat_label

__all__ = ["device_memory_limit", "host_offload_per_device", "resolve_run_memory"]


def device_memory_limit(device) -> int:
    """Bytes a step may use on ``device``: the allocator's limit where the device reports one
    (GPUs), else this machine's available RAM (CPU devices share it)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return machine_ram()["available"]


def host_offload_per_device(cfg, model_cfg, remat: str, offload_layers) -> int:
    """Pinned host bytes per device of a run (TrainConfig ``cfg``) under ``remat``."""
    return offloaded_bytes(model_cfg, cfg.tp, cfg.dp, max_seq_len=cfg.max_seq_len,
                           batch=cfg.batch_size, dtype=cfg.dtype,
                           sequence_parallel=cfg.sequence_parallel, cp=cfg.cp, remat=remat,
                           offload_layers=offload_layers)


def resolve_run_memory(cfg, model_cfg, mesh, say=None):
    """``cfg`` with remat ``auto`` replaced by the policy chosen for this run (and its
    ``offload_layers``), after checking the host budget; ConfigError when nothing fits.
    ``say(text)`` reports the choice."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    processes = local_processes()
    host_memory = cfg.host_memory_bytes
    ram = machine_ram()
    host_bytes, _ = host_budget(host_memory, ram)
    if cfg.remat == "auto":
        device_budget = device_memory_limit(local[0])
        # the plan's host bytes are this process's (its devices); the host is shared
        budgets = Budgets(device=device_budget, host=host_bytes // processes)

        def plan_at(remat, k):
            return plan_memory(model_cfg, cfg.tp, cfg.dp, cfg.max_seq_len,
                               batch=cfg.batch_size, lora=cfg.lora_config, dtype=cfg.dtype,
                               remat=remat, attention=cfg.attention,
                               micro_batches=cfg.grad_accum_steps,
                               ce_chunk_tokens=cfg.ce_chunk_tokens,
                               sequence_parallel=cfg.sequence_parallel,
                               mlp_chunk_tokens=cfg.mlp_chunk_tokens,
                               devices_per_host=len(local), base_quant=cfg.base_quant,
                               cp=cfg.cp, cp_impl=cfg.cp_impl, offload_layers=k)

        chosen = choose_remat(plan_at, model_cfg.num_layers, budgets)
        if chosen is None:
            raise ConfigError(
                f"remat auto: no policy fits max_seq_len={cfg.max_seq_len} in "
                f"{format_size(device_budget).strip()} per device and "
                f"{format_size(host_bytes).strip()} of host memory (even offload-input with "
                f"every layer on the host); use more devices (tp, cp) or a shorter "
                f"--max-seq-len (spmd-lora plan --find-max-seq-len finds the longest)")
        cfg = dataclasses.replace(cfg, remat=chosen["remat"],
                                  offload_layers=chosen["offload_layers"])
        if say:
            say(f"remat auto chose --remat {remat_label(chosen)} (compiled peak "
                f"{format_size(chosen['peak']).strip()} per device, host "
                f"{format_size(chosen['host_offload_per_host']).strip()})")
    per_device = host_offload_per_device(cfg, model_cfg, cfg.remat, cfg.offload_layers)
    if per_device:
        check_host_budget(per_device, remat=cfg.remat, devices_per_process=len(local),
                          processes=processes, host_memory=host_memory, ram=ram)
    return cfg

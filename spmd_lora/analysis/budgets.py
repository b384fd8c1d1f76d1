"""Host memory as a budget: what the offload remat policies keep in pinned host memory, how
much of it a host has, and the check ``spmd-lora train`` makes before it compiles.

The bytes are a formula of the shapes (the compiled program reports the same: a GPU compile's
``host_temp_size_in_bytes``, asserted in tests/test_gpu_compile.py). Per device, one saved
value is a layer's residual rows [B/dp, R, D] in the compute dtype, R = S_cp/tp under sequence
parallelism or S_cp, S_cp the cp rank's share of the (padded) sequence. ``offload`` keeps two
per layer (the layer input and the residual after attention), ``offload-input`` one; with
``offload_layers`` = K only the first K layers' go to the host, the rest stay on the device.
"""
from __future__ import annotations

import os

import numpy as np

from ..config.sizes import format_size
from ..engine.factory import forward_options
from ..errors import ConfigError
from ..model.remat import OFFLOAD_POLICIES, saved_names
from ..parallel.zigzag import padded_seq_len
from ..weights.shapes import resolve_dtype

__all__ = ["saved_value_bytes", "offload_split", "offloaded_bytes", "machine_ram",
           "local_processes", "host_need", "host_budget", "check_host_budget"]


def saved_value_bytes(cfg, tp: int, dp: int, *, max_seq_len: int, batch: int, dtype,
                      sequence_parallel: bool, cp: int = 1) -> int:
    """Bytes per device of one saved per-layer value [B/dp, R, D] (see the module docstring)."""
    local_seq = padded_seq_len(max_seq_len, cp, tp) // cp if cp > 1 else max_seq_len
    layout = forward_options(cfg, tp=tp, sequence_parallel=sequence_parallel).layout(local_seq)
    itemsize = np.dtype(resolve_dtype(dtype)).itemsize
    return (batch // dp) * layout.local_rows * cfg.hidden_size * itemsize


def offload_split(cfg, remat: str, offload_layers: int | None = None) -> tuple[int, int]:
    """(saved values per layer on the host, ... on the device) x layers, for ``remat``: how
    many [B/dp, R, D] values wait on the host and how many on the device (0, 0 for the
    policies that keep no named values)."""
    if remat not in OFFLOAD_POLICIES:
        return 0, 0
    k = cfg.num_layers if offload_layers is None else offload_layers
    names = len(saved_names(remat))
    return k * names, (cfg.num_layers - k) * names


def offloaded_bytes(cfg, tp: int, dp: int, *, max_seq_len: int, batch: int, dtype,
                    sequence_parallel: bool, cp: int = 1, remat: str = "offload",
                    offload_layers: int | None = None) -> int:
    """Pinned host bytes per device that ``remat`` keeps per step (computed, not compiled)."""
    host, _ = offload_split(cfg, remat, offload_layers)
    return host * saved_value_bytes(cfg, tp, dp, max_seq_len=max_seq_len, batch=batch,
                                    dtype=dtype, sequence_parallel=sequence_parallel, cp=cp)


def machine_ram() -> dict:
    """This machine's RAM in bytes: {"total", "available"} (``/proc/meminfo``'s MemTotal and
    MemAvailable; the page counts of ``os.sysconf`` where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f
                    if line.split(":")[0] in ("MemTotal", "MemAvailable")}
        return {"total": info["MemTotal"], "available": info.get("MemAvailable", info["MemTotal"])}
    except (OSError, KeyError, ValueError, IndexError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return {"total": pages, "available": pages}


def local_processes() -> int:
    """JAX processes sharing this host: ``SPMD_LORA_LOCAL_PROCESSES`` (``spmd-lora launch``
    sets it), else ``LOCAL_WORLD_SIZE`` (torchrun's, also set by many cluster launchers), else
    ``SLURM_NTASKS_PER_NODE``, else 1."""
    for name in ("SPMD_LORA_LOCAL_PROCESSES", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0]
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


def host_need(per_device: int, devices_per_process: int, processes: int = 1) -> int:
    """Host bytes the pinned offload of one host needs: per device x devices x processes."""
    return per_device * devices_per_process * processes


def host_budget(host_memory: int | None = None, ram: dict | None = None) -> tuple[int, str]:
    """(bytes, where they come from) of a host's budget: ``host_memory`` (the
    ``--host-memory`` flag) or the machine's available RAM (``ram``, default
    :func:`machine_ram`), whichever is smaller."""
    ram = machine_ram() if ram is None else ram
    if host_memory is not None and host_memory < ram["available"]:
        return host_memory, "--host-memory"
    return ram["available"], "this machine's available RAM"


def check_host_budget(per_device: int, *, remat: str, devices_per_process: int,
                      processes: int = 1, host_memory: int | None = None,
                      ram: dict | None = None) -> dict:
    """Check the pinned host bytes of ``remat`` against the host's budget: ``host_memory``
    (the ``--host-memory`` flag) and the machine's available RAM (``ram``, default
    :func:`machine_ram`), whichever is smaller. Returns {"need", "budget", "budget_from"};
    ConfigError saying which budget is short and by how much when it does not fit."""
    need = host_need(per_device, devices_per_process, processes)
    budget, source = host_budget(host_memory, ram)
    out = {"need": need, "budget": budget, "budget_from": source}
    if need > budget:
        hint = ("--remat offload-input (half the host bytes), " if remat == "offload" else "")
        raise ConfigError(
            f"host memory: remat {remat} keeps {format_size(per_device).strip()} per device in "
            f"pinned host memory, {format_size(need).strip()} on this host ({processes} "
            f"process(es) x {devices_per_process} device(s)), but {source} is "
            f"{format_size(budget).strip()}: short by {format_size(need - budget).strip()}. "
            f"Use {hint}--offload-layers K (only the first K layers on the host), more "
            f"devices (tp, cp), or a shorter --max-seq-len")
    return out

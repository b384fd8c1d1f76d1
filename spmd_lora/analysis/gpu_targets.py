"""NVIDIA GPUs as compile targets: compile for H100 / H200 / A100 / B200 without one.

With the CUDA plugin installed (``pip install -e ".[cuda12]"``), JAX compiles for GPUs that are
not there: ``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=TEXT,
topology="1xHxD")`` gives compile-only devices of H hosts x D devices, and a program jitted on
a mesh over them goes through the real XLA:GPU pipeline ("deviceless compilation"): GPU
fusion, buffer assignment, async collectives, and every Triton kernel through ptxas. What it
does not do: run anything (no time), autotune (GEMMs get default configs unless results dumped
on a real GPU are loaded: ``autotune_results``), build cuDNN graphs, or ``cost_analysis()``.

``TEXT`` is XLA's ``GpuTargetConfigProto`` (``xla/stream_executor/device_description.proto``)
in protobuf text format. :data:`TARGETS` holds our own table of each GPU's published figures
(NVIDIA's datasheets and what the driver reports for memory); :func:`target_config_text`
writes the proto from it, leaving out fields the installed jaxlib cannot parse (newer XLA
versions added fields; an unknown field fails the whole parse). Per-dtype execution-unit
rates are not written: XLA's cost models then fall back to their defaults.

Without a driver the CUDA plugin refuses to start (cuInit fails) and then does not register
the "cuda" topology: :func:`ensure_plugin_can_start` sets ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``
before JAX starts its backends (harmless on a machine with GPUs: it only skips the version
check).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import sys

from ..errors import ConfigError

CUDA_EXTRA = 'pip install -e ".[cuda12]"   (or: pip install "spmd_lora[cuda12]")'
MiB = 1024 ** 2


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """One GPU model's published figures.

    device_kind: what JAX reports as ``device.device_kind`` (the driver's product name).
    memory_bytes: device memory as the driver reports it (nvidia-smi's total).
    memory_bandwidth: bytes/s; l2_cache_bytes; boost_clock_ghz; sm_count; fp32 lanes per SM;
    shared memory per SM and the per-block opt-in maximum (bytes); registers per SM.
    """
    name: str
    device_kind: str
    compute_capability: tuple[int, int]
    sm_count: int
    memory_bytes: int
    memory_bandwidth: int
    l2_cache_bytes: int
    boost_clock_ghz: float
    fp32_per_sm: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    registers_per_sm: int = 65536
    description: str = ""

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 1024 ** 3


KiB = 1024
# Published figures: NVIDIA's product datasheets and architecture whitepapers (SMs, bandwidth,
# L2, clocks, shared memory), memory as nvidia-smi reports the total.
TARGETS: dict[str, GpuTarget] = {t.name: t for t in (
    GpuTarget("h100", "NVIDIA H100 80GB HBM3", (9, 0), sm_count=132,
              memory_bytes=81559 * MiB, memory_bandwidth=3_350 * 10 ** 9,
              l2_cache_bytes=50 * MiB, boost_clock_ghz=1.98, fp32_per_sm=128,
              shared_memory_per_sm=228 * KiB, shared_memory_per_block_optin=227 * KiB,
              description="H100 SXM5 80 GB (HBM3, 3.35 TB/s)"),
    GpuTarget("h100-pcie", "NVIDIA H100 PCIe", (9, 0), sm_count=114,
              memory_bytes=81559 * MiB, memory_bandwidth=2_000 * 10 ** 9,
              l2_cache_bytes=50 * MiB, boost_clock_ghz=1.755, fp32_per_sm=128,
              shared_memory_per_sm=228 * KiB, shared_memory_per_block_optin=227 * KiB,
              description="H100 PCIe 80 GB (HBM2e, 2.0 TB/s)"),
    GpuTarget("h200", "NVIDIA H200", (9, 0), sm_count=132,
              memory_bytes=143771 * MiB, memory_bandwidth=4_800 * 10 ** 9,
              l2_cache_bytes=50 * MiB, boost_clock_ghz=1.98, fp32_per_sm=128,
              shared_memory_per_sm=228 * KiB, shared_memory_per_block_optin=227 * KiB,
              description="H200 SXM 141 GB (HBM3e, 4.8 TB/s)"),
    GpuTarget("a100", "NVIDIA A100-SXM4-80GB", (8, 0), sm_count=108,
              memory_bytes=81920 * MiB, memory_bandwidth=2_039 * 10 ** 9,
              l2_cache_bytes=40 * MiB, boost_clock_ghz=1.41, fp32_per_sm=64,
              shared_memory_per_sm=164 * KiB, shared_memory_per_block_optin=163 * KiB,
              description="A100 SXM4 80 GB (HBM2e, 2.04 TB/s)"),
    GpuTarget("b200", "NVIDIA B200", (10, 0), sm_count=148,
              memory_bytes=183359 * MiB, memory_bandwidth=7_672 * 10 ** 9,
              l2_cache_bytes=126 * MiB + 512 * KiB, boost_clock_ghz=1.965, fp32_per_sm=128,
              shared_memory_per_sm=228 * KiB, shared_memory_per_block_optin=227 * KiB,
              description="B200 180 GB (HBM3e, 7.7 TB/s as the driver reports its bus)"),
)}
ALIASES = {"h100-sxm": "h100", "h100-80gb": "h100", "h200-sxm": "h200",
           "a100-80gb": "a100", "a100-sxm": "a100"}


def target_names() -> list[str]:
    return sorted(TARGETS)


def resolve_target(name: str) -> GpuTarget:
    """The :class:`GpuTarget` for a name or alias (case-insensitive); ConfigError otherwise."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in TARGETS:
        raise ConfigError(f"--target: unknown GPU {name!r}; choose one of "
                          f"{', '.join(target_names())} (aliases: {', '.join(sorted(ALIASES))})")
    return TARGETS[key]


# ----------------------------------------------------------------------------- proto text

def _library_version(dist: str, default: tuple[int, int, int]) -> tuple[int, int, int]:
    """(major, minor, patch) of an installed NVIDIA wheel, else ``default``."""
    try:
        parts = importlib.metadata.version(dist).split(".")
        return tuple(int(p) for p in (parts + ["0", "0"])[:3])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return default


def _device_info_lines(t: GpuTarget) -> list[str]:
    """The ``gpu_device_info`` fields every jaxlib since 0.10 parses."""
    major, minor = t.compute_capability
    return [
        "threads_per_block_limit: 1024",
        "threads_per_warp: 32",
        "shared_memory_per_block: 49152",           # without the opt-in: 48 KiB on every GPU
        f"shared_memory_per_core: {t.shared_memory_per_sm}",
        "threads_per_core_limit: 2048",
        f"core_count: {t.sm_count}",
        f"fpus_per_core: {t.fp32_per_sm}",
        "block_dim_limit_x: 2147483647",
        "block_dim_limit_y: 65535",
        "block_dim_limit_z: 65535",
        f"memory_bandwidth: {t.memory_bandwidth}",
        f"l2_cache_size: {t.l2_cache_bytes}",
        f"clock_rate_ghz: {t.boost_clock_ghz}",
        f"device_memory_size: {t.memory_bytes}",
        f"shared_memory_per_block_optin: {t.shared_memory_per_block_optin}",
        f"cuda_compute_capability {{ major: {major} minor: {minor} }}",
        f"registers_per_core_limit: {t.registers_per_sm}",
        "registers_per_block_limit: 65536",
    ]


def _optional_device_info_lines(t: GpuTarget) -> list[str]:
    """Fields added to the proto over time; each is kept only when the installed jaxlib
    parses it."""
    return [f'name: "{t.device_kind}"', 'device_vendor: "NVIDIA Corporation"',
            "thread_dim_limit_x: 1024", "thread_dim_limit_y: 1024", "thread_dim_limit_z: 64",
            "device_address_bits: 64"]


def _render(t: GpuTarget, info_lines: list[str]) -> str:
    dnn = _library_version("nvidia-cudnn-cu12", (9, 8, 0))
    body = "\n".join("  " + line for line in info_lines)
    return (f"gpu_device_info {{\n{body}\n}}\n"
            f'platform_name: "CUDA"\n'
            f"dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} patch: {dnn[2]} }}\n"
            f'device_description_str: "{t.device_kind}"\n')


@functools.lru_cache(maxsize=None)
def target_config_text(name: str) -> str:
    """``GpuTargetConfigProto`` text for target ``name``, with the optional fields the
    installed jaxlib parses (each probed once per process)."""
    t = resolve_target(name)
    lines = _device_info_lines(t)
    kept = [extra for extra in _optional_device_info_lines(t)
            if _parses(_render(t, lines + [extra]))]
    return _render(t, lines + kept)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (XLA's C++ logs a parse error there for every probe)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _parses(text: str) -> bool:
    from jax.experimental import topologies
    try:
        with _quiet_stderr():
            topologies.get_topology_desc(platform="cuda", target_config=text,
                                         topology="1x1x1")
        return True
    except Exception as e:  # noqa: BLE001 - jaxlib raises its own runtime error type
        if "parse" in str(e).lower():
            return False
        raise


# ----------------------------------------------------------------------------- devices

def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA 12 plugin (jax-cuda12-plugin) is importable."""
    for name in ("jax_cuda12_plugin", "jax_plugins.xla_cuda12"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:          # the parent package is absent
            continue
    return False


def ensure_plugin_can_start() -> None:
    """Let the CUDA plugin register without a driver (call before JAX starts its backends;
    a no-op after). See the module docstring."""
    if "JAX_PLATFORMS" not in os.environ:
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def quiet_xla_warnings() -> None:
    """For the command-line tools (call before JAX starts): keep XLA's C++ warnings off
    stderr unless the user set ``TF_CPP_MIN_LOG_LEVEL``. A GPU compile of a long-context step
    warns from its rematerialisation pass whenever the program is larger than the target's
    memory, which a length search does on purpose; errors still show."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def require_cuda_plugin() -> None:
    """ConfigError naming the extra to install when the CUDA plugin is missing."""
    if not cuda_plugin_installed():
        raise ConfigError("--target compiles for NVIDIA GPUs with JAX's CUDA plugin, which is "
                          f"not installed; install it with: {CUDA_EXTRA} "
                          "(no GPU needed; ~5.5 GB with the CUDA wheels)")


@functools.lru_cache(maxsize=None)
def _topology(name: str, hosts: int, devices_per_host: int):
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(platform="cuda",
                                            target_config=target_config_text(name),
                                            topology=f"1x{hosts}x{devices_per_host}")
    except NotImplementedError as e:   # "topology not implemented for cuda"
        raise ConfigError(
            f"the CUDA plugin is installed but did not start ({e}); set "
            f"JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 (or JAX_PLATFORMS=cpu) before JAX starts, or "
            f"run spmd-lora plan as a fresh process, which sets it") from None


def target_devices(name: str, n: int, *, hosts: int = 1) -> list:
    """``n`` compile-only devices of GPU ``name`` on ``hosts`` hosts (n divisible by hosts),
    in the order a mesh takes them (host by host)."""
    require_cuda_plugin()
    if hosts < 1 or n % hosts:
        raise ConfigError(f"--hosts: {n} devices cannot be split evenly over {hosts} hosts "
                          f"(tp*dp*cp must be a multiple of --hosts)")
    return list(_topology(resolve_target(name).name, hosts, n // hosts).devices)

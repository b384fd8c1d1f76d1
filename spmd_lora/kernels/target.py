"""Which devices the program being traced is compiled for.

A kernel decides between compiling (Triton on a GPU) and interpreting (anywhere else), and the
registry picks tiles, from the devices the *program* runs on, not from ``jax.default_backend()``:
a process without a GPU can compile a train step for abstract H100s (``spmd_lora.analysis.gpu_targets``),
and its default backend is then "cpu" while the program's devices are GPUs.

The program's devices are those of the mesh being traced under (``jax.shard_map`` over a mesh,
or ``jax.sharding.use_mesh`` / ``use_abstract_mesh``): JAX's abstract mesh carries an abstract
device with the platform and device kind. Outside any mesh the default device stands in.
"""
from __future__ import annotations

import dataclasses

import jax

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


@dataclasses.dataclass(frozen=True)
class ProgramDevice:
    """backend: "gpu", "cpu" or "tpu"; device_kind: e.g. "NVIDIA H100 80GB HBM3";
    compute_capability: (major, minor) when the device reports one (a real GPU), else None;
    source: "mesh" (the traced program's mesh) or "default device"."""
    backend: str
    device_kind: str
    compute_capability: tuple[int, int] | None
    source: str

    @property
    def is_gpu(self) -> bool:
        return self.backend == "gpu"


def _backend_of(platform: str) -> str:
    platform = (platform or "").lower()
    return "gpu" if platform in GPU_PLATFORMS else platform


def _compute_capability(device):
    cc = getattr(device, "compute_capability", None)
    if isinstance(cc, str):
        try:
            major, minor = cc.split(".")[:2]
            return int(major), int(minor)
        except ValueError:
            return None
    if cc is not None:
        try:
            return tuple(int(x) for x in cc)[:2]
        except TypeError:
            return None
    return None


def program_device() -> ProgramDevice:
    """The device the code being traced is compiled for (see the module docstring)."""
    mesh = jax.sharding.get_abstract_mesh()
    abstract = getattr(mesh, "abstract_device", None)
    if abstract is not None and getattr(abstract, "platform", None):
        return ProgramDevice(_backend_of(abstract.platform), str(abstract.device_kind or ""),
                             None, "mesh")
    device = jax.devices()[0]
    return ProgramDevice(_backend_of(jax.default_backend()),
                         str(getattr(device, "device_kind", "")), _compute_capability(device),
                         "default device")


def interpret_by_default() -> bool:
    """Whether a Pallas kernel traced now should run interpreted: yes unless the program is
    compiled for GPUs."""
    return not program_device().is_gpu

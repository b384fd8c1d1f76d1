"""Lower GPU kernels for CUDA on a machine without a GPU (CI, laptops).

From jax 0.11 the Triton lowering of a Pallas kernel asks the device for its compute
capability; with no GPU present it needs an *abstract* GPU device, given through an abstract
mesh with no axes. :func:`lower_for_cuda` does that (it works on jax 0.10.2 through 0.12) and
returns the StableHLO text, in which each Triton kernel is one ``xla.gpu.triton`` custom call.
This checks Triton-only constraints (power-of-two tiles, supported ops) without compiling PTX.
"""
from __future__ import annotations

import contextlib

import jax
from jax.sharding import AbstractDevice, AbstractMesh

H100 = "NVIDIA H100 80GB HBM3"


@contextlib.contextmanager
def abstract_gpu(device_kind: str = H100):
    """Trace and lower as if the default device were a CUDA GPU of ``device_kind``."""
    device = AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=device)):
        yield


def lower_for_cuda(fn, *abstract_args, device_kind: str = H100) -> str:
    """StableHLO text of ``jax.jit(fn)`` lowered for CUDA on ``abstract_args``
    (``jax.ShapeDtypeStruct``s), on any host."""
    with abstract_gpu(device_kind):
        lowered = jax.jit(fn).trace(*abstract_args).lower(lowering_platforms=("cuda",))
    return lowered.as_text()

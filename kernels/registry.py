"""Which attention implementation and tile sizes to use on which machine.

``choose(impl, ...)`` turns the user's ``impl`` ("auto", "pallas", "blockwise", "xla",
"cudnn") into a concrete :class:`KernelChoice` for the current backend:

* GPU: "auto" -> our Pallas kernel, with block sizes from :data:`GPU_TABLE`, matched on
  ``jax.devices()[0].device_kind`` (substring, case-insensitive) and then on the compute
  capability; the last entry is the catch-all.
* CPU (and TPU, where the Triton-style kernel does not lower): "auto" -> blockwise, with the
  block size from :data:`CPU_BLOCKWISE` by sequence length. Measured on the shared 2-core CPU
  box (fwd+bwd, B=1, 8 heads, hd=64, fp32, min of 15 runs, under load): S=128 xla 4.3 ms vs
  blockwise 3.1 ms; S=256 12.0 vs 12.6 ms (a tie); S=512 90 vs 52 ms; S=2048 ~2.0 s vs
  ~0.6 s. Blockwise never loses by more than noise, so there is no "short sequence -> xla"
  threshold: "auto" is blockwise at every length. "pallas" still works off-GPU, interpreted
  (slow; for tests).

Add a GPU: append a :class:`GpuEntry` to ``GPU_TABLE`` (or call :func:`register_gpu`) before
the catch-all; see kernels/README.md.
"""
from __future__ import annotations

import dataclasses

import jax

from .flash_attention import BlockSizes

IMPLS = ("auto", "pallas", "blockwise", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class GpuEntry:
    """Kernel settings for a family of GPUs.

    name: for messages. device_kinds: lower-case substrings of ``device.device_kind``
    ("h100" matches "NVIDIA H100 80GB HBM3"). min_compute_capability: matched when no
    device_kind substring matches (major, minor); None matches anything (catch-all).
    impl: what "auto" means there. block_sizes: ((max_head_dim, BlockSizes), ...) in
    increasing head-dim order; the first entry whose max_head_dim >= the head dim wins.
    """
    name: str
    device_kinds: tuple[str, ...]
    min_compute_capability: tuple[int, int] | None
    impl: str = "pallas"
    block_sizes: tuple[tuple[int, BlockSizes], ...] = ()

    def blocks_for(self, head_dim: int) -> BlockSizes:
        for max_d, bs in self.block_sizes:
            if head_dim <= max_d:
                return bs
        return self.block_sizes[-1][1] if self.block_sizes else BlockSizes()


# Starting points from the FlashAttention-2 Triton tutorial configurations (fwd 128x64, bwd
# 64x64; fewer/larger tiles for small head dims). NOT yet tuned on hardware: measure with
# kernels/README.md's recipe and edit here.
GPU_TABLE: list[GpuEntry] = [
    GpuEntry(
        name="Hopper (H100/H200/GH200, sm90)",
        device_kinds=("h100", "h200", "gh200", "h800", "h20"),
        min_compute_capability=(9, 0),
        block_sizes=(
            (64, BlockSizes(block_q=128, block_k=128, block_q_bwd=64, block_k_bwd=128,
                            num_warps=4, num_stages=3, num_warps_bwd=4, num_stages_bwd=2)),
            (128, BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64,
                             num_warps=8, num_stages=3, num_warps_bwd=8, num_stages_bwd=2)),
            (256, BlockSizes(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=32,
                             num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=1)),
        ),
    ),
    GpuEntry(
        name="Ampere/Ada (A100/A10/L4/L40, sm80-89)",
        device_kinds=("a100", "a800", "a10", "a30", "a40", "a6000", "l4", "l40"),
        min_compute_capability=(8, 0),
        block_sizes=(
            (64, BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64,
                            num_warps=4, num_stages=3, num_warps_bwd=4, num_stages_bwd=2)),
            (128, BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64,
                             num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=1)),
            (256, BlockSizes(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=32,
                             num_warps=8, num_stages=1, num_warps_bwd=8, num_stages_bwd=1)),
        ),
    ),
    GpuEntry(  # catch-all (V100, T4, unknown): small tiles that fit any shared memory
        name="generic GPU",
        device_kinds=(),
        min_compute_capability=None,
        block_sizes=(
            (128, BlockSizes(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=32,
                             num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=1)),
            (256, BlockSizes(block_q=32, block_k=32, block_q_bwd=16, block_k_bwd=16,
                             num_warps=4, num_stages=1, num_warps_bwd=4, num_stages_bwd=1)),
        ),
    ),
]

# (max sequence length, blockwise block size); the last entry covers everything longer.
CPU_BLOCKWISE: list[tuple[int, int]] = [(4096, 256), (1 << 62, 512)]


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    impl: str                       # "pallas" | "blockwise" | "xla" | "cudnn"
    block_sizes: BlockSizes | None  # for pallas and blockwise (block_q / block_k used)
    reason: str                     # which table entry / rule picked it


def register_gpu(entry: GpuEntry, *, first: bool = True) -> None:
    """Add a GPU entry (by default ahead of the built-in ones, so it wins ties)."""
    if first:
        GPU_TABLE.insert(0, entry)
    else:
        GPU_TABLE.insert(len(GPU_TABLE) - 1, entry)  # still before the catch-all


def _check_impl(impl) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; allowed values: "
                         + ", ".join(repr(i) for i in IMPLS))
    return impl


def device_info():
    """(backend, device_kind, compute_capability or None) of the default device."""
    backend = jax.default_backend()
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if isinstance(cc, str):
        try:
            major, minor = cc.split(".")[:2]
            cc = (int(major), int(minor))
        except ValueError:
            cc = None
    elif cc is not None:
        try:
            cc = tuple(int(x) for x in cc)[:2]
        except TypeError:
            cc = None
    return backend, str(getattr(dev, "device_kind", "")), cc


def gpu_entry(device_kind: str, compute_capability=None) -> GpuEntry:
    kind = device_kind.lower()
    for e in GPU_TABLE:
        if any(s in kind for s in e.device_kinds):
            return e
    for e in GPU_TABLE:
        if e.min_compute_capability is not None and compute_capability is not None \
                and tuple(compute_capability) >= e.min_compute_capability:
            return e
    return GPU_TABLE[-1]


def _cpu_block(seq_len: int) -> int:
    for max_s, block in CPU_BLOCKWISE:
        if seq_len <= max_s:
            return block
    return CPU_BLOCKWISE[-1][1]


def resolve_impl(impl: str = "auto", *, backend: str | None = None) -> str:
    """The concrete implementation ``impl`` means on ``backend`` (default: jax's default).

    Raises ValueError for an unknown impl, or for "cudnn" without a GPU.
    """
    _check_impl(impl)
    backend = backend or jax.default_backend()
    if impl == "cudnn" and backend != "gpu":
        raise ValueError(f"attention impl 'cudnn' needs a CUDA GPU; the JAX backend is "
                         f"{backend!r}. Use impl='auto', 'blockwise' or 'xla'.")
    if impl != "auto":
        return impl
    return "pallas" if backend == "gpu" else "blockwise"


def choose(impl: str = "auto", *, seq_len: int, head_dim: int,
           block_sizes: BlockSizes | None = None, backend: str | None = None,
           device_kind: str | None = None, compute_capability=None) -> KernelChoice:
    """Implementation and block sizes for one attention call (pure; inputs default to the
    current default device)."""
    if backend is None or (backend == "gpu" and device_kind is None):
        b, kind, cc = device_info()
        backend = backend or b
        device_kind = kind if device_kind is None else device_kind
        compute_capability = cc if compute_capability is None else compute_capability
    concrete = resolve_impl(impl, backend=backend)
    if concrete == "pallas":
        if backend == "gpu":
            entry = gpu_entry(device_kind or "", compute_capability)
            bs = block_sizes or entry.blocks_for(head_dim)
            return KernelChoice("pallas", bs, f"GPU table entry {entry.name!r}")
        return KernelChoice("pallas", block_sizes or BlockSizes(),
                            f"interpreted Pallas on {backend}")
    if concrete == "blockwise":
        if block_sizes is not None:
            return KernelChoice("blockwise", block_sizes, "caller's block sizes")
        blk = _cpu_block(seq_len)
        return KernelChoice("blockwise", BlockSizes(block_q=blk, block_k=blk,
                                                    block_q_bwd=blk, block_k_bwd=blk),
                            f"blockwise, block {blk} for S={seq_len}")
    return KernelChoice(concrete, None, concrete)

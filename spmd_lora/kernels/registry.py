"""Which attention implementation and tile sizes to use on which machine.

``choose(impl, ...)`` turns the user's ``impl`` ("auto", "pallas", "blockwise", "xla",
"cudnn", "tokamax") into a concrete :class:`KernelChoice` for the current backend:

* GPU: "auto" -> our Pallas kernel, with block sizes from :data:`GPU_TABLE`, matched on the
  device kind of the devices the program is compiled for (substring, case-insensitive; the
  traced mesh's devices, which may be abstract GPUs in a deviceless compile: ``target.py``)
  and then on the compute capability; the last entry is the catch-all.
* GPU with a measured kernel table (``SPMD_LORA_KERNEL_TABLE=path.json``, written by
  ``tools/gpu_suite.py`` on that GPU kind): its block sizes win over ``GPU_TABLE``, and "auto"
  takes the fastest implementation of its measured ranking that supports the call (dtype,
  head dim, segment ids, length); see :func:`load_table` for the file format.
* CPU (and TPU, where the Triton-style kernel does not lower): "auto" -> blockwise, with the
  block size from :data:`CPU_BLOCKWISE` by sequence length. Measured on the shared 2-core CPU
  box (fwd+bwd, B=1, 8 heads, hd=64, fp32, min of 15 runs, under load): S=128 xla 4.3 ms vs
  blockwise 3.1 ms; S=256 12.0 vs 12.6 ms (a tie); S=512 90 vs 52 ms; S=2048 ~2.0 s vs
  ~0.6 s (the blockwise kernel has become 1.6-1.8x faster since). Blockwise never loses by more
  than noise, so there is no "short sequence -> xla" threshold: "auto" is blockwise at every
  length (block sizes: see ``CPU_BLOCKWISE``). "pallas" still works off-GPU, interpreted (slow;
  for tests).

Add a GPU: append a :class:`GpuEntry` to ``GPU_TABLE`` (or call :func:`register_gpu`) before
the catch-all, or run the suite there; see kernels/README.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

from . import cudnn as _cudnn, tokamax_attention as _tokamax
from .flash_attention import BlockSizes
from .target import program_device

IMPLS = ("auto", "pallas", "blockwise", "xla", "cudnn", "tokamax")
GPU_ONLY = ("cudnn", "tokamax")
BRANCH_SEGMENT_IMPLS_MISSING = ("cudnn", "tokamax")   # no shared-prefix (DPO) segment mask
TABLE_ENV = "SPMD_LORA_KERNEL_TABLE"
TABLE_FORMAT = "spmd_lora kernel table"
# Measurements shipped with the package (tools/gpu_suite.py --table kernels/kernel_table.json
# on a GPU, then commit); used when SPMD_LORA_KERNEL_TABLE is unset. Absent until a GPU run.
PACKAGED_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_table.json")


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


# Not yet timed on hardware (no GPU has run them): measure with kernels/README.md's recipe
# (tools/gpu_suite.py) and edit here. The hd 64 / 128 tiles of Blackwell, Hopper and Ampere
# are the largest ptxas compiles for sm_100a / sm_90a / sm_80 without spilling in any variant
# the model uses (causal or not, padded, segment ids, GQA, bf16 / fp16, the ring's block
# kernels): tools/kernel_report.py --target b200 h100 a100 checks it (docs/benchmarks.md,
# "Compiled for GPUs"). The FlashAttention-2 tutorial's starting points we had before spilled:
# on sm_90a hd 64 dk/dv 2.5-3 KB, hd 128 dk/dv 48 B with segment ids; on sm_80 up to 2.4 KB
# (hd 128 dq). hd 256 and the catch-all are still those starting points.
# Hopper's tiles by max head dim (sm_90a); Blackwell (sm_100a) takes the same with one
# backward stage at hd 128 (two stages spill 32 B in its dk/dv there).
SM90_TILES = (
    (64, BlockSizes(block_q=128, block_k=64, block_q_bwd=128, block_k_bwd=64,
                    num_warps=8, num_stages=3, num_warps_bwd=8, num_stages_bwd=2)),
    (128, BlockSizes(block_q=128, block_k=64, block_q_bwd=128, block_k_bwd=32,
                     num_warps=8, num_stages=3, num_warps_bwd=8, num_stages_bwd=2)),
    (256, BlockSizes(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=32,
                     num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=1)),
)

GPU_TABLE: list[GpuEntry] = [
    GpuEntry(
        name="Blackwell (B200/GB200, sm100)",
        device_kinds=("b200", "b100", "gb200", "b300", "gb300"),
        min_compute_capability=(10, 0),
        block_sizes=tuple((d, dataclasses.replace(bs, num_stages_bwd=1) if d == 128 else bs)
                          for d, bs in SM90_TILES),
    ),
    GpuEntry(
        name="Hopper (H100/H200/GH200, sm90)",
        device_kinds=("h100", "h200", "gh200", "h800", "h20"),
        min_compute_capability=(9, 0),
        block_sizes=SM90_TILES,
    ),
    GpuEntry(
        name="Ampere/Ada (A100/A10/L4/L40, sm80-89)",
        device_kinds=("a100", "a800", "a10", "a30", "a40", "a6000", "l4", "l40"),
        min_compute_capability=(8, 0),
        block_sizes=(
            (64, BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=32,
                            num_warps=8, num_stages=2, num_warps_bwd=4, num_stages_bwd=1)),
            (128, BlockSizes(block_q=128, block_k=32, block_q_bwd=32, block_k_bwd=64,
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
# Measured fwd+bwd of one layer's causal attention on a quiet 2-core Xeon (load average < 1.5,
# 8 heads x 64, fp32, min of 3 runs; docs/benchmarks.md, issue 17), after the kernel moved to
# the heads-major layout: S=256 b128 5-6 ms, b256 4-5 ms; S=512 b64 16 ms, b128 15, b256 16,
# b512 23; S=1024 b128 48 ms, b256 45, b512 51; S=2048 b128 190 ms, b256 161, b512 139;
# S=4096 b256 553 ms, b512 451, b1024 521; S=8192 b512 1.64 s, 1024x512 1.74 s. Larger tiles win
# as S grows (fewer loop iterations, larger matmuls) until the score tile leaves the cache.
CPU_BLOCKWISE: list[tuple[int, int]] = [(256, 256), (512, 128), (1024, 256), (1 << 62, 512)]


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
    """(backend, device_kind, compute_capability or None) of the devices the program being
    traced is compiled for (the mesh's; the default device outside a mesh): see
    :mod:`.target`."""
    dev = program_device()
    return dev.backend, dev.device_kind, dev.compute_capability


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
    """The concrete implementation ``impl`` means on ``backend`` (default: the program's
    devices, :func:`device_info`).

    Raises ValueError for an unknown impl, or for "cudnn" without a GPU.
    """
    _check_impl(impl)
    backend = backend or device_info()[0]
    if impl in GPU_ONLY and backend != "gpu":
        raise ValueError(f"attention impl {impl!r} needs a CUDA GPU; the JAX backend is "
                         f"{backend!r}. Use impl='auto', 'blockwise' or 'xla'.")
    if impl != "auto":
        return impl
    return "pallas" if backend == "gpu" else "blockwise"


# ----------------------------------------------------------------------------- measured table

@dataclasses.dataclass(frozen=True)
class MeasuredEntry:
    """One GPU kind's measurements from the kernel table file.

    block_sizes: ((max_head_dim, BlockSizes), ...) for our Pallas kernel, increasing head dim.
    ranking: implementations fastest first (fwd+bwd TFLOP/s as the suite measured them).
    """
    device_kind: str
    block_sizes: tuple[tuple[int, BlockSizes], ...]
    ranking: tuple[str, ...]
    source: str

    def blocks_for(self, head_dim: int) -> BlockSizes | None:
        for max_d, bs in self.block_sizes:
            if head_dim <= max_d:
                return bs
        return None


_TABLE_CACHE: dict = {}


def _table_error(path, what):
    return ValueError(f"kernel table {path} (from {TABLE_ENV} or the packaged table): {what}. "
                      f"Fix or delete the file (tools/gpu_suite.py writes a valid one).")


def _parse_entry(path, kind, raw) -> MeasuredEntry:
    if not isinstance(raw, dict):
        raise _table_error(path, f"devices[{kind!r}] must be an object")
    blocks = []
    for item in raw.get("block_sizes", []):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)
                and isinstance(item[1], dict)):
            raise _table_error(path, f"devices[{kind!r}].block_sizes entries must be "
                                     f"[max_head_dim, {{BlockSizes fields}}], got {item!r}")
        try:
            blocks.append((item[0], BlockSizes(**item[1])))
        except (TypeError, ValueError) as e:
            raise _table_error(path, f"devices[{kind!r}].block_sizes: {e}") from None
    ranking = raw.get("ranking", [])
    bad = [r for r in ranking if r not in IMPLS or r == "auto"]
    if not isinstance(ranking, list) or bad:
        raise _table_error(path, f"devices[{kind!r}].ranking must list implementations from "
                                 f"{IMPLS[1:]}, got {ranking!r}")
    return MeasuredEntry(kind, tuple(sorted(blocks, key=lambda b: b[0])), tuple(ranking),
                         str(path))


def load_table(path=None) -> dict:
    """device_kind (lower case) -> :class:`MeasuredEntry` from the kernel table file
    (``path``; default ``$SPMD_LORA_KERNEL_TABLE``, else :data:`PACKAGED_TABLE` when it exists,
    else {}). Format::

        {"format": "spmd_lora kernel table", "version": 1,
         "devices": {"NVIDIA H100 80GB HBM3": {
             "block_sizes": [[128, {"block_q": 128, "block_k": 64, ...}]],
             "ranking": ["pallas", "cudnn", "xla"],
             "measurements": {...}}}}        # free-form: what the suite measured

    Raises ValueError naming the file and field when it is unreadable or malformed.
    """
    path = path or os.environ.get(TABLE_ENV) or (
        PACKAGED_TABLE if os.path.exists(PACKAGED_TABLE) else None)
    if not path:
        return {}
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError as e:
        raise _table_error(path, f"cannot read it ({e.strerror})") from None
    key = (os.path.abspath(path), stamp)
    if key not in _TABLE_CACHE:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise _table_error(path, f"not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT \
                or not isinstance(data.get("devices"), dict):
            raise _table_error(path, f"expected an object with \"format\": \"{TABLE_FORMAT}\" "
                                     f"and a \"devices\" object")
        _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = {k.lower(): _parse_entry(path, k, v)
                             for k, v in data["devices"].items()}
    return _TABLE_CACHE[key]


def write_table(path, device_kind: str, *, block_sizes=None, ranking=None,
                measurements=None) -> None:
    """Merge one GPU kind's results into the table file at ``path`` (created if missing;
    other devices kept), atomically (temp file + rename). block_sizes: ((max_head_dim,
    BlockSizes), ...); ranking: impl names fastest first."""
    data = {"format": TABLE_FORMAT, "version": 1, "devices": {}}
    if os.path.exists(path):
        load_table(path)  # validates
        with open(path) as f:
            data = json.load(f)
    entry = data["devices"].setdefault(device_kind, {})
    if block_sizes is not None:
        entry["block_sizes"] = [[d, dataclasses.asdict(bs)] for d, bs in block_sizes]
    if ranking is not None:
        entry["ranking"] = list(ranking)
    if measurements is not None:
        entry["measurements"] = measurements
    _parse_entry(path, device_kind, entry)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".kernel_table.", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def measured_entry(device_kind: str) -> MeasuredEntry | None:
    return load_table().get((device_kind or "").lower())


def supports(impl: str, *, dtype=None, head_dim: int, seq_len: int, segments,
             compute_capability=None):
    """(ok, reason): whether ``impl`` takes a call with these features on a GPU. ``segments``:
    False, True (segment ids), or "branches" (shared-prefix branch segments, which only our
    own kernels express)."""
    if segments == "branches" and impl in BRANCH_SEGMENT_IMPLS_MISSING:
        return False, f"{impl} has no mask for shared-prefix branch segments"
    if impl == "cudnn":
        return _cudnn.supports(dtype=dtype or "bfloat16", head_dim=head_dim, seq_len=seq_len,
                               segments=segments, compute_capability=compute_capability)
    if impl == "tokamax":
        return _tokamax.supports(dtype=dtype or "bfloat16", compute_capability=compute_capability)
    return True, "ok"


def _measured_auto(entry: MeasuredEntry, **features):
    """First implementation of the measured ranking that takes the call, or None."""
    for impl in entry.ranking:
        if supports(impl, **features)[0]:
            return impl
    return None


def choose(impl: str = "auto", *, seq_len: int, head_dim: int,
           block_sizes: BlockSizes | None = None, backend: str | None = None,
           device_kind: str | None = None, compute_capability=None, dtype=None,
           segments=False) -> KernelChoice:
    """Implementation and block sizes for one attention call (pure apart from reading the
    kernel table; inputs default to the program's devices, :func:`device_info`). ``dtype`` /
    ``segments`` (False, True, or "branches": see :func:`supports`) describe the call, for
    picking among measured implementations."""
    if backend is None or (backend == "gpu" and device_kind is None):
        b, kind, cc = device_info()
        backend = backend or b
        device_kind = kind if device_kind is None else device_kind
        compute_capability = cc if compute_capability is None else compute_capability
    concrete = resolve_impl(impl, backend=backend)
    if segments == "branches" and concrete in BRANCH_SEGMENT_IMPLS_MISSING:
        raise ValueError(f"attention {concrete!r} cannot mask shared-prefix branch segments "
                         f"(objective dpo's shared-prefix layout); use pallas, blockwise or "
                         f"xla, or the separate layout")
    measured = measured_entry(device_kind) if backend == "gpu" else None
    reason = None
    if impl == "auto" and measured is not None and measured.ranking:
        pick = _measured_auto(measured, dtype=dtype, head_dim=head_dim, seq_len=seq_len,
                              segments=segments, compute_capability=compute_capability)
        if pick is not None:
            concrete = pick
            reason = (f"fastest supported in the measured ranking {list(measured.ranking)} "
                      f"({measured.source})")
    if concrete == "pallas":
        if backend == "gpu":
            bs = block_sizes or (measured.blocks_for(head_dim) if measured else None)
            if bs is not None and block_sizes is None:
                return KernelChoice("pallas", bs, reason or f"measured block sizes "
                                                            f"({measured.source})")
            entry = gpu_entry(device_kind or "", compute_capability)
            bs = block_sizes or entry.blocks_for(head_dim)
            return KernelChoice("pallas", bs, reason or f"GPU table entry {entry.name!r}")
        return KernelChoice("pallas", block_sizes or BlockSizes(),
                            f"interpreted Pallas on {backend}")
    if concrete == "blockwise":
        if block_sizes is not None:
            return KernelChoice("blockwise", block_sizes, "caller's block sizes")
        blk = _cpu_block(seq_len)
        return KernelChoice("blockwise", BlockSizes(block_q=blk, block_k=blk,
                                                    block_q_bwd=blk, block_k_bwd=blk),
                            f"blockwise, block {blk} for S={seq_len}")
    return KernelChoice(concrete, None, reason or concrete)

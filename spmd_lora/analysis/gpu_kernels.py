"""The GPU kernels of a compiled program: registers, spills and shared memory from ptxas.

A GPU compile (a real one or a deviceless one, :mod:`spmd_lora.analysis.gpu_targets`) asked to dump
(``xla_dump_to``) leaves, per program, the thunk sequence (every kernel launch with its grid,
threads and shared memory) and the PTX of every kernel. :func:`compile_with_kernels` compiles
with such a dump in a temporary folder and returns :class:`Kernel` rows: launch facts from the
thunk sequence, and registers / spill bytes / stack from running ptxas (the one in the CUDA
wheels, as XLA does) on the PTX of the Triton kernels: our Pallas kernels (``spmd_lora_*``)
and XLA's own Triton fusions (GEMMs). The numbers are ptxas' for the PTX XLA generated, i.e.
what runs on the GPU.

A Pallas tile that does not fit in shared memory already fails the compile (XLA checks the
Triton kernel's shared memory against the target's opt-in limit: RESOURCE_EXHAUSTED).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import tempfile
from ..kernels import attention, ring_attention
from .gpu_targets import target_devices

OUR_PREFIX = "spmd_lora_"

_THUNK = re.compile(r"kCustomKernel\s*\[[^\]]*\]\s*(?P<name>[\w.\-$]+)\s+grid:\s*\[(?P<grid>[\d,\s]+)\]"
                    r"\s*threads:\s*\[(?P<threads>[\d,\s]+)\]\s*shared_memory:\s*(?P<smem>\d+)")
_ENTRY = re.compile(r"^\s*(?:\.visible\s+)?\.entry\s+([\w$]+)\s*\(", re.MULTILINE)
_TARGET = re.compile(r"^\s*\.target\s+(sm_\w+)", re.MULTILINE)
_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SERIAL = re.compile(r"wgmma\.mma_async instructions are serialized.*function '([^']+)'")
_TRITON_FUSION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*\bfusion\(.*\"kind\":\"__triton",
                            re.MULTILINE)
_TRITON_CALL = re.compile(r'custom_call_target="__gpu\$xla\.gpu\.triton".*?"name":"([^"]+)"')


@dataclasses.dataclass
class Kernel:
    """One GPU kernel of a compiled program.

    name: the kernel's entry name (ours: ``spmd_lora_flash_fwd`` ...; XLA's: the fusion name).
    kind: "ours" (a Pallas kernel of this package), "triton" (an XLA Triton fusion) or "xla"
    (a kernel XLA emitted through LLVM). launches: how often the thunk sequence launches it
    (loop bodies count once). grid / threads: of its first launch. shared_memory: bytes per
    block. registers / spill_stores / spill_loads / stack: from ptxas (None where ptxas was
    not run: "xla" kernels). arch: the PTX target (sm_90a ...). serialized_wgmma: ptxas warned
    that the kernel's Hopper tensor-core instructions run serialized (a performance loss).
    """
    name: str
    kind: str
    launches: int = 0
    grid: tuple = ()
    threads: tuple = ()
    shared_memory: int | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    arch: str | None = None
    serialized_wgmma: bool = False

    @property
    def spill_bytes(self) -> int | None:
        if self.spill_stores is None:
            return None
        return self.spill_stores + self.spill_loads


def ptxas_path() -> str | None:
    """The ptxas XLA uses: the CUDA wheel's (nvidia-cuda-nvcc-cu12), else one on PATH."""
    try:
        import nvidia.cuda_nvcc as nvcc
        for root in nvcc.__path__:
            path = os.path.join(root, "bin", "ptxas")
            if os.access(path, os.X_OK):
                return path
    except ImportError:
        pass
    return shutil.which("ptxas")


def triton_kernel_names(hlo_text: str) -> tuple[set, set]:
    """(our Pallas kernels, XLA's Triton fusions) named in an optimized GPU HLO text."""
    ours = set(_TRITON_CALL.findall(hlo_text))
    fusions = {kernel_name(n) for n in _TRITON_FUSION.findall(hlo_text)}
    return ours, fusions - ours


def kernel_name(hlo_name: str) -> str:
    """The kernel entry name XLA gives an HLO instruction ('gemm_fusion.3' -> 'gemm_fusion_3')."""
    return re.sub(r"[^\w$]", "_", hlo_name)


def parse_thunks(text: str) -> dict:
    """name -> Kernel with the launch facts of a ``*.thunk_sequence.txt`` dump."""
    kernels = {}
    for m in _THUNK.finditer(text):
        k = kernels.setdefault(m.group("name"), Kernel(m.group("name"), "xla"))
        if not k.launches:
            k.grid = tuple(int(x) for x in m.group("grid").split(","))
            k.threads = tuple(int(x) for x in m.group("threads").split(","))
            k.shared_memory = int(m.group("smem"))
        k.launches += 1
    return kernels


def parse_ptxas(text: str) -> dict:
    """entry name -> {registers, spill_stores, spill_loads, stack, arch, serialized_wgmma}
    from ``ptxas -v`` output."""
    out, current = {}, None
    serialized = set(_PTXAS_SERIAL.findall(text))
    for line in text.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            current = out.setdefault(m.group(1), {"arch": m.group(2),
                                                  "serialized_wgmma": m.group(1) in serialized})
            continue
        if current is None:
            continue
        m = _PTXAS_PROPS.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        m = _PTXAS_REGS.search(line)
        if m:
            current["registers"] = int(m.group(1))
    return out


def _run_ptxas(ptxas: str, path: str, arch: str) -> str:
    proc = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", "-o", os.devnull, path],
                          capture_output=True, text=True)
    return proc.stdout + proc.stderr


def kernels_from_dump(dump_dir: str, hlo_text: str) -> list[Kernel]:
    """Kernel rows of the program dumped into ``dump_dir`` (see the module docstring);
    ``hlo_text`` is its optimized HLO (``compiled.as_text()``), which names the Triton ones."""
    kernels = {}
    for path in sorted(glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt"))):
        if "after_thunk_passes" in path:
            continue
        with open(path) as f:
            for name, k in parse_thunks(f.read()).items():
                kernels.setdefault(name, k)
    ours, fusions = triton_kernel_names(hlo_text)
    for name, k in kernels.items():
        k.kind = "ours" if name in ours or name.startswith(OUR_PREFIX) else (
            "triton" if name in fusions else "xla")
    triton = {n for n, k in kernels.items() if k.kind != "xla"}
    jobs = []
    for path in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))):
        with open(path) as f:
            text = f.read()
        target = _TARGET.search(text)
        if target and triton.intersection(_ENTRY.findall(text)):
            jobs.append((path, target.group(1)))
    ptxas = ptxas_path()
    if jobs and ptxas is None:
        raise RuntimeError("ptxas not found (it comes with the CUDA wheels: "
                           'pip install -e ".[cuda12]")')
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        reports = list(pool.map(lambda job: _run_ptxas(ptxas, *job), jobs))
    for report in reports:
        for name, stats in parse_ptxas(report).items():
            if name in kernels:
                for key, value in stats.items():
                    setattr(kernels[name], key, value)
    order = {"ours": 0, "triton": 1, "xla": 2}
    return sorted(kernels.values(), key=lambda k: (order[k.kind], k.name))


def compile_with_kernels(lowered, compiler_options: dict | None = None):
    """Compile ``lowered`` for its GPU devices with a dump in a temporary folder. Returns
    (compiled, [Kernel]); the folder is removed."""
    with tempfile.TemporaryDirectory(prefix="spmd_lora_xla_dump_") as dump:
        compiled = lowered.compile({**(compiler_options or {}), "xla_dump_to": dump})
        return compiled, kernels_from_dump(dump, compiled.as_text())


def summarize(kernels: list[Kernel]) -> dict:
    """Totals by kind: count, max registers, kernels with spills, max shared memory."""
    out = {}
    for kind in ("ours", "triton", "xla"):
        rows = [k for k in kernels if k.kind == kind]
        regs = [k.registers for k in rows if k.registers is not None]
        out[kind] = {"kernels": len(rows), "max_registers": max(regs) if regs else None,
                     "spilling": sorted(k.name for k in rows if k.spill_bytes),
                     "max_shared_memory": max((k.shared_memory or 0 for k in rows), default=0)}
    return out


def format_table(kernels: list[Kernel], kinds=("ours", "triton")) -> list[str]:
    """Text rows of the kernel table for the given kinds."""
    rows = [f"{'kernel':<44} {'kind':<6} {'arch':<7} {'regs':>5} {'spill B':>8} {'stack B':>8} "
            f"{'smem KiB':>9} {'threads':>7} {'launches':>8}"]
    for k in kernels:
        if k.kind not in kinds:
            continue
        fmt = lambda x: "-" if x is None else str(x)  # noqa: E731
        smem = "-" if k.shared_memory is None else f"{k.shared_memory / 1024:.1f}"
        note = "  (wgmma serialized)" if k.serialized_wgmma else ""
        rows.append(f"{k.name[:44]:<44} {k.kind:<6} {fmt(k.arch):<7} {fmt(k.registers):>5} "
                    f"{fmt(k.spill_bytes):>8} {fmt(k.stack):>8} {smem:>9} "
                    f"{(k.threads[0] if k.threads else '-'):>7} {k.launches:>8}{note}")
    return rows


# ----------------------------------------------------------------------------- attention alone

def compile_attention(target: str, *, seq_len: int, heads: int, kv_heads: int, head_dim: int,
                      dtype="bfloat16", causal: bool = True, segments: bool = False,
                      ring: bool = False, block_sizes=None, batch: int = 1):
    """Forward + backward (dq, dk/dv) of our Pallas attention compiled for GPU ``target``
    without one. Returns (compiled, [Kernel]).

    ``ring=False``: ``kernels.attention(impl="pallas")`` inside shard_map over one device
    (tiles: ``block_sizes``, else the registry's for that GPU kind). ``ring=True``: the
    context-parallel block kernels, ``ring_attention(kernel="pallas")`` over a cp=2 ring
    (causal by global token index). ``seq_len`` is the whole sequence (split over the ring).
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


    n = 2 if ring else 1
    axis = "cp" if ring else "x"
    mesh = Mesh(target_devices(target, n), (axis,))
    spec = P(None, axis) if ring else P(axis)
    dt = jnp.dtype(dtype)

    def loss(q, k, v, index, seg):
        seg = seg if segments else None
        if ring:
            out = ring_attention(q, k, v, axis_name="cp", q_index=index, k_index=index,
                                 q_segment_ids=seg, kv_segment_ids=seg, kernel="pallas",
                                 block_sizes=block_sizes)
        else:
            out = attention(q, k, v, causal=causal, segment_ids=seg, impl="pallas",
                            block_sizes=block_sizes)
        return out.astype(jnp.float32).sum()

    def step(*args):
        return jax.shard_map(jax.grad(loss, argnums=(0, 1, 2)), mesh=mesh,
                             in_specs=(spec,) * 5, out_specs=(spec,) * 3)(*args)

    sharding = NamedSharding(mesh, spec)
    shapes = [((batch, seq_len, heads, head_dim), dt), ((batch, seq_len, kv_heads, head_dim), dt),
              ((batch, seq_len, kv_heads, head_dim), dt), ((batch, seq_len), jnp.int32),
              ((batch, seq_len), jnp.int32)]
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
    return compile_with_kernels(jax.jit(step).lower(*args))

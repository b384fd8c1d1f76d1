"""What fills the device temporaries at their peak: XLA's buffer assignment, read back.

A compile asked to dump (``xla_dump_to``, passed per compile as a compiler option: see
:func:`dump_options`) leaves, for its optimized program, three text files this module reads:

* ``*after_optimizations-buffer-assignment.txt``: every allocation (size, memory space
  ``color``, kind) and the values placed in it (size, offset, shape);
* ``*after_optimizations-live-range.txt``: the flattened schedule (one position per
  instruction, while bodies included) and each value's live range ``start-end`` on it;
* ``*after_optimizations.txt``: the optimized HLO, whose ``op_name`` metadata carries the
  ``jax.named_scope`` names of the model (attn_norm, qkv, rope, attention, o_proj, mlp_norm,
  mlp, embed, layer, final_norm, lm_head, loss).

The device temporaries are the ``preallocated-temp`` allocations of memory space 0; for every
schedule position the bytes in use are the union of the ``[offset, offset + size)`` ranges of
the values live there (values that alias the same bytes count once). Their maximum is the
peak (:class:`Peak`); the values live at it, merged where they overlap, are its rows
(:class:`Buffer`). Allocations of another memory space (pinned host memory, ``color 5``:
remat offload's saved inputs on a GPU) are not device memory and are left out; their bytes
are reported apart (``host_bytes``). XLA's own "peak" in the live-range file counts
parameters and host buffers too, and is not used.

``temp_bytes``, the size of the device temporaries' allocation(s), is exactly
``compiled.memory_analysis().temp_size_in_bytes``; the peak in use is at most that, the
difference (``fragmentation``) being the holes XLA's heap leaves at the peak: a few KiB in the
XLA:GPU train steps we checked (<0.01 %), a few % on XLA:CPU.

Limits: XLA:GPU and XLA:CPU (jaxlib 0.10) write these files in the same format, so both
are read, but a CPU compile is only an estimate of a GPU one (other fusion, f32 copies of
bf16 weights, offloaded residuals kept in its one memory; :mod:`spmd_lora.analysis.plan`).
Values that the live-range file does not list are counted in ``unranged`` and not placed.
The files are XLA's debug output, not an API: where their format is not what this parser
knows (no allocations, no schedule, a value line it cannot read, rows that do not add up to
the peak) it raises :class:`~spmd_lora.errors.ConfigError` rather than report wrong numbers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import re
import tempfile

from ..errors import ConfigError

__all__ = ["Buffer", "Peak", "dump_options", "temp_dump", "maybe_dump", "find_dump", "read_peak",
           "compile_with_buffers", "format_peak", "short_scope", "op_names",
           "parse_buffer_assignment", "parse_live_range"]

_SUFFIX = "after_optimizations-buffer-assignment.txt"


def dump_options(dump_dir: str, module_re: str | None = None) -> dict:
    """Compiler options (``lowered.compile(options)``) that make one compile dump its
    optimized HLO, buffer assignment and live ranges into ``dump_dir``. jaxlib 0.10 takes
    them per compile, so no ``XLA_FLAGS`` (which XLA reads once per process) is needed."""
    opts = {"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True}
    if module_re:
        opts["xla_dump_hlo_module_re"] = module_re
    return opts


def temp_dump():
    """A temporary folder for one compile's dump (a context manager yielding its path)."""
    return tempfile.TemporaryDirectory(prefix="spmd_lora_buffers_")


# ----------------------------------------------------------------------------- parsing

_ALLOCATION = re.compile(r"allocation (\d+): size (\d+)(.*)$")
_VALUE = re.compile(r" value: <\d+ (\S+)(?: \(phi\))? @(\d+)> \(size=(\d+),offset=(\d+)\): (.*)$")


@dataclasses.dataclass(frozen=True)
class _Value:
    name: str          # instruction{shape index}, as the live-range file names it
    size: int
    offset: int
    shape: str


@dataclasses.dataclass(frozen=True)
class _Allocation:
    index: int
    size: int
    color: int
    temp: bool
    values: tuple


def parse_buffer_assignment(text: str) -> list:
    """The allocations of a ``*-buffer-assignment.txt`` dump, with their values."""
    allocs, cur = [], None
    for line in text.splitlines():
        m = _ALLOCATION.match(line)
        if m:
            rest = m.group(3)
            c = re.search(r"\bcolor (\d+)", rest)
            cur = [int(m.group(1)), int(m.group(2)), int(c.group(1)) if c else 0,
                   "preallocated-temp" in rest, []]
            allocs.append(cur)
            continue
        if cur is not None and line.startswith(" value:"):
            v = _VALUE.match(line)
            if v is None:
                raise ConfigError(f"buffer assignment dump: unexpected value line {line[:120]!r}")
            name, _, size, offset, shape = v.groups()
            cur[4].append(_Value(name if "{" in name else name + "{}", int(size), int(offset),
                                 shape))
    if not allocs:
        raise ConfigError("buffer assignment dump: no allocations found (has XLA's dump "
                          "format changed?)")
    return [_Allocation(i, s, c, t, tuple(vs)) for i, s, c, t, vs in allocs]


def parse_live_range(text: str) -> tuple[list, dict]:
    """(schedule: instruction names by position, {value name: (start, end)}) of a
    ``*-live-range.txt`` dump; ranges are inclusive."""
    schedule, ranges, section = [], {}, None
    for line in text.splitlines():
        s = line.strip()
        if s == "InstructionSequence:":
            section = "seq"
        elif s == "BufferLiveRange:":
            section = "ranges"
        elif line.startswith("  ") and not line.startswith("    "):
            section = None            # "Live ranges at N (peak):" and what follows
        elif section == "seq":
            pos, _, name = s.partition(":")
            if pos.isdigit():
                schedule.append(name)
        elif section == "ranges":
            m = re.match(r"(\S+):(\d+)-(\d+)$", s)
            if m:
                ranges[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    if not schedule or not ranges:
        raise ConfigError("live-range dump: no schedule or live ranges found (has XLA's dump "
                          "format changed?)")
    return schedule, ranges


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLED = re.compile(
    r"\b(?:body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-, %]+)\}?")


def op_names(hlo_text: str) -> dict:
    """{instruction: op_name} of an optimized HLO text. An instruction without metadata (a
    while body's parameter, a tuple) takes its computation's caller's op_name."""
    names, comp_of, caller = {}, {}, {}
    comp = None
    for line in hlo_text.splitlines():
        c = _COMPUTATION.match(line)
        if c and "=" not in line.split("{")[0]:
            comp = c.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        inst, rest = m.groups()
        op = re.search(r'op_name="([^"]*)"', rest)
        names[inst] = op.group(1) if op else ""
        comp_of[inst] = comp
        for called in _CALLED.finditer(rest):
            for callee in called.group(1).replace("%", "").split(","):
                caller.setdefault(callee.strip(), inst)
    for inst in names:
        seen, c = set(), comp_of.get(inst)
        while not names[inst] and c in caller and c not in seen:
            seen.add(c)
            names[inst] = names.get(caller[c], "")
            c = comp_of.get(caller[c])
    return names


# JAX's structural name-stack entries: not scopes of ours
_STRUCTURAL = {"while", "body", "cond", "closed_call", "checkpoint", "remat2", "remat",
               "rematted_computation", "pjit", "shard_map", "scan", "branch", "core_call",
               "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "pallas_call"}
_WRAPPER = re.compile(r"^(transpose|jvp|vmap|jit|pjit|remat|checkpoint)\((.*)\)$")


def short_scope(op_name: str) -> str:
    """The meaningful tail of an op_name: the pass (``fwd``, ``bwd``, ``remat`` = forward
    recomputed in the backward; none outside the gradient, e.g. the optimizer update), our
    named scopes and the primitive:
    ``jit(step)/while/body/closed_call/transpose(jvp())/.../checkpoint/layer/checkpoint/
    rematted_computation/mlp/dot_general`` -> ``remat layer/mlp/dot_general``."""
    if not op_name:
        return ""
    forward = backward = recompute = False
    kept = []
    parts = op_name.split("/")
    for i, part in enumerate(parts):
        inner = part
        while True:
            m = _WRAPPER.match(inner)
            if not m:
                break
            backward |= m.group(1) == "transpose"
            forward |= m.group(1) == "jvp"
            if m.group(1) == "jit":          # a function's name (jit(step)): not a scope
                inner = ""
                break
            inner = m.group(2)
        if part == "rematted_computation":
            recompute = True
        if not inner or inner in _STRUCTURAL or "->" in inner or inner.startswith("branch_"):
            continue
        kept.append(inner)
    where = ("remat" if recompute else "bwd") if backward else "fwd" if forward else ""
    return " ".join(x for x in (where, "/".join(kept)) if x)


# ----------------------------------------------------------------------------- the peak

@dataclasses.dataclass(frozen=True)
class Buffer:
    """Device bytes live at the peak: one value, or values overlapping in memory (aliases:
    a loop carry and its body's parameter, an in-place update and its operand) merged."""

    size: int                 # bytes (the union of the merged values' ranges)
    offset: int               # in its temporaries allocation
    shape: str                # dtype[dims] of the largest value, layout dropped
    live: tuple               # (first, last) schedule position (inclusive) of the merged values
    name: str                 # the largest value: instruction{shape index}
    op_name: str
    scope: str                # short_scope(op_name)
    aliases: tuple = ()       # the other merged values' names

    @property
    def instruction(self) -> str:
        return self.name.split("{")[0]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "live": list(self.live),
                "aliases": list(self.aliases)}


@dataclasses.dataclass(frozen=True)
class Peak:
    """The device temporaries' peak of one compiled program and the buffers live there
    (largest first)."""

    platform: str             # "gpu" or "cpu": whose compiler wrote the dump
    module: str               # the dump's file prefix
    peak_bytes: int           # device temporaries in use at the peak
    temp_bytes: int           # size of the device temporaries' allocation(s) (memory_analysis)
    position: int             # schedule position of the peak
    schedule_length: int
    instruction: str          # the instruction at the peak
    op_name: str
    scope: str
    buffers: tuple            # Buffer rows; they sum to peak_bytes
    host_bytes: int = 0       # temporaries in other memory spaces (pinned host), left out
    unranged: int = 0         # device temporary values the live-range file does not list

    @property
    def fragmentation(self) -> int:
        return self.temp_bytes - self.peak_bytes

    def top(self, n: int) -> tuple:
        return self.buffers[:n]

    def to_dict(self, top: int | None = None) -> dict:
        d = dataclasses.asdict(self)
        d["buffers"] = [b.to_dict() for b in (self.buffers if top is None else self.top(top))]
        d["buffers_listed"] = len(d["buffers"])
        d["buffers_live"] = len(self.buffers)
        return d


def find_dump(dump_dir: str, module: str | None = None) -> str:
    """The file prefix (without ``-buffer-assignment.txt``) of the program dumped into
    ``dump_dir`` whose module name contains ``module`` (e.g. ``jit_step``); the one program
    there when ``module`` is None."""
    found = sorted(glob.glob(os.path.join(glob.escape(dump_dir), "*" + _SUFFIX)))
    if module:
        found = [f for f in found if f".{module}." in os.path.basename(f)]
    if not found:
        raise ConfigError(f"no XLA buffer assignment dump (*{_SUFFIX})"
                          + (f" of module {module!r}" if module else "") + f" in {dump_dir}: "
                          f"compile with dump_options(dir) or XLA_FLAGS=--xla_dump_to=DIR")
    if len(found) > 1:
        names = ", ".join(os.path.basename(f).split(".")[1] for f in found)
        raise ConfigError(f"{len(found)} programs dumped in {dump_dir} ({names}): name one "
                          f"(module=...) or dump one compile per folder")
    return found[0][:-len("-buffer-assignment.txt")]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"XLA dump incomplete: no {os.path.basename(path)} next to the "
                          f"buffer assignment") from None


def _union(ranges) -> int:
    total, end = 0, -1
    for a, b in sorted(ranges):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _usage(values, ranges, length):
    """Bytes in use per schedule position (union of the live values' byte ranges)."""
    import numpy as np

    edges = sorted({v.offset for v in values} | {v.offset + v.size for v in values})
    index = {e: i for i, e in enumerate(edges)}
    widths = np.diff(np.asarray(edges, dtype=np.int64))
    starts, ends = {}, {}
    for v in values:
        a, b = ranges[v.name]
        starts.setdefault(a, []).append(v)
        ends.setdefault(b, []).append(v)
    count = np.zeros(len(widths), dtype=np.int32)
    usage = np.zeros(length + 1, dtype=np.int64)
    for t in range(length + 1):
        for v in starts.get(t, ()):
            count[index[v.offset]:index[v.offset + v.size]] += 1
        usage[t] = int(widths[count > 0].sum())
        for v in ends.get(t, ()):
            count[index[v.offset]:index[v.offset + v.size]] -= 1
    return usage


def _merge(live, ranges, names) -> list:
    """Buffer rows of the values live at the peak, merged where their byte ranges overlap."""
    groups, group, end = [], [], -1
    for v in sorted(live, key=lambda v: (v.offset, -v.size)):
        if group and v.offset >= end:
            groups.append(group)
            group, end = [], -1
        group.append(v)
        end = max(end, v.offset + v.size)
    if group:
        groups.append(group)
    rows = []
    for g in groups:
        # the largest value names the row; among equals one with an op_name, the earliest
        best = min(g, key=lambda v: (-v.size, not names.get(v.name.split("{")[0]),
                                     ranges[v.name][0]))
        op = names.get(best.name.split("{")[0], "")
        lo = min(v.offset for v in g)
        rows.append(Buffer(
            size=max(v.offset + v.size for v in g) - lo, offset=lo,
            shape=best.shape.split("{")[0], name=best.name, op_name=op, scope=short_scope(op),
            live=(min(ranges[v.name][0] for v in g), max(ranges[v.name][1] for v in g)),
            aliases=tuple(v.name for v in g if v is not best)))
    return rows


def read_peak(dump_dir: str, module: str | None = None) -> Peak:
    """The device temporaries' peak of the program dumped into ``dump_dir`` (see the
    module docstring) and the buffers live at it, largest first."""
    prefix = find_dump(dump_dir, module)
    allocs = parse_buffer_assignment(_read(prefix + "-buffer-assignment.txt"))
    schedule, ranges = parse_live_range(_read(prefix + "-live-range.txt"))
    names = op_names(_read(prefix + ".txt"))
    base = os.path.basename(prefix)
    platform = "gpu" if "gpu_after_optimizations" in base else (
        "cpu" if "cpu_after_optimizations" in base else "?")
    device = [a for a in allocs if a.temp and a.color == 0]
    host = sum(a.size for a in allocs if a.temp and a.color != 0)
    import numpy as np

    usage = np.zeros(len(schedule) + 1, dtype=np.int64)
    placed, unranged = [], 0
    for a in device:
        vals = [v for v in a.values if v.name in ranges]
        unranged += len(a.values) - len(vals)
        if vals:
            usage += _usage(vals, ranges, len(schedule))
        placed.append((a, vals))
    t = int(usage.argmax())
    rows = []
    for a, vals in placed:
        live = [v for v in vals if ranges[v.name][0] <= t <= ranges[v.name][1]]
        rows += _merge(live, ranges, names)
    rows.sort(key=lambda b: (-b.size, b.offset))
    inst = schedule[t] if t < len(schedule) else ""
    op = names.get(inst, "")
    peak = Peak(platform=platform, module=base, peak_bytes=int(usage[t]),
                temp_bytes=sum(a.size for a in device), position=t,
                schedule_length=len(schedule), instruction=inst, op_name=op,
                scope=short_scope(op), buffers=tuple(rows), host_bytes=host, unranged=unranged)
    if sum(b.size for b in rows) != peak.peak_bytes:      # the rows are the peak's partition
        raise ConfigError(f"buffer dump {base}: the buffers live at the peak sum to "
                          f"{sum(b.size for b in rows)} bytes, not the peak's {peak.peak_bytes}")
    return peak


def format_peak(d: dict) -> list:
    """Report lines of a :meth:`Peak.to_dict` (its listed rows, largest first): size in GiB,
    shape, live range, scope and instruction, then the listed rows' sum against the
    temporaries."""
    gib = 2 ** 30
    who = {"gpu": "XLA:GPU", "cpu": "XLA:CPU"}.get(d["platform"], "XLA")
    at = d["instruction"] + (f": {d['scope']}" if d["scope"] else "")
    lines = [f"device buffers live at the peak ({who} buffer assignment): "
             f"{d['peak_bytes'] / gib:.3f} GiB in use at step {d['position']} of "
             f"{d['schedule_length']} ({at})",
             f"  {'GiB':>8s}  {'shape':28s} {'live':>11s}  {'scope':44s} instruction"]
    for b in d["buffers"]:
        live = f"{b['live'][0]}-{b['live'][1]}"
        alias = f" (+{len(b['aliases'])} aliased)" if b["aliases"] else ""
        lines.append(f"  {b['size'] / gib:8.3f}  {b['shape'][:28]:28s} {live:>11s}  "
                     f"{(b['scope'] or '-')[:44]:44s} {b['name'].removesuffix('{}')}{alias}")
    listed = sum(b["size"] for b in d["buffers"])
    temp = d["temp_bytes"]
    lines.append(f"  the {d['buffers_listed']} largest of {d['buffers_live']} buffers live: "
                 f"{listed / gib:.3f} GiB of {temp / gib:.3f} GiB temporaries "
                 f"({100 * listed / max(temp, 1):.1f} %; in use at the peak "
                 f"{d['peak_bytes'] / gib:.3f} GiB, holes "
                 f"{(temp - d['peak_bytes']) / 2 ** 20:.1f} MiB)")
    if d.get("host_bytes"):
        lines.append(f"  pinned host temporaries, not counted: {d['host_bytes'] / gib:.3f} GiB")
    return lines


def compile_with_buffers(lowered, compiler_options: dict | None = None):
    """Compile ``lowered`` with a dump in a temporary folder. Returns (compiled, Peak)."""
    with temp_dump() as d:
        compiled = lowered.compile({**(compiler_options or {}), **dump_options(d)})
        return compiled, read_peak(d)


@contextlib.contextmanager
def maybe_dump(wanted: bool):
    """:func:`temp_dump` when ``wanted``, else None."""
    if not wanted:
        yield None
        return
    with temp_dump() as d:
        yield d

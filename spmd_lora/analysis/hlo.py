"""Collective census of a compiled XLA program (``compiled.as_text()``), and what it should be.

One module of ~870 lines, on purpose: its five sections (parsing, loops, replica groups ->
mesh axes, the census, the expectations derived from the projection table) share one
instruction model, and every census line is read against an expected count (callers and
tests use both through ``hlo``). Each section is headed by a ``# ---`` line.

``collective_census(compiled, mesh)`` lists every collective the program runs per call (one
training step): kind, the mesh axis it reduces/gathers over, result shape and bytes, where it
came from (jax name stack and the innermost ``spmd_lora`` source line) and how many times it
runs per step. Collectives inside ``while`` bodies (the layer ``lax.scan``, the chunked
cross-entropy scan, the gradient-accumulation scan) are multiplied by the loop trip count
(``known_trip_count`` in the while op's backend_config, else read off the loop condition);
nested loops multiply.

Counting conventions
--------------------
* An async pair (``all-reduce-start`` / ``all-reduce-done``, ``async-start`` wrapping a
  collective ...) counts once; its shape is the ``-done`` result.
* XLA's combiner merges independent all-reduces into one op with a tuple result, or (XLA:GPU)
  flattens and concatenates them into one buffer (``concatenated``: the arrays are read off
  the concatenation's inputs). ``count`` is the number of ops launched; ``operands`` is the
  number of arrays it reduces (the logical ``psum``s). ``megatron_minimum`` compares logical
  reductions, since combining is a backend-dependent scheduling choice.
* ``axis``: the mesh axes whose coordinate varies inside a replica group ('tp', 'dp',
  'dp+tp'); '(partial)' is appended when a group spans only part of those axes. Device ids in
  replica groups are partition ids, i.e. flat indices into ``mesh.devices`` (what ``jax.jit``
  uses as the device assignment for NamedSharding inputs on that mesh).
* ``bytes`` is the size of the result buffer on one device; ``wire_bytes`` estimates what one
  device sends with ring algorithms (all-reduce 2(n-1)/n * size, all-gather (n-1)/n * result,
  reduce-scatter (n-1) * result, all-to-all (n-1)/n * size, collective-permute size).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

import numpy as np

from ..config.projections import BLOCKS, projection_dims
from ..kernels import cp_bytes_per_device

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")

DTYPE_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16, "token": 0,
}

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s"
                    r"(?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$")
_COMP_HEADER = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_INIT_STEP = re.compile(r'"known_init_step"\s*:\s*\{\s*"init"\s*:\s*"(-?\d+)"\s*,\s*"step"\s*:\s*"(-?\d+)"')


# ----------------------------------------------------------------------------- parsing

@dataclasses.dataclass
class Instr:
    name: str
    op: str
    type: str
    rest: str          # operands and attributes (everything after "op(")
    computation: str

    def attr(self, key):
        """Value of ``key=...`` (balanced braces / quoted strings), or None."""
        return _attr(self.rest, key)


def _operand_names(instr: Instr) -> list[str]:
    """Names of an instruction's operands (``op(%a, %b), attrs`` or ``op(f32[4] %a, ...)``)."""
    head = instr.rest.split(")", 1)[0]
    return [tok.strip().split()[-1].lstrip("%") for tok in head.split(",") if tok.strip()]


def _attr(text, key):
    m = re.search(r"(?:^|[\s,(])" + re.escape(key) + r"=", text)
    if not m:
        return None
    i = m.end()
    if i < len(text) and text[i] == '"':
        j = i + 1
        while j < len(text) and text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        return text[i + 1:j]
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c in "{[(":
            depth += 1
        elif c in "}])":
            if depth == 0:
                break
            depth -= 1
        elif c == "," and depth == 0:
            break
        j += 1
    return text[i:j].strip()


@dataclasses.dataclass
class HloModule:
    computations: dict            # name -> list[Instr]
    entry: str
    stack_frames: dict            # frame id -> (file, line, function, parent id or 0)

    @property
    def instructions(self):
        return {i.name: i for c in self.computations.values() for i in c}


def parse_hlo(text: str) -> HloModule:
    """Split HLO text into computations of instructions, plus the source-location tables."""
    comps, entry, current = {}, None, None
    tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    table = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped in tables:
            table = tables[stripped]
            continue
        if table is not None:
            m = re.match(r"^(\d+)\s+(.*)$", stripped)
            if m:
                table[int(m.group(1))] = m.group(2)
                continue
            table = None
        if current is None:
            m = _COMP_HEADER.match(line)
            if m:
                current = m.group("name")
                comps[current] = []
                if m.group("entry"):
                    entry = current
            continue
        if stripped == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append(Instr(m.group("name"), m.group("op"), m.group("type"),
                                        m.group("rest"), current))
    if entry is None:
        raise ValueError("no ENTRY computation in HLO text")
    return HloModule(comps, entry, _stack_frames(tables))


def _stack_frames(tables):
    def field(s, key):
        m = re.search(key + r"=(\d+)", s)
        return int(m.group(1)) if m else 0

    files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    funcs = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    locs = {k: (files.get(field(v, "file_name_id"), "?"), field(v, "line"),
                funcs.get(field(v, "function_name_id"), "?"))
            for k, v in tables["FileLocations"].items()}
    frames = {}
    for k, v in tables["StackFrames"].items():
        # The printed parent id is (parent frame id + 1); 1 means "no parent".
        f, line, fn = locs.get(field(v, "file_location_id"), ("?", 0, "?"))
        frames[k] = (f, line, fn, max(field(v, "parent_frame_id") - 1, 0))
    return frames


def source_of(module: HloModule, frame_id: int | None, prefer=("spmd_lora/",)) -> str:
    """'model.py:123 row_linear' for the innermost frame in the package (else innermost)."""
    if not frame_id or frame_id not in module.stack_frames:
        return ""
    chain, seen, fid = [], set(), frame_id
    while fid and fid in module.stack_frames and fid not in seen:
        seen.add(fid)
        chain.append(module.stack_frames[fid])
        fid = module.stack_frames[fid][3]
    pick = next((c for c in chain if any(p in c[0] for p in prefer)
                 and not c[0].endswith(("/hlo.py",))), chain[0])
    return f"{pick[0].rsplit('/', 1)[-1]}:{pick[1]} {pick[2].rsplit('.', 1)[-1]}"


# ----------------------------------------------------------------------------- loops

def _trip_count(module: HloModule, instr: Instr):
    """Trip count of a while op, or None when unknown."""
    m = _TRIP.search(instr.rest)
    if m:
        return int(m.group(1))
    cond = instr.attr("condition")
    if not cond:
        return None
    cond = cond.lstrip("%")
    init, step = 0, 1
    m = _INIT_STEP.search(instr.rest)
    if m:
        init, step = int(m.group(1)), int(m.group(2))
    consts = {}
    for i in module.computations.get(cond, []):
        if i.op == "constant" and re.fullmatch(r"[su]\d+\[\]", i.type.strip()):
            consts[i.name] = int(re.match(r"\s*(-?\d+)", i.rest).group(1))
    for i in module.computations.get(cond, []):
        if i.op == "compare":
            direction = i.attr("direction")
            for pos, o in enumerate(_operand_names(i)):
                if o in consts and step > 0:
                    bound = consts[o]
                    if (direction, pos) in (("LT", 1), ("GT", 0)):
                        return max(math.ceil((bound - init) / step), 0)
                    if (direction, pos) in (("LE", 1), ("GE", 0)):
                        return max(math.floor((bound - init) / step) + 1, 0)
    return None


def _callees(instr: Instr):
    """(callee computation, factor kind) pairs this instruction executes."""
    out = []
    if instr.op == "while":
        for key, kind in (("body", "body"), ("condition", "cond")):
            v = instr.attr(key)
            if v:
                out.append((v.lstrip("%"), kind))
        return out
    if instr.op in ("async-update", "async-done") or instr.op.endswith("-done"):
        return out
    for key in ("to_apply", "calls", "true_computation", "false_computation"):
        v = instr.attr(key)
        if v:
            out.extend((c.strip().lstrip("%"), "call") for c in v.strip("{}").split(","))
    v = instr.attr("branch_computations")
    if v:
        out.extend((c.strip().lstrip("%"), "branch") for c in v.strip("{}").split(","))
    return out


def multiplicities(module: HloModule):
    """computation -> (times it runs per call of ENTRY, loop path), following the call graph.
    Unknown trip counts count as 1 and are reported in the loop path as '?'."""
    edges = collections.defaultdict(list)
    for cname, instrs in module.computations.items():
        for i in instrs:
            for callee, kind in _callees(i):
                if callee not in module.computations:
                    continue
                factor, label = 1, None
                if kind in ("body", "cond"):
                    n = _trip_count(module, i)
                    factor = 1 if n is None else (n if kind == "body" else n + 1)
                    label = f"{i.name}x{'?' if n is None else n}"
                edges[cname].append((callee, factor, label))
    mult = collections.Counter({module.entry: 1})
    loops = {module.entry: ()}
    # Kahn's algorithm over the (acyclic) call graph, restricted to what ENTRY reaches.
    reach, stack = set(), [module.entry]
    while stack:
        c = stack.pop()
        if c in reach:
            continue
        reach.add(c)
        stack.extend(e[0] for e in edges[c])
    indeg = collections.Counter()
    for c in reach:
        for callee, _, _ in edges[c]:
            indeg[callee] += 1
    ready = [module.entry]
    while ready:
        c = ready.pop()
        for callee, factor, label in edges[c]:
            mult[callee] += mult[c] * factor
            if callee not in loops or len(loops[c]) + (label is not None) > len(loops[callee]):
                loops[callee] = loops[c] + ((label,) if label else ())
            indeg[callee] -= 1
            if indeg[callee] == 0:
                ready.append(callee)
    return mult, loops


# ----------------------------------------------------------------------------- groups -> axes

_MESH_GROUPS = re.compile(r"mesh\[(?P<axes>[^\]]*)\]\s*\{(?P<sel>[^}]*)\}")
_MESH_AXIS = re.compile(r"'?(?P<name>[^'=,\s]+)'?\s*=\s*(?P<size>\d+)")
_MESH_SEL = re.compile(r"'?(?P<name>[^':,\s]+)'?(?::\((?P<pre>\d+)\)(?P<size>\d+))?")


def _mesh_axes_groups(m):
    """Groups of a mesh-axes replica-group list (jaxlib >= 0.12 prints
    ``mesh['dp'=4,'tp'=2] {'tp'}``): devices are the row-major (iota) partition ids of the
    named mesh; a group holds the devices that differ only along the selected axes. A selected
    sub-axis ``'x':(pre)size`` splits axis x (size n) into [pre, size, n / (pre * size)] and
    varies the middle part."""
    axes = [(a.group("name"), int(a.group("size"))) for a in _MESH_AXIS.finditer(m.group("axes"))]
    index = {name: i for i, (name, _) in enumerate(axes)}
    sel = {}
    for a in _MESH_SEL.finditer(m.group("sel")):
        if a.group("name") not in index:
            raise ValueError(f"replica groups name axis {a.group('name')!r} not in the mesh "
                             f"{[n for n, _ in axes]}")
        sel[a.group("name")] = (int(a.group("pre")), int(a.group("size"))) if a.group("pre") \
            else None
    dims, varied = [], []
    for name, size in axes:
        if name in sel and sel[name] is not None:
            pre, sub = sel[name]
            dims += [pre, sub, size // (pre * sub)]
            varied.append(len(dims) - 2)
        else:
            dims.append(size)
            if name in sel:
                varied.append(len(dims) - 1)
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    fixed = [d for d in range(len(dims)) if d not in varied]
    size = int(np.prod([dims[d] for d in varied] or [1]))
    return ids.transpose(fixed + varied).reshape(-1, size).tolist()


def _parse_groups(text):
    """replica_groups / source_target_pairs attribute -> list of lists of ints (None = all).

    Three syntaxes: explicit ``{{0,1},{2,3}}``; iota ``[2,2]<=[4]`` (optionally ``T(perm)``),
    both jaxlib 0.10; and mesh axes ``mesh['dp'=4,'tp'=2] {'tp'}`` (jaxlib 0.12)."""
    if text is None:
        return None
    text = text.strip()
    if text in ("{}", ""):
        return None
    m = _MESH_GROUPS.fullmatch(text)
    if m:
        return _mesh_axes_groups(m)
    m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if m:                                    # iota format: [groups,size]<=[dims]T(perm)
        shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    return [[int(x) for x in g.split(",") if x.strip()]
            for g in re.findall(r"\{([\d,\s]*)\}", text)]


def axis_of_groups(groups, mesh_shape: dict, pairs=False) -> str:
    """Mesh axes spanned by the device groups (ids = flat indices of the mesh's devices)."""
    names, sizes = list(mesh_shape), [mesh_shape[n] for n in mesh_shape]
    n_dev = int(np.prod(sizes))
    if groups is None:
        groups = [list(range(n_dev))]
    varied, partial = set(), False
    for g in groups:
        if not g or max(g) >= n_dev:
            return "?"
        coords = np.array(np.unravel_index(np.asarray(g), sizes)).T       # [len(g), axes]
        v = {names[a] for a in range(len(names)) if len(set(coords[:, a])) > 1}
        varied |= v
        if not pairs and len(g) != int(np.prod([mesh_shape[a] for a in v] or [1])):
            partial = True
    if not varied:
        return "self"
    return "+".join(n for n in names if n in varied) + (" (partial)" if partial else "")


# ----------------------------------------------------------------------------- census

def _arrays(type_str):
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_str)
            if dt in DTYPE_BYTES]


def _nbytes(arrays):
    return int(sum(DTYPE_BYTES[dt] * int(np.prod(shape)) for dt, shape in arrays))


_MLIR_TENSOR = re.compile(r"tensor<((?:\d+x)*)([a-z]+\d*)>")
_MLIR_TO_HLO = {"bf16": "bf16", "f16": "f16", "f32": "f32", "f64": "f64", "i1": "pred",
                "i8": "s8", "i16": "s16", "i32": "s32", "i64": "s64", "ui8": "u8", "ui32": "u32"}


def program_dtypes(lowered_text: str) -> dict:
    """shape tuple -> set of HLO dtypes of the collectives in the program as JAX emitted it
    (StableHLO, ``jax.jit(f).lower(...).as_text()``), before XLA's backend passes. XLA:CPU
    promotes bf16 all-reduces to f32; a GPU compile keeps them bf16."""
    out = collections.defaultdict(set)
    pat = re.compile(r'stablehlo\.(all_reduce|all_gather|reduce_scatter|all_to_all|collective_permute)\b')
    for m in pat.finditer(lowered_text):
        with_region = m.group(1) in ("all_reduce", "reduce_scatter")
        end = lowered_text.find("}) : (" if with_region else " : (", m.end())
        if end < 0:
            continue
        line_end = lowered_text.find("\n", end)
        sig = lowered_text[end:line_end if line_end > 0 else None].split("->")[-1]
        for dims, dt in _MLIR_TENSOR.findall(sig):
            out[tuple(int(d) for d in dims.split("x") if d)].add(_MLIR_TO_HLO.get(dt, dt))
    return dict(out)


def _program_arrays(arrays, prog):
    """Compiled (dtype, shape) -> the dtype the program asked for, when XLA widened it."""
    res = []
    for dt, shape in arrays:
        want = prog.get(shape) if prog else None
        if want and dt not in want and len(want) == 1:
            dt = next(iter(want))
        res.append((dt, shape))
    return res


def _phase(op_name: str) -> str:
    """forward / backward / remat (forward recomputed in the backward pass) / mixed / other."""
    kinds = set()
    for seg in op_name.split(":") if ":" in op_name else [op_name]:
        if "rematted_computation" in seg:
            kinds.add("remat")
        elif "transpose(" in seg:
            kinds.add("backward")
        elif "jvp(" in seg or "shard_map" in seg:
            kinds.add("forward")
        else:
            kinds.add("other")
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _wire_bytes(kind, nbytes, n):
    if n <= 1:
        return 0
    if kind == "all-reduce":
        return int(2 * (n - 1) / n * nbytes)
    if kind in ("all-gather", "all-to-all", "ragged-all-to-all"):
        return int((n - 1) / n * nbytes)
    if kind == "reduce-scatter":
        return int((n - 1) * nbytes)
    return int(nbytes)


def _mesh_shape(mesh):
    if isinstance(mesh, dict):
        return dict(mesh)
    return dict(zip(mesh.axis_names, mesh.devices.shape))


_PASS_THROUGH = ("bitcast", "reshape", "copy")


def _origin(producers: dict, name: str):
    """The instruction behind ``name``, looking through bitcasts, reshapes and copies."""
    seen = set()
    while name in producers and name not in seen:
        seen.add(name)
        instr = producers[name]
        if instr.op not in _PASS_THROUGH:
            return instr
        operands = _operand_names(instr)
        if not operands:
            return instr
        name = operands[0]
    return producers.get(name)


def _concatenated_operands(module: HloModule, producers: dict, instr: Instr):
    """XLA:GPU's all-reduce combiner may flatten several independent all-reduces and
    concatenate them into one buffer (a ``concatenate``, or a fusion that only concatenates,
    named ``wrapped_concatenate``). For such an all-reduce, the instructions whose results it
    reduces (looked through bitcasts); None otherwise."""
    if not instr.op.startswith("all-reduce"):
        return None
    names = _operand_names(instr)
    if len(names) != 1 or names[0] not in producers:
        return None
    producer = producers[names[0]]
    if producer.op == "fusion":
        body = module.computations.get((producer.attr("calls") or "").lstrip("%"), [])
        ops = {i.op for i in body}
        if "concatenate" not in ops or not ops <= {"parameter", "concatenate", *_PASS_THROUGH}:
            return None
    elif producer.op != "concatenate":
        return None
    origins = [_origin(producers, n) for n in _operand_names(producer)]
    if len(origins) < 2 or any(o is None or len(_arrays(o.type)) != 1 for o in origins):
        return None
    return origins


def _frame_and_name(instr: Instr):
    m = re.search(r"stack_frame_id=(\d+)", instr.rest)
    meta = instr.attr("metadata") or ""
    n = re.search(r'op_name="([^"]*)"', meta)
    return (int(m.group(1)) if m else None), (n.group(1) if n else "")


def collective_census(compiled, mesh, lowered=None) -> list[dict]:
    """Every collective in the compiled program, one dict per HLO op:

    kind, axis, group_size, shapes (list of 'dtype[dims]'), operands, dtype, bytes (result, one
    device), wire_bytes, per_call (times per execution of the loop nest it is in), count (per
    step = product of enclosing trip counts), loops (enclosing while ops 'namexN', outer first),
    phase, op_name, source, name, computation, and for all-gathers and reduce-scatters the
    ``dimension`` they gather or scatter along.

    ``compiled``: a ``jax.stages.Compiled`` (anything with ``as_text()``) or HLO text.
    ``mesh``: a ``jax.sharding.Mesh`` or a dict axis -> size in mesh order.
    ``lowered``: optionally the ``jax.stages.Lowered`` (or its text) the program came from; then
    ``program_shapes`` / ``program_bytes`` give the dtypes JAX asked for (XLA:CPU promotes bf16
    all-reduces to f32: ``bytes`` is what the CPU executable moves, ``program_bytes`` what a
    backend with native bf16 collectives, i.e. a GPU, moves). Without it both are equal.
    """
    prog = None
    if lowered is not None:
        prog = program_dtypes(lowered if isinstance(lowered, str) else lowered.as_text())
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    module = parse_hlo(text)
    mesh_shape = _mesh_shape(mesh)
    mult, loops = multiplicities(module)
    producers = module.instructions
    done_type = {}
    for instrs in module.computations.values():
        for i in instrs:
            if i.op.endswith("-done"):
                done_type[_operand_names(i)[0]] = i.type
    rows = []
    for cname, instrs in module.computations.items():
        if mult.get(cname, 0) == 0:
            continue
        for i in instrs:
            kind = i.op[:-len("-start")] if i.op.endswith("-start") else i.op
            if kind not in COLLECTIVES:
                continue
            type_str = done_type.get(i.name, i.type) if i.op.endswith("-start") else i.type
            arrays = _arrays(type_str)
            frame, op_name_s = _frame_and_name(i)
            bundled = _concatenated_operands(module, producers, i)
            if bundled:     # one op reducing several flattened, concatenated arrays
                arrays = [_arrays(o.type)[0] for o in bundled]
                if frame is None:
                    frame, op_name_s = next((fn for fn in map(_frame_and_name, bundled)
                                             if fn[0] is not None), (None, op_name_s))
            pairs = kind == "collective-permute"
            groups = _parse_groups(i.attr("source_target_pairs") if pairs else i.attr("replica_groups"))
            axis = axis_of_groups(groups, mesh_shape, pairs=pairs)
            n_dev = int(np.prod(list(mesh_shape.values())))
            size = n_dev if groups is None else (2 if pairs else len(groups[0]))
            nbytes = _nbytes(arrays)
            parrays = _program_arrays(arrays, prog)
            source = source_of(module, frame) if frame is not None else ""
            dims = re.findall(r"\d+", i.attr("dimensions") or "")
            rows.append({
                "kind": kind, "axis": axis, "group_size": size,
                "shapes": [f"{dt}[{','.join(map(str, s))}]" for dt, s in arrays],
                "operands": len(arrays), "dtype": ",".join(sorted({dt for dt, _ in arrays})),
                "bytes": nbytes, "wire_bytes": _wire_bytes(kind, nbytes, size),
                "program_shapes": [f"{dt}[{','.join(map(str, s))}]" for dt, s in parrays],
                "program_bytes": _nbytes(parrays),
                "program_wire_bytes": _wire_bytes(kind, _nbytes(parrays), size),
                "count": int(mult[cname]), "loops": list(loops.get(cname, ())),
                "phase": _phase(op_name_s), "op_name": op_name_s, "source": source,
                "name": i.name, "computation": cname, "concatenated": bool(bundled),
                **({"dimension": int(dims[0])} if dims and kind in ("all-gather", "reduce-scatter")
                   else {}),
            })
    return rows


def summarize(census: list[dict]) -> list[dict]:
    """Per (kind, axis): ops per step, logical reductions (operands) per step, bytes and wire
    bytes per step (as compiled, and in the program's dtypes)."""
    acc = {}
    for r in census:
        k = (r["kind"], r["axis"])
        a = acc.setdefault(k, {"kind": r["kind"], "axis": r["axis"], "ops": 0, "operands": 0,
                               "bytes": 0, "wire_bytes": 0, "program_bytes": 0,
                               "program_wire_bytes": 0})
        a["ops"] += r["count"]
        a["operands"] += r["count"] * r["operands"]
        a["bytes"] += r["count"] * r["bytes"]
        a["wire_bytes"] += r["count"] * r["wire_bytes"]
        a["program_bytes"] += r["count"] * r.get("program_bytes", r["bytes"])
        a["program_wire_bytes"] += r["count"] * r.get("program_wire_bytes", r["wire_bytes"])
    return sorted(acc.values(), key=lambda a: (a["kind"], a["axis"]))


# ----------------------------------------------------------------------------- expectations

def operand_role(shape, lora_rank: int | None) -> str:
    """'scalar', 'lora_grad' (a LoRA gradient: A [L, in, r] / B [L, r, out] stacked over layers,
    or one layer's [in, r] / [r, out]) or 'activation' (everything else: [B, S, D] inside
    layers, [N] / [N, D] in the cross-entropy). Shape-based, so pick test dimensions that
    differ from r."""
    if len(shape) == 0:
        return "scalar"
    if lora_rank and len(shape) in (2, 3) and lora_rank in shape[-2:]:
        return "lora_grad"
    return "activation"


def expected_collectives(cfg, tp: int, dp: int = 1, *, sequence_parallel: bool = False,
                         lora=None, remat: str = "full", micro_batches: int = 1,
                         mlp_tiles: int = 1, ce_chunks: int = 1, tokens: int | None = None,
                         padded_tokens: int | None = None, dtype_bytes: int = 2) -> dict:
    """Collectives over tp per step that our train step emits, and the Megatron(-SP) minimum.
    Counted per array (logical collective; XLA's combiner may merge several into one op, see
    the module docstring). Checked against the compiled HLO of tiny models by
    tests/test_tools.py (both layouts; remat none/full/save-dots/offload; tiles).

    The layer's collectives come from THE projection table (config/projections.py): each block
    (``BLOCKS``: attention, mlp) reads its input in its column-parallel projections and ends
    with its row-parallel one, whose partial sums are reduced over tp. Per block, layer and
    micro-batch, with k tiles of the block (``mlp_tiles`` n tiles both blocks, in either
    layout), each of an activation [B, S, D] / k:

    * replicated layout (Megatron TP): forward k all-reduces after the row projection,
      backward k (the block's input gradient; Megatron's f);
    * sequence-parallel layout (Megatron-SP): forward k all-gathers before the column
      projections and k reduce-scatters after the row one, backward the same (transposed).

    Remat (the layer's forward again in its backward) adds, per block: the reduction again,
    except for the last block's, which feeds only the carried residual (for remat full /
    save-dots / offload-input; none and offload, which keeps each block's input on the host,
    re-reduce nothing); and under SP the gathers again (remat != none), or, tiled, each tile's
    own re-gather (checkpointed tiles, always) plus one more for the non-last blocks under full
    and the offload policies (save-dots keeps the q/k/v products). offload-input recomputes
    the non-last blocks once more (the MLP's input from the offloaded layer input, then the
    block in its own backward): one more gather of their input under SP. Outside the layers: the embedding's rows
    (all-reduce; SP: reduce-scatter, per tile), and per cross-entropy chunk (C = ``ce_chunks``)
    3 [N] all-reduces (max, sum-exp, target logit) plus the [N, D] input gradient (an
    all-reduce; SP: the chunk all-gathered once and its gradient reduce-scattered). The
    Megatron(-SP) minimum is the same count untiled (n = 1).

    In bytes on a ring (all-reduce = 2 (tp-1)/tp of the array, all-gather and reduce-scatter
    (tp-1)/tp each), a layer of the SP step moves 11/10 of the replicated step's bytes under
    remat full (the re-scatter of the recompute), the same bytes under none, and under offload
    more (the replicated recompute needs no all-reduce, SP's still re-gathers the block inputs).

    LoRA weight gradients are accumulated per device over all micro-batches and all-reduced
    ONCE per step over the whole mesh: ``lora_grad_bytes_minimum`` (fp32 LoRA size when
    tp*dp > 1). Over **dp** also the loss sum and token count (2 scalars) per step.

    ``tokens``: local tokens per micro-batch (B_local * S) and ``padded_tokens`` (B_local *
    S_pad, default ``tokens``) for byte estimates with ``dtype_bytes`` per activation element.
    Returned keys: ``counts`` {(kind, term): arrays per step}, ``megatron`` (the same for the
    minimum), totals per kind (``all_reduce``, ``all_gather``, ``reduce_scatter``),
    ``tp_activation_reductions`` (activation all-reduces, the replicated layout's census number),
    ``megatron_tp``, ``extra_tp``, and with ``tokens`` the bytes and ring wire bytes.
    """
    L, A, C = cfg.num_layers, micro_batches, ce_chunks
    sp = sequence_parallel and tp > 1
    targets = tuple(lora.targets) if lora is not None else ()
    r = lora.rank if lora is not None else 0
    AR, AG, RS = "all-reduce", "all-gather", "reduce-scatter"
    rematted = remat != "none"
    # the recompute re-runs the reductions; a tiled recompute re-gathers q/k/v
    re_reduce = remat in ("full", "save-dots", "offload-input")
    re_gather = remat in ("full", "offload", "offload-input")
    # offload-input runs the non-last blocks' forward once more (the MLP's input from the
    # offloaded layer input), each with its own gathers
    once_more = remat == "offload-input"
    # Bytes of one op's RESULT on one device, from the local token counts (0 without tokens).
    tok = tokens or 0
    full = padded_tokens or tok                      # S_pad-based token count under SP
    whole = (full if sp else tok) * cfg.hidden_size * dtype_bytes     # one [B, S, D]
    stats = (full if sp else tok) / C * 4            # one chunk's [N] f32 softmax statistic
    chunk = whole / C                                # one CE chunk's [N, D]

    def entries(n):
        """(kind, term, count per micro-batch, result bytes) with n MLP tiles."""
        if tp == 1:
            return []
        out = []
        for i, block in enumerate(BLOCKS):
            k = n                                    # tiles of this block: both are tiled
            act, not_last = whole / k, i < len(BLOCKS) - 1
            if not sp:
                out += [(AR, "forward", k * L, act), (AR, "backward", k * L, act),
                        (AR, "remat", re_reduce * not_last * k * L, act)]
                continue
            regather = (rematted if k == 1 else 1 + re_gather * not_last) + once_more * not_last
            out += [(AG, "forward", k * L, act), (RS, "forward", k * L, act / tp),
                    (AG, "remat", regather * k * L, act),
                    (RS, "remat", re_reduce * not_last * k * L, act / tp),
                    (AG, "backward", k * L, act), (RS, "backward", k * L, act / tp)]
        if sp:
            return out + [(RS, "embedding", n, whole / n / tp), (AG, "ce_forward", C, chunk),
                          (RS, "ce_backward", C, chunk / tp), (AR, "ce_forward", 3 * C, stats)]
        return out + [(AR, "embedding", 1, whole), (AR, "ce_forward", 3 * C, stats),
                      (AR, "ce_backward", C, chunk)]

    ours, mega = entries(mlp_tiles), entries(1)

    def counts(entries):
        out = {}
        for kind, term, v, _ in entries:
            out[(kind, term)] = out.get((kind, term), 0) + v * A
        return out

    def total(entries, kind):
        return sum(v for k, _, v, _ in entries if k == kind) * A

    def nbytes(entries):
        """(result bytes, ring wire bytes sent per device) per step."""
        frac = (tp - 1) / tp if tp > 1 else 0.0
        res = wire = 0.0
        for kind, _, v, b in entries:
            res += v * A * b
            if kind == "all-reduce":
                wire += v * A * 2 * frac * b
            elif kind == "all-gather":
                wire += v * A * frac * b
            else:                                    # reduce-scatter: (tp-1) x its result
                wire += v * A * (tp - 1) * b
        return int(res), int(wire)

    out = {
        "layout": "sequence-parallel" if sp else "replicated",
        "counts": counts(ours), "megatron": counts(mega),
        "all_reduce": total(ours, "all-reduce"), "all_gather": total(ours, "all-gather"),
        "reduce_scatter": total(ours, "reduce-scatter"),
        "tp_activation_reductions": total(ours, "all-reduce"),
        "megatron_tp": total(mega, "all-reduce"),
        "extra_tp": total(ours, "all-reduce") - total(mega, "all-reduce"),
        "lora_grad_bytes_minimum": (4 * r * L * sum(sum(projection_dims(cfg, t)) for t in targets)
                                    if (tp > 1 or dp > 1) else 0),
        "dp_scalars": 2 if dp > 1 else 0,
    }
    if tokens:
        out["tp_bytes"], out["tp_wire_bytes"] = nbytes(ours)
        out["megatron_tp_bytes"], out["megatron_tp_wire_bytes"] = nbytes(mega)
    return out


def _merges_index_resends() -> bool:
    """Whether this jaxlib's XLA merges repeated index sends outside a ring loop (CSE): 0.10
    does, 0.12 does not (measured on the census of tiny models, offload-input at cp = 2)."""
    import jaxlib
    return tuple(int(x) for x in jaxlib.__version__.split(".")[:2]) < (0, 12)


def expected_cp_collectives(cfg, tp: int, cp: int, *, cp_impl: str = "ring",
                            segments: bool = False, remat: str = "full", micro_batches: int = 1,
                            local_batch: int = 1, seq_len: int = 0, dtype_bytes: int = 2) -> dict:
    """Collectives over the ``cp`` axis per train step, as compiled: only ring attention's, one
    call per layer and micro-batch, counted in arrays (the census ``operands``).

    Per call, ``spmd_lora.kernels.ring_attention`` asks for (m arrays per K/V block: k, v and
    k_index, + segment ids when packed; the index arrays are int32, one per token):

    * ring: forward (cp-1) m permutes; backward (cp-1) m (K/V again) + 2 cp (dK, dV: fp32);
    * allgather: forward m all-gathers; backward 2 reduce-scatters (dK, dV).

    A rematerialised layer (t = 1 for remat full | save-dots | offload | offload-input) runs
    the forward's again in the backward pass; offload-input once more (e = 1: the attention
    forward that rebuilds the MLP's input). XLA then removes some repeats, and the counts below
    are what the compiled step keeps (checked against the census of tiny models, with every
    layer offloaded: a partial ``offload_layers`` splits the layer scan, and XLA may merge a
    few index sends more):

    * the index and segment-id blocks are the same in every layer, so the *forward's* sends of
      them are hoisted out of the layer scan: (cp-1)(m-2) per micro-batch for ring, (m-2)
      all-gathers for allgather, instead of per layer (not under the offload policies, whose
      half-layer checkpoints keep them in the layer: h = 0 below, else 1);
    * at cp = 2 the ring's single step has no loop, and its backward resend of K/V and indices
      is the same op as the recompute's (t = 1) or, for the indices, the hoisted forward's
      (t = 0): merged (CSE).

    =========================  ====================================  =========================
    per layer, micro-batch     ring                                  allgather
    =========================  ====================================  =========================
    K/V arrays (k, v)          2(cp-1) (1 + t + e) + 2(cp-1) r       AG 2 (1 + t + e), RS 2
                               + 2 cp
    index arrays (m-2)         (m-2)(cp-1) (t + e' + r' + 1 - h)     AG (m-2) (t + e' + 1 - h)
    per micro-batch            (m-2)(cp-1) h                         AG (m-2) h
    =========================  ====================================  =========================

    with r = 0 when cp = 2 and t = 1 (else 1) and r' = 0 when cp = 2 (else 1); e' = e, except
    that the XLA of jaxlib < 0.12 merges the extra forward's index sends with the recompute's
    where there is no ring loop (allgather, and ring at cp = 2): e' = 0 there. Nothing else
    crosses cp but the step's one LoRA-gradient all-reduce over the whole mesh and the loss /
    token-count scalars: no weight collective, no all-gather of full-S K/V for ``ring``.

    ``seq_len``: the global padded S (a multiple of 2*cp*tp); with it, ``wire_bytes`` is what
    one device sends over cp per step (K/V in ``dtype_bytes``, dK/dV of ring in fp32, of
    allgather in ``dtype_bytes``; indices int32). ``logical_wire_bytes`` is the same without
    XLA's merges (``cp_bytes_per_device`` per call)."""
    out = {"permute_operands": 0, "all_gather_operands": 0, "reduce_scatter_operands": 0,
           "wire_bytes": 0, "logical_wire_bytes": 0}
    if cp == 1:
        return out
    L, A = cfg.num_layers, micro_batches
    k = 2 if segments else 1                        # index arrays per K/V block
    t = 0 if remat == "none" else 1
    e = 1 if remat == "offload-input" else 0        # the attention forward once more
    # its index sends, where XLA merges them with the recompute's (jaxlib < 0.12, below)
    e_idx = 0 if e and _merges_index_resends() else e
    h = 0 if remat in ("offload", "offload-input") else 1   # forward index sends hoisted
    local = local_batch * (seq_len // cp)           # tokens of one K/V block
    kv = local * cfg.kv_heads_per_device(tp) * cfg.head_dim     # elements of k (or v)
    if cp_impl == "ring":
        r = 0 if (cp == 2 and t) else 1
        r_idx = 0 if cp == 2 else 1
        kv_fwd = 2 * (cp - 1) * (1 + t + e) + 2 * (cp - 1) * r      # K/V sends per layer
        kv_grad = 2 * cp                                            # dK/dV sends per layer
        idx_layer = k * (cp - 1) * (t + (e if r_idx else e_idx) + r_idx + 1 - h)
        idx_micro = k * (cp - 1) * h
        out["permute_operands"] = A * (L * (kv_fwd + kv_grad + idx_layer) + idx_micro)
        sent = A * (L * (kv_fwd * kv * dtype_bytes + kv_grad * kv * 4 + idx_layer * local * 4)
                    + idx_micro * local * 4)
    else:
        ag_layer, idx_layer, idx_micro = 2 * (1 + t + e), k * (t + e_idx + 1 - h), k * h
        out["all_gather_operands"] = A * (L * (ag_layer + idx_layer) + idx_micro)
        out["reduce_scatter_operands"] = A * L * 2
        # an all-gather sends (cp-1) local pieces, a reduce-scatter (cp-1) local results
        gathered = L * (ag_layer * kv * dtype_bytes + idx_layer * local * 4) + idx_micro * local * 4
        sent = A * (cp - 1) * (gathered + L * 2 * kv * dtype_bytes)
    if seq_len:
        kw = dict(batch=local_batch, seq_len=seq_len, cp=cp,
                  kv_heads=cfg.kv_heads_per_device(tp), head_dim=cfg.head_dim,
                  kv_itemsize=dtype_bytes, segments=segments)
        out["wire_bytes"] = int(sent)
        out["logical_wire_bytes"] = A * L * (cp_bytes_per_device(cp_impl, **kw)
                                             + (t + e) * cp_bytes_per_device(
                                                 cp_impl, backward=False, **kw))
    return out


def measured(census: list[dict], lora_rank: int | None) -> dict:
    """Per-step logical collectives by role from a census (bytes in the program's dtypes,
    ``program_shapes``): tp activation all-reduces (all, and those outside the cross-entropy,
    i.e. in the layers and the embedding), tp all-gathers and reduce-scatters (arrays, result
    bytes), ring wire bytes over tp, LoRA gradient reductions (any axis), dp scalars, ops
    that are neither all-reduce, all-gather nor reduce-scatter, and over cp: permutes,
    all-gathers, reduce-scatters (arrays) and their wire bytes, and ``cp_other_ops``: anything
    else touching cp but the LoRA-gradient and scalar all-reduces (0: no weight collective). Layer (and embedding)
    activations are [B, S, D]; the cross-entropy's are flattened token rows ([N] statistics,
    [N, D] gradients), which tells them apart also inside ops XLA combined with others."""
    out = {"tp_activation_reductions": 0, "tp_activation_bytes": 0,
           "tp_layer_activation_reductions": 0, "tp_all_gathers": 0, "tp_all_gather_bytes": 0,
           "tp_reduce_scatters": 0, "tp_reduce_scatter_bytes": 0, "tp_wire_bytes": 0,
           "lora_grad_reductions": 0, "lora_grad_bytes": 0, "dp_lora_grad_reductions": 0,
           "dp_scalars": 0, "non_all_reduce_ops": 0, "other_ops": 0, "ops": 0,
           "cp_permute_operands": 0, "cp_all_gather_operands": 0,
           "cp_reduce_scatter_operands": 0, "cp_wire_bytes": 0, "cp_other_ops": 0}
    for r in census:
        if r["axis"] == "self":
            continue
        out["ops"] += r["count"]
        if r["axis"] == "cp" and r["kind"] in ("collective-permute", "all-gather",
                                                "reduce-scatter"):
            key = {"collective-permute": "permute", "all-gather": "all_gather",
                   "reduce-scatter": "reduce_scatter"}[r["kind"]]
            out[f"cp_{key}_operands"] += r["count"] * r["operands"]
            out["cp_wire_bytes"] += r["count"] * r.get("program_wire_bytes", r["wire_bytes"])
            out["non_all_reduce_ops"] += r["count"]
            continue
        if "cp" in r["axis"] and not (r["kind"] == "all-reduce" and all(
                operand_role(_shape(sh), lora_rank) in ("lora_grad", "scalar")
                for sh in r["shapes"])):
            out["cp_other_ops"] += r["count"]
        if r["kind"] != "all-reduce":
            out["non_all_reduce_ops"] += r["count"]
        if r["kind"] not in ("all-reduce", "all-gather", "reduce-scatter"):
            out["other_ops"] += r["count"]
            continue
        for sh in r.get("program_shapes", r["shapes"]):
            dt, dims = sh.split("[")
            shape = tuple(int(d) for d in dims.rstrip("]").split(",") if d)
            nbytes = DTYPE_BYTES[dt] * int(np.prod(shape))
            wire = r["count"] * _wire_bytes(r["kind"], nbytes, r["group_size"])
            if r["kind"] != "all-reduce":
                if r["axis"] == "tp":
                    out["tp_wire_bytes"] += wire
                    key = "all_gathers" if r["kind"] == "all-gather" else "reduce_scatters"
                    out[f"tp_{key}"] += r["count"]
                    out[f"tp_{key[:-1]}_bytes"] += r["count"] * nbytes
                continue
            role = operand_role(shape, lora_rank)
            if role == "lora_grad":
                out["lora_grad_reductions"] += r["count"]
                out["lora_grad_bytes"] += r["count"] * nbytes
                if "dp" in r["axis"]:
                    out["dp_lora_grad_reductions"] += r["count"]
            elif role == "scalar":
                if "dp" in r["axis"]:
                    out["dp_scalars"] += r["count"]
            elif r["axis"] == "tp":
                out["tp_activation_reductions"] += r["count"]
                out["tp_activation_bytes"] += r["count"] * nbytes
                out["tp_wire_bytes"] += wire
                if len(shape) == 3:        # [B, S, D]: layers and embedding ([N..] in the CE)
                    out["tp_layer_activation_reductions"] += r["count"]
    return out


def _shape(text: str) -> tuple:
    """'f32[2,3]' -> (2, 3)."""
    return tuple(int(d) for d in text.split("[")[1].rstrip("]").split(",") if d)


def census_to_json(census, path, **extra):
    with open(path, "w") as f:
        json.dump({"census": census, "summary": summarize(census), **extra}, f, indent=1)

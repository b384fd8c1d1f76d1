"""Collective census of a compiled XLA program (``compiled.as_text()``).

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
* XLA's combiner merges independent all-reduces into one op with a tuple result. ``count`` is
  the number of ops launched; ``operands`` is the number of arrays it reduces (the logical
  ``psum``s). ``megatron_minimum`` compares logical reductions, since combining is a
  backend-dependent scheduling choice.
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


def source_of(module: HloModule, frame_id: int | None, prefer=("spmd_lora/", "kernels/")) -> str:
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
            operands = [o.strip().lstrip("%") for o in i.rest.split(")", 1)[0].split(",")]
            for pos, o in enumerate(operands):
                o = o.split()[-1].lstrip("%") if o else o
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


def collective_census(compiled, mesh, lowered=None) -> list[dict]:
    """Every collective in the compiled program, one dict per HLO op:

    kind, axis, group_size, shapes (list of 'dtype[dims]'), operands, dtype, bytes (result, one
    device), wire_bytes, per_call (times per execution of the loop nest it is in), count (per
    step = product of enclosing trip counts), loops (enclosing while ops 'namexN', outer first),
    phase, op_name, source, name, computation.

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
    done_type = {}
    for instrs in module.computations.values():
        for i in instrs:
            if i.op.endswith("-done"):
                src = i.rest.split(")", 1)[0].split(",")[0].strip().split()[-1].lstrip("%")
                done_type[src] = i.type
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
            pairs = kind == "collective-permute"
            groups = _parse_groups(i.attr("source_target_pairs") if pairs else i.attr("replica_groups"))
            axis = axis_of_groups(groups, mesh_shape, pairs=pairs)
            n_dev = int(np.prod(list(mesh_shape.values())))
            size = n_dev if groups is None else (2 if pairs else len(groups[0]))
            nbytes = _nbytes(arrays)
            parrays = _program_arrays(arrays, prog)
            op_name = i.attr("metadata") or ""
            m = re.search(r'op_name="([^"]*)"', op_name)
            op_name_s = m.group(1) if m else ""
            m = re.search(r"stack_frame_id=(\d+)", i.rest)
            source = source_of(module, int(m.group(1))) if m else ""
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
                "name": i.name, "computation": cname,
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

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


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


def megatron_minimum(cfg, tp: int, dp: int = 1, *, lora=None, remat: str = "full",
                     micro_batches: int = 1, ce_chunks: int = 1, tokens: int | None = None,
                     dtype_bytes: int = 2) -> dict:
    """Logical all-reduces of activations over tp per step: what our code emits and the
    Megatron minimum, with the terms explained. Counted per array reduced (XLA's combiner may
    merge several into one op; see the module docstring). Checked against the compiled HLO of
    tiny models by tests/test_tools.py (remat none/full/save-dots, LoRA targets, tp, dp).

    Per micro-batch, over **tp** (L layers, C cross-entropy chunks):

    ============================  ==========  =========  ====================================
    term                          ours        Megatron   what
    ============================  ==========  =========  ====================================
    forward, per layer            2 L         2 L        [B,S,D] psum after o_proj, down_proj
                                                         (LoRA's rank-r term of a row layer is
                                                         folded into that psum)
    remat, per layer              1 L / 0     same       remat full|save-dots recompute the
                                                         o_proj psum inside the backward scan
                                                         (the down_proj psum only feeds the
                                                         residual the scan carries); none: 0
    backward, per layer           2 L         2 L        [B,S,D] psum of the input gradient of
                                                         the attention and MLP blocks: the
                                                         normed input is pcast to tp-varying
                                                         once per block, so the q/k/v (and
                                                         gate/up) input gradients are summed
                                                         locally first (Megatron's f operator)
    embedding                     1           1          psum of the looked-up rows (frozen
                                                         table: no backward collective)
    cross-entropy fwd, per chunk  3 C         3 C        pmax, psum of sum-exp, psum of the
                                                         target logit ([N] each)
    cross-entropy bwd, per chunk  1 C (+2 C)  1 C        [N,D] psum of dL/dh (column-parallel
                                                         LM head); with C > 1 the checkpointed
                                                         chunk recomputes pmax and sum-exp (2C)
    ============================  ==========  =========  ====================================

    Without the per-block ``pcast`` JAX transposes each implicit ``pvary`` of the replicated
    layer input separately (one psum per use): 5 L backward plus one [B,S,r] psum per
    LoRA-targeted column projection.

    LoRA weight gradients are accumulated per device over all micro-batches (the step takes
    them w.r.t. a (dp, tp)-varying copy of the factors, so the backward emits no LoRA
    collective) and all-reduced ONCE per step over the whole mesh after the accumulation scan:
    ``lora_grad_bytes_minimum`` (fp32 LoRA size when tp*dp > 1). Over **dp** also the loss sum
    and token count (2 scalars) per step.

    ``tokens``: local tokens per micro-batch (B_local * S) to also return byte estimates with
    ``dtype_bytes`` per activation element.
    """
    L, A, C = cfg.num_layers, micro_batches, ce_chunks
    targets = tuple(lora.targets) if lora is not None else ()
    r = lora.rank if lora is not None else 0
    remat_l = 0 if remat == "none" else 1
    ours, mega = {}, {}
    if tp > 1:
        ours = {"forward": 2 * L, "remat": remat_l * L, "backward": 2 * L,
                "embedding": 1, "ce_forward": 3 * C, "ce_backward": C + (2 * C if C > 1 else 0)}
        mega = dict(ours)
    ours = {k: v * A for k, v in ours.items()}
    mega = {k: v * A for k, v in mega.items()}
    out = {
        "ours": ours, "megatron": mega,
        "tp_activation_reductions": sum(ours.values()),
        "megatron_tp": sum(mega.values()),
        "extra_tp": sum(ours.values()) - sum(mega.values()),
        "lora_grad_bytes_minimum": (4 * r * L * sum(sum(_proj_dims(cfg, t)) for t in targets)
                                    if (tp > 1 or dp > 1) else 0),
        "dp_scalars": 2 if dp > 1 else 0,
    }
    if tokens:
        D = cfg.hidden_size
        n_chunk = math.ceil(tokens / C)

        def nbytes(t):
            layer = (t["forward"] + t["remat"] + t["backward"]) * tokens * D * dtype_bytes
            emb = t["embedding"] * tokens * D * dtype_bytes
            ce = (t["ce_forward"] + t["ce_backward"] - A * C) * n_chunk * 4 + A * C * n_chunk * D * dtype_bytes
            return int(layer + emb + ce)
        out["tp_bytes"] = nbytes(ours) if ours else 0
        out["megatron_tp_bytes"] = nbytes(mega) if mega else 0
    return out


def _proj_dims(cfg, name):
    from .lora import projection_dims
    return projection_dims(cfg, name)


def measured(census: list[dict], lora_rank: int | None) -> dict:
    """Per-step logical reductions by role from a census: tp activation reductions, LoRA
    gradient reductions (any axis), dp scalars, and anything that is not an all-reduce. Bytes
    are in the program's dtypes (``program_shapes``)."""
    out = {"tp_activation_reductions": 0, "tp_activation_bytes": 0, "lora_grad_reductions": 0,
           "lora_grad_bytes": 0, "dp_lora_grad_reductions": 0, "dp_scalars": 0,
           "non_all_reduce_ops": 0, "ops": 0}
    for r in census:
        if r["axis"] == "self":
            continue
        out["ops"] += r["count"]
        if r["kind"] != "all-reduce":
            out["non_all_reduce_ops"] += r["count"]
            continue
        for s in r.get("program_shapes", r["shapes"]):
            dt, dims = s.split("[")
            shape = tuple(int(d) for d in dims.rstrip("]").split(",") if d)
            nbytes = DTYPE_BYTES[dt] * int(np.prod(shape))
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
    return out


def census_to_json(census, path, **extra):
    with open(path, "w") as f:
        json.dump({"census": census, "summary": summarize(census), **extra}, f, indent=1)

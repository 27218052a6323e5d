"""Lower and compile a jitted function on abstract inputs, and read what the compile tells.

Per device: argument, output, alias, temporary and code bytes (``memory_analysis``); the matmul
FLOPs counted from the jaxpr (``dot_general``: 2 · output elements · contracted size, scans × their
length, rematerialised forwards included since they are in the differentiated jaxpr) over the
global batch, divided by the device count. XLA's own cost analysis is kept for reference only:
deviceless GPU compiles have none, and it counts a scanned body once. Bytes moved by each
collective kind are read from the optimised HLO (loops weighted by their trip counts).
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}


@dataclasses.dataclass
class CompiledPlan:
    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    xla_flops: float | None          # per device, XLA's cost analysis (None: the backend gave none)
    matmul_flops: float              # per device, counted from the jaxpr
    collective_bytes: dict[str, int]
    lower_s: float
    compile_s: float
    executable: Any = dataclasses.field(default=None, repr=False, compare=False)  # the jax Compiled

    @property
    def flops(self) -> float:
        """The per-device FLOPs the report uses: the jaxpr's matmul count. XLA's cost analysis
        counts a while (scan) body once, whatever its trip count, so it is kept only for reference."""
        return self.matmul_flops

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "executable"}
        return {**out, "flops": self.flops}


# --- HLO collectives ------------------------------------------------------------------------------
_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")
_SHAPE_RE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE_RE.findall(text):
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _computation_multiplicities(hlo: str) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Each computation's lines, and how many times one execution of the entry runs it."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMP_RE.match(line.strip())
        if m and not line.startswith(" "):
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is not None:
            comps[current].append(line)
    mult = {c: 0 for c in comps}
    if entry is None:
        return comps, mult
    edges: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}
    for c, lines in comps.items():
        for line in lines:
            if " while(" in line:
                body = re.search(r"body=%?([\w.\-]+)", line)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                if body:
                    edges[c].append((body.group(1), int(trips.group(1)) if trips else 1))
            for key in ("calls", "true_computation", "false_computation"):
                for callee in re.findall(key + r"=%?([\w.\-]+)", line):
                    edges[c].append((callee, 1))
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                edges[c].extend((x.strip().lstrip("%"), 1) for x in group.split(","))

    def visit(c: str, factor: int, depth: int = 0):
        if c not in mult or depth > 64:
            return
        mult[c] += factor
        for callee, n in edges[c]:
            visit(callee, factor * n, depth + 1)

    visit(entry, 1)
    return comps, mult


def _top_level(text: str) -> list[str]:
    """The elements of a tuple type ``(a, (b, c), d)``; ``[text]`` when it is not a tuple."""
    text = text.strip()
    if not text.startswith("("):
        return [text]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(text):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        if (ch == "," and depth == 1) or depth == 0:
            parts.append(text[start:i])
            start = i + 1
        if depth == 0:
            break
    return parts


def _async_result(shape: str) -> str:
    """The result part of an async collective's ``-start`` type: ``(operands, results, context…)``
    (all-gather, all-to-all, collective-permute); all-reduce-start's type is its result alone."""
    parts = _top_level(shape)
    return parts[1] if len(parts) > 1 else shape


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes per collective kind for one execution of the HLO module (per device).

    A collective's bytes are its result's bytes (an all-gather counts the gathered array). Ops in
    a while body count once per trip when XLA knows the trip count (scans do); async pairs count
    once, the result in ``-start``'s (operands, results) type (not the ``-done``).
    """
    comps, mult = _computation_multiplicities(hlo)
    out = {k: 0 for k in COLLECTIVES}
    for c, lines in comps.items():
        if not mult.get(c):
            continue
        for line in lines:
            if "=" not in line:
                continue
            lhs_rhs = line.split("=", 1)[1]
            for kind in COLLECTIVES:
                m = re.search(r"\s" + kind + r"(-start)?\(", lhs_rhs)
                if m:
                    shape = lhs_rhs[:m.start()]
                    if m.group(1) and kind != "all-reduce":
                        shape = _async_result(shape)
                    out[kind] += mult[c] * _shape_bytes(shape)
                    break
    return out


# --- jaxpr FLOPs ----------------------------------------------------------------------------------
def _sub_jaxprs(params: dict):
    from jax.extend import core as jcore
    for v in params.values():
        items = v if isinstance(v, (tuple, list)) else (v,)
        for item in items:
            if isinstance(item, jcore.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jcore.Jaxpr):
                yield item


def matmul_flops(jaxpr) -> float:
    """FLOPs of every ``dot_general`` in a (closed) jaxpr, over the global shapes it was traced at."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in lc)
            continue
        subs = list(_sub_jaxprs(eqn.params))
        if not subs:
            continue
        if name == "cond":
            total += max(matmul_flops(s) for s in subs)
        elif name == "scan":
            total += eqn.params["length"] * sum(matmul_flops(s) for s in subs)
        else:  # pjit, remat, custom_vjp/jvp, shard_map (per-shard shapes: × the mesh size), while (once)
            factor = 1
            if name == "shard_map":
                mesh = eqn.params.get("mesh")
                factor = math.prod(mesh.shape.values()) if mesh is not None else 1
            total += factor * sum(matmul_flops(s) for s in subs)
    return total


def compile_traced(name: str, traced, num_devices: int, compiler_options: dict | None = None,
                   count_jaxpr=None) -> CompiledPlan:
    """Compile a ``jax.jit(...).trace(...)`` result and read its memory, FLOPs and collectives."""
    t0 = time.perf_counter()
    lowered = traced.lower()
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options or None)
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    g = lambda attr: int(getattr(mem, attr, 0) or 0) if mem is not None else 0  # noqa: E731
    xla_flops = None
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, list):
            cost = cost[0] if cost else None
        if cost and cost.get("flops", 0) > 0:
            xla_flops = float(cost["flops"])
    except Exception:  # noqa: BLE001 - deviceless GPU compiles have no cost model
        xla_flops = None
    return CompiledPlan(name=name, argument_bytes=g("argument_size_in_bytes"), output_bytes=g("output_size_in_bytes"),
                        alias_bytes=g("alias_size_in_bytes"), temp_bytes=g("temp_size_in_bytes"),
                        code_bytes=g("generated_code_size_in_bytes"), xla_flops=xla_flops,
                        matmul_flops=matmul_flops(count_jaxpr if count_jaxpr is not None else traced.jaxpr)
                        / num_devices,
                        collective_bytes=collective_bytes(compiled.as_text()), lower_s=t1 - t0, compile_s=t2 - t1,
                        executable=compiled)


def describe(x: Any) -> str:
    return f"{x.dtype}{list(x.shape)}"

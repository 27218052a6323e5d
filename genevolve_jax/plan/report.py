"""A plan's per-device memory, FLOPs and collectives, as JSON and as a table.

Per phase, per device:
- resident state: parameters, optimiser state (and the KL reference's copy in RL), held all run;
- gradients: one per trainable parameter, live inside the step (part of its temporaries, shown
  for scale, not added again);
- for each compiled function: its non-state inputs (the batch), its temporaries, and its
  outputs not aliased to donated inputs. Its peak is resident + inputs + temporaries + outputs;
  the phase's peak is the largest.
The budget is the device's memory times the share the trainer gets (``mem_fraction``).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

from genevolve_jax.plan import abstract
from genevolve_jax.plan.compile import COLLECTIVES, CompiledPlan

PROJECTED_MFU = 0.40
MAX_FNS_SHOWN = 3


@dataclasses.dataclass
class PhaseReport:
    phase: str
    batch: str
    resident_bytes: dict[str, int]
    gradient_bytes: int
    fns: list[CompiledPlan]
    extra_input_bytes: dict[str, int]
    largest_buffers: list[abstract.Buffer]
    runs_per_step: dict[str, int]
    mem_fraction: float = 1.0
    mem_fraction_source: str = ""
    note: str = ""

    def peak_of(self, fn: CompiledPlan) -> int:
        return (sum(self.resident_bytes.values()) + self.extra_input_bytes[fn.name] + fn.temp_bytes
                + max(0, fn.output_bytes - fn.alias_bytes))

    @property
    def peak_bytes(self) -> int:
        return max((self.peak_of(f) for f in self.fns), default=sum(self.resident_bytes.values()))

    @property
    def step_flops(self) -> float:
        return sum(f.flops * self.runs_per_step.get(f.name, 1) for f in self.fns)

    def collectives(self) -> dict[str, int]:
        out = {k: 0 for k in COLLECTIVES}
        for f in self.fns:
            for k, v in f.collective_bytes.items():
                out[k] += v * self.runs_per_step.get(f.name, 1)
        return out


@dataclasses.dataclass
class Plan:
    config: str
    target: str
    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    strategy: str
    attention: str
    device_memory_bytes: int
    peak_flops: float
    phases: list[PhaseReport]

    def budget(self, phase: PhaseReport) -> int:
        return int(self.device_memory_bytes * phase.mem_fraction)

    def fits(self, phase: PhaseReport) -> bool:
        return phase.peak_bytes <= self.budget(phase)

    @property
    def all_fit(self) -> bool:
        return all(self.fits(p) for p in self.phases)

    def to_json(self) -> dict[str, Any]:
        phases = []
        for p in self.phases:
            flops = p.step_flops
            phases.append({
                "phase": p.phase, "batch": p.batch, "resident_bytes": p.resident_bytes,
                "gradient_bytes": p.gradient_bytes,
                "functions": [{**f.to_json(), "peak_bytes": p.peak_of(f),
                               "runs_per_step": p.runs_per_step.get(f.name, 1),
                               "input_bytes": p.extra_input_bytes[f.name]} for f in p.fns],
                "peak_bytes": p.peak_bytes, "budget_bytes": self.budget(p), "mem_fraction": p.mem_fraction,
                "mem_fraction_source": p.mem_fraction_source, "note": p.note,
                "headroom_bytes": self.budget(p) - p.peak_bytes, "fits": self.fits(p),
                "flops_per_device_per_step": flops,
                "step_s_at_peak": flops / self.peak_flops if self.peak_flops else None,
                "step_s_at_40pct": flops / (PROJECTED_MFU * self.peak_flops) if self.peak_flops else None,
                "collective_bytes": p.collectives(),
                "largest_buffers": [dataclasses.asdict(b) for b in p.largest_buffers],
            })
        return {"config": self.config, "target": self.target, "device_kind": self.device_kind,
                "num_devices": self.num_devices, "mesh": self.mesh, "strategy": self.strategy,
                "attention": self.attention, "device_memory_bytes": self.device_memory_bytes,
                "peak_flops_per_device": self.peak_flops,
                "fits": self.all_fit, "phases": phases, "kind": "planned (deviceless compile), not measured"}


def fmt_bytes(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    return str(n)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def print_plan(plan: Plan, file=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    console = Console(file=file or sys.stdout, width=None if (file or sys.stdout).isatty() else 160)
    mesh = ",".join(f"{k}={v}" for k, v in plan.mesh.items() if v > 1) or "1"
    title = (f"plan: {plan.config} on {plan.target} ({plan.num_devices} × {plan.device_kind}), "
             f"{plan.strategy} [{mesh}], attention {plan.attention} — PLANNED, not measured")
    for p in plan.phases:
        t = Table(title=escape(f"{title}\nphase {p.phase}: {p.batch}"))
        t.add_column("per device", justify="left")
        t.add_column("value", justify="right")
        for name, b in p.resident_bytes.items():
            t.add_row(escape(name), fmt_bytes(b))
        t.add_row("gradients (inside the step)", fmt_bytes(p.gradient_bytes))
        # A transfer compiles a program per kind of bucket: show the largest few.
        shown = sorted(p.fns, key=p.peak_of, reverse=True)[:MAX_FNS_SHOWN] if len(p.fns) > MAX_FNS_SHOWN else p.fns
        for f in shown:
            t.add_row(f"{f.name}: inputs (batch)", fmt_bytes(p.extra_input_bytes[f.name]))
            t.add_row(f"{f.name}: compiled temporaries", fmt_bytes(f.temp_bytes))
            t.add_row(f"{f.name}: peak", fmt_bytes(p.peak_of(f)))
            t.add_row(f"{f.name}: compile", f"{f.lower_s + f.compile_s:.1f} s")
        if len(shown) < len(p.fns):
            rest = [f for f in p.fns if f not in shown]
            t.add_row(f"{len(rest)} more program(s): peaks up to", fmt_bytes(max(p.peak_of(f) for f in rest)))
            t.add_row("all programs: compile", f"{sum(f.lower_s + f.compile_s for f in p.fns):.1f} s")
        if p.note:
            t.add_row("note", p.note)
        t.add_row("peak", fmt_bytes(p.peak_bytes))
        share = f"{p.mem_fraction:g} × {fmt_bytes(plan.device_memory_bytes)}, {p.mem_fraction_source}"
        t.add_row(escape(f"budget ({share})"),
                  fmt_bytes(plan.budget(p)))
        t.add_row("headroom", fmt_bytes(plan.budget(p) - p.peak_bytes))
        t.add_row("fits", "[green]yes[/green]" if plan.fits(p) else "[red]NO[/red]")
        flops = p.step_flops
        t.add_row("FLOPs per step", f"{flops:.3e}")
        if plan.peak_flops:
            t.add_row("step time at peak / at 40 %", f"{fmt_seconds(flops / plan.peak_flops)} / "
                      f"{fmt_seconds(flops / (PROJECTED_MFU * plan.peak_flops))}")
        for k, v in p.collectives().items():
            if v:
                t.add_row(f"{k} per step", fmt_bytes(v))
        console.print(t)
        if not plan.fits(p):
            console.print(f"[red]phase {p.phase} does not fit[/red]: peak {fmt_bytes(p.peak_bytes)} > budget "
                          f"{fmt_bytes(plan.budget(p))}. Largest buffers per device:")
            for b in p.largest_buffers[:8]:
                console.print(escape(f"  {fmt_bytes(b.bytes_per_device):>12}  {b.name} {b.dtype}{list(b.shape)}"))

"""`genevolve compare-sharding` on the tiny model over 8 simulated devices, plus its HLO reader."""
import json

import pytest

from genevolve_jax.cli import main
from genevolve_jax.jobs.compare_sharding import parse_mesh_args
from genevolve_jax.plan.compile import COLLECTIVES, collective_bytes

HLO = """HloModule m, entry_computation_layout={()}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]) parameter(0)
  %g = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %ag = f32[16,4]{1,0} all-gather(f32[2,4]{1,0} %g), channel_id=1, replica_groups={{0,1}}, dimensions={0}
  %ar = f32[8,4]{1,0} all-reduce(f32[8,4]{1,0} %g), channel_id=2, to_apply=%add
  ROOT %t = (s32[], f32[8,4]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[8,4]) -> f32[8,4] {
  %x = f32[8,4]{1,0} parameter(0)
  %w = (s32[], f32[8,4]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %rs = bf16[2,4]{1,0} reduce-scatter(bf16[8,4]{1,0} %y), channel_id=3, dimensions={0}, to_apply=%add
  %cps = (f32[4]{0}, f32[4]{0}) collective-permute-start(f32[4]{0} %z), channel_id=4
  %cpd = f32[4]{0} collective-permute-done(%cps)
  %a2a = ((u16[16,6]{1,0}), u16[16,6]{1,0}) all-to-all-start(u16[16,6]{1,0} %q), channel_id=5, dimensions={0}
  %a2d = u16[16,6]{1,0} all-to-all-done(%a2a)
  %ags = ((bf16[2]{0}, f32[3]{0}), (bf16[16]{0}, f32[24]{0})) all-gather-start(bf16[2]{0} %u, f32[3]{0} %v)
  %ars = (f32[5]{0}, f32[7]{0}) all-reduce-start(f32[5]{0} %e, f32[7]{0} %f), to_apply=%add
  ROOT %r = f32[8,4]{1,0} get-tuple-element(%w), index=1
}
"""


def test_collective_bytes_weights_loops_by_trip_count():
    got = collective_bytes(HLO)
    # An async -start's type holds its operands, its results (and context): the results count.
    assert got["all-gather"] == 5 * 16 * 4 * 4 + 16 * 2 + 24 * 4
    assert got["all-reduce"] == 5 * 8 * 4 * 4 + (5 + 7) * 4   # all-reduce-start: its results alone
    assert got["reduce-scatter"] == 2 * 4 * 2
    assert got["collective-permute"] == 4 * 4
    assert got["all-to-all"] == 16 * 6 * 2


def test_mesh_argument_parsing():
    assert parse_mesh_args(["tp:data=2,tensor=4"]) == {"tp": {"data": 2, "tensor": 4}}
    with pytest.raises(ValueError, match="is not AXIS=N"):
        parse_mesh_args(["tp:data"])


@pytest.mark.slow
def test_compare_two_strategies_writes_json(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    rc = main(["compare-sharding", "--config", "tiny", "--layers", "1", "--strategies", "dp,fsdp",
               "--batch-size", "8", "--seq-len", "16", "--steps", "1", "--simulate-devices", "8",
               "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "compare-sharding" in printed and "fsdp" in printed
    result = json.loads(out.read_text())
    rows = {r["strategy"]: r for r in result["rows"]}
    assert set(rows) == {"dp", "fsdp"}
    assert abs(rows["dp"]["loss"] - rows["fsdp"]["loss"]) < 1e-5 and result["loss_spread"] < 1e-5
    for r in rows.values():
        assert set(r["collective_bytes"]) == set(COLLECTIVES)
        assert r["compile_s"] > 0 and r["step_s"] > 0 and r["peak_temp_bytes"] >= 0
    # dp replicates parameters and all-reduces gradients; fsdp shards them and all-gathers weights
    assert rows["dp"]["collective_bytes"]["all-reduce"] > 0
    assert rows["fsdp"]["collective_bytes"]["all-gather"] > 0
    assert rows["fsdp"]["param_opt_bytes_per_device"] < 0.5 * rows["dp"]["param_opt_bytes_per_device"]


@pytest.mark.parametrize("mesh,message", [
    ("tp:tensor=3", "multiply to 3 devices, but 8 are present"),
    ("tp:data=2,tensor=4", "num_key_value_heads = 2 is not divisible by mesh axes ['tensor'] (size 4)"),
])
def test_impossible_mesh_is_refused(tmp_path, capsys, mesh, message):
    out = tmp_path / "x.json"
    rc = main(["compare-sharding", "--strategies", "tp", "--mesh", mesh, "--layers", "1",
               "--output", str(out)])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_plan_only_reports_every_strategy_without_running(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["compare-sharding", "--plan-only", "--config", "tiny", "--layers", "1", "--strategies", "dp,fsdp,tp",
               "--batch-size", "8", "--seq-len", "32", "--output", str(out)])
    assert rc == 0
    assert "PLANNED" in capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {r["strategy"]: r for r in result["rows"]}
    assert set(rows) == {"dp", "fsdp", "tp"}
    for r in rows.values():
        assert not r["measured"] and r["loss"] is None
        assert r["planned_peak_bytes"] >= r["param_opt_bytes_per_device"] + r["peak_temp_bytes"] > 0
        assert r["flops_per_device"] > 0
    # dp holds the whole state on every device; fsdp an eighth of it.
    assert rows["fsdp"]["param_opt_bytes_per_device"] * 4 < rows["dp"]["param_opt_bytes_per_device"]


def test_a_strategy_that_does_not_fit_the_host_is_skipped(tmp_path, capsys):
    """With (almost) no memory to spare, nothing is built: each strategy gets a line saying why."""
    out = tmp_path / "cmp.json"
    rc = main(["compare-sharding", "--config", "tiny", "--layers", "1", "--strategies", "fsdp,tp",
               "--batch-size", "8", "--seq-len", "16", "--steps", "1", "--host-memory-fraction", "1e-9",
               "--output", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "skipping fsdp" in captured.err and "skipping tp" in captured.err
    rows = json.loads(out.read_text())["rows"]
    assert all(not r["measured"] and "free on this host" in r["skipped"] for r in rows)

"""`bench/async_step.py --smoke`: the asynchronous-RL benchmark's three modes run end to end on CPU
(render service subprocess with latency, the trainer through the real loop and scorer) and write
the JSON row per mode that BENCHMARKS.md's table comes from. No timing is asserted (figures are
the benchmark's, not a test's); only that each mode ran its steps and reported its fields."""
import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow    # three trainers and a render service: about 60 CPU-s on 2 cores with a cold compile cache
def test_async_step_smoke_writes_a_row_per_mode(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_async_step", os.path.join(ROOT, "bench", "async_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "async.json"
    bench.main(["--smoke", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    result = json.loads(out.read_text())
    rows = {r["mode"]: r for r in result["modes"]}
    assert list(rows) == ["barrier", "streaming", "stale1"]
    assert (rows["barrier"]["stream_rewards"], rows["streaming"]["stream_rewards"]) == (False, True)
    assert rows["stale1"]["max_staleness"] == 1 and rows["streaming"]["max_staleness"] == 0
    for r in rows.values():
        assert len(r["step_wall_s"]) == len(r["reward_curve"]) == r["steps"]
        assert all(math.isfinite(x) and x >= 0 for x in (r["steady_step_s"], r["rollout_phase_s"], r["trainer_idle_s"]))
    assert rows["stale1"]["staleness_mean"] <= 1 and rows["stale1"]["dropped_stale"] == 0
    assert set(result["ratios"]) == {"streaming rollout phase / barrier's", "stale1 steady step / streaming's"}

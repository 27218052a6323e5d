"""`bench/gpu_suite.py --smoke`: every part of the GPU suite runs its code path on CPU (so the script
cannot rot before a GPU shows up), and its JSON and BENCHMARKS rows hold the figures it claims."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_part(tmp_path):
    out, rows = tmp_path / "suite.json", tmp_path / "rows.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--smoke", "--output", str(out),
                           "--rows", str(rows)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    result = json.loads(out.read_text()) if out.exists() else {"parts": {}}
    errors = {k: p.get("error", "")[-1500:] for k, p in result["parts"].items() if not p.get("ok")}
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}\nfailed parts: {errors}"
    parts = result["parts"]
    assert set(parts) == {"plan", "train", "kl", "sampler", "attention", "logits"}
    assert all(p["ok"] for p in parts.values())
    plan = parts["plan"]
    # The plan holds at least the state it must hold, and the step it planned ran to a finite loss.
    assert plan["planned_peak_bytes"] >= plan["planned_state_bytes"] > 0 and plan["planned_temp_bytes"] > 0
    assert plan["loss"] == pytest.approx(plan["loss"]) and plan["measured_peak_bytes"] >= 0
    # bf16 packed-segment attention stays within bf16 rounding of the fp32 reference.
    assert 0 < parts["attention"]["xla"]["max_abs_error_vs_fp32"] < 0.05
    kl = {(r["op"], r["variant"]) for r in parts["kl"]["kl"]["results"]}
    assert kl == {("logprob", "fused"), ("logprob", "naive"), ("kl", "fused"), ("kl", "naive")}
    assert "tok" in parts["sampler"]["stdout"].lower()
    assert "matmuls alone" in parts["sampler"]["stdout"]   # the CPU floor's code path (--matmul-floor)
    text = rows.read_text()
    assert "smoke" in text and "| plan |" in text and "| attention |" in text

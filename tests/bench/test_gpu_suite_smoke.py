"""`bench/gpu_suite.py --smoke`: every part of the GPU suite runs its code path on CPU (so the script
cannot rot before a GPU shows up), and its JSON and BENCHMARKS rows hold the figures it claims.
The smoke run calls each part's script in one process (the GPU run starts a process per part): a
part that raises still fails the run, with its traceback in the JSON."""
import json
import math
import os
import subprocess
import sys

import pytest

from genevolve_jax.jobs.compare_sharding import load_model_config

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
    assert_plan_figures(parts["plan"])
    # The train part's step, ours against transformers on the same tiny model and image batch:
    # one finite loss, the same to float32 rounding.
    ours, theirs = parts["train"]["train_image"]["results"]
    assert ours["impl"].startswith("ours") and theirs["impl"].startswith("transformers")
    assert math.isfinite(ours["loss"]) and ours["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
    # bf16 packed-segment attention stays within bf16 rounding of the fp32 reference.
    assert 0 < parts["attention"]["xla"]["max_abs_error_vs_fp32"] < 0.05
    # The logits part: the same random weights and tokens through ours and transformers, fp32.
    logits = parts["logits"]["logits"]["results"]
    assert logits[0]["impl"] == "ours (logits)" and logits[-1]["impl"].startswith("transformers")
    assert 0 <= logits[0]["max_abs_logit_diff_vs_transformers"] < 1e-4
    kl = {(r["op"], r["variant"]) for r in parts["kl"]["kl"]["results"]}
    assert kl == {("logprob", "fused"), ("logprob", "naive"), ("kl", "fused"), ("kl", "naive")}
    assert "tok" in parts["sampler"]["stdout"].lower()
    assert "matmuls alone" in parts["sampler"]["stdout"]   # the CPU floor's code path (--matmul-floor)
    text = rows.read_text()
    assert "smoke" in text and "| plan |" in text and "| attention |" in text


def assert_plan_figures(plan: dict) -> None:
    """The plan part's figures on CPU: the planned state and peak, and the step it planned."""
    assert plan["planned_peak_bytes"] >= plan["planned_state_bytes"] > 0 and plan["planned_temp_bytes"] > 0
    # A random model's next-token loss is the entropy of a near-uniform guess, ln(vocab): 6.24 for
    # the tiny preset's 512 tokens (measured 6.26). NaN, inf, or a loss that is not a cross-entropy
    # over this vocabulary falls outside.
    vocab = load_model_config(plan["model"], 0, False, "full", plan["dtype"]).text.vocab_size
    assert math.isfinite(plan["loss"]) and abs(plan["loss"] - math.log(vocab)) < 0.5, (plan["loss"], vocab)
    # On CPU the measured figure is the bytes of the arrays alive after the step (its state, batch
    # and outputs): the state the plan counts is really there, and the planned peak covers it all.
    assert plan["measured_with"].startswith("bytes of the live arrays"), plan["measured_with"]
    assert plan["planned_state_bytes"] <= plan["measured_peak_bytes"] <= plan["planned_peak_bytes"], plan

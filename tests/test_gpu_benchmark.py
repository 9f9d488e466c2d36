"""The GPU throughput benchmark's own logic, run at tiny shapes on the CPU (its GPU numbers need a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = Path.home() / ".cache/tokencredit/models/smollm2-135m-instruct"


@pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").exists(), reason="SmolLM2 tokenizer not cached")
def test_smoke_run_times_every_lever_and_checks_logprobs(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_ppo_throughput.py"), "--smoke", "--skip-trl",
         "--work-dir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    tiny = result["setups"]["tiny"]
    assert set(tiny["tokencredit"]) == {"plain", "static", "static+graph", "static+graph+reuse"}
    for lever in tiny["tokencredit"].values():
        assert lever["updates_timed"] == 2 and lever["episodes_per_s"] > 0
        assert lever["seconds_per_update"] >= lever["time/rollout"] > 0
    assert tiny["trl"] == {"skipped": "--skip-trl"}
    # on the CPU in float32 the fast decoder's sampling log-probs equal a full forward's
    assert tiny["generation"]["logprob_check"]["max_abs_diff"] < 1e-4
    assert tiny["generation"]["4"]["tokencredit_static_graph"] > 0

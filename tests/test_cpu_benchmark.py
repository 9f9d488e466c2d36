"""The CPU throughput benchmark's own logic, on the real SmolLM2 at tiny shapes (TRL arms skipped: not installed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path.home() / ".cache/tokencredit/models/smollm2-135m-instruct"


@pytest.mark.slow
@pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="SmolLM2 not converted yet")
def test_tiny_run_records_phases_memory_and_sampling(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_ppo_throughput.py"), "--skip-trl",
         "--arms", "plain,autocast_bf16+levers (default),fp32_levers+shared_critic", "--batch", "2",
         "--prompt-len", "8", "--new-tokens", "4", "--epochs", "1", "--updates", "2", "--warmup", "0",
         "--gen-batches", "2", "--gen-repeats", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["nproc"] >= 1 and result["cpu"]
    arms = {**result["comparisons"]["fp32"], **result["comparisons"]["bf16"]}
    assert set(arms) == {"plain", "autocast_bf16+levers (default)", "fp32_levers+shared_critic"}
    for name, arm in arms.items():
        assert len(arm["update_seconds"]) == 2, name
        assert arm["seconds_per_update_min"] <= arm["seconds_per_update_median"]
        assert set(arm["phases_median"]) == {"sampling", "reward", "reference", "old_logprobs", "values",
                                             "optimisation"}
        assert arm["peak_rss_gb"] > 0.1
    # the levers that skip passes really skip them
    assert arms["plain"]["phases_median"]["old_logprobs"] > 0
    assert arms["autocast_bf16+levers (default)"]["phases_median"]["old_logprobs"] == 0
    assert arms["autocast_bf16+levers (default)"]["config"]["mixed_precision"] == "bf16"
    sampling = result["sampling"]["fp32"]["2"]
    assert sampling["transformers_generate"]["tokens_per_s_median"] > 0
    assert set(sampling["ratio_vs_generate"]) == {"tokencredit_plain", "tokencredit_static"}

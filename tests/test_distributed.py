"""Data-parallel runs on 2 CPU processes (gloo) launched by Accelerate, against the same run in one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokencredit import distributed
from tokencredit.distributed import ProcessGroup, process_group
from tokencredit.masked import masked_whiten

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
# Statistics are reduced in float64 and summed in another order across ranks: equal to float32 rounding.
TOL = dict(rtol=1e-4, atol=1e-5)


def accelerate_cmd() -> list[str]:
    """`accelerate launch` for 2 processes with torchrun underneath (`--cpu` would start one without MPI)."""
    exe = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port)]


def env() -> dict:
    """Offline, one thread per process (two processes share this machine's cores), no inherited launch vars."""
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent / "src"))
    return e


def launch(mode: str, out: Path, *settings: str, processes: int = 2, expect: int = 0) -> subprocess.CompletedProcess:
    """Run the worker in `processes` processes; check its exit code."""
    cmd = (accelerate_cmd() if processes == 2 else [sys.executable]) + [str(WORKER), mode, str(out), *settings]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect or (expect and proc.returncode != 0), proc.stderr[-4000:]
    return proc


def result(out: Path, rank: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """What one rank wrote: its JSON record and its final trainable weights."""
    return json.loads((out / f"rank{rank}.json").read_text()), load_file(str(out / f"rank{rank}.safetensors"))


def assert_same_history(a: list[dict], b: list[dict]) -> None:
    """Every logged number equal within float tolerance, every flag and count exactly."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            if isinstance(ra[key], float):
                assert ra[key] == pytest.approx(rb[key], rel=TOL["rtol"], abs=TOL["atol"]), key
            else:
                assert ra[key] == rb[key], key


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Final trainable weights equal within float tolerance."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL)


@pytest.mark.parametrize("mode", ["ppo-scripted", "ppo-guided", "sft"])
def test_two_processes_take_the_step_one_process_takes(tmp_path, mode):
    # ppo-scripted: the same responses per prompt whichever rank samples them, so both runs see the same samples;
    # reward whitening, the adaptive KL controller and early stopping on KL all read global batch statistics.
    # ppo-guided: LOLS (both roll-ins, the guide critic) with greedy learner tokens and a fixed guide.
    settings = {"ppo-scripted": ("target_kl=0.004",), "ppo-guided": ("updates=4",)}.get(mode, ())
    launch(mode, tmp_path / "one", *settings, processes=1)
    launch(mode, tmp_path / "two", *settings)
    one, one_w = result(tmp_path / "one")
    two0, two0_w = result(tmp_path / "two", 0)
    two1, two1_w = result(tmp_path / "two", 1)
    assert (one["world_size"], two0["world_size"], two1["world_size"], two1["rank"]) == (1, 2, 2, 1)
    # Ranks hold bit-identical weights after every update (rank 1 started from perturbed weights).
    assert two0["hashes"] == two1["hashes"] and len(two0["hashes"]) == len(one["history"])
    assert two0["history"] == two1["history"]
    assert_same_history(one["history"], two0["history"])
    assert_same_weights(one_w, two0_w)
    if mode == "ppo-scripted":
        assert any(h["optim/early_stopped"] for h in one["history"])  # the early stop was exercised
        assert one["history"][-1]["kl/coef"] != 0.05  # and the adaptive controller moved
    if mode == "ppo-guided":  # both roll-ins happened, and guide tokens were in the batch
        assert {h["guide/rollin_is_guide"] for h in one["history"]} == {0.0, 1.0}
        assert all(h["guide/learner_token_frac"] < 1 for h in one["history"])
    # Only rank 0 wrote the run folder; no rank files outside checkpoints.
    run = tmp_path / "two" / "run"
    assert (run / "metrics.jsonl").exists() and (run / "policy").is_dir()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(one["history"])


def test_reward_model_training_on_two_processes_matches_one(tmp_path):
    launch("seq-rm", tmp_path / "one", processes=1)
    launch("seq-rm", tmp_path / "two")
    one, one_w = result(tmp_path / "one")
    two0, two0_w = result(tmp_path / "two", 0)
    two1, _ = result(tmp_path / "two", 1)
    assert two0["world_size"] == 2 and two0["final_hash"] == two1["final_hash"]
    assert_same_history(one["history"], two0["history"])
    assert_same_weights(one_w, two0_w)
    assert one["eval"] == pytest.approx(two0["eval"], rel=1e-4)
    run = tmp_path / "two" / "run"
    assert (run / "model").is_dir() and len((run / "metrics.jsonl").read_text().splitlines()) == len(one["history"])


def test_two_process_sampled_run_is_reproducible_and_resumes_after_a_kill(tmp_path):
    settings = ("updates=4", "save_every=1")
    launch("ppo", tmp_path / "a", *settings)
    launch("ppo", tmp_path / "b", *settings)
    a0, a_w = result(tmp_path / "a")
    a1, _ = result(tmp_path / "a", 1)
    b0, b_w = result(tmp_path / "b")
    assert a0["hashes"] == a1["hashes"]
    assert a0["history"] == b0["history"] and a0["final_hash"] == b0["final_hash"]  # reproducible, bit for bit
    # Killed right after the checkpoint of update 2, on both ranks; the resumed run continues identically.
    launch("ppo", tmp_path / "c", *settings, "kill_after=2", expect=17)
    ckpt = tmp_path / "c" / "run" / "checkpoints" / "step-00000002"
    assert (ckpt / "trainer_state.pt").exists() and (ckpt / "rank1_state.pt").exists()
    launch("ppo", tmp_path / "c", *settings, "resume=true")
    c0, c_w = result(tmp_path / "c")
    c1, _ = result(tmp_path / "c", 1)
    assert c0["hashes"] == c1["hashes"] == a0["hashes"][2:]
    # The resumed run's history comes back from metrics.jsonl, which also names each record's step.
    resumed = [{k: v for k, v in h.items() if k != "step"} for h in c0["history"]]
    assert resumed == a0["history"] and c0["final_hash"] == a0["final_hash"]
    assert_same_weights(a_w, c_w)
    # Another number of processes cannot continue it: each rank had its own sampling stream.
    proc = launch("ppo", tmp_path / "c", "updates=5", "save_every=1", "resume=true", "allow_changed_settings=true",
                  processes=1, expect=1)
    assert "written by 2 process(es), this run has 1" in proc.stderr


def test_the_command_line_runs_under_accelerate_launch(tmp_path):
    from tokencredit.testing import save_tiny_causal_lm

    model = save_tiny_causal_lm(tmp_path / "model", "a b c d e f g h".split())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join("a b c d e f g h".split()) + "\n")
    cmd = accelerate_cmd() + ["-m", "tokencredit", "ppo", f"model={model}", f"prompts={prompts}",
                              f"output_dir={tmp_path / 'run'}", "num_updates=2", "batch_size=4",
                              "max_new_tokens=4", "progress=false", "log_tensorboard=false"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["updates"] == 2  # rank 0 alone reports
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "run" / "policy").is_dir()


# ---------------------------------------------------------------------- one process: the identity


def test_a_single_process_group_is_the_identity():
    group = ProcessGroup()
    assert (group.world_size, group.rank, group.is_main, group.distributed) == (1, 0, True, False)
    x = torch.tensor([1.5, -2.0])
    assert group.sum(x) is x and group.token_weight(7) == 1.0 and group.share([1, 2, 3]) == [1, 2, 3]
    assert group.broadcast({"a": 1}) == {"a": 1}
    assert group.on_main(lambda: 5) == 5
    with pytest.raises(KeyError):
        group.on_main(lambda: {}["missing"])


def test_shares_and_divisibility_across_ranks():
    assert ProcessGroup(world_size=2, rank=1).share(list(range(6))) == [3, 4, 5]
    assert ProcessGroup(world_size=3, rank=0).share("abcdef") == ["a", "b"]
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple of the number of processes \\(4\\)"):
        ProcessGroup(world_size=4).check_divides(batch_size=6)


def test_whitening_with_a_reduction_matches_whitening_all_rows_at_once():
    torch.manual_seed(0)
    x, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    # Two "ranks" in two threads, rows 0-2 and 3-5; the reduction sums what both post, like an all-reduce.
    barrier, posted, out = threading.Barrier(2), [None, None], [None, None]

    def rank(i: int) -> None:
        def reduce(local: torch.Tensor) -> torch.Tensor:
            posted[i] = local
            barrier.wait()
            total = posted[0] + posted[1]
            barrier.wait()
            return total

        out[i] = masked_whiten(x[3 * i:3 * i + 3], mask[3 * i:3 * i + 3], reduce=reduce)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat(out), masked_whiten(x, mask))


def test_sharding_engines_are_refused_with_a_message(monkeypatch):
    monkeypatch.setattr(distributed, "_GROUP", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP, which shards parameters"):
        process_group("cpu")


def test_commands_that_run_in_one_process_refuse_a_launch(monkeypatch, capsys):
    from tokencredit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["demo", "--fast"]) != 0
    assert "runs in one process" in capsys.readouterr().err


def test_trainer_refuses_a_batch_the_ranks_cannot_share(monkeypatch, tmp_path):
    from tokencredit import PPOConfig, PPOTrainer
    from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

    monkeypatch.setattr(distributed, "_GROUP", ProcessGroup(world_size=4, rank=0))
    tok = tiny_word_tokenizer(list("abc"))
    model = tiny_causal_lm(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = PPOConfig(output_dir=str(tmp_path / "run"), batch_size=6, mixed_precision="no")
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple of the number of processes"):
        PPOTrainer(cfg, policy=model, tokenizer=tok, prompts=["a b"], reward_fn=lambda p, r, i: [0.0] * len(p))


def _average_in_buckets(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: gradients differ per rank, one is missing on rank 1, one on both."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (2, 5, 1, 4)]
        for i, p in enumerate(params):
            if (i == 2 and rank == 1) or i == 3:
                continue
            p.grad = torch.arange(p.numel(), dtype=torch.float32) + 10.0 * i + 100.0 * rank
        ProcessGroup(world_size=2, rank=rank).average_gradients(params, bucket_elements=3)
        torch.save([None if p.grad is None else p.grad for p in params], f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gradient_average_in_small_buckets_on_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_average_in_buckets, args=(port, str(tmp_path)), nprocs=2)
    grads = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for g in grads:
        torch.testing.assert_close(g[0], torch.arange(2.0) + 50.0)  # mean of +0 and +100
        torch.testing.assert_close(g[1], torch.arange(5.0) + 60.0)
        torch.testing.assert_close(g[2], torch.tensor([20.0 / 2]))  # rank 1 had none: counts as zero
        assert g[3] is None  # no rank had one: the optimiser skips it, as one process would

"""Data-parallel PPO on this machine: 1 process vs 2 processes (accelerate launch, gloo), same global batch.

Each arm runs ``tokencredit ppo`` on the built-in SmolLM2-135M-Instruct with LoRA (the command's defaults) for
``--updates`` updates of ``--batch`` prompts, one whole-batch optimiser step per epoch (the setting in which
N processes take exactly the step one process takes), and the same seed. Arms, all using the machine's cores:

    1proc-1thread   one process, OMP_NUM_THREADS=1 (the per-rank work of the 2-process arm, done alone)
    1proc           one process, all cores (OMP_NUM_THREADS = cores)
    2proc           accelerate launch --multi_gpu --num_processes 2 (torchrun + gloo on CPU), 1 thread each

Per arm: seconds per update and episodes/s (median over updates after the first, from rank 0's metrics.jsonl;
every rank waits for the others at each gradient all-reduce, so rank 0's clock is the run's), the split into
sampling / scoring / optimisation, and each process's peak RSS (VmHWM, polled from /proc). Results go to
benchmarks/results/distributed_scaling.json and .svg; a run prints the ratios side by side.

    python benchmarks/distributed_scaling.py            # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def peak_rss_mb(marker: str) -> dict[int, float]:
    """VmHWM (peak resident memory) of every live process whose command line contains marker, in MB."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            launcher = "accelerate" in cmdline and " launch " in cmdline  # the launcher itself trains nothing
            if marker not in cmdline or "distributed_scaling" in cmdline or launcher:
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[int(pid)] = int(line.split()[1]) / 1024
        except (OSError, IndexError):
            continue
    return out


def run_arm(name: str, processes: int, threads: int, args: argparse.Namespace, work: Path) -> dict:
    """Run one arm to completion and read its timings and memory."""
    run = work / name
    settings = [f"output_dir={run}", f"num_updates={args.updates}", f"batch_size={args.batch}",
                f"mini_batch_size={args.batch}", f"max_new_tokens={args.tokens}", "progress=false",
                "log_tensorboard=false", f"save_every={args.updates}", "seed=0"]
    if processes == 1:
        cmd = [sys.executable, "-m", "tokencredit", "ppo", *settings]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        exe = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
        cmd = [exe, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               "-m", "tokencredit", "ppo", *settings]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    began = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, float] = {}
    while proc.poll() is None:
        peaks.update(peak_rss_mb(str(run)))
        time.sleep(1.0)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{err[-3000:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:] if len(records) > 1 else records  # the first update pays for warm-up
    per_update = [r["time/rollout"] + r["time/score"] + r["time/update"] for r in steady]
    sec = statistics.median(per_update)
    shutil.rmtree(run, ignore_errors=True)
    return {
        "processes": processes, "threads_per_process": threads, "seconds_per_update": sec,
        "episodes_per_second": args.batch / sec,
        "rollout_s": statistics.median(r["time/rollout"] for r in steady),
        "score_s": statistics.median(r["time/score"] for r in steady),
        "update_s": statistics.median(r["time/update"] for r in steady),
        "peak_rss_mb_per_process": sorted(round(v) for v in peaks.values()),
        "wall_seconds": round(time.time() - began, 1),
        "last_reward": records[-1]["reward/mean"],
    }


def main() -> int:
    """Run the arms, print ratios, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--arms", nargs="+", default=["1proc-1thread", "1proc", "2proc"])
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    plan = {"1proc-1thread": (1, 1), "1proc": (1, cores), "2proc": (2, max(1, cores // 2))}
    result = {"args": vars(args), "cores": cores, "arms": {}}
    out = RESULTS / "distributed_scaling.json"
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tc-scaling-") as work:
        for name in args.arms:
            processes, threads = plan[name]
            print(f"{name}: {processes} process(es) x {threads} thread(s) ...", flush=True)
            result["arms"][name] = run_arm(name, processes, threads, args, Path(work))
            print(json.dumps(result["arms"][name]), flush=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
    arms = result["arms"]
    print(f"\n{'arm':15}{'s/update':>10}{'episodes/s':>12}{'rollout':>9}{'score':>8}{'update':>8}  peak RSS MB")
    for name, a in arms.items():
        print(f"{name:15}{a['seconds_per_update']:10.1f}{a['episodes_per_second']:12.3f}{a['rollout_s']:9.1f}"
              f"{a['score_s']:8.1f}{a['update_s']:8.1f}  {a['peak_rss_mb_per_process']}")
    if "2proc" in arms and "1proc" in arms:
        ratio = arms["2proc"]["episodes_per_second"] / arms["1proc"]["episodes_per_second"]
        result["ratio_2proc_to_1proc"] = ratio
        print(f"2 processes / 1 process (same cores): {ratio:.2f}x episodes/s")
    if "2proc" in arms and "1proc-1thread" in arms:
        ratio = arms["2proc"]["episodes_per_second"] / arms["1proc-1thread"]["episodes_per_second"]
        result["ratio_2proc_to_1proc_1thread"] = ratio
        print(f"2 processes / 1 process on one core: {ratio:.2f}x episodes/s")
    out.write_text(json.dumps(result, indent=1) + "\n")
    sys.path.insert(0, str(HERE))
    from plot_results import svg_bars

    bars = [(f"{n} ({a['processes']}x{a['threads_per_process']} threads)", a["episodes_per_second"], None, "#4477aa")
            for n, a in arms.items()]
    memory = [(f"{n}: rank {i}", mb, None, "#aa7744") for n, a in arms.items()
              for i, mb in enumerate(a["peak_rss_mb_per_process"])]
    chart = svg_bars([("PPO episodes/s (SmolLM2-135M, LoRA)", bars), ("peak RSS per process, MB", memory)],
                     f"Data-parallel PPO on {cores} CPU cores, batch {args.batch}", unit="")
    (RESULTS / "distributed_scaling.svg").write_text(chart + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Known-answer check of RLGF (issue 31): a sparse exact reward that only a guide can lead the learner to.

Task. The answer is the eight planets, comma-separated, in one secret order ("neptune , mercury , ..."; 15 words,
then the end token); the reward is 1 for exactly that answer and 0 for anything else. The policy is a tiny Llama
(hidden 64, 2 layers) over a word vocabulary of the eight names and the comma, with one prompt.

- The *start* model is the random-init model fine-tuned on random orders of the planets: it writes well-formed
  lists whose order is about uniform, so its chance of the secret order is about 1 / 8! = 2.5e-5.
- The *guide* is the start fine-tuned further on the secret order, stopped as soon as about half of its samples
  are exactly right (``guide_target``).

Why the effect must show. Plain PPO from the start almost never sees a reward (about 0.04 expected successes in
the whole run), so it must stay near 0. PPO++ rolls in with the guide for h tokens and lets the learner finish:
late switch points leave the learner only a few planets to place, so rewards come early and the credit moves
back along the answer; the learner is trained to maximise the exact reward, not to imitate the guide, so it can
end *above* the guide's own success rate ("better than your guide"). AggreVaTeD rolls in with the learner and
lets the guide finish: the learner's prefix is paid when the guide can complete it. D2LOLS is AggreVaTeD, then
PPO++; LOLS mixes them per update.

Arms: ppo, ppo_pp, aggrevated, lols, d2lols, from the same start, seed and sample budget (``num_updates`` x
``batch_size`` rows, guide-written rows included), and ppo_pp_whitened (PPO++ with the trainer's advantage
whitening). Evaluations use the learner alone (``eval_samples`` samples at temperature 1 from its own seeded
stream, no guide), every ``eval_every`` updates. The guide's own success rate is measured the same way. TRIL's
settings where they apply: beta 0.6 for PPO++, 0.8 for the others; the D2LOLS switch at 2/5 of the run (TRIL: 20
of 50 iterations on IMDB); no KL term and no advantage whitening (TRIL's buffer normalises none).

How the settings were found (seed 0 tuning runs). At learning rate 1e-3 every arm's learner collapsed (PPO++:
commas and the end token pushed to log-prob -9 within 50 updates, KL 47 nats); at 3e-4 without whitening PPO++
learned the task; with whitening it collapsed in the tuning seed (the mean shift makes every token of every
unrewarded row negative). A KL coefficient of 0.05 stopped PPO++ from learning at all within 200 updates.

What the first recorded run showed (3 seeds; benchmarks/results/rlgf_known_answer.md): PPO 0; PPO++ 0.97, twice
the guide's 0.49, in every seed; AggreVaTeD's learner ends after 2 of the 8 planets in every seed. TRIL draws
h from {1 .. len-1} of the learner's own answer, so the learner's last token and its end token are never
trained; mass pushed off wrong planets drifts to the end token, and once the learner stops early nothing pushes it
back. Two changes were tried and did not help (so neither was kept): letting h reach the learner's end token, and
one-step advantages (lambda = 0, AggreVaTeD's cost-to-go after a single action). LOLS and D2LOLS inherit it
from their AggreVaTeD updates: each learns in the seeds where the PPO++ updates undo the early stop (LOLS 2/3,
D2LOLS 1/3).

Predictions (mean over seeds; printed PASS/FAIL):

    P1  the start and plain PPO stay below 0.02 success
    P2  the guide's success rate is within 0.35 .. 0.65 (the task as designed)
    P3  PPO++ ends above the guide's success rate
    P4  D2LOLS ends above the guide's success rate
    P5  every guided arm ends above plain PPO
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from seedstats import cpu_name  # noqa: E402 - a sibling module of this script

RESULTS = HERE / "results"
OUT_JSON = RESULTS / "rlgf_known_answer.json"
RUN_ROOT = Path("/tmp/rlgf_known_answer")

PLANETS = ["mercury", "venus", "earth", "mars", "jupiter", "saturn", "uranus", "neptune"]
PROMPT = "planets"
ARMS = ("ppo", "ppo_pp", "aggrevated", "lols", "d2lols", "ppo_pp_whitened")

SETTINGS = {
    "hidden_size": 64, "num_layers": 2, "start_steps": 600, "start_lr": 3e-3, "sft_batch": 32,
    "guide_lr": 3e-4, "guide_target": 0.5, "guide_max_steps": 600, "guide_check_every": 2,
    "num_updates": 200, "batch_size": 16, "learning_rate": 3e-4, "ppo_epochs": 2, "max_new_tokens": 16,
    "beta_ppo_pp": 0.6, "beta_other": 0.8, "lols_tau": 0.8, "d2lols_switch_frac": 0.4,
    "eval_every": 10, "eval_samples": 256,
}


def secret_order() -> list[str]:
    """The secret order: a fixed shuffle of the planets."""
    order = list(PLANETS)
    random.Random(31).shuffle(order)
    return order


def answer_text(order: Sequence[str]) -> str:
    """An order as the answer's words: names separated by commas."""
    return " , ".join(order)


def exact_reward(tok: object):
    """The sparse reward: 1.0 for exactly the secret answer followed by the end token, else 0.0."""
    target = tok(answer_text(secret_order()), add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id

    def reward_fn(prompts: list[str], responses: list[str], response_token_ids: list[list[int]]) -> list[float]:
        return [1.0 if list(ids) == [*target, eos] else 0.0 for ids in response_token_ids]
    return reward_fn


def sample_stats(model: torch.nn.Module, tok: object, seed: int, n: int) -> dict:
    """Of ``n`` samples (temperature 1, own seeded stream): exact-answer share, mean planets named, ended share."""
    from tokencredit.generation import generate

    model.eval()
    with torch.no_grad():
        gen = generate(model, tok, [PROMPT] * n, max_new_tokens=SETTINGS["max_new_tokens"],
                       generator=torch.Generator().manual_seed(seed))
    ids = [row[: int(m.sum())].tolist() for row, m in zip(gen.response_ids, gen.response_mask)]
    return {"success": statistics.fmean(exact_reward(tok)([], [], ids)),
            "planets": statistics.fmean(sum(w in PLANETS for w in t.split()) for t in gen.texts),
            "ended": float(gen.finished.float().mean())}


def success_rate(model: torch.nn.Module, tok: object, seed: int, n: int) -> float:
    """Share of ``n`` samples that are exactly the secret answer."""
    return sample_stats(model, tok, seed, n)["success"]


def sft(model: torch.nn.Module, tok: object, answers, steps: int, lr: float, seed: int,
        stop=None) -> int:
    """Cross-entropy on answer tokens (+ end token) after the prompt; ``stop(step)`` may end it early."""
    gen = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    for step in range(1, steps + 1):
        rows = [prompt_ids + tok(answers(gen), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for _ in range(SETTINGS["sft_batch"])]
        ids = torch.tensor(rows)  # every answer has the same length: no padding
        labels = ids.clone()
        labels[:, : len(prompt_ids)] = -100
        model.train()
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if stop is not None and stop(step):
            return step
    return steps


def make_models(seed: int) -> tuple[object, torch.nn.Module, torch.nn.Module, dict]:
    """Tokenizer, start model and guide of one seed, with how they were made."""
    from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

    tok = tiny_word_tokenizer([*PLANETS, ","])
    start = tiny_causal_lm(len(tok), seed=seed, hidden_size=SETTINGS["hidden_size"],
                           num_layers=SETTINGS["num_layers"], eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)

    def shuffled(gen: random.Random) -> str:
        order = list(PLANETS)
        gen.shuffle(order)
        return answer_text(order)

    sft(start, tok, shuffled, SETTINGS["start_steps"], SETTINGS["start_lr"], seed)
    guide = copy.deepcopy(start)
    secret = answer_text(secret_order())
    checks: list[tuple[int, float]] = []

    def reached(step: int) -> bool:
        if step % SETTINGS["guide_check_every"]:
            return False
        checks.append((step, success_rate(guide, tok, 5_000 + step, 128)))
        return checks[-1][1] >= SETTINGS["guide_target"]

    steps = sft(guide, tok, lambda gen: secret, SETTINGS["guide_max_steps"], SETTINGS["guide_lr"], seed,
                stop=reached)
    info = {"guide_sft_steps": steps, "guide_checks": checks,
            "start_success": success_rate(start, tok, 7_000 + seed, SETTINGS["eval_samples"]),
            "guide_success": success_rate(guide, tok, 8_000 + seed, SETTINGS["eval_samples"])}
    return tok, start, guide, info


def run_arm(arm: str, seed: int, tok: object, start: torch.nn.Module, guide: torch.nn.Module, on_eval) -> dict:
    """Train one arm from the seed's start, evaluating the learner alone every eval_every updates."""
    from tokencredit import PPOConfig, PPOTrainer

    n = SETTINGS["num_updates"]
    algorithm = arm.removesuffix("_whitened")
    beta = SETTINGS["beta_ppo_pp"] if algorithm == "ppo_pp" else SETTINGS["beta_other"]
    cfg = PPOConfig(
        output_dir=str(RUN_ROOT / arm / str(seed)), seed=seed, overwrite=True, num_updates=n,
        batch_size=SETTINGS["batch_size"], mini_batch_size=SETTINGS["batch_size"],
        max_new_tokens=SETTINGS["max_new_tokens"], learning_rate=SETTINGS["learning_rate"],
        ppo_epochs=SETTINGS["ppo_epochs"], kl_coef=0.0, whiten_advantages=arm.endswith("_whitened"),
        algorithm=algorithm, guide_beta=beta, lols_tau=SETTINGS["lols_tau"],
        d2lols_switch_update=int(SETTINGS["d2lols_switch_frac"] * n) if algorithm == "d2lols" else None,
        save_every=10_000, progress=False, log_tensorboard=False, mixed_precision="no")
    policy = copy.deepcopy(start)
    trainer = PPOTrainer(cfg, policy, tok, [PROMPT] * SETTINGS["batch_size"], exact_reward(tok),
                         guide=None if arm == "ppo" else copy.deepcopy(guide))
    record = {"arm": arm, "seed": seed, "evals": [], "rewards": [], "done": False}
    t0 = time.perf_counter()

    def snap(update: int) -> None:
        stats = sample_stats(policy, tok, 20_000 + 101 * seed + update, SETTINGS["eval_samples"])
        record["evals"].append({"update": update, **stats})
        record["time_s"] = time.perf_counter() - t0
        on_eval(record)

    def before_update(t: PPOTrainer) -> None:
        if t.update_idx % SETTINGS["eval_every"] == 0:
            snap(t.update_idx)

    logs = trainer.train(before_update=before_update)
    record["rewards"] = [m.get("reward/mean", 0.0) for m in logs]
    record["learner_token_frac"] = [m.get("guide/learner_token_frac", 1.0) for m in logs]
    snap(n)
    record["done"] = True
    return record


def summarize(data: dict) -> dict:
    """Per arm: start, final and best success of the learner alone (mean, sd over seeds)."""
    def ms(xs: list[float]) -> list[float]:
        return [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]

    out = {}
    for arm, by_seed in data["runs"].items():
        recs = [r for r in by_seed.values() if r.get("done")]
        if recs:
            out[arm] = {"seeds": sorted(r["seed"] for r in recs),
                        "final": ms([r["evals"][-1]["success"] for r in recs]),
                        "best": ms([max(e["success"] for e in r["evals"]) for r in recs]),
                        "final_planets": ms([r["evals"][-1]["planets"] for r in recs]),
                        "reward_per_sample": ms([statistics.fmean(r["rewards"]) for r in recs]),
                        "time_s": ms([r["time_s"] for r in recs])}
    models = list(data["models"].values())
    if models:
        out["start"] = {"seeds": sorted(int(s) for s in data["models"]),
                        "final": ms([m["start_success"] for m in models])}
        out["guide"] = {"seeds": out["start"]["seeds"], "final": ms([m["guide_success"] for m in models]),
                        "sft_steps": ms([m["guide_sft_steps"] for m in models])}
    return out


def predictions(summary: dict) -> list[dict]:
    """P1-P5 of the module docstring, each PASS, FAIL or n/a."""
    def final(arm: str) -> float | None:
        return summary[arm]["final"][0] if arm in summary else None

    out = []

    def check(name: str, ok: bool | None, detail: str) -> None:
        out.append({"prediction": name, "result": "n/a" if ok is None else ("PASS" if ok else "FAIL"),
                    "detail": detail})

    s, g, p = final("start"), final("guide"), final("ppo")
    check("P1 start and plain PPO below 0.02", None if s is None or p is None else s < 0.02 and p < 0.02,
          f"start {s}, ppo {p}")
    check("P2 guide success within 0.35-0.65", None if g is None else 0.35 <= g <= 0.65, f"guide {g}")
    for name, arm in (("P3", "ppo_pp"), ("P4", "d2lols")):
        a = final(arm)
        check(f"{name} {arm} ends above the guide", None if a is None or g is None else a > g, f"{arm} {a}, guide {g}")
    guided = [a for a in ARMS[1:5] if a in summary]
    check("P5 every guided arm above plain PPO",
          None if p is None or not guided else all(final(a) > p for a in guided),
          ", ".join(f"{a} {final(a):.3f}" for a in guided) + f"; ppo {p}")
    return out


def write_report(data: dict) -> None:
    """Chart (.svg: learner-alone success along the run) and table (.md)."""
    from tokencredit.evaluate import svg_line_chart

    summary = data["summary"]
    curves = {}
    for arm, by_seed in data["runs"].items():
        recs = [r for r in by_seed.values() if r.get("done")]
        if recs:
            k = min(len(r["evals"]) for r in recs)
            curves[arm] = [statistics.fmean(r["evals"][i]["success"] for r in recs) for i in range(k)]
    if "guide" in summary and curves:
        width = max(len(c) for c in curves.values())
        curves["guide (its own rate)"] = [summary["guide"]["final"][0]] * width
    if curves:
        (RESULTS / "rlgf_known_answer.svg").write_text(svg_line_chart(
            curves, "Secret planet order: success of the learner alone (mean over seeds)",
            xlabel=f"evaluation (every {SETTINGS['eval_every']} updates; 1 = start)", ylabel="exact answers",
            width=720, height=320))

    def ms(row: dict, key: str) -> str:
        return f"{row[key][0]:.3f} ± {row[key][1]:.3f}"

    lines = ["# RLGF known-answer check (issue 31): the secret planet order", "",
             f"`benchmarks/rlgf_known_answer.py`: {SETTINGS['num_updates']} updates x {SETTINGS['batch_size']} rows "
             f"per arm and seed; success = share of {SETTINGS['eval_samples']} samples of the learner alone (no "
             f"guide) that are exactly the secret answer; mean ± sd over seeds. CPU: {data.get('cpu', '?')}, one "
             "thread.", "",
             "| policy | seeds | final success | best success | planets named (of 8) | training reward per row "
             "| time / seed (s) |",
             "|---|---|---|---|---|---|---|"]
    for name in ("start", "guide", *ARMS):
        if name not in summary:
            continue
        r = summary[name]
        best = ms(r, "best") if "best" in r else "—"
        planets = ms(r, "final_planets") if "final_planets" in r else "—"
        reward = ms(r, "reward_per_sample") if "reward_per_sample" in r else "—"
        secs = f"{r['time_s'][0]:.0f}" if "time_s" in r else "—"
        lines.append(f"| {name} | {len(r['seeds'])} | {ms(r, 'final')} | {best} | {planets} | {reward} | {secs} |")
    lines += ["", "| prediction | result | detail |", "|---|---|---|"]
    lines += [f"| {p['prediction']} | {p['result']} | {p['detail']} |" for p in data.get("predictions", [])]
    lines += ["", "Settings: `" + json.dumps(data["settings"]) + "`", ""]
    (RESULTS / "rlgf_known_answer.md").write_text("\n".join(lines))


def save(data: dict) -> None:
    """Summary, predictions and the JSON file, written atomically (a cut run leaves what it measured)."""
    from tokencredit.runs import atomic_write_json

    data["summary"] = summarize(data)
    data["predictions"] = predictions(data["summary"])
    atomic_write_json(OUT_JSON, data)


def main(argv: Sequence[str] | None = None) -> int:
    """Make each seed's start and guide, run the arms, write results, chart and table, print the checks."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override a setting (tuning only; the results file records the settings used)")
    p.add_argument("--report", action="store_true", help="only rewrite summary, chart and table from the JSON")
    p.add_argument("--fresh", action="store_true", help="drop runs already in the results file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in SETTINGS:
            p.error(f"unknown setting {key!r}")
        SETTINGS[key] = type(SETTINGS[key])(value)
    data = {"settings": dict(SETTINGS), "cpu": cpu_name(), "models": {}, "runs": {}}
    if OUT_JSON.exists() and not args.fresh:
        old = json.loads(OUT_JSON.read_text())
        # Runs of other settings are not comparable: keep only runs made with exactly these.
        if old.get("settings") == data["settings"] or args.report:
            data = old if args.report else dict(data, models=old.get("models", {}), runs=old.get("runs", {}))
    if not args.report:
        RUN_ROOT.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            todo = [a for a in args.arms if not data["runs"].get(a, {}).get(str(seed), {}).get("done")]
            if not todo:
                continue
            print(f"== seed {seed}: start and guide", flush=True)
            tok, start, guide, info = make_models(seed)
            data["models"][str(seed)] = info
            print(f"   start {info['start_success']:.3f}, guide {info['guide_success']:.3f} after "
                  f"{info['guide_sft_steps']} SFT steps", flush=True)
            save(data)
            for arm in todo:
                print(f"== {arm} seed {seed}", flush=True)

                def on_eval(record: dict, arm: str = arm, seed: int = seed) -> None:
                    data["runs"].setdefault(arm, {})[str(seed)] = record
                    save(data)

                on_eval(run_arm(arm, seed, tok, start, guide, on_eval))
                print(f"   final {data['runs'][arm][str(seed)]['evals'][-1]['success']:.3f}", flush=True)
    save(data)
    write_report(data)
    for pred in data["predictions"]:
        print(f"{pred['result']:7s} {pred['prediction']}  [{pred['detail']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

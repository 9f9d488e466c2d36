"""`tokencredit ser`: self-evolved reward learning, then PPO on the evolved reward model (arXiv 2411.00418).

The data's distinct prompts are split three ways, so that no text is shared between what trains the arms and
what judges them: the last ``test_prompts`` prompts (the policies are evaluated on them; no reward model trains
on their pairs), a ``judge_fraction`` share of the others, drawn with the seed (their pairs train the judge alone),
and the rest (the SER pairs).

1. **Evolve** (``evolve/``): a sequence reward model trained on ``labelled_fraction`` of the SER pairs labels the
   rest of them itself, loop after loop, keeping only pairs it is sure of (``tokencredit evolve``). The RM on 100%
   of the SER pairs' labels is trained too: the reference for the evolved RM's accuracy.
2. **Judge** (``judge/``): a sequence RM (``judge_model``, default the same backbone) on the judge pairs alone,
   with every label; its held-out accuracy is reported, since a judge at chance cannot tell the policies apart.
3. **PPO** (``ppo_ser/``, ``ppo_seed/``): the same start policy, budget and seed, rewarded by sigma(r) - 0.5 of
   the best evolved RM, and — the baseline SER has to beat — of the seed RM that saw only the labelled share.
   KL to the start policy is steered by the adaptive controller, as in the paper.
4. **Evaluate**: greedy answers to the test prompts from the start policy and both PPO policies, scored by the
   judge (trained on other prompts' pairs than either arm's reward model) as the mean sigma(r), plus length.

``summary.json`` and ``report.html`` land in ``output``. Stages are skipped when ``resume=true`` finds them done.
The same thing from the command line, by hand:

    tokencredit evolve data=pairs.jsonl output_dir=runs/ser/evolve full_baseline=true
    tokencredit ppo reward=rm:runs/ser/evolve/loop-K/model reward_sigmoid_baseline=0.5 adaptive_kl=true ...
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from tokencredit.models import LoraSettings, load_policy, load_tokenizer, quiet_saves
from tokencredit.recipes.stages import Stage, check_fast_model, claim_recipe_folder, clamp_layers
from tokencredit.run_folders import releases_run_folders
from tokencredit.runs import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class SERRecipeConfig:
    """Every knob of the SER recipe; the defaults are sized for the built-in models on a CPU."""

    output: str = "runs/ser"  # folder for every stage, summary.json and report.html
    data: str | None = None  # .jsonl of {prompt, chosen, rejected}; the prompts are also the RL prompts
    fast: bool = False  # tiny random models and toy pairs, few steps: for tests, not for results
    seed: int = 0  # one seed for the evolve loops and both PPO arms
    resume: bool = False  # skip finished stages; continue interrupted ones
    overwrite: bool = False  # replace a run already in the output folder (kept aside until this one finishes)
    allow_changed_settings: bool = False  # resume even though settings differ from the saved config.yaml

    # --- 1. evolve (see tokencredit.rewards.evolve.EvolveConfig) ---
    rm_model: str = "all-minilm-l6-v2"  # backbone of the sequence RMs
    max_pairs: int | None = 600  # use only the first N pairs of data; None = all
    labelled_fraction: float = 0.15  # share of the training pairs whose labels the seed RM may use
    max_loops: int = 3  # SER loops after the seed loop
    rm_epochs: int = 3  # passes over each loop's training pairs
    rm_learning_rate: float = 2e-4  # RM learning rate (AdamW)
    rm_max_length: int = 256  # prompt + response tokens the RMs read
    # The paper's thresholds on sigma(r) as they are (False), or on sigma of the pool-standardised scores (True:
    # for a small RM whose raw scores never leave sigma's 0.45-0.55 band; a looser rule than the paper's)
    calibrate: bool = False
    val_fraction: float = 0.1  # share of the SER training pairs that chooses the best loop (never trained on)

    # --- 2. judge: the evaluation scorer, on prompts neither arm's reward model saw ---
    judge_fraction: float = 0.3  # share of the non-test prompts whose pairs train only the judge
    judge_model: str | None = None  # the judge's backbone; None = rm_model

    # --- 2. ppo: both arms (the evolved RM and the seed RM) use these ---
    policy_model: str = "smollm2-135m-instruct"  # start policy of both arms (built-in name, folder or hub id)
    chat_template: bool = True  # the policy sees prompts in its chat template; the RMs see them raw
    test_prompts: int = 32  # held-out prompts (the last ones of the data) for the evaluation
    ppo_updates: int = 5  # PPO updates per arm (each = one rollout batch + one epoch of optimisation)
    ppo_batch_size: int = 16  # prompts (= sampled responses) per update; mini-batches are half of it
    ppo_learning_rate: float = 5e-4  # policy (LoRA) learning rate
    max_new_tokens: int = 32  # longest response, in tokens, in PPO and in the evaluation
    sigmoid_baseline: float = 0.5  # reward = sigma(r) - baseline
    kl_coef: float = 0.05  # initial coefficient of the adaptive controller
    kl_target: float = 2.0  # KL per sequence the controller steers towards
    lora_r: int = 8  # LoRA rank of the policy adapters (alpha = 2 * lora_r)
    top_layers: int | None = 10  # blocks with adapters (None = all): cheaper backward passes on a CPU

    def validate(self) -> None:
        """Check what would fail late."""
        check_fast_model(self.fast, self.policy_model, "policy_model")
        if self.data is None and not self.fast:
            raise ValueError("ser needs data=PAIRS.jsonl ({prompt, chosen, rejected} records), or fast=true")
        if self.test_prompts < 1 or self.ppo_updates < 1:
            raise ValueError("test_prompts and ppo_updates must be >= 1")
        if not 0 < self.judge_fraction < 1:
            raise ValueError(f"judge_fraction must be in (0, 1): the judge and the SER arms each need prompts "
                             f"(got {self.judge_fraction})")


FAST_OVERRIDES = dict(max_pairs=80, max_loops=1, rm_epochs=1, test_prompts=2, ppo_updates=2, ppo_batch_size=4,
                      max_new_tokens=4, top_layers=None, lora_r=4)


def _fast_inputs(root: Path) -> tuple[str, str, str]:
    """Toy pairs and tiny random policy / RM backbones (one word tokenizer) for fast mode."""
    from tokencredit.testing import save_tiny_causal_lm, toy_preference_pairs

    words = "a b c d x y".split()
    data = root / "toy_pairs.jsonl"
    rng = random.Random(0)
    pairs = toy_preference_pairs(80, rng)
    for pair in pairs:  # two-word prompts: 16 distinct ones, enough for the test / judge / SER split
        pair["prompt"] = f"{rng.choice('abcd')} {rng.choice('abcd')}"
    data.write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    model = save_tiny_causal_lm(root / "tiny-model", words)
    return str(data), str(model), str(model)


@releases_run_folders
def run_ser(cfg: SERRecipeConfig) -> dict:
    """Evolve a reward model, train a policy on it and on the seed RM, evaluate; returns the summary."""
    with quiet_saves():
        return _run_ser(cfg)


def _run_ser(cfg: SERRecipeConfig) -> dict:
    """run_ser without the progress-bar settings."""
    from tokencredit.rewards.evolve import EvolveConfig, run_evolve

    if cfg.fast:
        cfg = SERRecipeConfig(**{**vars(cfg), **FAST_OVERRIDES})
    cfg.validate()
    root = Path(cfg.output)
    drop_replaced = claim_recipe_folder(root, cfg)
    data, policy_model, rm_model = (_fast_inputs(root) if cfg.fast else (cfg.data, cfg.policy_model, cfg.rm_model))

    ser_file, judge_file, train_prompts, test_prompts = _split_by_prompt(cfg, data, root)

    # 1. Evolve from the labelled share of the SER pairs, with the 100%-label reference beside it.
    evolve_stage = Stage(root, "evolve", cfg.resume)
    evolve = evolve_stage.info() if evolve_stage.done else None
    if evolve is None:
        evolve = run_evolve(EvolveConfig(
            output_dir=str(root / "evolve"), model=rm_model, data=str(ser_file), max_pairs=cfg.max_pairs,
            seed=cfg.seed, labelled_fraction=cfg.labelled_fraction, val_fraction=cfg.val_fraction,
            max_loops=cfg.max_loops, patience=2, num_epochs=cfg.rm_epochs, batch_size=16,
            learning_rate=cfg.rm_learning_rate, max_length=cfg.rm_max_length, full_baseline=True,
            calibrate=cfg.calibrate, progress=not cfg.fast))
        evolve_stage.finish(evolve)
    models = {"ppo_ser": evolve["best_model"], "ppo_seed": str(root / "evolve" / "loop-0" / "model")}

    # 2. The judge, on pairs of prompts neither arm's reward model trained on.
    judge_stage = Stage(root, "judge", cfg.resume)
    judge = judge_stage.info() if judge_stage.done else None
    if judge is None:
        judge = _train_judge(cfg, cfg.judge_model or rm_model, judge_file, root / "judge")
        judge_stage.finish(judge)
    scorer = judge["model"]

    # 3. The same start, budget and seed for both arms; only the reward model differs.
    for arm, rm_folder in models.items():
        stage = Stage(root, arm, cfg.resume)
        if not stage.done:
            history = _ppo(cfg, arm, root, policy_model, rm_folder, train_prompts)
            stage.finish({"updates": len(history), "reward_model": rm_folder})

    # 4. Greedy answers on the test prompts, scored by the judge.
    results = {name: _evaluate(cfg, policy, policy_model, scorer, test_prompts)
               for name, policy in (("start", policy_model), ("ppo_seed", str(root / "ppo_seed" / "policy")),
                                    ("ppo_ser", str(root / "ppo_ser" / "policy")))}
    summary = {"evolve": {k: evolve.get(k) for k in ("seed_accuracy", "best_accuracy", "best_loop",
                                                     "full_label_accuracy", "stop_reason", "chosen_on")},
               "judge": judge, "policies": results, "train_prompts": len(train_prompts),
               "test_prompts": len(test_prompts), "scorer": scorer}
    atomic_write_json(root / "summary.json", summary)
    _report(root, summary, evolve)
    drop_replaced()  # a replaced run goes only once this one has finished
    return summary


def _split_by_prompt(cfg: SERRecipeConfig, data: str, root: Path) -> tuple[Path, Path, list[str], list[str]]:
    """Write the SER pairs and the judge pairs to root (split by prompt, so no text crosses); return both files,
    the RL training prompts (the SER pairs' prompts) and the test prompts (whose pairs no reward model sees)."""
    from tokencredit.runs import atomic_write_text

    records = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
    prompts = list(dict.fromkeys(r["prompt"] for r in records))
    if len(prompts) <= cfg.test_prompts + 1:
        raise ValueError(f"{len(prompts)} distinct prompts: after {cfg.test_prompts} test prompts the judge and "
                         "the SER arms need at least one prompt each; lower test_prompts or add data")
    test_prompts, rest = prompts[-cfg.test_prompts:], prompts[: -cfg.test_prompts]
    shuffled = list(rest)
    random.Random(cfg.seed).shuffle(shuffled)
    n_judge = min(max(1, round(cfg.judge_fraction * len(rest))), len(rest) - 1)
    judge_prompts = set(shuffled[:n_judge])
    train_prompts = [p for p in rest if p not in judge_prompts]
    ser_file, judge_file = root / "ser_pairs.jsonl", root / "judge_pairs.jsonl"
    for path, keep in ((ser_file, set(train_prompts)), (judge_file, judge_prompts)):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records if r["prompt"] in keep))
    return ser_file, judge_file, train_prompts, test_prompts


def _train_judge(cfg: SERRecipeConfig, backbone: str, data: Path, folder: Path) -> dict:
    """The evaluation scorer: a sequence RM on every label of the judge pairs; its model folder and accuracy on
    a held-out tenth of them."""
    from tokencredit.rewards.data import load_pairs
    from tokencredit.rewards.seq_rm import SeqRMConfig, SequenceRewardModel, train_sequence_reward_model

    pairs = load_pairs(str(data))
    rm = SequenceRewardModel.from_pretrained(backbone, seed=cfg.seed)
    config = SeqRMConfig(output_dir=str(folder), seed=cfg.seed, num_epochs=cfg.rm_epochs, batch_size=16,
                         learning_rate=cfg.rm_learning_rate, max_length=cfg.rm_max_length,
                         eval_fraction=0.1 if len(pairs) >= 10 else 0.0, progress=not cfg.fast)
    history = train_sequence_reward_model(rm, config, pairs)
    return {"model": str(folder / "model"), "pairs": len(pairs), "backbone": backbone,
            "heldout_accuracy": history[-1]["eval"]["pair_accuracy"]}


def _ppo(cfg: SERRecipeConfig, arm: str, root: Path, policy_model: str, rm_folder: str,
         prompts: list[str]) -> list[dict]:
    """PPO from the start policy on sigma(RM) - baseline with adaptive KL; the policy lands in root/arm/policy."""
    from tokencredit.models import apply_chat
    from tokencredit.rewards.saved import SavedRewardSettings, reward_from_saved_rm
    from tokencredit.rl.ppo import PPOConfig, PPOTrainer

    tokenizer = load_tokenizer(policy_model)
    rendered = apply_chat(tokenizer, prompts) if cfg.chat_template and tokenizer.chat_template else list(prompts)
    raw_of = dict(zip(rendered, prompts))
    reward = reward_from_saved_rm(rm_folder, tokenizer, SavedRewardSettings(sigmoid_baseline=cfg.sigmoid_baseline),
                                  raw_prompt=lambda p: raw_of.get(p, p))
    # A smaller model than the default has fewer blocks than top_layers: then every block gets adapters.
    lora = LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r, dropout=0.0,
                        top_layers=clamp_layers(policy_model, cfg.top_layers))
    policy = load_policy(policy_model, lora=lora, seed=cfg.seed)
    config = PPOConfig(output_dir=str(root / arm), seed=cfg.seed, num_updates=cfg.ppo_updates,
                       batch_size=cfg.ppo_batch_size, mini_batch_size=cfg.ppo_batch_size // 2 or 1, ppo_epochs=1,
                       learning_rate=cfg.ppo_learning_rate, max_new_tokens=cfg.max_new_tokens,
                       kl_coef=cfg.kl_coef, adaptive_kl=True, kl_target=cfg.kl_target,
                       kl_horizon=cfg.ppo_updates * cfg.ppo_batch_size, resume=cfg.resume, log_tensorboard=False,
                       progress=not cfg.fast, save_every=max(1, cfg.ppo_updates // 2))
    trainer = PPOTrainer(config, policy=policy, tokenizer=tokenizer, prompts=rendered, reward_fn=reward)
    return trainer.train()


@torch.no_grad()
def _evaluate(cfg: SERRecipeConfig, policy_path: str, base_model: str, scorer: str, prompts: list[str]) -> dict:
    """Mean sigma(score) of the 100%-label RM on greedy answers, and their mean length in words."""
    from tokencredit.generation import generate
    from tokencredit.models import apply_chat, load_trained_policy
    from tokencredit.rewards.saved import load_saved_reward_model

    model, tokenizer = load_trained_policy(policy_path)
    rendered = apply_chat(tokenizer, prompts) if cfg.chat_template and tokenizer.chat_template else list(prompts)
    answers = []
    for start in range(0, len(rendered), 16):  # bounded batches: the held-out set can be large
        answers += generate(model, tokenizer, rendered[start : start + 16], max_new_tokens=cfg.max_new_tokens,
                            greedy=True).texts
    rm = load_saved_reward_model(scorer)
    scores = rm.score_sequences(prompts, answers, max_length=cfg.rm_max_length)
    probs = [1.0 / (1.0 + math.exp(-s)) for s in scores]
    return {"scorer_mean_sigma": sum(probs) / len(probs), "mean_words": sum(len(a.split()) for a in answers)
            / len(answers), "examples": [{"prompt": p, "answer": a, "sigma": q}
                                         for p, a, q in list(zip(prompts, answers, probs))[:5]]}


def _report(root: Path, summary: dict, evolve: dict) -> None:
    """report.html: the evolve accuracies and the policies' held-out scores."""
    from tokencredit.evaluate import html_table, write_html_report

    rows = [{"policy": name, "scorer mean sigma(r)": round(r["scorer_mean_sigma"], 4),
             "mean words": round(r["mean_words"], 1)} for name, r in summary["policies"].items()]
    loops = [{k: v for k, v in r.items() if k in ("loop", "heldout_accuracy", "test_accuracy", "selected",
                                                    "pseudo_label_accuracy", "train_pairs")}
             for r in evolve.get("loops", [])]
    examples = [{"policy": name, **ex} for name, r in summary["policies"].items() for ex in r["examples"]]
    judge = {k: summary["judge"][k] for k in ("backbone", "pairs", "heldout_accuracy")}
    write_html_report(root / "report.html", "tokencredit ser: self-evolved reward, then PPO", [
        ("Reward models (loop accuracies: heldout = validation pairs, which choose the loop; test = report)",
         html_table([summary["evolve"]]) + html_table(loops)),
        ("Judge (trained on other prompts' pairs than either arm's reward model)", html_table([judge])),
        ("Policies on held-out prompts (scored by the judge)", html_table(rows)),
        ("Examples", html_table(examples)),
    ])

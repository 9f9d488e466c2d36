"""`tokencredit rlgf`: reinforcement learning with a guide LLM (RLGF, arXiv 2306.11816) on IMDB continuation.

1. **Data** (``data/``): reviews {text, label}; a prompt is a review's first ``prompt_words`` words, its target
   the next ``target_words``. A held-out sentiment scorer (bag of words, trained here on the training reviews'
   labels, saved as JSON) judges the policies beside the reward scorer.
2. **Start and guide** (``learner_sft/``, ``guide_sft/``): the learner starts from the built-in model fine-tuned
   on all training reviews; the guide is the same model fine-tuned on the positive ones only — a policy that
   already writes what the reward wants, as RLGF's guide is.
3. **RL** (one folder per algorithm): the same start, seed and sample budget for each of ``algorithms`` — plain
   PPO, PPO++, AggreVaTeD, LOLS and D2LOLS (see :mod:`tokencredit.rl.guided`) — rewarded by P(positive) of the
   continuation under VADER.
4. **Evaluate**: sampled continuations of held-out prompts: VADER (the training reward), the held-out scorer
   (never trained on), perplexity under the start model (fluency), length and distinct-n.

``summary.json`` and ``report.html`` (reward curves of every algorithm, metrics table, examples) land in ``output``;
``resume=true`` skips finished stages. ``fast=true`` uses toy reviews and a tiny random model, for tests.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokencredit.config import save_config
from tokencredit.models import LoraSettings, load_policy, load_tokenizer, quiet_saves
from tokencredit.precision import release_free_memory
from tokencredit.recipes.tppo import _Stage
from tokencredit.runs import atomic_write_json, read_metrics

log = logging.getLogger(__name__)

ALL_ALGORITHMS = ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols"]


@dataclass
class RLGFConfig:
    """Every knob of the RLGF recipe; the defaults are sized for the built-in model on a CPU."""

    output: str = "runs/rlgf"
    task: str = "imdb"  # the one task wired up so far
    data: str | None = None  # reviews .jsonl {text, label}; required unless fast
    test_data: str | None = None  # held-out reviews; None = test_fraction of data
    test_fraction: float = 0.2
    max_reviews: int | None = 2000
    fast: bool = False
    seed: int = 0
    resume: bool = False
    model: str = "smollm2-135m-instruct"
    prompt_words: int = 12
    target_words: int = 24  # SFT targets; also bounds max_new_tokens in spirit (~1.3 tokens a word)
    max_new_tokens: int = 24
    algorithms: list[str] = field(default_factory=lambda: list(ALL_ALGORITHMS))

    sft_examples: int = 512  # reviews per SFT (the guide takes that many positive ones)
    sft_epochs: int = 1
    sft_learning_rate: float = 5e-4
    lora_r: int = 16
    top_layers: int | None = 10  # blocks with adapters (None = all): cheaper backward passes on a CPU

    ppo_updates: int = 10
    ppo_batch_size: int = 16
    ppo_learning_rate: float = 1e-3
    kl_coef: float = 0.05
    guide_beta: float = 0.5
    lols_tau: float = 0.8
    d2lols_switch_update: int | None = None  # None = half of ppo_updates
    eval_prompts: int = 64

    def validate(self) -> None:
        """Check what would fail late."""
        if self.task != "imdb":
            raise ValueError(f"task must be 'imdb' for now (got {self.task!r}); CommonGen's task module exists "
                             "(tokencredit.tasks.commongen) but its recipe stage is not wired yet")
        if self.data is None and not self.fast:
            raise ValueError("rlgf needs data=REVIEWS.jsonl ({text, label} records), or fast=true")
        unknown = set(self.algorithms) - set(ALL_ALGORITHMS)
        if unknown or not self.algorithms:
            raise ValueError(f"algorithms must be among {ALL_ALGORITHMS} (got {self.algorithms})")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1) (got {self.test_fraction})")


FAST_OVERRIDES = dict(max_reviews=60, prompt_words=4, target_words=6, max_new_tokens=6, sft_examples=24,
                      ppo_updates=2, ppo_batch_size=4, eval_prompts=4, top_layers=None, lora_r=4)

_FAST_WORDS = "great good fine love awful bad boring film movie plot acting was the a and it this".split()


def _fast_inputs(root: Path) -> tuple[str, str]:
    """Toy labelled reviews and a tiny random model over their words, for fast mode."""
    from tokencredit.testing import save_tiny_causal_lm

    rng = random.Random(0)
    rows = []
    for i in range(60):
        label = i % 2
        mood = ["great", "good", "love"] if label else ["awful", "bad", "boring"]
        words = [rng.choice(["the", "film", "movie", "plot", "acting", "was", "it", "this", "a", "and"])
                 for _ in range(8)]
        words[rng.randrange(8)] = rng.choice(mood)
        words += [rng.choice(mood) for _ in range(4)]
        rows.append({"text": " ".join(words), "label": label})
    data = root / "toy_reviews.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(data), str(save_tiny_causal_lm(root / "tiny-model", _FAST_WORDS))


def _split(review_text: str, prompt_words: int, target_words: int) -> tuple[str, str]:
    """(the review's first words, the words after them)."""
    words = review_text.split()
    return " ".join(words[:prompt_words]), " " + " ".join(words[prompt_words : prompt_words + target_words])


def run_rlgf(cfg: RLGFConfig) -> dict:
    """Run every stage; returns the summary also written to summary.json."""
    with quiet_saves():
        return _run_rlgf(cfg)


def _run_rlgf(cfg: RLGFConfig) -> dict:
    """run_rlgf without the progress-bar settings."""
    from tokencredit.tasks.imdb import BagOfWordsScorer, clean_review, load_reviews, train_bow_scorer

    if cfg.fast:
        cfg = RLGFConfig(**{**vars(cfg), **FAST_OVERRIDES})
    cfg.validate()
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    data, model_name = _fast_inputs(root) if cfg.fast else (cfg.data, cfg.model)

    # 1. Reviews, prompts and the held-out scorer.
    reviews = load_reviews(data)[: cfg.max_reviews]
    if cfg.test_data is not None:
        train, test = reviews, load_reviews(cfg.test_data)
    else:
        order = list(range(len(reviews)))
        random.Random(cfg.seed).shuffle(order)
        n_test = max(1, round(cfg.test_fraction * len(reviews)))
        test, train = [reviews[i] for i in order[:n_test]], [reviews[i] for i in order[n_test:]]
    scorer_path = root / "data" / "heldout_scorer.json"
    if cfg.resume and scorer_path.exists():
        heldout = BagOfWordsScorer.load(scorer_path)
    else:
        heldout = train_bow_scorer(train, min_df=1 if cfg.fast else 2)
        heldout.save(scorer_path)
    pairs = [_split(clean_review(r.text), cfg.prompt_words, cfg.target_words) for r in train]
    train_prompts = [p for p, _ in pairs]
    test_prompts = [_split(clean_review(r.text), cfg.prompt_words, cfg.target_words)[0]
                    for r in test][: cfg.eval_prompts]

    # 2. The learner's start (all reviews) and the guide (positive reviews only), LoRA merged into plain models.
    tokenizer = load_tokenizer(model_name)
    positives = [pair for pair, r in zip(pairs, train) if r.label == 1]
    start = _sft(cfg, model_name, tokenizer, pairs[: cfg.sft_examples], root / "learner_sft")
    guide_model = _sft(cfg, model_name, tokenizer, positives[: cfg.sft_examples], root / "guide_sft")

    # 3. Every algorithm from the same start with the same seed and budget.
    curves = {}
    for algorithm in cfg.algorithms:
        stage = _Stage(root, algorithm, cfg.resume)
        if not stage.done:
            _rl(cfg, algorithm, start, guide_model, tokenizer, train_prompts, stage.dir)
            stage.finish({"algorithm": algorithm})
        curves[algorithm] = [m.get("reward/mean") for m in read_metrics(stage.dir)]

    # 4. Held-out prompts: the training reward, the held-out scorer, fluency under the start model.
    policies = {"start": None, **{a: root / a / "policy" for a in cfg.algorithms}}
    results = {name: _evaluate(cfg, start, adapter, tokenizer, test_prompts, heldout)
               for name, adapter in policies.items()}
    summary = {"task": cfg.task, "train_reviews": len(train), "test_prompts": len(test_prompts),
               "heldout_scorer_accuracy": heldout.accuracy([clean_review(r.text) for r in test],
                                                           [r.label for r in test]),
               "policies": results, "reward_curves": curves}
    atomic_write_json(root / "summary.json", summary)
    _report(root, summary)
    return summary


def _sft(cfg: RLGFConfig, model_name: str, tokenizer: object, pairs: list[tuple[str, str]], folder: Path) -> str:
    """LoRA SFT on (opening, continuation), merged and saved as a plain model; returns its folder."""
    from tokencredit.rl.sft import SFTConfig, SFTTrainer

    merged_dir = folder / "merged"
    if cfg.resume and (merged_dir / "config.json").exists():
        return str(merged_dir)
    if not pairs:
        raise ValueError(f"{folder.name}: no training examples (are there positive reviews in the data?)")
    policy = load_policy(model_name, lora=LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r, dropout=0.0),
                         seed=cfg.seed)
    SFTTrainer(SFTConfig(output_dir=str(folder), seed=cfg.seed, num_epochs=cfg.sft_epochs, batch_size=8,
                         learning_rate=cfg.sft_learning_rate, log_tensorboard=False, progress=not cfg.fast),
               policy=policy, tokenizer=tokenizer, prompts=[p for p, _ in pairs],
               responses=[r for _, r in pairs]).train()
    merged = policy.merge_and_unload()
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    del policy, merged
    release_free_memory()
    return str(merged_dir)


def _rl(cfg: RLGFConfig, algorithm: str, start: str, guide_model: str, tokenizer: object, prompts: list[str],
        folder: Path) -> None:
    """One algorithm's run: LoRA on the start model, VADER reward, the guide model when the algorithm uses one."""
    from tokencredit.rl.ppo import PPOConfig, PPOTrainer
    from tokencredit.tasks.imdb import VaderScorer, imdb_reward_fn

    top = cfg.top_layers
    policy = load_policy(start, lora=LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r, dropout=0.0, top_layers=top),
                         seed=cfg.seed)
    guide = None if algorithm == "ppo" else load_policy(guide_model)
    config = PPOConfig(output_dir=str(folder), seed=cfg.seed, num_updates=cfg.ppo_updates,
                       batch_size=cfg.ppo_batch_size, mini_batch_size=cfg.ppo_batch_size, ppo_epochs=2,
                       learning_rate=cfg.ppo_learning_rate, max_new_tokens=cfg.max_new_tokens, kl_coef=cfg.kl_coef,
                       algorithm=algorithm, guide_beta=cfg.guide_beta, lols_tau=cfg.lols_tau,
                       d2lols_switch_update=(cfg.d2lols_switch_update if cfg.d2lols_switch_update is not None
                                             else cfg.ppo_updates // 2),
                       resume=cfg.resume, save_every=max(1, cfg.ppo_updates // 2), log_tensorboard=False,
                       progress=not cfg.fast)
    PPOTrainer(config, policy=policy, tokenizer=tokenizer, prompts=prompts, reward_fn=imdb_reward_fn(VaderScorer()),
               guide=guide).train()
    del policy, guide
    release_free_memory()


@torch.no_grad()
def _evaluate(cfg: RLGFConfig, start: str, adapter: Path | None, tokenizer: object, prompts: list[str],
              heldout: object) -> dict:
    """Sampled continuations (seeded) of the held-out prompts and their metrics."""
    from peft import PeftModel

    from tokencredit.generation import generate
    from tokencredit.tasks.imdb import VaderScorer, imdb_metrics

    base = load_policy(start)
    policy = base if adapter is None else PeftModel.from_pretrained(load_policy(start), adapter).merge_and_unload()
    generator = torch.Generator().manual_seed(cfg.seed)
    texts: list[str] = []
    for begin in range(0, len(prompts), 16):
        texts += generate(policy, tokenizer, prompts[begin : begin + 16], max_new_tokens=cfg.max_new_tokens,
                          generator=generator).texts
    metrics = imdb_metrics(prompts, texts, reward_scorer=VaderScorer(), heldout_scorer=heldout, model=base,
                           tokenizer=tokenizer)
    metrics["examples"] = [{"prompt": p, "continuation": t} for p, t in list(zip(prompts, texts))[:4]]
    return metrics


def _report(root: Path, summary: dict) -> None:
    """report.html: reward curves, the held-out table and examples."""
    from tokencredit.evaluate import html_table, svg_line_chart, write_html_report

    curves = {k: [v for v in vals if v is not None] for k, vals in summary["reward_curves"].items()}
    chart = svg_line_chart(curves, "Training reward (VADER P(positive)) per update", xlabel="update",
                           ylabel="reward")
    keys = ("reward_p_pos", "heldout_p_pos", "perplexity", "mean_length", "distinct_2")
    rows = [{"policy": name, **{k: round(float(m[k]), 4) for k in keys if k in m}}
            for name, m in summary["policies"].items()]
    examples = [{"policy": name, **ex} for name, m in summary["policies"].items() for ex in m["examples"]]
    write_html_report(root / "report.html", "tokencredit rlgf: learning with a guide (IMDB)", [
        ("Reward curves", chart), ("Held-out prompts", html_table(rows)), ("Examples", html_table(examples))])

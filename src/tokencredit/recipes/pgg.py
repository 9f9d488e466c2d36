"""`tokencredit pgg`: preference-grounded token guidance (PGG, arXiv 2306.00398) end to end.

``task=fewshot`` — discrete prompt generation. The policy (the built-in model with LoRA) is asked to write a
short phrase; a frozen copy of the built-in model classifies the 16-shot training examples with that phrase
(:class:`~tokencredit.tasks.fewshot.PromptedClassifier`), and the mean classification margin is the metric
that ranks the samples. Arms, same start, seed and budget: ``pgg`` (REINFORCE with the grounded token reward,
one arm per aggregator) and ``sequence`` (REINFORCE with the centred metric score, no reward model); the
hand-written prompt is the reference. After training, ``candidates`` prompts are sampled from each policy, the
best on the dev examples is kept, and its test accuracy is the arm's number.

``task=summarize`` — reward-weighted MLE. The policy learns the reference summaries of ``data`` with each
reference token weighted by the grounded token reward (``pgg``, ROUGE-L ranks the policy's own samples) or
uniformly (``mle``: plain MLE); both from the same start with the same steps. Greedy summaries of held-out
documents are scored with ROUGE-1/2/L.

Each arm is a :class:`~tokencredit.rl.pgg_trainer.PGGTrainer` run folder; ``summary.json`` and ``report.html`` (score
curves, the discovered prompts or example summaries) land in ``output``. ``resume=true`` skips finished arms.
``fast=true`` uses toy data and a tiny random model, for tests.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokencredit.models import LoraSettings, load_policy, load_tokenizer, quiet_saves
from tokencredit.precision import release_free_memory
from tokencredit.recipes.stages import Stage, check_fast_model, claim_recipe_folder, clamp_layers
from tokencredit.run_folders import releases_run_folders
from tokencredit.runs import atomic_write_json, read_metrics

log = logging.getLogger(__name__)

TASKS = ("fewshot", "summarize")
ARMS = {"fewshot": ("pgg", "sequence"), "summarize": ("pgg", "mle")}


@dataclass
class PGGRecipeConfig:
    """Every knob of the PGG recipe; the defaults are sized for the built-in model on a CPU."""

    output: str = "runs/pgg"  # folder for every arm, summary.json and report.html
    task: str = "fewshot"  # fewshot | summarize
    data: str | None = None  # fewshot: a split folder with train/dev[/test].tsv; summarize: documents .jsonl
    test_data: str | None = None  # summarize: held-out documents .jsonl (None = test_fraction of data)
    dataset: str | None = None  # fewshot: sst-2 | yelp-2 | agnews (None = the data folder's parent name)
    test_fraction: float = 0.2  # summarize: held-out share of data (seeded) when test_data is None
    max_records: int | None = 1000  # summarize: first N documents of data; fewshot: first N test examples
    fast: bool = False  # toy data + tiny random model, few steps: for tests, not for results
    seed: int = 0  # one seed for the split, every arm's run and the sampled candidates
    resume: bool = False  # skip finished arms; continue interrupted ones
    overwrite: bool = False  # replace a run already in the output folder (kept aside until this one finishes)
    allow_changed_settings: bool = False  # resume even though settings differ from the saved config.yaml
    model: str = "smollm2-135m-instruct"  # the policy's start (fewshot: also the frozen classifier)
    # The token reward's backbone: "policy" = a copy of the start model, which reads the policy's own token ids (the
    # paper's choice); a model name or folder with another tokenizer has its rewards mapped through characters.
    reward_backbone: str = "policy"
    arms: list[str] | None = None  # None = every arm of the task
    aggregators: list[str] = field(default_factory=lambda: ["avg"])  # one pgg arm per aggregator

    num_steps: int = 40  # LM optimiser steps per arm
    batch_size: int = 8  # prompts per LM step
    # None = the task's value (TASK_DEFAULTS): prompts 3e-3 / rank 16 / every block, summaries 5e-4 / 8 / top 10
    learning_rate: float | None = None  # policy (LoRA) learning rate
    lora_r: int | None = None  # LoRA rank of the policy adapters (alpha = 2 * lora_r)
    top_layers: int | None = None  # blocks with adapters, counted from the top (>= the model's blocks: all)
    max_new_tokens: int | None = None  # None = 4 for prompts, 48 for summaries
    samples_per_prompt: int = 8  # K responses sampled and ranked per prompt (at least 2)
    ground_every: int = 10  # LM steps between groundings
    ground_until: int | None = None  # no grounding at or after this LM step; None = half of num_steps
    # Each grounding fits on fresh samples until its held-out pair accuracy stops improving (rl.pgg.PGGConfig):
    ground_prompts: int = 8  # prompts per fresh draw of ranked lists
    rm_epochs: int = 4  # passes over each draw before fresh samples replace it
    rm_batch_size: int = 8  # ranked lists per reward-model step
    rm_max_steps: int = 200  # reward-model steps per grounding at most
    rm_eval_every: int = 5  # steps between held-out checks
    rm_patience: int = 3  # checks without improvement that end a fit
    rm_min_steps: int = 60  # ...but not before this many steps
    rm_eval_prompts: int = 4  # held-out prompts (x K samples) per grounding
    rm_learning_rate: float = 1e-4  # reward-model learning rate
    # fewshot (REINFORCE): weight of the entropy bonus. Not the paper's 0.125: measured too strong for a learned
    # reward (docs/pgg.md); 0 would make PGG's all-positive weights plain self-imitation.
    entropy_coef: float = 0.01

    candidates: int = 16  # fewshot: prompts sampled from each trained policy to pick from on dev
    document_words: int = 200  # summarize: words of each document in the prompt
    eval_documents: int = 64  # summarize: held-out documents summarised in the evaluation (the first N)

    def validate(self) -> None:
        """Check what would fail late."""
        check_fast_model(self.fast, self.model)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)} (got {self.task!r})")
        if self.data is None and not self.fast:
            what = "a split folder (train.tsv, dev.tsv)" if self.task == "fewshot" else "DOCUMENTS.jsonl"
            raise ValueError(f"pgg task={self.task} needs data= {what}, or fast=true")
        unknown = set(self.arms or []) - set(ARMS[self.task])
        if unknown or (self.arms is not None and not self.arms):
            raise ValueError(f"arms for task={self.task} must be among {list(ARMS[self.task])} (got {self.arms})")
        from tokencredit.rewards.pgg_rm import AGGREGATORS

        bad = set(self.aggregators) - set(AGGREGATORS)
        if bad or not self.aggregators:
            raise ValueError(f"aggregators must be among {list(AGGREGATORS)} (got {self.aggregators})")
        for name in ("learning_rate", "lora_r", "top_layers", "max_new_tokens"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 or null for the task's default (got {getattr(self, name)})")
        for name in ("num_steps", "batch_size", "candidates", "eval_documents", "ground_prompts", "rm_epochs",
                     "rm_batch_size", "rm_max_steps", "rm_eval_every", "rm_patience", "rm_eval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1) (got {self.test_fraction})")


# Measured on SST-2 16-shot (docs/pgg.md): with 8-token prompts, LoRA rank 8 on the top 10 blocks and 5e-4 no arm
# moved its margin in 40 steps; 4-token prompts, rank 16 on every block and 3e-3 raised it within 10 steps.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "fewshot": dict(learning_rate=3e-3, lora_r=16, top_layers=1000, max_new_tokens=4),
    "summarize": dict(learning_rate=5e-4, lora_r=8, top_layers=10, max_new_tokens=48),
}


def task_setting(cfg: PGGRecipeConfig, name: str) -> Any:
    """A field's value, or the task's default when it is None."""
    value = getattr(cfg, name)
    return TASK_DEFAULTS[cfg.task][name] if value is None else value


FAST_OVERRIDES = dict(num_steps=3, batch_size=2, samples_per_prompt=2, ground_prompts=2, ground_every=2,
                      rm_epochs=1, rm_batch_size=2, rm_max_steps=4, rm_eval_every=2, rm_patience=1, rm_min_steps=0,
                      rm_eval_prompts=2, candidates=3, eval_documents=3, max_records=12, top_layers=1000, lora_r=4,
                      reward_backbone="policy", document_words=12)
_FAST_WORDS = "good bad film plot it was N/A the a cat sat dog ran mat far summary short".split()


def _fast_inputs(root: Path, task: str) -> tuple[str, str]:
    """Toy data of the task and a tiny random model over its words."""
    from tokencredit.testing import save_tiny_causal_lm

    rng = random.Random(0)
    if task == "fewshot":
        folder = root / "toy" / "sst-2" / "16-0"
        folder.mkdir(parents=True, exist_ok=True)
        for name, n in (("train", 8), ("dev", 8), ("test", 12)):
            rows = ["sentence\tlabel"]
            for i in range(n):
                label = i % 2
                rows.append(f"the film was {'good' if label else 'bad'} {rng.choice(['plot', 'it'])}\t{label}")
            (folder / f"{name}.tsv").write_text("\n".join(rows) + "\n")
        data = str(folder)
    else:
        rows = [{"document": " ".join(rng.choice(_FAST_WORDS[9:15]) for _ in range(20)),
                 "summary": " ".join(rng.choice(_FAST_WORDS[9:15]) for _ in range(4))} for _ in range(12)]
        path = root / "toy_docs.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        data = str(path)
    return data, str(save_tiny_causal_lm(root / "tiny-model", _FAST_WORDS))


@releases_run_folders
def run_pgg(cfg: PGGRecipeConfig) -> dict:
    """Run every arm; returns the summary also written to summary.json."""
    with quiet_saves():
        if cfg.fast:
            cfg = PGGRecipeConfig(**{**vars(cfg), **FAST_OVERRIDES})
        cfg.validate()
        root = Path(cfg.output)
        drop_replaced = claim_recipe_folder(root, cfg)
        data, model_name = _fast_inputs(root, cfg.task) if cfg.fast else (cfg.data, cfg.model)
        if cfg.task == "fewshot":
            summary = _fewshot(cfg, root, data, model_name)
        else:
            summary = _summarize(cfg, root, data, model_name)
        atomic_write_json(root / "summary.json", summary)
        _report(root, summary)
        drop_replaced()  # a replaced run goes only once this one has finished
        return summary


def arm_names(cfg: PGGRecipeConfig) -> list[str]:
    """Run-folder names: pgg-<aggregator> per aggregator, then the baseline."""
    arms = cfg.arms if cfg.arms is not None else list(ARMS[cfg.task])
    out = []
    for arm in arms:
        out += [f"pgg-{a}" for a in cfg.aggregators] if arm == "pgg" else [arm]
    return out


def _train_arm(cfg: PGGRecipeConfig, arm: str, model_name: str, tokenizer: Any, prompts: list[str], score_fn: Any,
               references: list[str] | None, folder: Path) -> None:
    """One PGGTrainer run from the start model with the arm's guidance."""
    from tokencredit.rewards.token_rm import TokenRewardModel
    from tokencredit.rl.pgg_trainer import PGGConfig, PGGTrainer

    top = clamp_layers(model_name, task_setting(cfg, "top_layers"))  # a model with fewer blocks: all of them
    rank = task_setting(cfg, "lora_r")
    policy = load_policy(model_name, lora=LoraSettings(r=rank, alpha=2 * rank, dropout=0.0, top_layers=top),
                         seed=cfg.seed)
    objective = "reinforce" if cfg.task == "fewshot" else "weighted_mle"
    guidance = "token" if arm.startswith("pgg") else ("sequence" if arm == "sequence" else "none")
    rm = None
    if guidance == "token" and cfg.reward_backbone != "policy":
        rm = TokenRewardModel.from_pretrained(cfg.reward_backbone, seed=cfg.seed)
    config = PGGConfig(
        output_dir=str(folder), seed=cfg.seed, num_steps=cfg.num_steps, resume=cfg.resume,
        save_every=max(1, cfg.num_steps // 2), log_tensorboard=False, progress=not cfg.fast, objective=objective,
        guidance=guidance, batch_size=cfg.batch_size, learning_rate=task_setting(cfg, "learning_rate"),
        entropy_coef=cfg.entropy_coef, max_new_tokens=_max_new_tokens(cfg),
        samples_per_prompt=cfg.samples_per_prompt, ground_prompts=cfg.ground_prompts, ground_every=cfg.ground_every,
        ground_until=cfg.ground_until, aggregator=arm.split("-", 1)[1] if arm.startswith("pgg-") else "avg",
        rm_epochs=cfg.rm_epochs, rm_batch_size=cfg.rm_batch_size, rm_max_steps=cfg.rm_max_steps,
        rm_eval_every=cfg.rm_eval_every, rm_patience=cfg.rm_patience, rm_min_steps=cfg.rm_min_steps,
        rm_eval_prompts=cfg.rm_eval_prompts,
        rm_learning_rate=cfg.rm_learning_rate)
    PGGTrainer(config, policy, tokenizer, prompts, score_fn, references=references, reward_model=rm).train()
    # A finished arm is never resumed; its checkpoints (reward model weights included) only take disk.
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    del policy, rm
    release_free_memory()


def groundings(run_dir: Path) -> list[dict]:
    """Each grounding of a PGG run: the LM step it preceded, the reward's held-out pair accuracy before and after
    its fit, the fit's steps and the metric calls it spent (empty for arms without a reward model)."""
    keys = {"rm_start_accuracy": "ground/rm_start_accuracy", "rm_rank_accuracy": "ground/rm_rank_accuracy",
            "rm_steps": "ground/rm_steps", "metric_calls": "ground/metric_calls"}
    return [{"before_step": row["step"] - 1, **{k: row.get(v) for k, v in keys.items()}}
            for row in read_metrics(run_dir) if "ground/index" in row]


def _max_new_tokens(cfg: PGGRecipeConfig) -> int:
    """The task's default response length unless set."""
    if cfg.max_new_tokens is None and cfg.fast and cfg.task == "summarize":
        return 6
    return task_setting(cfg, "max_new_tokens")


def _policy_with(model_name: str, adapter: Path | None) -> torch.nn.Module:
    """The start model, with an arm's trained adapter merged in when given."""
    from peft import PeftModel

    base = load_policy(model_name)
    return base if adapter is None else PeftModel.from_pretrained(base, adapter).merge_and_unload()


# ---------------------------------------------------------------------- few-shot prompts
def _fewshot(cfg: PGGRecipeConfig, root: Path, data: str, model_name: str) -> dict:
    """Train each arm to write prompts; pick each arm's best prompt on dev; test accuracy of it."""
    from tokencredit.generation import generate
    from tokencredit.models import apply_chat
    from tokencredit.tasks.fewshot import (
        HAND_PROMPTS,
        INSTRUCTIONS,
        LABEL_WORDS,
        PromptedClassifier,
        clean_prompt,
        load_fewshot_split,
    )

    dataset = cfg.dataset or Path(data).parent.name
    if dataset not in LABEL_WORDS:
        raise ValueError(f"dataset must be one of {sorted(LABEL_WORDS)} (got {dataset!r}); pass dataset=")
    split = load_fewshot_split(data, dataset)
    test = split.get("test") or split["dev"]
    if cfg.max_records:
        test = test[: cfg.max_records]
    tokenizer = load_tokenizer(model_name)
    words = ["bad", "good"] if cfg.fast else LABEL_WORDS[dataset]
    classifier = PromptedClassifier(load_policy(model_name), tokenizer, words)
    score_fn = classifier.score_fn(split["train"])
    instruction = INSTRUCTIONS[dataset]
    policy_prompt = apply_chat(tokenizer, [instruction])[0] if getattr(tokenizer, "chat_template", None) else (
        instruction + "\nPhrase:")

    def judge(prompts: list[str]) -> list[dict]:
        margins = classifier.margins_many(split["train"], prompts).mean(-1).tolist()
        dev = classifier.accuracy_many(split["dev"], prompts)
        return [{"prompt": p, "train_margin": m, "dev_accuracy": d} for p, m, d in zip(prompts, margins, dev)]

    results: dict[str, dict] = dict(zip(("hand-written", "no prompt"), judge([HAND_PROMPTS[dataset], ""])))
    curves = {}
    for arm in arm_names(cfg):
        stage = Stage(root, arm, cfg.resume)
        if not stage.done:
            _train_arm(cfg, arm, model_name, tokenizer, [policy_prompt], score_fn, None, stage.dir)
            policy = _policy_with(model_name, stage.dir / "policy")
            generator = torch.Generator().manual_seed(cfg.seed)
            new_tokens = _max_new_tokens(cfg)
            texts = generate(policy, tokenizer, [policy_prompt], max_new_tokens=new_tokens, greedy=True).texts
            texts += generate(policy, tokenizer, [policy_prompt] * cfg.candidates, max_new_tokens=new_tokens,
                              generator=generator).texts
            judged = sorted(judge(sorted({clean_prompt(t) for t in texts})),
                            key=lambda r: (r["dev_accuracy"], r["train_margin"]), reverse=True)
            stage.finish({"best": judged[0], "candidates": judged})
            del policy
            release_free_memory()
        info = stage.info()
        every = info["candidates"]
        # The mean over every distinct candidate describes the policy; the best-on-dev one also reflects the luck
        # of picking among them on a few dev examples.
        results[arm] = {**info["best"], "candidates": every[:8], "candidates_seen": len(every),
                        "candidates_dev_mean": sum(c["dev_accuracy"] for c in every) / len(every),
                        "candidates_margin_mean": sum(c["train_margin"] for c in every) / len(every)}
        curves[arm] = [m.get("score/mean") for m in read_metrics(stage.dir)]
        results[arm]["groundings"] = groundings(stage.dir)
    # One pass over the test examples scores every kept prompt.
    tested = classifier.accuracy_many(test, [r["prompt"] for r in results.values()])
    for result, accuracy in zip(results.values(), tested):
        result["test_accuracy"] = accuracy
    return {"task": "fewshot", "dataset": dataset, "test_split": "test" if split.get("test") else "dev",
            "test_examples": len(test), "label_words": words,
            "results": results, "score_curves": curves, "chance": 1 / len(words)}


# ---------------------------------------------------------------------- summarisation
def _summarize(cfg: PGGRecipeConfig, root: Path, data: str, model_name: str) -> dict:
    """Weighted MLE (PGG) vs plain MLE on the references; ROUGE of greedy summaries of held-out documents."""
    from tokencredit.generation import generate
    from tokencredit.tasks.summarize import load_documents, rouge_l_score_fn, summary_metrics, summary_prompt

    docs = load_documents(data)[: cfg.max_records]
    if cfg.test_data is not None:
        train, test = docs, load_documents(cfg.test_data)
    else:
        order = list(range(len(docs)))
        random.Random(cfg.seed).shuffle(order)
        n_test = max(1, round(cfg.test_fraction * len(docs)))
        train, test = [docs[i] for i in order[n_test:]], [docs[i] for i in order[:n_test]]
    train = [d for d in train if d.references]
    test = [d for d in test if d.references][: cfg.eval_documents]
    tokenizer = load_tokenizer(model_name)
    prompts = [summary_prompt(d, tokenizer, cfg.document_words) for d in train]
    references = [" " + d.references[0] if not getattr(tokenizer, "chat_template", None) else d.references[0]
                  for d in train]
    score_fn = rouge_l_score_fn(train, prompts)
    test_prompts = [summary_prompt(d, tokenizer, cfg.document_words) for d in test]

    def evaluate(adapter: Path | None) -> dict:
        policy = _policy_with(model_name, adapter)
        texts: list[str] = []
        for begin in range(0, len(test_prompts), 8):
            texts += generate(policy, tokenizer, test_prompts[begin : begin + 8], max_new_tokens=_max_new_tokens(cfg),
                              greedy=True).texts
        del policy
        release_free_memory()
        return {**summary_metrics(texts, test), "examples": [{"reference": d.references[0], "summary": t}
                                                            for d, t in list(zip(test, texts))[:3]]}

    results = {"start": evaluate(None)}
    curves = {}
    for arm in arm_names(cfg):
        stage = Stage(root, arm, cfg.resume)
        if not stage.done:
            _train_arm(cfg, arm, model_name, tokenizer, prompts, score_fn, references, stage.dir)
            stage.finish({"metrics": evaluate(stage.dir / "policy")})
        results[arm] = {**stage.info()["metrics"], "groundings": groundings(stage.dir)}
        curves[arm] = [m.get("score/mean") for m in read_metrics(stage.dir)]
    return {"task": "summarize", "train_documents": len(train), "test_documents": len(test), "results": results,
            "score_curves": curves}


def _report(root: Path, summary: dict) -> None:
    """report.html: score curves, the results table, prompts or example summaries."""
    from tokencredit.evaluate import html_table, svg_line_chart, write_html_report

    curves = {k: [v for v in vals if v is not None] for k, vals in summary["score_curves"].items()}
    metric = "mean classification margin" if summary["task"] == "fewshot" else "ROUGE-L"
    sections = [("Score per step", svg_line_chart(curves, f"Metric of each step's samples ({metric})", xlabel="step",
                                                   ylabel=metric))]
    if summary["task"] == "fewshot":
        rows = [{"arm": arm, **{k: r[k] for k in ("prompt", "dev_accuracy", "test_accuracy")}}
                for arm, r in summary["results"].items()]
        sections.append((f"Best prompt per arm ({summary['dataset']}, chance {summary['chance']:.2f})",
                         html_table(rows)))
        cands = [{"arm": arm, **c} for arm, r in summary["results"].items() for c in r.get("candidates", [])]
        sections.append(("Candidates (best first)", html_table(cands)))
    else:
        rows = [{"arm": arm, **{k: round(r[k], 4) for k in ("rouge1", "rouge2", "rougeL", "mean_length")}}
                for arm, r in summary["results"].items()]
        sections.append(("Held-out ROUGE (greedy)", html_table(rows)))
        examples = [{"arm": arm, **e} for arm, r in summary["results"].items() for e in r["examples"]]
        sections.append(("Examples", html_table(examples)))
    fits = [{"arm": arm, **g} for arm, r in summary["results"].items() for g in r.get("groundings", [])]
    if fits:
        sections.append(("Groundings: the token reward's held-out pair accuracy before and after each fit",
                         html_table(fits)))
    write_html_report(root / "report.html", f"tokencredit pgg: {summary['task']}", sections)

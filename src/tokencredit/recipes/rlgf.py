"""`tokencredit rlgf`: reinforcement learning with a guide LLM (RLGF, arXiv 2306.11816) on IMDB or CommonGen.

1. **Data** (``data/``). ``task=imdb``: reviews {text, label}; a prompt is a review's first ``prompt_words``
   words, the SFT target the next ``target_words``; a held-out sentiment scorer (bag of words, trained here on
   the training reviews' labels, saved as JSON) judges the policies beside the reward scorer.
   ``task=commongen``: concept sets {concepts, references}; the prompt asks for one sentence using every
   concept (the model's chat template when it has one); chrF, which no reward uses, is the held-out metric.
2. **Start and guide** (``learner_sft/``, ``guide_sft/``). IMDB: the learner starts from the built-in model
   fine-tuned on all training reviews, the guide is the same model fine-tuned on positive reviews only — a policy
   that already writes what the reward wants, as RLGF's guide is. CommonGen: the learner starts from the built-in
   instruction model as it is, the guide is that model fine-tuned on the reference sentences (the "SFT" arm).
   ``start=`` / ``guide=`` take model folders to reuse instead (e.g. one trained start shared by several seeds).
3. **RL** (one folder per algorithm): the same start, seed and sample budget for each of ``algorithms`` — plain
   PPO, PPO++, AggreVaTeD, LOLS and D2LOLS (see :mod:`tokencredit.rl.guided`). Rewards: VADER's P(positive) of
   the continuation (IMDB); concept coverage + ROUGE-L + BLEU against the references (CommonGen).
4. **Evaluate** on held-out prompts: the training reward, the held-out scorer, perplexity under the start model
   (fluency), length and distinct-n, for the start, the guide and every algorithm.

``summary.json`` and ``report.html`` (reward curves of every algorithm, metrics table, examples) land in ``output``;
``resume=true`` skips finished stages. ``fast=true`` uses toy data and a tiny random model, for tests.
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

ALL_ALGORITHMS = ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols"]
TASKS = ("imdb", "commongen")
# The paper's per-task settings (arXiv 2306.11816 and its code, TRIL's cfgs/alg/*.yaml): KL .001 on IMDB, none on
# CommonGen; beta .6 for PPO++ on IMDB and .8 for every other algorithm and for CommonGen; the guide samples with
# top-p .92 and top-k 50 (IMDB) or none (CommonGen).
TASK_DEFAULTS = {"imdb": {"kl_coef": 0.001, "start": "sft"},
                 "commongen": {"kl_coef": 0.0, "start": "base"}}
TASK_BETAS = {"imdb": {"ppo_pp": 0.6, "aggrevated": 0.8, "lols": 0.8, "d2lols": 0.8},
              "commongen": {"ppo_pp": 0.8, "aggrevated": 0.8, "lols": 0.8, "d2lols": 0.8}}
TASK_GUIDE_SAMPLING = {"imdb": {"guide_top_k": 50, "guide_top_p": 0.92},
                       "commongen": {"guide_top_k": 0, "guide_top_p": 0.92}}


@dataclass
class RLGFConfig:
    """Every knob of the RLGF recipe; the defaults are sized for the built-in model on a CPU."""

    output: str = "runs/rlgf"  # folder for every stage, summary.json and report.html
    task: str = "imdb"  # imdb | commongen
    data: str | None = None  # .jsonl: imdb {text, label}, commongen {concepts, references}; required unless fast
    test_data: str | None = None  # held-out records; None = test_fraction of data
    test_fraction: float = 0.2  # held-out share of data (seeded) when test_data is None
    max_records: int | None = 2000  # first N records of data
    fast: bool = False  # toy data + tiny random model, few steps: for tests, not for results
    seed: int = 0  # one seed for the split, SFT, every algorithm's run and the sampled evaluation
    resume: bool = False  # skip finished stages; continue interrupted ones
    overwrite: bool = False  # replace a run already in the output folder (kept aside until this one finishes)
    allow_changed_settings: bool = False  # resume even though settings differ from the saved config.yaml
    model: str = "smollm2-135m-instruct"  # base of the start and the guide (built-in name, folder or hub id)
    start: str | None = None  # "sft" | "base" | a model folder to reuse; None = the task's default
    # a model folder to reuse as the guide; "base" = the model as it is (with guide_best_of: a guide made better by
    # selection alone); None = fine-tune one here
    guide: str | None = None
    prompt_words: int = 12  # imdb: words of the review shown
    target_words: int = 24  # imdb: words of the SFT target
    max_new_tokens: int = 24  # longest response, in tokens, in RL and in the evaluation
    # algorithms to run, each from the same start: ppo, ppo_pp, aggrevated, lols, d2lols (see rl.guided)
    algorithms: list[str] = field(default_factory=lambda: list(ALL_ALGORITHMS))

    sft_examples: int = 512  # examples per SFT (the IMDB guide takes that many positive reviews)
    sft_epochs: int = 1  # passes over the SFT examples (start and guide alike)
    sft_learning_rate: float = 5e-4  # peak SFT learning rate (AdamW, on the LoRA adapters)
    lora_r: int = 16  # LoRA rank in SFT and RL (alpha = 2 * lora_r)
    top_layers: int | None = 10  # blocks with adapters in RL (None = all): cheaper backward passes on a CPU

    ppo_updates: int = 10  # PPO updates per algorithm (each = one rollout batch + 2 epochs of optimisation)
    ppo_batch_size: int = 16  # prompts (= sampled responses) per update, one optimiser step per epoch
    ppo_learning_rate: float = 1e-3  # policy (LoRA) learning rate
    kl_coef: float | None = None  # None = the task's default
    guide_beta: float | None = None  # None = the paper's per task and algorithm (TASK_BETAS)
    # >1: the guide keeps the best of this many samples by the training reward (rl.guided.BestOfNWriter), a guide
    # better than the model it samples from; the "guide" row of the evaluation is that writer too
    guide_best_of: int = 1
    # TRIL normalises no advantages. Whitening shifts their mean to 0, so under a sparse reward every token of
    # every unrewarded row is pushed down (benchmarks/rlgf_known_answer.py: PPO++ learns the task without it only).
    whiten_advantages: bool = False
    lols_tau: float = 0.8  # LOLS: probability that an update is PPO++ (else AggreVaTeD)
    d2lols_switch_update: int | None = None  # None = half of ppo_updates
    eval_prompts: int = 64  # held-out prompts every policy answers in the evaluation (the first N)

    def validate(self) -> None:
        """Check what would fail late."""
        check_fast_model(self.fast, self.model)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)} (got {self.task!r})")
        if self.data is None and not self.fast:
            what = "REVIEWS.jsonl ({text, label}" if self.task == "imdb" else "CONCEPTS.jsonl ({concepts, references}"
            raise ValueError(f"rlgf needs data={what} records), or fast=true")
        unknown = set(self.algorithms) - set(ALL_ALGORITHMS)
        if unknown or not self.algorithms:
            raise ValueError(f"algorithms must be among {ALL_ALGORITHMS} (got {self.algorithms})")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1) (got {self.test_fraction})")
        if self.start is not None and self.start not in ("sft", "base") and not Path(self.start).is_dir():
            raise ValueError(f"start must be 'sft', 'base' or a model folder (got {self.start!r}: no such folder)")
        if self.guide is not None and self.guide != "base" and not Path(self.guide).is_dir():
            raise ValueError(f"guide must be 'base' or a model folder (got {self.guide!r}: no such folder)")
        for name in ("ppo_updates", "ppo_batch_size", "max_new_tokens", "eval_prompts", "sft_examples",
                     "guide_best_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")

    def beta(self, algorithm: str) -> float:
        """The share of switched rows for one algorithm: guide_beta if set, else the paper's for the task."""
        return self.guide_beta if self.guide_beta is not None else TASK_BETAS[self.task][algorithm]

    def resolved(self) -> RLGFConfig:
        """A copy with the task's defaults filled in where a field is None."""
        defaults = TASK_DEFAULTS[self.task]
        return RLGFConfig(**{**vars(self), **{k: v for k, v in defaults.items() if getattr(self, k) is None}})


FAST_OVERRIDES = dict(max_records=60, prompt_words=4, target_words=6, max_new_tokens=6, sft_examples=24,
                      ppo_updates=2, ppo_batch_size=4, eval_prompts=4, top_layers=None, lora_r=4)

_FAST_WORDS = ("great good fine love awful bad boring film movie plot acting was the a and it this dog ball "
               "throw park run sentence").split()


def _fast_inputs(root: Path, task: str) -> tuple[str, str]:
    """Toy records of the task and a tiny random model over their words, for fast mode."""
    from tokencredit.testing import save_tiny_causal_lm

    rng = random.Random(0)
    rows: list[dict] = []
    for i in range(60):
        if task == "imdb":
            label = i % 2
            mood = ["great", "good", "love"] if label else ["awful", "bad", "boring"]
            words = [rng.choice(["the", "film", "movie", "plot", "acting", "was", "it", "this", "a", "and"])
                     for _ in range(8)]
            words[rng.randrange(8)] = rng.choice(mood)
            words += [rng.choice(mood) for _ in range(4)]
            rows.append({"text": " ".join(words), "label": label})
        else:
            concepts = rng.sample(["dog", "ball", "throw", "park", "run"], 2)
            rows.append({"concepts": concepts, "references": [f"the {concepts[0]} and the {concepts[1]}",
                                                              f"a {concepts[1]} and a {concepts[0]}"]})
    data = root / f"toy_{task}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(data), str(save_tiny_causal_lm(root / "tiny-model", _FAST_WORDS))


def _split(review_text: str, prompt_words: int, target_words: int) -> tuple[str, str]:
    """(the review's first words, the words after them)."""
    words = review_text.split()
    return " ".join(words[:prompt_words]), " " + " ".join(words[prompt_words : prompt_words + target_words])


@dataclass
class _TaskData:
    """What the stages need from a task: SFT pairs, RL prompts, the reward, and the held-out evaluation."""

    start_pairs: list[tuple[str, str]]
    guide_pairs: list[tuple[str, str]]
    train_prompts: list[str]
    test_prompts: list[str]
    reward_fn: Any
    evaluate: Any  # (prompts, texts, fluency_model, tokenizer) -> metrics
    facts: dict
    test_reward_fn: Any = None  # the reward on the held-out prompts, where it depends on the prompt; None = reward_fn


def _split_records(cfg: RLGFConfig, records: list, load: Any) -> tuple[list, list]:
    """(train, test): test_data when given, else a seeded test_fraction of the records."""
    if cfg.test_data is not None:
        return records, load(cfg.test_data)
    order = list(range(len(records)))
    random.Random(cfg.seed).shuffle(order)
    n_test = max(1, round(cfg.test_fraction * len(records)))
    return [records[i] for i in order[n_test:]], [records[i] for i in order[:n_test]]


def _imdb_data(cfg: RLGFConfig, data: str, root: Path) -> _TaskData:
    """Reviews -> prompts, SFT pairs (all / positive), VADER reward, held-out bag-of-words scorer."""
    from tokencredit.tasks.imdb import (
        BagOfWordsScorer,
        VaderScorer,
        clean_review,
        imdb_metrics,
        imdb_reward_fn,
        load_reviews,
        train_bow_scorer,
    )

    train, test = _split_records(cfg, load_reviews(data)[: cfg.max_records], load_reviews)
    scorer_path = root / "data" / "heldout_scorer.json"
    if cfg.resume and scorer_path.exists():
        heldout = BagOfWordsScorer.load(scorer_path)
    else:
        heldout = train_bow_scorer(train, min_df=1 if cfg.fast else 2)
        heldout.save(scorer_path)
    pairs = [_split(clean_review(r.text), cfg.prompt_words, cfg.target_words) for r in train]
    test_prompts = [_split(clean_review(r.text), cfg.prompt_words, cfg.target_words)[0]
                    for r in test][: cfg.eval_prompts]
    vader = VaderScorer()

    def evaluate(prompts: list[str], texts: list[str], model: Any, tokenizer: Any) -> dict:
        return imdb_metrics(prompts, texts, reward_scorer=vader, heldout_scorer=heldout, model=model,
                            tokenizer=tokenizer)

    texts, labels = [clean_review(r.text) for r in test], [r.label for r in test]
    facts = {"train_records": len(train),
             # The scorers' own accuracy on held-out reviews: the references that show the rewards mean something.
             "heldout_scorer_accuracy": heldout.accuracy(texts, labels),
             "reward_scorer_accuracy": float(sum((p > 0.5) == bool(y) for p, y in
                                                 zip(vader.prob_positive(texts), labels)) / len(labels))}
    return _TaskData(start_pairs=pairs[: cfg.sft_examples],
                     guide_pairs=[pair for pair, r in zip(pairs, train) if r.label == 1][: cfg.sft_examples],
                     train_prompts=[p for p, _ in pairs], test_prompts=test_prompts,
                     reward_fn=imdb_reward_fn(vader), evaluate=evaluate, facts=facts)


def _commongen_data(cfg: RLGFConfig, data: str, tokenizer: Any) -> _TaskData:
    """Concept sets -> prompts, SFT pairs on references, the coverage+ROUGE+BLEU reward, chrF held out."""
    from tokencredit.tasks.commongen import (
        commongen_metrics,
        commongen_reward_fn,
        concept_prompt,
        first_line,
        load_concept_sets,
    )
    from tokencredit.tasks.imdb import distinct_n, fluency

    train, test = _split_records(cfg, load_concept_sets(data)[: cfg.max_records], load_concept_sets)
    test = [r for r in test if r.references][: cfg.eval_prompts]
    train = [r for r in train if r.references]
    if not train or not test:
        raise ValueError("commongen needs records with references for both training and evaluation")
    rng = random.Random(cfg.seed)
    train_prompts = [concept_prompt(r, tokenizer) for r in train]
    test_prompts = [concept_prompt(r, tokenizer) for r in test]
    pairs = [(p, rng.choice(r.references)) for p, r in zip(train_prompts, train)]

    def evaluate(prompts: list[str], texts: list[str], model: Any, tokenizer: Any) -> dict:
        sentences = [first_line(t) for t in texts]
        out = {**commongen_metrics(sentences, test), "reward": float(sum(
            commongen_reward_fn(test, test_prompts)(prompts, texts, [[]] * len(texts))) / len(texts))}
        out["chrf"] = _corpus_chrf(sentences, test)
        if any(sentences):
            out.update(fluency(model, tokenizer, *zip(*[(p, " " + s) for p, s in zip(prompts, sentences) if s])))
        out["distinct_2"] = distinct_n(sentences, 2)
        return out

    return _TaskData(start_pairs=pairs[: cfg.sft_examples], guide_pairs=pairs[: cfg.sft_examples],
                     train_prompts=train_prompts, test_prompts=test_prompts,
                     reward_fn=commongen_reward_fn(train, train_prompts), evaluate=evaluate,
                     facts={"train_records": len(train), **_commongen_references(test)},
                     test_reward_fn=commongen_reward_fn(test, test_prompts))


def _corpus_chrf(sentences: list[str], records: list) -> float:
    """sacrebleu's corpus chrF over all references, in [0, 1]: a metric no RLGF reward here uses."""
    from sacrebleu.metrics import CHRF

    width = max(len(r.references) for r in records)
    streams = [[r.references[k] if k < len(r.references) else None for r in records] for k in range(width)]
    return CHRF().corpus_score(sentences, streams).score / 100.0


def _commongen_references(records: list) -> dict:
    """The metrics of a held-out human reference (leave one out) and of another record's reference (chance)."""
    from tokencredit.tasks.commongen import ConceptSet, commongen_metrics

    usable = [r for r in records if len(r.references) >= 2]
    if len(usable) < 2:
        return {}
    rest = [ConceptSet(r.concepts, r.references[1:]) for r in usable]
    human = commongen_metrics([r.references[0] for r in usable], rest)
    shuffled = commongen_metrics([usable[(i + 1) % len(usable)].references[0] for i in range(len(usable))], rest)
    return {"human_reference": {**human, "chrf": _corpus_chrf([r.references[0] for r in usable], rest)},
            "other_record_reference": shuffled}


@releases_run_folders
def run_rlgf(cfg: RLGFConfig) -> dict:
    """Run every stage; returns the summary also written to summary.json."""
    with quiet_saves():
        return _run_rlgf(cfg)


def _run_rlgf(cfg: RLGFConfig) -> dict:
    """run_rlgf without the progress-bar settings."""
    if cfg.fast:
        cfg = RLGFConfig(**{**vars(cfg), **FAST_OVERRIDES})
    cfg.validate()
    cfg = cfg.resolved()
    root = Path(cfg.output)
    drop_replaced = claim_recipe_folder(root, cfg)
    data, model_name = _fast_inputs(root, cfg.task) if cfg.fast else (cfg.data, cfg.model)

    # 1. Records, prompts, reward and held-out scorers.
    tokenizer = load_tokenizer(model_name)
    task = (_imdb_data(cfg, data, root) if cfg.task == "imdb" else _commongen_data(cfg, data, tokenizer))

    # 2. The learner's start and the guide, LoRA merged into plain models (or folders given to reuse).
    if cfg.start == "sft":
        start = _sft(cfg, model_name, tokenizer, task.start_pairs, root / "learner_sft")
    else:
        start = model_name if cfg.start == "base" else cfg.start
    guide_model = (model_name if cfg.guide == "base" else
                   cfg.guide or _sft(cfg, model_name, tokenizer, task.guide_pairs, root / "guide_sft"))

    # 3. Every algorithm from the same start with the same seed and budget.
    curves = {}
    for algorithm in cfg.algorithms:
        stage = Stage(root, algorithm, cfg.resume)
        if not stage.done:
            _rl(cfg, algorithm, start, guide_model, tokenizer, task, stage.dir)
            stage.finish({"algorithm": algorithm})
        curves[algorithm] = [m.get("reward/mean") for m in read_metrics(stage.dir)]

    # 4. Held-out prompts: the training reward, the held-out scorer, fluency under the start model.
    policies: dict[str, tuple[str, Path | None]] = {"start": (start, None), "guide": (guide_model, None)}
    policies.update({a: (start, root / a / "policy") for a in cfg.algorithms})
    results = {name: _evaluate(cfg, start, model, adapter, tokenizer, task, best_of=name == "guide")
               for name, (model, adapter) in policies.items()}
    summary = {"task": cfg.task, "test_prompts": len(task.test_prompts), **task.facts,
               "settings": {**{k: getattr(cfg, k) for k in ("kl_coef", "ppo_updates", "ppo_batch_size",
                                                            "max_new_tokens", "seed", "start", "whiten_advantages",
                                                            "guide_best_of")},
                            "guide_beta": {a: cfg.beta(a) for a in cfg.algorithms if a != "ppo"}},
               "policies": results, "reward_curves": curves}
    atomic_write_json(root / "summary.json", summary)
    _report(root, summary)
    drop_replaced()  # a replaced run goes only once this one has finished
    return summary


def _sft(cfg: RLGFConfig, model_name: str, tokenizer: object, pairs: list[tuple[str, str]], folder: Path) -> str:
    """LoRA SFT on (prompt, target), merged and saved as a plain model; returns its folder."""
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


def _rl(cfg: RLGFConfig, algorithm: str, start: str, guide_model: str, tokenizer: object, task: _TaskData,
        folder: Path) -> None:
    """One algorithm's run: LoRA on the start model, the task's reward, the guide model when the algorithm uses one."""
    from tokencredit.rl.ppo import PPOConfig, PPOTrainer

    top = clamp_layers(start, cfg.top_layers)  # a smaller model than the default has fewer blocks
    policy = load_policy(start, lora=LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r, dropout=0.0, top_layers=top),
                         seed=cfg.seed)
    guide = None if algorithm == "ppo" else _guide_writer(cfg, load_policy(guide_model), tokenizer, task)
    config = PPOConfig(output_dir=str(folder), seed=cfg.seed, num_updates=cfg.ppo_updates,
                       batch_size=cfg.ppo_batch_size, mini_batch_size=cfg.ppo_batch_size, ppo_epochs=2,
                       learning_rate=cfg.ppo_learning_rate, max_new_tokens=cfg.max_new_tokens, kl_coef=cfg.kl_coef,
                       algorithm=algorithm, guide_beta=0.5 if algorithm == "ppo" else cfg.beta(algorithm),
                       whiten_advantages=cfg.whiten_advantages, lols_tau=cfg.lols_tau,
                       **TASK_GUIDE_SAMPLING[cfg.task],
                       d2lols_switch_update=(cfg.d2lols_switch_update if cfg.d2lols_switch_update is not None
                                             else cfg.ppo_updates // 2),
                       resume=cfg.resume, save_every=max(1, cfg.ppo_updates // 2), log_tensorboard=False,
                       progress=not cfg.fast)
    PPOTrainer(config, policy=policy, tokenizer=tokenizer, prompts=task.train_prompts, reward_fn=task.reward_fn,
               guide=guide).train()
    # A finished stage is never resumed, and a checkpoint holds the critic and its optimiser state (~1.6 GB for
    # the built-in model): five algorithms x seeds filled a disk. The final policy/ stays.
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    del policy, guide
    release_free_memory()


@torch.no_grad()
def _reward_score(reward_fn: Any, tokenizer: object, prompts: list[str]) -> Any:
    """The task's reward as a BestOfNWriter score: each continuation is scored as part of its whole answer.

    A guide's context is a training prompt plus what the row holds already (a learner's prefix under AggreVaTeD):
    the prompt is found as the longest known prompt the context starts with, and the reward sees the prompt and
    the answer so far plus the continuation, as it will in training.
    """
    # A prompt as the guide sees it is its token ids decoded (special tokens kept), which need not be the prompt's
    # own text (a word tokenizer writes unknown words as <unk>): match that form, hand the reward the original.
    rendered = {tokenizer.decode(tokenizer(p)["input_ids"], skip_special_tokens=False): p for p in prompts}
    known = sorted(rendered, key=len, reverse=True)

    def prompt_of(context: str) -> tuple[str, str]:
        for form in known:
            if context.startswith(form):
                return form, rendered[form]
        raise ValueError(f"a guide context matches no training prompt: {context[:80]!r}")

    def score(contexts: list[str], texts: list[str]) -> list[float]:
        forms, found = zip(*[prompt_of(c) for c in contexts]) if contexts else ((), ())
        answers = [c[len(f):] + t for c, f, t in zip(contexts, forms, texts)]
        found = list(found)
        ids = [list(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
        return [float(sum(r)) if isinstance(r, (list, tuple)) else float(r) for r in reward_fn(found, answers, ids)]
    return score


def _guide_writer(cfg: RLGFConfig, model: torch.nn.Module, tokenizer: object, task: _TaskData,
                  heldout: bool = False) -> object:
    """The guide as the trainer gets it: the model itself, or the best of guide_best_of of its samples.

    ``heldout``: scored on the held-out prompts (the guide's row of the evaluation) instead of the training ones.
    """
    if cfg.guide_best_of <= 1:
        return model
    from tokencredit.rl.guided import BestOfNWriter

    reward_fn, prompts = ((task.test_reward_fn or task.reward_fn, task.test_prompts) if heldout
                          else (task.reward_fn, task.train_prompts))
    sampling = TASK_GUIDE_SAMPLING[cfg.task]
    return BestOfNWriter(model, tokenizer, _reward_score(reward_fn, tokenizer, prompts), n=cfg.guide_best_of,
                         top_k=sampling["guide_top_k"], top_p=sampling["guide_top_p"])


def _answers(policy: torch.nn.Module, writer: object, tokenizer: object, prompts: list[str], max_new_tokens: int,
             generator_for: Any, chunk: int = 16) -> list[str]:
    """One sampled answer per prompt, ``chunk`` prompts at a time: from the policy itself, or through a writer (a
    best-of-n guide) when one is given; ``generator_for(first index of the chunk)`` gives each chunk's stream."""
    from tokencredit.generation import encode_prompts, generate

    texts: list[str] = []
    for begin in range(0, len(prompts), chunk):
        part, generator = prompts[begin : begin + chunk], generator_for(begin)
        if writer is policy:
            texts += generate(policy, tokenizer, part, max_new_tokens=max_new_tokens, generator=generator).texts
            continue
        writer.generator = generator
        ids, mask = encode_prompts(tokenizer, part)
        rows = writer.write(ids, mask, [max_new_tokens] * len(part))
        texts += tokenizer.batch_decode([r[0] for r in rows], skip_special_tokens=True)
    return texts


def _evaluate(cfg: RLGFConfig, start: str, model: str, adapter: Path | None, tokenizer: object,
              task: _TaskData, best_of: bool = False) -> dict:
    """Sampled responses (seeded) to the held-out prompts and their metrics; fluency is under the start model."""
    from peft import PeftModel


    base = load_policy(start)
    if adapter is not None:
        policy = PeftModel.from_pretrained(load_policy(model), adapter).merge_and_unload()
    else:
        policy = base if model == start else load_policy(model)
    generator = torch.Generator().manual_seed(cfg.seed)
    prompts = task.test_prompts
    writer = _guide_writer(cfg, policy, tokenizer, task, heldout=True) if best_of else policy
    texts = _answers(policy, writer, tokenizer, prompts, cfg.max_new_tokens, lambda begin: generator)
    metrics = task.evaluate(prompts, texts, base, tokenizer)
    metrics["examples"] = [{"prompt": p[-120:], "response": t} for p, t in list(zip(prompts, texts))[:4]]
    del policy, base
    release_free_memory()
    return metrics


REPORT_KEYS = {"imdb": ("reward_p_pos", "heldout_p_pos", "perplexity", "mean_length", "distinct_2"),
               "commongen": ("reward", "coverage", "bleu", "rouge_l", "chrf", "perplexity", "mean_length")}


def _report(root: Path, summary: dict) -> None:
    """report.html: reward curves, the held-out table and examples."""
    from tokencredit.evaluate import html_table, svg_line_chart, write_html_report

    task = summary["task"]
    curves = {k: [v for v in vals if v is not None] for k, vals in summary["reward_curves"].items()}
    what = "VADER P(positive)" if task == "imdb" else "coverage + ROUGE-L + BLEU"
    chart = svg_line_chart(curves, f"Training reward ({what}) per update", xlabel="update", ylabel="reward")
    rows = [{"policy": name, **{k: round(float(m[k]), 4) for k in REPORT_KEYS[task] if k in m}}
            for name, m in summary["policies"].items()]
    examples = [{"policy": name, **ex} for name, m in summary["policies"].items() for ex in m["examples"]]
    write_html_report(root / "report.html", f"tokencredit rlgf: learning with a guide ({task})", [
        ("Reward curves", chart), ("Held-out prompts", html_table(rows)), ("Examples", html_table(examples))])

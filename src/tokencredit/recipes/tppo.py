"""`tokencredit demo`: the TPPO query-generation pipeline end to end on an embedded default.

SFT -> sample queries + label their words -> train a token reward model -> token-level PPO (TPPO), and the
baseline of sequence-level PPO with the same reward model's summed score on the last token. Every policy is
then evaluated on held-out sessions; `summary.json` and `report.html` land in the output folder.

Each stage writes its own sub-folder and a `done.json` marker; running again with `resume=true` skips
finished stages and resumes an interrupted PPO or SFT run from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from tokencredit.models import (
    LoraSettings,
    load_critic,
    load_policy,
    load_tokenizer,
    quiet_saves,
    train_top_layers,
)
from tokencredit.precision import release_free_memory, validate_mixed_precision
from tokencredit.recipes.stages import Stage, check_fast_model, claim_recipe_folder, clamp_layers
from tokencredit.recipes.tppo_eval import CURVE_METRICS, evaluate_policies, learning_curve, write_report
from tokencredit.recipes.tppo_labels import (
    label_samples,
    label_sum,
    make_labeler,
    miss_cost,
    pairs_from_labels,
    read_records,
    records_stats,
    token_example,
    write_records,
)
from tokencredit.run_folders import releases_run_folders
from tokencredit.runs import atomic_write_json

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Every knob of the demo; the defaults fit the built-in model and data on 2 CPU cores in < 15 minutes."""

    # What a run folder saved before a setting existed did, where that differs from the setting's default now:
    # resuming such a run must ask for it explicitly (see run_folders.changed_settings).
    BEHAVIOUR_BEFORE_ADDED: ClassVar[dict] = {"reward_repeat": "keep", "label_repeats": "keep", "label_unit": "token",
                                              "label_end": False, "pair_rank": "share",
                                              "rm_anchor_weight": 0.0, "label_clicked": True,
                                              "label_miss_cost": "balanced"}

    output: str = "runs/demo"  # folder for every stage, summary.json and report.html
    model: str = "smollm2-135m-instruct"  # policy (and reward-model backbone)
    data: str | None = None  # sessions .jsonl; None = the built-in dataset (train/test split shipped)
    test_fraction: float = 0.2  # held-out share when `data` is given
    seed: int = 0  # seeds the data split, sampling, and every stage's data order and initialisation
    resume: bool = False  # skip finished stages; continue interrupted ones
    overwrite: bool = False  # replace a run already in the output folder (kept aside until this one finishes)
    allow_changed_settings: bool = False  # resume even though settings differ from the saved config.yaml
    fast: bool = False  # tiny random model + word tokenizer, few steps: for tests, not for results
    max_train_sessions: int | None = None  # use only the first N train sessions; None = all
    max_test_sessions: int | None = 60  # evaluate on the first N held-out sessions; None = all
    history_entries: int = 3  # history entries shown in the prompt
    max_new_tokens: int = 12  # longest generated query, in tokens (labelled samples, PPO and evaluation)
    # AI feedback: an OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1) or "hf:MODEL" for a local judge
    # that marks good and bad words of each sample; None = the reference-based labeler (no judge).
    judge: str | None = None
    judge_model: str = "smollm2-135m-instruct"  # the model name the endpoint serves (URL judges)
    judge_api_key_env: str = "OPENAI_API_KEY"  # URL judges: environment variable holding the API key
    # Every training stage (SFT, reward model, PPO) in bf16 autocast with fp32 trainable weights where bf16 matmuls
    # are native ("auto"), always ("bf16") or never ("no"). See tokencredit.precision.
    mixed_precision: str = "auto"

    # --- sft ---
    sft_epochs: int = 1  # passes over the train sessions
    sft_batch_size: int = 8  # examples per SFT optimiser step
    sft_learning_rate: float = 5e-4  # peak SFT learning rate (AdamW, on the LoRA adapters)
    lora_r: int = 16  # LoRA rank of the policy adapters in SFT and PPO (alpha = 2 * lora_r)
    # Blocks trained after SFT (policy LoRA, reward-model LoRA, critic): backpropagating through the top
    # blocks only makes the reward model and PPO steps about 2x cheaper on a CPU. None = every block.
    top_layers: int | None = 10

    # --- feedback + token reward model ---
    label_prompts: int = 64  # train prompts whose samples get labelled
    samples_per_prompt: int = 2  # samples labelled per prompt; those of one prompt also form preference pairs
    # Labels that pay for content once (docs/tppo.md, "Labels"). "bad": a word repeating an earlier word of the same
    # sample is labelled -1 whatever its support (stopwords stay unlabelled); "keep": each occurrence on its own
    label_repeats: Literal["bad", "keep"] = "bad"
    # Reference labeler only (no judge): whether a word of a clicked title counts as support (+1) besides the words
    # of the true next query. False (the default) makes the labels measure what the test's token F1 measures (the
    # next query): at 30 updates on TREC it raised TPPO in 3 of 3 seeds (0.542 +- 0.032 vs 0.523 +- 0.023 with
    # clicked titles; SFT 0.499) and every seed's TPPO - SFT interval has its low end above -0.01
    label_clicked: bool = False
    # Reference labeler only: label stopwords like any other word (+1 when the next query holds them, else -1)
    # instead of leaving them unlabelled. Token F1 counts every word of a query, stopwords too, so an unlabelled
    # stopword is a miss the reward never charges: on AOL seed 2 (v3, 30 updates) TPPO's queries grew to 6.8 words,
    # 40% of them stopwords (SFT 3.2 words, 10%), and F1 fell from 0.145 to 0.120 (docs/tppo.md, "v3")
    label_stopwords: bool = False
    # "word": a word's label sits on its first token only (its other tokens are unlabelled), so a word of k tokens
    # is one unit of credit; "token": every token of the word carries it
    label_unit: Literal["word", "token"] = "word"
    # True: a finished sample's end token is labelled +1 when it holds a +1 word, else -1, and a sample cut at
    # max_new_tokens is trained without an end token and with -1 on its last token; False: every sample gets an
    # end token, unlabelled
    label_end: bool = True
    # "sum": pairs of finished samples ranked by the sum of their token labels (what the summed reward is fitted
    # to), a miss counting label_miss_cost against a hit's 1, paired only when the sums differ by a hit's worth
    # or more; "share": every sample ranked by its share of good words
    pair_rank: Literal["sum", "share"] = "sum"
    # What a miss (a -1 word or end) costs against a hit (+1). The token BCE weighs -1 units by it and pairs are
    # ranked by hits - cost * misses, so a word's reward crosses 0 where its chance of being right is
    # cost / (1 + cost). "auto": the break-even of token F1 (adding a word whose chance of being right is p raises
    # a query's expected F1 only when p > F1 / 2, so cost = F / (2 - F)), F the mean token F1 of the labelling
    # policy's greedy queries on the labelled prompts (what the test measures), at least 0.01; a judge, which sees
    # no reference, gets 1.0. At a cost
    # of 1 every word whose chance is under one half costs reward: on AOL (samples' F1 ~0.05, words copied from
    # the history right ~30% of the time, others ~0.5%) every word then lost reward and the empty query was
    # the optimum. "balanced": good and bad labels weigh equally in the BCE and a miss costs 1 (as measured
    # before this option). A number: that cost
    label_miss_cost: float | Literal["auto", "balanced"] = "auto"
    # Weight of the pull towards 0 of the reward at unlabelled tokens (stopwords, a word's later tokens), so that a
    # query's summed reward counts its labelled units instead of the head's extrapolation (0 = off)
    rm_anchor_weight: float = 1.0
    rm_epochs: int = 1  # reward-model passes over the labelled samples
    rm_learning_rate: float = 3e-4  # reward-model learning rate (AdamW)
    rm_batch_size: int = 8  # reward-model examples (and pairs) per optimiser step

    # --- ppo: both TPPO and the sequence-level baseline use these ---
    ppo_updates: int = 5  # PPO updates per policy (each = one rollout batch + ppo_epochs of optimisation)
    ppo_batch_size: int = 16  # prompts (= sampled queries) per update
    ppo_mini_batch_size: int = 8  # rows per optimiser step
    ppo_epochs: int = 1  # passes over each rollout batch
    ppo_learning_rate: float = 1e-3  # policy (LoRA) learning rate
    critic_learning_rate: float = 5e-5  # value model learning rate (it starts from the reward model)
    kl_coef: float = 0.05  # beta: weight of the per-token KL to the SFT reference, subtracted from the reward
    # policies to train and compare: "sft" (always) plus any of "tppo" (per-token RM rewards) and "ppo_sequence"
    # (the RM's summed reward on the last token)
    policies: list[str] = field(default_factory=lambda: ["sft", "tppo", "ppo_sequence"])

    # --- length control (docs/tppo.md), learning curves, ablations ---
    # Subtracted from every token reward of both PPO policies: "none" = nothing; "mean" = the reward model's mean
    # token reward on the labelled SFT samples, so that a query earns or loses nothing merely by its length
    reward_center: Literal["none", "mean"] = "none"
    # "zero": the end-of-query token's reward is 0 for both PPO policies (word labels never reach it, and
    # Bradley-Terry on summed rewards makes it carry the length preference); "keep": as the reward model gives it
    reward_eos: Literal["keep", "zero"] = "keep"
    # "sum": a query's reward is its summed token rewards (as the reward model was trained). "mean" (each token's
    # reward times mean length / the query's final length) was removed: it made a token's reward depend on the
    # tokens after it (not causal); a config asking for it is refused with an error saying so
    reward_length: Literal["sum", "mean"] = "sum"
    # "eos": a query cut at max_new_tokens without an end token gets the reward model's mean end-token reward on
    # the labelled samples added at its last token, so running to the limit no longer escapes the cost of ending
    # (TREC: end tokens averaged -0.51 and PPO queries grew to the limit); "none": nothing added
    reward_unfinished: Literal["none", "eos"] = "none"
    # "clip": a token repeating an earlier token of the same query gets at most 0 reward (token rewards add up, so
    # otherwise a liked word pays again each time it is repeated: TREC and AOL PPO queries turned into repeats of
    # one word at 30 updates; clipping kept TPPO at 0.400 vs 0.298 token F1 there on TREC, 0.173 vs 0.083 on AOL,
    # and moved it by under 0.01 at the demo's 5 updates); "clip_words": the same for every token of a word that
    # repeats an earlier word ("Civil" and " civil" are different tokens but one word); "keep": as the RM gives it
    reward_repeat: Literal["keep", "clip", "clip_words"] = "clip"
    # "potential": both PPO policies optimise one bounded score of the whole query, Phi = sigmoid(summed token reward
    # / its spread on the labelled samples); TPPO gets it token by token as Phi(y<=t) - Phi(y<t), sequence PPO gets
    # the total Phi(y) - Phi(empty) at the end, so dense and sparse credit share one optimum and a repeat pays only
    # if Phi rises (reward_center, reward_eos, reward_unfinished and reward_repeat then do not apply). "none": summed
    # token rewards with those options
    reward_shaping: Literal["none", "potential"] = "none"
    curve_every: int | None = None  # also evaluate both PPO policies on the test sessions every N updates
    # Online RLAIF: before every N-th PPO update each PPO policy's own samples on label_prompts fresh train prompts
    # are labelled (same labeler and label rules) and its reward model is refitted on them plus as many replayed
    # earlier labels, starting from the previous round's model (rm_epochs passes); None = the offline reward model
    # fitted once on SFT samples. Rounds are kept under <policy>/reward_rounds/ and resume like stages.
    relabel_every: int | None = None
    # An earlier demo run folder (same data, seed, model and stage settings) whose finished sft, labels and
    # reward_model stages this run uses instead of training its own: for ablations of the PPO stages
    reuse_stages: str | None = None

    def validate(self) -> None:
        """Check the values that would fail late."""
        check_fast_model(self.fast, self.model)
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1) (got {self.test_fraction})")
        unknown = set(self.policies) - {"sft", "tppo", "ppo_sequence"}
        if unknown or "sft" not in self.policies:
            raise ValueError(f"policies must include 'sft' and be among sft, tppo, ppo_sequence (got {self.policies})")
        validate_mixed_precision(self.mixed_precision)
        if self.reward_center not in ("none", "mean") or self.reward_eos not in ("keep", "zero"):
            raise ValueError(f"reward_center must be none or mean and reward_eos keep or zero (got "
                             f"{self.reward_center!r}, {self.reward_eos!r})")
        if self.reward_length == "mean":
            raise ValueError("reward_length=mean was removed: it scaled every token's reward by the query's final "
                             "length, so a token's reward depended on the tokens sampled after it. Remove the "
                             "setting (sum is the only value left); reward_center=mean makes length reward-neutral")
        if self.reward_length != "sum":
            raise ValueError(f"reward_length must be sum (got {self.reward_length!r})")
        if self.reward_unfinished not in ("none", "eos"):
            raise ValueError(f"reward_unfinished must be none or eos (got {self.reward_unfinished!r})")
        if self.reward_repeat not in ("keep", "clip", "clip_words"):
            raise ValueError(f"reward_repeat must be keep, clip or clip_words (got {self.reward_repeat!r})")
        if self.reward_shaping not in ("none", "potential"):
            raise ValueError(f"reward_shaping must be none or potential (got {self.reward_shaping!r})")
        if not self.rm_anchor_weight >= 0:
            raise ValueError(f"rm_anchor_weight must be >= 0 (got {self.rm_anchor_weight})")
        if (self.label_repeats not in ("bad", "keep") or self.label_unit not in ("word", "token")
                or self.pair_rank not in ("sum", "share") or not isinstance(self.label_end, bool)):
            raise ValueError(f"label_repeats must be bad or keep, label_unit word or token, label_end true or false "
                             f"and pair_rank sum or share (got {self.label_repeats!r}, {self.label_unit!r}, "
                             f"{self.label_end!r}, {self.pair_rank!r})")
        cost = self.label_miss_cost
        if cost not in ("auto", "balanced") and not (isinstance(cost, float) and 0 < cost < float("inf")):
            raise ValueError(f"label_miss_cost must be auto, balanced or a number > 0 (got {cost!r})")
        if self.relabel_every is not None and not 1 <= self.relabel_every < self.ppo_updates:
            raise ValueError(f"relabel_every must be in [1, ppo_updates={self.ppo_updates}) so that at least one "
                             f"refit happens before the last update (got {self.relabel_every}); null = offline")
        if self.curve_every is not None and not 1 <= self.curve_every <= self.ppo_updates:
            raise ValueError(f"curve_every must be in [1, ppo_updates={self.ppo_updates}] (got {self.curve_every})")
        if self.reuse_stages is not None and Path(self.reuse_stages).resolve() == Path(self.output).resolve():
            raise ValueError("reuse_stages names this run's own folder; use resume=true to continue a run")
        if not isinstance(self.label_clicked, bool) or not isinstance(self.label_stopwords, bool):
            raise ValueError(f"label_clicked and label_stopwords must be true or false (got {self.label_clicked!r}, "
                             f"{self.label_stopwords!r})")
        if self.judge is not None and self.label_stopwords:
            raise ValueError("label_stopwords applies to the reference labeler; a judge labels every word it sees "
                             "(drop label_stopwords=true or the judge)")
        if self.judge is not None and self.label_clicked:
            # the default (false) is simply unused with a judge; asking for clicked titles is a mistake worth naming
            raise ValueError("label_clicked applies to the reference labeler; a judge decides support itself "
                             "(drop label_clicked=true or the judge)")
        if self.judge is not None and not (self.judge.startswith(("http://", "https://", "hf:"))):
            raise ValueError(f"judge must be an http(s) base URL or 'hf:MODEL' (got {self.judge!r})")


FAST_OVERRIDES = dict(
    max_train_sessions=48, max_test_sessions=12, max_new_tokens=6, sft_epochs=2, sft_batch_size=8,
    label_prompts=16, samples_per_prompt=2, rm_epochs=1, ppo_updates=2, ppo_batch_size=8, ppo_mini_batch_size=4,
    ppo_epochs=1, top_layers=1,
)


def _load_data(cfg: DemoConfig) -> tuple[list, list]:
    """(train, test) sessions."""
    from tokencredit.tasks.querygen import builtin_sessions, load_sessions, split_sessions

    if cfg.data is None:
        train, test = builtin_sessions("train"), builtin_sessions("test")
    else:
        train, test = split_sessions(load_sessions(cfg.data), cfg.test_fraction, cfg.seed)
    if cfg.max_train_sessions:
        train = train[: cfg.max_train_sessions]
    if cfg.max_test_sessions:
        test = test[: cfg.max_test_sessions]
    if not train or not test:
        raise ValueError(f"need train and test sessions, got {len(train)} and {len(test)}")
    return train, test


def _fast_model(root: Path, sessions: list) -> str:
    """Save a tiny random model with a word tokenizer over the data's words; return its folder."""
    from tokencredit.tasks.querygen import render_prompt
    from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

    folder = root / "tiny-model"
    if (folder / "config.json").exists():
        return str(folder)
    words: list[str] = []
    from tokenizers.pre_tokenizers import Whitespace

    split = Whitespace()
    for s in sessions:
        for text in (render_prompt(s), s.target_query):
            words.extend(w for w, _ in split.pre_tokenize_str(text))
    tok = tiny_word_tokenizer(sorted(set(words)))
    model = tiny_causal_lm(len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@releases_run_folders
def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage and write summary.json and report.html; returns the summary."""
    # transformers' per-load and per-save bars would bury the stage bars.
    with quiet_saves():
        return _run_demo(cfg)


@dataclass
class _DemoRun:
    """What every stage of one demo run reads: settings, folders, data, prompts, model and timings."""

    cfg: DemoConfig
    root: Path
    train: list
    test: list
    model_name: str
    tokenizer: object
    template: object
    train_prompts: list[str]
    test_prompts: list[str]
    lora: LoraSettings
    top_layers: int | None
    timings: dict[str, float] = field(default_factory=dict)


def _run_demo(cfg: DemoConfig) -> dict:
    """run_demo without the progress-bar settings."""
    from tokencredit.rewards.token_rm import TokenRewardModel
    from tokencredit.tasks.querygen import PromptTemplate, render_prompt

    cfg.validate()
    root = Path(cfg.output)
    drop_replaced = claim_recipe_folder(root, cfg)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    train, test = _load_data(cfg)
    model_name = _fast_model(root, train + test) if cfg.fast else cfg.model
    tokenizer = load_tokenizer(model_name)
    # The instruction goes in the system message: it replaces SmolLM2's default system prompt, so every
    # forward pass of every stage is ~17% shorter.
    template = PromptTemplate(max_history=cfg.history_entries, instruction_as_system=True)
    run = _DemoRun(cfg, root, train, test, model_name, tokenizer, template,
                   [render_prompt(s, tokenizer, template) for s in train],
                   [render_prompt(s, tokenizer, template) for s in test],
                   LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r, dropout=0.0),
                   clamp_layers(model_name, cfg.top_layers))
    log.info("demo: %d train / %d test sessions, model %s, output %s", len(train), len(test), model_name, root)

    sft_model = _timed(run, "sft", lambda: _sft_stage(run))
    labels_stage, records = _timed(run, "labels", lambda: _labels_stage(run, sft_model))
    rm_stage, rm_dir = _timed(run, "reward_model", lambda: _reward_model_stage(run, sft_model, records))
    rm = TokenRewardModel.from_pretrained(rm_dir)
    # Where the reward model puts its credit on the SFT samples it was trained on (EOS, stopwords, position, and
    # how the summed reward moves with length), and the length control both PPO policies get.
    controls = _reward_controls(cfg, rm, records)

    # 4. TPPO (per-token RM rewards) and the sequence-level baseline (the RM's sum on the last token).
    for name, kind in {"tppo": "token", "ppo_sequence": "sequence"}.items():
        if name in cfg.policies:
            _timed(run, name, lambda name=name, kind=kind: _ppo_stage(run, name, kind, sft_model, rm, rm_dir,
                                                                      records, controls))

    # 5. Evaluate every policy on held-out sessions: greedy queries vs the true next query, and RM reward.
    summary, generations = _timed(run, "evaluate", lambda: evaluate_policies(cfg, root, sft_model, test,
                                                                               run.test_prompts, tokenizer, rm))
    _complete_summary(run, summary, generations, records, labels_stage, rm_stage, controls)
    atomic_write_json(root / "summary.json", summary)
    write_report(cfg, root, summary, generations, test, tokenizer)
    drop_replaced()  # a replaced run goes only once this one has finished
    return summary


def _timed(run: _DemoRun, name: str, stage: Callable[[], object]) -> object:
    """Run a stage and add its wall-clock seconds to the run's timings."""
    t0 = time.perf_counter()
    out = stage()
    run.timings[name] = time.perf_counter() - t0
    return out


def _sft_stage(run: _DemoRun) -> Path:
    """1. SFT on (history -> next query); the merged model's folder. LoRA is merged afterwards so the SFT model is
    a plain model: PPO's fresh adapters then sit on top of it and "adapters off" is exactly the SFT reference."""
    from tokencredit.rl.sft import SFTConfig, SFTTrainer

    cfg = run.cfg
    sft = Stage.reused(run.root, "sft", cfg.resume, cfg.reuse_stages)
    sft_model = sft.dir / "merged"
    if not sft.done:
        policy = load_policy(run.model_name, lora=run.lora, seed=cfg.seed)
        SFTTrainer(
            SFTConfig(output_dir=str(sft.dir), seed=cfg.seed, num_epochs=cfg.sft_epochs, batch_size=cfg.sft_batch_size,
                      learning_rate=cfg.sft_learning_rate, save_every=10, resume=cfg.resume, log_tensorboard=False,
                      mixed_precision=cfg.mixed_precision),
            policy=policy, tokenizer=run.tokenizer, prompts=run.train_prompts,
            responses=[s.target_query for s in run.train],
        ).train()
        merged = policy.merge_and_unload()
        merged.save_pretrained(sft_model)
        run.tokenizer.save_pretrained(sft_model)
        sft.finish({"model": str(sft_model)})
        del policy, merged
        release_free_memory()
    return sft_model


def _labels_stage(run: _DemoRun, sft_model: Path) -> tuple[Stage, list[dict]]:
    """2. Sample queries from the SFT policy and label their words (reference-based labeler by default)."""
    cfg = run.cfg
    labels_stage = Stage.reused(run.root, "labels", cfg.resume, cfg.reuse_stages)
    labels_path = labels_stage.dir / "token_labels.jsonl"
    if not labels_stage.done:
        labels_stage.dir.mkdir(parents=True, exist_ok=True)
        policy = load_policy(sft_model)
        chosen = random.Random(cfg.seed).sample(range(len(run.train)), min(cfg.label_prompts, len(run.train)))
        labeler = make_labeler(cfg, labels_stage.dir)
        records, skipped = label_samples(cfg, policy, run.tokenizer, labeler, chosen, run.train, run.train_prompts,
                                          run.template, torch.Generator().manual_seed(cfg.seed))
        write_records(labels_path, records)
        labels_stage.finish(records_stats(records, labeler, skipped))
        del policy
        release_free_memory()
    return labels_stage, read_records(labels_path)


def _reward_model_stage(run: _DemoRun, sft_model: Path, records: list[dict]) -> tuple[Stage, Path]:
    """3. Token reward model on the SFT backbone: per-token BCE on the word labels, plus Bradley-Terry on the
    summed token rewards of pairs of samples of one prompt ranked by the sum of their token labels."""
    cfg = run.cfg
    rm_stage = Stage.reused(run.root, "reward_model", cfg.resume, cfg.reuse_stages)
    if not rm_stage.done:
        history, examples, pairs = _fit_token_rm(cfg, sft_model, records, rm_stage.dir, run.tokenizer,
                                                 run.top_layers, cfg.seed)
        rm_stage.finish({"examples": examples, "pairs": pairs, "miss_cost": history[-1].get("miss_cost"),
                         "eval": history[-1].get("eval", {})})
        release_free_memory()
    return rm_stage, rm_stage.dir / "model"


def _ppo_stage(run: _DemoRun, name: str, kind: str, sft_model: Path, rm: object, rm_dir: Path,
               records: list[dict], controls: _RewardControls) -> None:
    """4. One PPO policy from the SFT model: "token" rewards (TPPO) or the RM's sum on the last token."""
    from tokencredit.rl.ppo import PPOConfig, PPOTrainer

    cfg = run.cfg
    stage = Stage(run.root, name, cfg.resume)
    if stage.done:
        return
    policy = load_policy(sft_model, lora=dataclasses.replace(run.lora, top_layers=run.top_layers), seed=cfg.seed)
    curve = cfg.curve_every is not None
    # The value model starts from the reward model's weights.
    critic = train_top_layers(load_critic(rm_dir), run.top_layers)
    PPOTrainer(
        PPOConfig(output_dir=str(stage.dir), seed=cfg.seed, num_updates=cfg.ppo_updates,
                  batch_size=cfg.ppo_batch_size, mini_batch_size=cfg.ppo_mini_batch_size,
                  ppo_epochs=cfg.ppo_epochs, learning_rate=cfg.ppo_learning_rate,
                  critic_learning_rate=cfg.critic_learning_rate, kl_coef=cfg.kl_coef,
                  max_new_tokens=cfg.max_new_tokens, save_every=cfg.curve_every if curve else 2,
                  # every checkpoint is a point of the learning curve; they go once it is measured
                  keep_checkpoints=cfg.ppo_updates if curve else 2, resume=cfg.resume,
                  log_tensorboard=False, reuse_sampling_logprobs=True,
                  mixed_precision=cfg.mixed_precision),
        policy=policy, tokenizer=run.tokenizer, prompts=run.train_prompts, critic=critic,
        reward_fn=_policy_reward_fn(cfg, rm, kind, controls),
    ).train(before_update=None if cfg.relabel_every is None else _OnlineRefits(
        cfg, stage.dir / "reward_rounds", kind, rm_dir, records, _LabelSource(
            run.train, run.train_prompts, run.template, run.tokenizer), run.top_layers))
    del policy, critic
    release_free_memory()
    info: dict = {"policy": str(stage.dir / "policy")}
    if cfg.relabel_every is not None:
        info["reward_rounds"] = _rounds_info(stage.dir / "reward_rounds")
    if curve:
        info["curve"] = learning_curve(cfg, stage.dir, sft_model, run.test, run.test_prompts, run.tokenizer, rm)
        shutil.rmtree(stage.dir / "checkpoints", ignore_errors=True)
    stage.finish(info)


def _complete_summary(run: _DemoRun, summary: dict, generations: dict, records: list[dict], labels_stage: Stage,
                      rm_stage: Stage, controls: _RewardControls) -> None:
    """Add timings, data, labels, reward-model checks, credit, length control and curves to the summary."""
    cfg, root = run.cfg, run.root
    summary["timings_s"] = {k: round(v, 1) for k, v in run.timings.items()}
    summary["data"] = {"train_sessions": len(run.train), "test_sessions": len(run.test),
                       "labelled_samples": len(records), "source": cfg.data or "built-in"}
    summary["labeler"] = (f"LLM judge {cfg.judge} ({cfg.judge_model}) marking good and bad words" if cfg.judge
                          else "reference-based (words supported by the true next query or clicked titles)")
    summary["labels"] = labels_stage.info()
    summary["label_rules"] = {"label_repeats": cfg.label_repeats, "label_unit": cfg.label_unit,
                              "label_end": cfg.label_end, "pair_rank": cfg.pair_rank}
    summary["reward_model_eval"] = rm_stage.info().get("eval", {})
    summary["reward_credit"] = {"labelled_samples": controls.credit, **{
        name: generations[name]["credit"] for name in cfg.policies if "credit" in generations.get(name, {})}}
    summary["length_control"] = {"reward_center": cfg.reward_center, "center": controls.center,
                                 "reward_eos": cfg.reward_eos, "reward_length": cfg.reward_length,
                                 "reward_unfinished": cfg.reward_unfinished, "unfinished": controls.unfinished,
                                 "reward_repeat": cfg.reward_repeat, "reward_shaping": cfg.reward_shaping,
                                 "shaping_temperature": controls.shaping_temperature}
    curves = {name: Stage(root, name, True).info().get("curve") for name in ("tppo", "ppo_sequence")
              if name in cfg.policies}
    if cfg.relabel_every is not None:
        summary["reward_rounds"] = {name: Stage(root, name, True).info().get("reward_rounds", [])
                                    for name in ("tppo", "ppo_sequence") if name in cfg.policies}
    if any(curves.values()):
        summary["learning_curves"] = {"sft": {k: summary["sft"][k] for k in CURVE_METRICS},
                                      **{k: v for k, v in curves.items() if v}}


def _fit_token_rm(cfg: DemoConfig, start: Path, records: list[dict], folder: Path, tokenizer: object,
                  top_layers: int | None, seed: int) -> tuple[list[dict], int, int]:
    """Fit a token reward model from the model folder ``start`` (fresh LoRA adapters) on labelled samples: per-token
    BCE on the word labels plus Bradley-Terry on the summed token rewards of pairs of samples of one prompt ranked
    by the sum of their token labels. Saved to ``folder/model``; returns (history, examples, pairs)."""
    from tokencredit.rewards.token_rm import TokenRewardModel
    from tokencredit.rewards.token_rm_training import TokenRMConfig, train_token_reward_model

    # With end labels an empty finished query is an example too: its end token alone, labelled -1.
    examples = [token_example(r, cfg.label_end) for r in records
                if r["response"] or (cfg.label_end and r.get("finished", True))]
    cost = miss_cost(cfg, records)
    pairs = pairs_from_labels(records, cfg.pair_rank, lambda r: label_sum(
        token_example(r, cfg.label_end), tokenizer, cfg.label_unit, 1.0 if cost is None else cost),
        min_gap=1.0)
    rm = TokenRewardModel.from_pretrained(
        start, lora=LoraSettings(r=8, alpha=16, dropout=0.0, top_layers=top_layers), seed=seed)
    history = train_token_reward_model(
        rm, TokenRMConfig(output_dir=str(folder), seed=seed, num_epochs=cfg.rm_epochs,
                          batch_size=cfg.rm_batch_size, learning_rate=cfg.rm_learning_rate, progress=True,
                          balance_labels=cost is None, bad_weight=cost, mixed_precision=cfg.mixed_precision,
                          label_unit=cfg.label_unit, anchor_weight=cfg.rm_anchor_weight),
        token_examples=examples, pairs=pairs,
    )
    history[-1]["miss_cost"] = cost
    return history, len(examples), len(pairs)


@dataclass
class _RewardControls:
    """What a reward model's PPO reward takes from its labelled samples (docs/tppo.md, "Length control")."""

    center: float  # subtracted from every token reward (reward_center=mean), else 0
    unfinished: float  # added to the last token of a query cut at the limit (reward_unfinished=eos), else 0
    shaping_temperature: float | None  # the potential's scale (reward_shaping=potential), else None
    credit: dict  # credit_profile of the labelled samples


def _reward_controls(cfg: DemoConfig, rm: object, records: list[dict]) -> _RewardControls:
    """Where the reward model puts its credit on labelled samples (EOS, stopwords, position, and how the summed
    reward moves with length), and the length-control constants both PPO policies get from them."""
    from tokencredit.rewards.credit import credit_profile
    from tokencredit.rewards.token_rm import mean_token_reward

    label_ids = [rm.encode_response(r["response"]) for r in records]
    if cfg.label_end:  # a sample cut at the length limit is read as the reward model was trained on it: no EOS
        label_ids = [ids[:-1] if not r.get("finished", True) and len(ids) > 1 else ids
                     for r, ids in zip(records, label_ids)]
    prompts = [r["prompt"] for r in records]
    rewards = rm.score_token_ids(prompts, label_ids) if records else []
    credit = credit_profile(rm, prompts, label_ids, rewards=rewards) if records else {}
    center = (mean_token_reward(rm, prompts, label_ids, exclude_eos=cfg.reward_eos == "zero", rewards=rewards)
              if cfg.reward_center == "mean" else 0.0)
    eos_mean = credit.get("mean_reward", {}).get("eos") if credit else None
    unfinished = float(eos_mean) if cfg.reward_unfinished == "eos" and eos_mean is not None else 0.0
    temperature = _sum_spread(rewards) if cfg.reward_shaping == "potential" else None
    return _RewardControls(center, unfinished, temperature, credit)


def _policy_reward_fn(cfg: DemoConfig, rm: object, kind: str, controls: _RewardControls) -> Callable:
    """The reward a PPO policy of the demo gets from a token reward model: per token ("token", TPPO) or summed
    ("sequence"), with the demo's shaping or length and repeat options."""
    if cfg.reward_shaping == "potential":
        return _shaped_reward_fn(rm, kind, controls.shaping_temperature)
    return rm.as_reward_fn(kind, center=controls.center, eos=cfg.reward_eos, unfinished=controls.unfinished,
                           repeats=cfg.reward_repeat)


@dataclass
class _LabelSource:
    """The train sessions and prompts online rounds draw fresh prompts from, and how prompts are written."""

    train: list
    prompts: list[str]
    template: object
    tokenizer: object


class _OnlineRefits:
    """``relabel_every``: the reward model a PPO policy is trained on, refitted on its own samples.

    Called before every PPO update (:meth:`PPOTrainer.train`'s ``before_update``). Round k starts at update
    k * relabel_every: the policy as it is then samples queries for ``label_prompts`` train prompts drawn afresh
    for the round, the demo's labeler labels them, and round k-1's reward model (round 0: the offline one) is
    fitted on them plus as many labels replayed from earlier rounds, then becomes the trainer's reward. Each round
    is a folder with a done marker, so a resumed run loads the rounds it finished and rebuilds at most the one
    that was interrupted, from the policy resumed at the same update.
    """

    def __init__(self, cfg: DemoConfig, root: Path, kind: str, offline_rm: Path, offline_records: list[dict],
                 source: _LabelSource, top_layers: int | None) -> None:
        """Rounds under ``root`` for a policy of ``kind`` ("token" or "sequence")."""
        self.cfg, self.root, self.kind, self.source, self.top_layers = cfg, root, kind, source, top_layers
        self.offline_rm, self.offline_records = offline_rm, offline_records
        self.round = 0

    def _dir(self, k: int) -> Path:
        """Round k's folder."""
        return self.root / f"round{k}"

    def _model(self, k: int) -> Path:
        """Round k's reward model folder (round 0: the offline reward model)."""
        return self.offline_rm if k == 0 else self._dir(k) / "reward_model" / "model"

    def _records(self, k: int) -> list[dict]:
        """The labels of rounds 0..k (round 0: the offline labels of SFT samples)."""
        out = list(self.offline_records)
        for j in range(1, k + 1):
            out += read_records(self._dir(j) / "labels.jsonl")
        return out

    def __call__(self, trainer: object) -> None:
        """Make the trainer's reward the one of the round its next update belongs to."""
        from tokencredit.rewards.token_rm import TokenRewardModel

        target = trainer.update_idx // self.cfg.relabel_every
        if target == self.round:
            return
        for k in range(1, target + 1):
            if not (self._dir(k) / "done.json").exists():
                if k < target:
                    log.warning("online round %d is missing under %s; building it from the policy at update %d",
                                k, self.root, trainer.update_idx)
                self._build(k, trainer.policy)
        rm = TokenRewardModel.from_pretrained(self._model(target))
        trainer.reward_fn = _policy_reward_fn(self.cfg, rm, self.kind,
                                              _reward_controls(self.cfg, rm, self._records(target)))
        self.round = target

    def _build(self, k: int, policy: object) -> None:
        """Round k: label the policy's samples on fresh prompts and refit round k-1's reward model on them."""
        cfg, src = self.cfg, self.source
        folder = self._dir(k)
        folder.mkdir(parents=True, exist_ok=True)
        # A round's prompts and samples are a function of (seed, round), so a rebuilt round is the same round.
        round_seed = cfg.seed * 1_000_003 + k
        rng = random.Random(round_seed)
        chosen = rng.sample(range(len(src.train)), min(cfg.label_prompts, len(src.train)))
        labeler = make_labeler(cfg, folder)
        records, skipped = label_samples(cfg, policy, src.tokenizer, labeler, chosen, src.train, src.prompts,
                                          src.template, torch.Generator().manual_seed(round_seed))
        earlier = self._records(k - 1)
        replay = rng.sample(earlier, min(len(earlier), len(records)))
        # Replayed samples keep their own prompts, and pairs form within one session: mark them apart so a replayed
        # sample never pairs with a new one of the same session.
        fit_records = records + [{**r, "session": ("replay", r["session"])} for r in replay]
        history, examples, pairs = _fit_token_rm(cfg, self._model(k - 1), fit_records, folder / "reward_model",
                                                 src.tokenizer, self.top_layers, cfg.seed + k)
        write_records(folder / "labels.jsonl", records)
        atomic_write_json(folder / "done.json", {
            "round": k, "labels": records_stats(records, labeler, skipped), "replayed": len(replay),
            "examples": examples, "pairs": pairs, "miss_cost": history[-1].get("miss_cost"),
            "eval": history[-1].get("eval", {}),
            "mean_f1": (statistics.fmean(r["f1"] for r in records)
                        if records and all("f1" in r for r in records) else None),
            # The labeler's verdict on the policy's own samples, round by round: whether PPO improved what the
            # labels measure (the offline reward model's view of it can drift from that).
            "mean_label_sum": (statistics.fmean(label_sum(token_example(r, cfg.label_end), src.tokenizer,
                                                          cfg.label_unit) for r in records) if records else None),
        })
        release_free_memory()


def _rounds_info(root: Path) -> list[dict]:
    """What each finished online round recorded, in round order."""
    folders = sorted(root.glob("round*/done.json"), key=lambda p: int(p.parent.name[len("round"):]))
    return [json.loads(p.read_text()) for p in folders]


def _sum_spread(rewards: list[list[float]]) -> float:
    """The standard deviation of the summed token rewards of some responses (1.0 when it cannot be measured):
    the scale at which the shaping potential's sigmoid neither saturates nor stays linear."""
    sums = [sum(row) for row in rewards]
    spread = statistics.stdev(sums) if len(sums) > 1 else 0.0
    return spread if spread > 1e-6 else 1.0


def _shaped_reward_fn(rm: object, kind: str, temperature: float) -> Callable:
    """The potential-shaped reward of a token RM: per token for TPPO, its telescoped total for sequence PPO."""
    from tokencredit.rewards.shaping import potential_reward_fn, token_rm_potentials

    per_token = potential_reward_fn(token_rm_potentials(rm, bound="sigmoid", temperature=temperature))
    if kind == "token":
        return per_token

    def total(prompts: list[str], responses: list[str], ids: list[list[int]]) -> list[float]:
        return [sum(row) for row in per_token(prompts, responses, ids)]

    return total

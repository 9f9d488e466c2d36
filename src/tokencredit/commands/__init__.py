"""Every `tokencredit <name>` in one table: its config class, its run function, its flags and what it prints.

Config classes and run functions are named as "module:name" strings and imported only when a command runs (or
its --help is asked for), so the CLI starts without loading torch. The table is the one place to add a command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["COMMANDS", "Command", "Flag"]


@dataclass(frozen=True)
class Flag:
    """A command-line option that sets one config field (or, with ``to_run``, an argument of the run function)."""

    name: str  # "--model", or "model" for a positional argument
    help: str
    field: str | None = None  # the config field it sets; None = the name without dashes, "-" read as "_"
    type: type | None = None  # argparse type of the value (str when None)
    switch: bool = False  # a flag without a value: sets the field to true
    choices: tuple[str, ...] | None = None
    exact: bool = False  # set as given after loading (dataclasses.replace), not parsed as a key=value override
    to_run: bool = False  # passed to the run function as a keyword argument, not to the config

    @property
    def dest(self) -> str:
        """The attribute argparse stores the value under."""
        return self.name.lstrip("-").replace("-", "_")

    @property
    def key(self) -> str:
        """The config field (or run-function keyword) the value goes to."""
        return self.field or self.dest


@dataclass(frozen=True)
class Command:
    """One `tokencredit <name>`: where its config class and run function live, and how the CLI presents it."""

    config: str  # "module:ConfigClass"
    run: str  # "module:function", called with the loaded config (plus any to_run flags)
    help: str  # one line in `tokencredit --help`
    description: str  # the command's own --help text
    example: str = "resume=true"  # a key=value example for the overrides' help
    flags: tuple[Flag, ...] = ()
    config_file: bool = True  # takes --config FILE.yaml
    defaults: str | None = None  # "module:NAME" of settings under the file and the overrides (the embedded default)
    fast_defaults: str | None = None  # "module:NAME" of the sizes fast=true brings, under the file and overrides
    report: Callable[[Any], Any] | None = None  # what to print (as JSON) of the run's result; None = nothing
    distributed: tuple[str, ...] = ()  # what may run under accelerate launch: "" = the command, else its actions


def _rlgf_report(summary: dict) -> dict:
    """Each policy's task metrics."""
    from tokencredit.recipes.rlgf import REPORT_KEYS

    keys = REPORT_KEYS[summary["task"]]
    return {k: {m: v.get(m) for m in keys} for k, v in summary["policies"].items()}


def _pgg_report(summary: dict) -> dict:
    """Each arm's results without its candidates and examples."""
    return {arm: {k: v for k, v in r.items() if k not in ("candidates", "examples")}
            for arm, r in summary["results"].items()}


def _ser_report(summary: dict) -> dict:
    """The evolve summary and each policy's scorer reading and length."""
    return {"evolve": summary["evolve"], "policies": {
        k: {m: v[m] for m in ("scorer_mean_sigma", "mean_words")} for k, v in summary["policies"].items()}}


_FAST = Flag("--fast", "tiny random model and few steps: checks the plumbing", switch=True)
_RESUME = Flag("--resume", "skip finished stages, continue an interrupted one", switch=True)

COMMANDS: dict[str, Command] = {
    "ppo": Command(
        "tokencredit.commands.ppo:PPORunConfig", "tokencredit.commands.ppo:run_ppo",
        "token-level PPO on prompts with a reward function",
        "Token-level PPO. With no config, a short example run of the built-in model.",
        defaults="tokencredit.commands.ppo:PPO_DEFAULTS", distributed=("",)),
    "sft": Command(
        "tokencredit.commands.sft:SFTRunConfig", "tokencredit.commands.sft:run_sft",
        "supervised fine-tuning on prompt/response pairs",
        "Supervised fine-tuning: mean NLL of the response tokens. Needs data=FILE.jsonl.", distributed=("",)),
    "demo": Command(
        "tokencredit.recipes.tppo:DemoConfig", "tokencredit.recipes.tppo:run_demo",
        "TPPO query generation end to end: SFT, labels, token reward model, TPPO vs sequence PPO",
        "The TPPO query-generation demo on the built-in sessions and model (about 5 minutes on 2 CPU cores). Writes "
        "summary.json and report.html to --output.", "ppo_updates=10",
        flags=(Flag("--model", "policy and reward-model backbone (built-in name, folder or cached hub id)"),
               Flag("--data", "sessions .jsonl ({history: [{query, clicked}], target_query}); split into train/test "
                              "by test_fraction"),
               Flag("--output", "run folder (default runs/demo)"), _FAST, _RESUME,
               Flag("--judge", "label samples with an LLM judge: an OpenAI-compatible base URL (model name in "
                               "judge_model=...) or hf:MODEL for a local one")),
        fast_defaults="tokencredit.recipes.tppo:FAST_OVERRIDES",
        report=lambda s: {k: s[k] for k in ("sft", "tppo", "ppo_sequence") if k in s}),
    "fg": Command(
        "tokencredit.recipes.fg:FGConfig", "tokencredit.recipes.fg:run_fg",
        "FG: fine-grained PPO (token RM from minimal edits) vs sequence-level PPO",
        "Minimal edits -> SFT -> token RM (hybrid loss) and sequence RM -> fine-grained vs sequence PPO -> held-out "
        "evaluation. Needs edits=FILE.jsonl; writes summary.json and report.html to output.", "edits=edits.jsonl",
        flags=(_FAST, _RESUME), fast_defaults="tokencredit.recipes.fg:FAST_OVERRIDES",
        report=lambda s: s["policies"]),
    "reward": Command(
        "tokencredit.commands.reward:RewardRunConfig", "tokencredit.commands.reward:run_reward",
        "train / evaluate reward models, or show per-token rewards as colour",
        "Reward models from preference pairs, minimal edits, ranked lists or span labels.",
        "kind=sequence data=pairs.jsonl",
        flags=(Flag("action", "train, eval or show", choices=("train", "eval", "show"), to_run=True),),
        distributed=("train",)),
    "evolve": Command(
        "tokencredit.rewards.evolve:EvolveConfig", "tokencredit.rewards.evolve:run_evolve",
        "SER: grow a reward model's training set from a few labels",
        "Self-evolved reward learning. Needs data=PAIRS.jsonl.", "labelled_fraction=0.15",
        report=lambda s: {k: v for k, v in s.items() if k != "loops"}),
    "rlgf": Command(
        "tokencredit.recipes.rlgf:RLGFConfig", "tokencredit.recipes.rlgf:run_rlgf",
        "RLGF recipe: PPO vs PPO++ / AggreVaTeD / LOLS / D2LOLS with a guide",
        "Learning with a guide LLM end to end on IMDB continuation or CommonGen (recipes/rlgf.py). Needs "
        "data=REVIEWS.jsonl (task=imdb) or data=CONCEPTS.jsonl (task=commongen), or fast=true.",
        "data=imdb_train.jsonl algorithms='[ppo, ppo_pp]'", report=_rlgf_report),
    "pgg": Command(
        "tokencredit.recipes.pgg:PGGRecipeConfig", "tokencredit.recipes.pgg:run_pgg",
        "PGG recipe: token guidance grounded in metric rankings",
        "Preference-grounded token guidance end to end (recipes/pgg.py): task=fewshot (discrete prompts for a "
        "frozen classifier; data=a 16-shot split folder) or task=summarize (reward-weighted MLE; "
        "data=DOCUMENTS.jsonl), or fast=true.", "task=fewshot data=fewshot/sst-2/16-42", report=_pgg_report),
    "ser": Command(
        "tokencredit.recipes.ser:SERRecipeConfig", "tokencredit.recipes.ser:run_ser",
        "SER recipe: evolve a reward model, then PPO on it vs the seed RM",
        "Self-evolved reward learning end to end (recipes/ser.py). Needs data=PAIRS.jsonl, or fast=true.",
        "data=pairs.jsonl ppo_updates=5", report=_ser_report),
    "judge": Command(
        "tokencredit.commands.judge:JudgeRunConfig", "tokencredit.commands.judge:run_judge",
        "label a dataset with an LLM judge (pairs, rubric scores, spans, edits)",
        "RLAIF labelling with a cached, resumable judge.", "task=pairwise data=pairs.jsonl", report=lambda s: s),
    "evaluate": Command(
        "tokencredit.commands.judge:EvaluateConfig", "tokencredit.commands.judge:run_evaluate",
        "judged win rate of one policy (or generations) against another",
        "Judged win rate with a 95% bootstrap interval, plus BLEU/ROUGE-L against references.",
        "prompts=p.jsonl a=runs/x/policy", report=lambda s: s),
    "serve": Command(
        "tokencredit.model_server:ServeConfig", "tokencredit.serve:run_serve",
        "serve a local model over an OpenAI-compatible HTTP API",
        "OpenAI-compatible /v1/chat/completions and /v1/completions for a local causal LM.",
        "max_rows=16 max_context=4096 request_timeout_s=60 max_connections=8 max_body_bytes=1048576",
        config_file=False,
        # a flag given wins over key=value, and is taken as typed (no YAML reading of, say, an API key)
        flags=(Flag("model", "built-in name, model folder (e.g. a trained policy) or cached hub id", exact=True),
               Flag("--host", "address to bind (default: 127.0.0.1, loopback only)", exact=True),
               Flag("--port", "port (default 8000; 0 = any free port, printed at start)", type=int, exact=True),
               Flag("--served-name", "the model name clients send (default: the folder or built-in name)",
                    exact=True),
               Flag("--device", "auto (default), cpu, cuda, cuda:1 ...", exact=True),
               Flag("--api-key", "require 'Authorization: Bearer KEY' on every route (default: the "
                                 "TOKENCREDIT_API_KEY environment variable, which keeps it out of ps)", exact=True))),
}

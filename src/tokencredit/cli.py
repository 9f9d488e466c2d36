"""The `tokencredit` command: `tokencredit ppo|sft --config run.yaml key=value ...`."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import importlib.resources
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokencredit import __version__
from tokencredit.config import ConfigError, import_object, load_config
from tokencredit.judges.backends import JudgeError
from tokencredit.models import LoraSettings, apply_chat
from tokencredit.record_files import RecordError
from tokencredit.rl.ppo import PPOConfig
from tokencredit.rl.sft import SFTRunConfig, run_sft
from tokencredit.runs import CheckpointError

log = logging.getLogger("tokencredit")


@dataclass
class PPORunConfig(PPOConfig):
    """`tokencredit ppo`: the PPO knobs plus where the model, prompts and reward come from."""

    model: str = "smollm2-135m-instruct"  # built-in name, local folder or (cached) hub id
    adapter: str | None = None  # saved LoRA adapter to continue training
    lora: LoraSettings | None = None  # train new LoRA adapters; the reference is the policy with them off
    save_merged: bool = False  # LoRA: also write policy-merged/, the adapters merged into a plain model folder
    critic_model: str | None = None  # value model backbone (e.g. a reward model folder); None = policy copy
    dtype: str = "float32"  # torch dtype the policy (and critic) weights are loaded in, e.g. bfloat16
    prompts: str | None = None  # .txt (one a line) or .jsonl; None = the built-in example prompts
    prompt_field: str = "prompt"  # .jsonl field holding each prompt
    reference_field: str | None = None  # .jsonl field with reference responses, for target_coef
    max_prompts: int | None = None  # use only the first N prompts; None = all
    # "module:name", "file.py:name" (Python code: trusted), or "rm:PATH", a saved reward model folder (data)
    reward: str = "tokencredit.rewards.examples:PositiveWords"
    # rm:PATH only: auto (token RM: every token; sequence RM: its score), token, sum (token scores summed onto
    # the last token) or last (the score at the last token)
    reward_placement: Literal["auto", "token", "sum", "last"] = "auto"
    # rm:PATH with one score per response (sum, last, or a sequence RM): reward sigma(score) - baseline, as SER
    # does (0.5 centres it); None = the raw score
    reward_sigmoid_baseline: float | None = None
    reward_scale: float = 1.0  # rm:PATH only: multiplies every reward
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template when it has one
    system_prompt: str | None = None  # system message before each prompt when chat_template applies; None = none


# The embedded default: a short LoRA run of the built-in model on the example prompts and per-token reward.
PPO_DEFAULTS = {
    "output_dir": "runs/ppo-example",
    "num_updates": 8,
    "batch_size": 8,
    "mini_batch_size": 4,
    "ppo_epochs": 2,
    "max_new_tokens": 24,
    "learning_rate": 5e-4,
    "critic_learning_rate": 1e-5,
    "kl_coef": 0.05,
    "save_every": 2,
    "lora": {"r": 8, "alpha": 32, "dropout": 0.0},
}


def make_reward_fn(spec: str, tokenizer: object) -> object:
    """The reward callable named by spec; a class is constructed with the tokenizer as its one argument."""
    obj = import_object(spec)
    fn = obj(tokenizer) if isinstance(obj, type) else obj
    if not callable(fn):
        raise ConfigError(f"reward {spec!r} is not callable")
    return fn



def saved_rm_reward(cfg: PPORunConfig, tokenizer: object, raw_of: dict[str, str]) -> object:
    """The reward_fn of ``reward=rm:PATH``: prompts go back to their raw text, then the RM's own format."""
    from tokencredit.models import resolve_device
    from tokencredit.rewards.saved import SavedRewardSettings, reward_from_saved_rm

    settings = SavedRewardSettings(placement=cfg.reward_placement, sigmoid_baseline=cfg.reward_sigmoid_baseline,
                                   scale=cfg.reward_scale)
    try:
        return reward_from_saved_rm(cfg.reward[3:], tokenizer, settings, raw_prompt=lambda p: raw_of.get(p, p),
                                    device=resolve_device(cfg.device))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"reward={cfg.reward}: {exc}") from exc


def run_ppo(cfg: PPORunConfig) -> list[dict]:
    """Load everything the config names and train."""
    from tokencredit.models import load_critic, load_policy, load_tokenizer
    from tokencredit.record_files import load_prompts
    from tokencredit.rl.ppo import PPOTrainer

    if cfg.prompts is None:
        text = importlib.resources.files("tokencredit").joinpath("data/ppo_example_prompts.txt").read_text()
        prompts, refs = [line for line in text.splitlines() if line.strip()], None
    else:
        prompts, refs = load_prompts(cfg.prompts, cfg.prompt_field, cfg.reference_field)
    if not cfg.reward.startswith("rm:") and (cfg.reward_placement != "auto" or cfg.reward_scale != 1.0
                                             or cfg.reward_sigmoid_baseline is not None):
        raise ConfigError("reward_placement, reward_scale and reward_sigmoid_baseline apply to reward=rm:PATH only")
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
        refs = refs[: cfg.max_prompts] if refs is not None else None
    tokenizer = load_tokenizer(cfg.model)
    raw_prompts = list(prompts)
    if cfg.chat_template and tokenizer.chat_template:
        prompts = apply_chat(tokenizer, prompts, cfg.system_prompt)
    reward_fn = make_reward_fn(cfg.reward, tokenizer) if not cfg.reward.startswith("rm:") else (
        saved_rm_reward(cfg, tokenizer, dict(zip(prompts, raw_prompts))))
    policy = load_policy(cfg.model, lora=cfg.lora, adapter=cfg.adapter, dtype=cfg.dtype, seed=cfg.seed)
    critic = load_critic(cfg.critic_model, dtype=cfg.dtype) if cfg.critic_model else None
    trainer = PPOTrainer(cfg, policy=policy, tokenizer=tokenizer, prompts=prompts, reward_fn=reward_fn,
                         critic=critic, reference_responses=refs)
    history = trainer.train()
    if not trainer.group.is_main:
        return history  # rank 0 writes the merged policy and reports
    if cfg.save_merged:
        from tokencredit.models import save_merged

        save_merged(trainer.policy, tokenizer, Path(cfg.output_dir) / "policy-merged")
    if history:
        first, last = history[0], history[-1]
        print(json.dumps({"updates": len(history), "first_reward": first.get("reward/mean"),
                          "last_reward": last.get("reward/mean"), "last_kl": last.get("kl/mean"),
                          "run": str(cfg.output_dir)}))
    return history


# Where each command's config class lives; imported only when its --help is asked for, so the CLI starts fast.
CONFIG_CLASSES = {
    "PPORunConfig": "tokencredit.cli:PPORunConfig",
    "SFTRunConfig": "tokencredit.rl.sft:SFTRunConfig",
    "DemoConfig": "tokencredit.recipes.tppo:DemoConfig",
    "FGConfig": "tokencredit.recipes.fg:FGConfig",
    "RewardRunConfig": "tokencredit.commands.reward:RewardRunConfig",
    "EvolveConfig": "tokencredit.rewards.evolve:EvolveConfig",
    "RLGFConfig": "tokencredit.recipes.rlgf:RLGFConfig",
    "PGGRecipeConfig": "tokencredit.recipes.pgg:PGGRecipeConfig",
    "SERRecipeConfig": "tokencredit.recipes.ser:SERRecipeConfig",
    "JudgeRunConfig": "tokencredit.commands.judge:JudgeRunConfig",
    "EvaluateConfig": "tokencredit.commands.judge:EvaluateConfig",
    "ServeConfig": "tokencredit.serve:ServeConfig",
}


class _HelpWithFields(argparse.Action):
    """-h/--help that appends every field of the command's config class (type, default, description)."""

    def __init__(self, option_strings: list[str], dest: str, config: str = "", **kwargs: object) -> None:
        """Remember which config class to describe."""
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show this help, with every setting, and exit")
        self.config = config

    def __call__(self, parser: argparse.ArgumentParser, namespace: object, values: object,
                 option_string: str | None = None) -> None:
        """Print the usage, the options and the settings, then exit."""
        from tokencredit.config import format_fields

        module, _, name = CONFIG_CLASSES[self.config].partition(":")
        cls = getattr(importlib.import_module(module), name)
        sys.stdout.write(parser.format_help() + "\n" + format_fields(cls) + "\n")
        parser.exit()


def _add_help(parser: argparse.ArgumentParser, config: str) -> None:
    """Give ``parser`` the -h/--help that lists ``config``'s fields."""
    parser.add_argument("-h", "--help", action=_HelpWithFields, config=config)


def _config_command(
    sub: argparse._SubParsersAction, name: str, config: str, help_: str, description: str, example: str
) -> argparse.ArgumentParser:
    """A subcommand configured by a dataclass: --config FILE.yaml and key=value overrides."""
    parser = sub.add_parser(name, help=help_, description=f"{description} ({config})", add_help=False)
    _add_help(parser, config)
    parser.add_argument("--config", help=f"YAML file with {config} fields")
    parser.add_argument("overrides", nargs="*", help=f"key=value settings that win over the file, e.g. {example}")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the `tokencredit` command."""
    parser = argparse.ArgumentParser(prog="tokencredit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tokencredit {__version__}")
    parser.add_argument("--allow-download", action="store_true",
                        help="let a hub id that is not in the local cache download (same as "
                             "TOKENCREDIT_ALLOW_DOWNLOAD=1); off by default, so runs stay offline")
    sub = parser.add_subparsers(dest="command", required=True)
    _config_command(sub, "ppo", "PPORunConfig", "token-level PPO on prompts with a reward function",
                    "Token-level PPO. With no config, a short example run of the built-in model.", "resume=true")
    _config_command(sub, "sft", "SFTRunConfig", "supervised fine-tuning on prompt/response pairs",
                    "Supervised fine-tuning: mean NLL of the response tokens. Needs data=FILE.jsonl.", "resume=true")
    demo = _config_command(
        sub, "demo", "DemoConfig", "TPPO query generation end to end: SFT, labels, token reward model, TPPO vs "
        "sequence PPO", "The TPPO query-generation demo on the built-in sessions and model (about 5 minutes on 2 "
        "CPU cores). Writes summary.json and report.html to --output.", "ppo_updates=10")
    demo.add_argument("--model", help="policy and reward-model backbone (built-in name, folder or cached hub id)")
    demo.add_argument("--data", help="sessions .jsonl ({history: [{query, clicked}], target_query}); "
                      "split into train/test by test_fraction")
    demo.add_argument("--output", help="run folder (default runs/demo)")
    demo.add_argument("--fast", action="store_true", help="tiny random model and few steps: checks the plumbing")
    demo.add_argument("--resume", action="store_true", help="skip finished stages, continue an interrupted one")
    demo.add_argument("--judge", help="label samples with an LLM judge: an OpenAI-compatible base URL (model name "
                                      "in judge_model=...) or hf:MODEL for a local one")
    fg = _config_command(
        sub, "fg", "FGConfig", "FG: fine-grained PPO (token RM from minimal edits) vs sequence-level PPO",
        "Minimal edits -> SFT -> token RM (hybrid loss) and sequence RM -> fine-grained vs sequence PPO -> held-out "
        "evaluation. Needs edits=FILE.jsonl; writes summary.json and report.html to output.", "edits=edits.jsonl")
    fg.add_argument("--fast", action="store_true", help="tiny random model and few steps: checks the plumbing")
    fg.add_argument("--resume", action="store_true", help="skip finished stages, continue an interrupted one")
    reward = sub.add_parser("reward", help="train / evaluate reward models, or show per-token rewards as colour",
                            description="Reward models from preference pairs, minimal edits, ranked lists or span "
                                        "labels (RewardRunConfig).", add_help=False)
    _add_help(reward, "RewardRunConfig")
    reward.add_argument("action", choices=["train", "eval", "show"])
    reward.add_argument("--config", help="YAML file with RewardRunConfig fields")
    reward.add_argument("overrides", nargs="*", help="key=value settings, e.g. kind=sequence data=pairs.jsonl")
    _config_command(sub, "evolve", "EvolveConfig", "SER: grow a reward model's training set from a few labels",
                    "Self-evolved reward learning. Needs data=PAIRS.jsonl.", "labelled_fraction=0.15")
    _config_command(sub, "rlgf", "RLGFConfig", "RLGF recipe: PPO vs PPO++ / AggreVaTeD / LOLS / D2LOLS with a guide",
                    "Learning with a guide LLM end to end on IMDB continuation or CommonGen (recipes/rlgf.py). "
                    "Needs data=REVIEWS.jsonl (task=imdb) or data=CONCEPTS.jsonl (task=commongen), or fast=true.",
                    "data=imdb_train.jsonl algorithms='[ppo, ppo_pp]'")
    _config_command(sub, "pgg", "PGGRecipeConfig", "PGG recipe: token guidance grounded in metric rankings",
                    "Preference-grounded token guidance end to end (recipes/pgg.py): task=fewshot (discrete prompts "
                    "for a frozen classifier; data=a 16-shot split folder) or task=summarize (reward-weighted MLE; "
                    "data=DOCUMENTS.jsonl), or fast=true.", "task=fewshot data=fewshot/sst-2/16-42")
    _config_command(sub, "ser", "SERRecipeConfig", "SER recipe: evolve a reward model, then PPO on it vs the seed RM",
                    "Self-evolved reward learning end to end (recipes/ser.py). Needs data=PAIRS.jsonl, or fast=true.",
                    "data=pairs.jsonl ppo_updates=5")
    _config_command(sub, "judge", "JudgeRunConfig", "label a dataset with an LLM judge (pairs, rubric scores, spans, "
                    "edits)", "RLAIF labelling with a cached, resumable judge.", "task=pairwise data=pairs.jsonl")
    _config_command(sub, "evaluate", "EvaluateConfig", "judged win rate of one policy (or generations) against "
                    "another", "Judged win rate with a 95% bootstrap interval, plus BLEU/ROUGE-L against "
                    "references.", "prompts=p.jsonl a=runs/x/policy")
    serve = sub.add_parser("serve", help="serve a local model over an OpenAI-compatible HTTP API",
                           description="OpenAI-compatible /v1/chat/completions and /v1/completions for a local "
                                       "causal LM (ServeConfig).", add_help=False)
    _add_help(serve, "ServeConfig")
    serve.add_argument("model", help="built-in name, model folder (e.g. a trained policy) or cached hub id")
    serve.add_argument("--host", help="address to bind (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, help="port (default 8000; 0 = any free port, printed at start)")
    serve.add_argument("--served-name", help="the model name clients send (default: the folder or built-in name)")
    serve.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route (default: the "
                                         "TOKENCREDIT_API_KEY environment variable, which keeps it out of ps)")
    serve.add_argument("overrides", nargs="*", metavar="key=value",
                       help="any other ServeConfig field, e.g. the limits max_rows=16 max_context=4096 "
                            "request_timeout_s=60 max_connections=8 max_body_bytes=1048576 read_timeout_s=10")
    return parser


def demo_config(args: argparse.Namespace) -> object:
    """DemoConfig from the file, the flags and key=value overrides (flags win); --fast brings its small sizes."""
    from tokencredit.recipes.tppo import FAST_OVERRIDES, DemoConfig

    overrides = list(args.overrides)
    for flag in ("model", "data", "output", "judge"):
        if getattr(args, flag):
            overrides.append(f"{flag}={getattr(args, flag)}")
    if args.fast:
        overrides.append("fast=true")
    if args.resume:
        overrides.append("resume=true")
    cfg = load_config(DemoConfig, args.config, overrides)
    if cfg.fast:
        # Reloaded so the fast sizes are a base that the file and overrides can still change.
        cfg = load_config(DemoConfig, args.config, overrides, base=FAST_OVERRIDES)
    return cfg


def _check_multi_process(args: argparse.Namespace) -> None:
    """Under `accelerate launch`, refuse the commands that run in one process (they would write N times)."""
    from tokencredit.distributed import launched_world_size

    command = args.command + (f" {args.action}" if args.command == "reward" else "")
    if launched_world_size() > 1 and command not in ("ppo", "sft", "reward train"):
        raise ConfigError(f"`tokencredit {command}` runs in one process; under accelerate launch only ppo, sft "
                          "and reward train spread over processes (see docs/distributed.md)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tokencredit` command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse fills serve's key=value positionals before it meets the flags after MODEL; collect the rest.
        if getattr(args, "command", None) == "serve" and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from tokencredit.distributed import is_main_process

    # Under `accelerate launch` every rank runs this; only rank 0 reports progress (the others warn only).
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # rouge-score logs through absl at INFO on every scorer it builds ("Using default tokenizer.").
    logging.getLogger("absl").setLevel(logging.WARNING)
    if getattr(args, "allow_download", False):
        from tokencredit.models import ALLOW_DOWNLOAD_ENV

        os.environ[ALLOW_DOWNLOAD_ENV] = "1"
    try:
        _check_multi_process(args)
        if args.command == "ppo":
            cfg = load_config(PPORunConfig, args.config, args.overrides, base=PPO_DEFAULTS)
            run_ppo(cfg)
        elif args.command == "sft":
            run_sft(load_config(SFTRunConfig, args.config, args.overrides))
        elif args.command == "rlgf":
            from tokencredit.recipes.rlgf import REPORT_KEYS, RLGFConfig, run_rlgf

            summary = run_rlgf(load_config(RLGFConfig, args.config, args.overrides))
            keys = REPORT_KEYS[summary["task"]]
            print(json.dumps({k: {m: v.get(m) for m in keys} for k, v in summary["policies"].items()}, indent=1))
        elif args.command == "pgg":
            from tokencredit.recipes.pgg import PGGRecipeConfig, run_pgg

            summary = run_pgg(load_config(PGGRecipeConfig, args.config, args.overrides))
            print(json.dumps({arm: {k: v for k, v in r.items() if k not in ("candidates", "examples")}
                              for arm, r in summary["results"].items()}, indent=1))
        elif args.command == "ser":
            from tokencredit.recipes.ser import SERRecipeConfig, run_ser

            summary = run_ser(load_config(SERRecipeConfig, args.config, args.overrides))
            print(json.dumps({"evolve": summary["evolve"], "policies": {
                k: {m: v[m] for m in ("scorer_mean_sigma", "mean_words")} for k, v in summary["policies"].items()}},
                indent=1))
        elif args.command == "evolve":
            from tokencredit.rewards.evolve import EvolveConfig, run_evolve

            summary = run_evolve(load_config(EvolveConfig, args.config, args.overrides))
            print(json.dumps({k: v for k, v in summary.items() if k != "loops"}, indent=1))
        elif args.command == "reward":
            from tokencredit.commands.reward import RewardRunConfig, run_reward

            run_reward(args.action, load_config(RewardRunConfig, args.config, args.overrides))
        elif args.command == "judge":
            from tokencredit.commands.judge import JudgeRunConfig, run_judge

            print(json.dumps(run_judge(load_config(JudgeRunConfig, args.config, args.overrides)), indent=1))
        elif args.command == "evaluate":
            from tokencredit.commands.judge import EvaluateConfig, run_evaluate

            print(json.dumps(run_evaluate(load_config(EvaluateConfig, args.config, args.overrides)), indent=1))
        elif args.command == "serve":
            from tokencredit.serve import ServeConfig, run_serve

            flags = {"model": args.model, "host": args.host, "port": args.port, "served_name": args.served_name,
                     "device": args.device, "api_key": args.api_key}
            flags = {k: v for k, v in flags.items() if v is not None}  # a flag given wins over key=value
            run_serve(dataclasses.replace(load_config(ServeConfig, None, args.overrides), **flags))
        elif args.command == "fg":
            from tokencredit.recipes.fg import FAST_OVERRIDES as FG_FAST
            from tokencredit.recipes.fg import FGConfig, run_fg

            flags = [*args.overrides, *(["fast=true"] if args.fast else []), *(["resume=true"] if args.resume else [])]
            cfg = load_config(FGConfig, args.config, flags)
            if cfg.fast:  # reloaded so the fast sizes are a base that the file and overrides still change
                cfg = load_config(FGConfig, args.config, flags, base=FG_FAST)
            print(json.dumps(run_fg(cfg)["policies"], indent=1))
        elif args.command == "demo":
            from tokencredit.recipes.tppo import run_demo

            summary = run_demo(demo_config(args))
            print(json.dumps({k: summary[k] for k in ("sft", "tppo", "ppo_sequence") if k in summary}, indent=1))
    except (ConfigError, RecordError, FileNotFoundError, ValueError, JudgeError, CheckpointError) as exc:
        print(f"tokencredit: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The machine, not the program: a full disk, a read-only or vanished folder, no permission.
        print(f"tokencredit: error: {_os_error_message(exc)}", file=sys.stderr)
        return 2
    return 0


def _one_line(exc: BaseException) -> str:
    """An error message on one line: some libraries' messages span several, and scripts read one line per error."""
    return " ".join(str(exc).split()) or type(exc).__name__


_OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full: free space or choose another output folder; a run resumes from its last "
                  "checkpoint with resume=true",
    errno.EDQUOT: "the disk quota is used up: free space or choose another output folder; a run resumes from its "
                  "last checkpoint with resume=true",
    errno.EROFS: "the file system is read-only: choose another output folder",
    errno.EACCES: "no permission: choose a folder you can write, or fix its permissions",
    errno.EPERM: "not permitted: choose a folder you can write, or fix its permissions",
}


def _os_error_message(exc: OSError) -> str:
    """What failed, on which file, and what to do about it."""
    where = f" ({exc.filename})" if exc.filename else ""
    reason = exc.strerror or _one_line(exc)
    hint = _OS_ERROR_HINTS.get(exc.errno)
    return f"{reason}{where}" + (f": {hint}" if hint else "")


if __name__ == "__main__":
    sys.exit(main())

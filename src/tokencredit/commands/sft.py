"""`tokencredit sft`: supervised fine-tuning on (prompt, response) pairs from a file or a task."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokencredit.config import ConfigError
from tokencredit.models import LoraSettings, apply_chat
from tokencredit.record_files import RecordError, read_jsonl
from tokencredit.rl.sft import SFTConfig, SFTTrainer


@dataclass
class SFTRunConfig(SFTConfig):
    """`tokencredit sft`: the SFT knobs plus where the model and the (prompt, response) pairs come from."""

    model: str = "smollm2-135m-instruct"  # built-in name, local folder or (cached) hub id
    adapter: str | None = None  # saved LoRA adapter to continue training
    lora: LoraSettings | None = None  # train new LoRA adapters instead of every weight
    save_merged: bool = False  # LoRA: also write policy-merged/, the adapters merged into a plain model folder
    dtype: str = "float32"  # torch dtype the model weights are loaded in, e.g. bfloat16
    data: str | None = None  # .jsonl with one {prompt_field: ..., response_field: ...} object a line
    task: str | None = None  # "querygen": data holds search sessions (None = the built-in train split)
    history_entries: int = 4  # querygen: most recent searches shown in the prompt
    prompt_field: str = "prompt"  # .jsonl field holding each prompt (not used by task=querygen)
    response_field: str = "response"  # .jsonl field holding the target response (not used by task=querygen)
    max_examples: int | None = None  # use only the first N pairs
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template when it has one
    system_prompt: str | None = None  # system message before each prompt when chat_template applies; None = none

    def validate(self) -> None:
        """SFTConfig's checks plus the data options."""
        super().validate()
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1 or None (got {self.max_examples})")
        if self.task not in (None, "querygen"):
            raise ValueError(f"task must be unset or 'querygen' (got {self.task!r})")


def load_sft_data(
    cfg: SFTRunConfig, tokenizer: object | None = None
) -> tuple[list[str], list[str], list[str] | None]:
    """(prompts, responses, record names) a run config names, prompts rendered for ``tokenizer``.

    Record names ("file:line") let errors found later, such as a response longer than max_length, point at
    the line; tasks plug in here.
    """
    if cfg.task == "querygen":
        from tokencredit.tasks.querygen import PromptTemplate, builtin_sessions, load_sessions, render_prompt

        sessions = builtin_sessions("train") if cfg.data is None else load_sessions(cfg.data)
        sessions = sessions[: cfg.max_examples] if cfg.max_examples else sessions
        template = PromptTemplate(max_history=cfg.history_entries)
        # The task renders its own prompts (chat form or the plain "Next query:" form) exactly as the demo does.
        use_chat = cfg.chat_template and bool(getattr(tokenizer, "chat_template", None))
        prompts = [render_prompt(s, tokenizer, template, chat=use_chat) for s in sessions]
        return prompts, [s.target_query for s in sessions], None
    if cfg.data is None:
        raise ConfigError("sft needs data: a .jsonl file with one {prompt, response} object a line (data=...)")
    prompts, responses, names = [], [], []
    for lineno, obj in read_jsonl(cfg.data):
        prompt, response = obj.get(cfg.prompt_field), obj.get(cfg.response_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise RecordError(f"{cfg.data}:{lineno}: field {cfg.prompt_field!r} must be a non-empty string")
        if not isinstance(response, str):
            raise RecordError(f"{cfg.data}:{lineno}: field {cfg.response_field!r} must be a string")
        prompts.append(prompt)
        responses.append(response)
        names.append(f"{cfg.data}:{lineno}")
        if cfg.max_examples is not None and len(prompts) == cfg.max_examples:
            break
    if not prompts:
        raise RecordError(f"{cfg.data}: no examples found")
    if tokenizer is not None and cfg.chat_template and getattr(tokenizer, "chat_template", None):
        prompts = apply_chat(tokenizer, prompts, cfg.system_prompt)
    return prompts, responses, names


def run_sft(cfg: SFTRunConfig) -> list[dict]:
    """Load the model and data the config names and train."""
    from tokencredit.models import load_policy, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    prompts, responses, names = load_sft_data(cfg, tokenizer)
    policy = load_policy(cfg.model, lora=cfg.lora, adapter=cfg.adapter, dtype=cfg.dtype, seed=cfg.seed)
    trainer = SFTTrainer(cfg, policy=policy, tokenizer=tokenizer, prompts=prompts, responses=responses,
                         record_names=names)
    history = trainer.train()
    if not trainer.group.is_main:
        return history  # rank 0 writes the merged policy and reports
    if cfg.save_merged:
        from tokencredit.models import save_merged

        save_merged(policy, tokenizer, Path(cfg.output_dir) / "policy-merged")
    if history:
        print(json.dumps({"steps": len(history), "first_loss": history[0].get("loss"),
                          "last_loss": history[-1].get("loss"), "run": str(cfg.output_dir)}))
    return history

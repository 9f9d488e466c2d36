"""Any saved reward model as a PPO reward: ``tokencredit ppo reward=rm:PATH`` and :func:`reward_from_saved_rm`.

A folder written by ``tokencredit reward train``, ``evolve``, the demo or ``save_pretrained`` records its kind
(token, sequence, pgg) and how its training prompts were written (``tokencredit_reward.json``). Placements:

- ``token``: the reward model's score at every response token (TPPO, fine-grained PPO); token and PGG models.
- ``sum``: the sum of those token scores, placed on the last token (the sequence-level baseline of a token RM).
- ``last``: the score at the last token, i.e. a sequence reward model's score of the whole response (scored on
  the response text in the reward model's own tokens with EOS appended, as it was trained, so any policy
  tokenizer works).
- ``auto`` (default): ``token`` for token and PGG models, ``last`` for sequence models.

``sigmoid_baseline=b`` turns a sequence score s into sigma(s) - b, as SER feeds its reward model to PPO (b = 0.5
centres it); ``scale`` multiplies the result. Prompts reach the reward model written the way it was trained on
(raw, or its tokenizer's chat template), whatever form the policy sees them in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tokencredit.rewards.tokens import RewardFn

Placement = Literal["auto", "token", "sum", "last"]


@dataclass
class SavedRewardSettings:
    """How a saved reward model's scores become PPO rewards (see the module docstring)."""

    placement: Placement = "auto"
    sigmoid_baseline: float | None = None  # sequence placements only: sigma(score) - baseline
    scale: float = 1.0
    batch_size: int = 16

    def validate(self) -> None:
        """Raise ValueError naming the field that is wrong."""
        if self.placement not in ("auto", "token", "sum", "last"):
            raise ValueError(f"placement must be auto, token, sum or last (got {self.placement!r})")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number (got {self.scale})")
        if self.sigmoid_baseline is not None and not math.isfinite(self.sigmoid_baseline):
            raise ValueError(f"sigmoid_baseline must be a finite number (got {self.sigmoid_baseline})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {self.batch_size})")


def load_saved_reward_model(path: str | Path, device: str | torch.device = "cpu") -> object:
    """The TokenRewardModel or SequenceRewardModel a folder holds, by the kind it records, in eval mode."""
    from tokencredit.rewards.seq_rm import SequenceRewardModel
    from tokencredit.rewards.token_rm import TokenRewardModel, read_reward_info

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"rm:{path}: {folder} is not a saved reward model (no config.json)")
    kind = read_reward_info(folder).get("kind", "token")
    if kind not in ("token", "sequence", "pgg"):
        raise ValueError(f"rm:{path}: unknown reward model kind {kind!r} in its tokencredit_reward.json")
    cls = SequenceRewardModel if kind == "sequence" else TokenRewardModel
    rm = cls.from_pretrained(folder)
    rm.model.to(device).eval().requires_grad_(False)
    return rm


def reward_from_saved_rm(
    path: str | Path,
    policy_tokenizer: object,
    settings: SavedRewardSettings | None = None,
    raw_prompt: Callable[[str], str] | None = None,
    device: str | torch.device = "cpu",
) -> RewardFn:
    """A PPO ``reward_fn`` scoring responses with the reward model saved at ``path``.

    ``raw_prompt`` maps the prompt PPO passes (possibly rendered with the policy's chat template) back to the
    text the user wrote, which is then written the way the reward model was trained on; None passes it as is.
    """
    from tokencredit.rewards.token_rm import render_for_reward_model, same_tokenizer

    settings = settings or SavedRewardSettings()
    settings.validate()
    rm = load_saved_reward_model(path, device)
    kind = "sequence" if type(rm).__name__ == "SequenceRewardModel" else ("pgg" if rm.bounded else "token")
    placement = settings.placement
    if placement == "auto":
        placement = "last" if kind == "sequence" else "token"
    if kind == "sequence" and placement != "last":
        raise ValueError(f"rm:{path} is a sequence reward model: it gives one score at the last token, so "
                         f"placement must be 'last' or 'auto' (got {placement!r})")
    if placement == "token" and settings.sigmoid_baseline is not None:
        raise ValueError("sigmoid_baseline applies to one score per response (placement sum or last), not to "
                         "token rewards")
    cross = not same_tokenizer(rm.tokenizer, policy_tokenizer)

    def reward_fn(prompts: list[str], responses: list[str], response_token_ids: list[list[int]]) -> list:
        """Score the sampled responses with the saved reward model."""
        texts = [raw_prompt(p) for p in prompts] if raw_prompt is not None else list(prompts)
        rm_prompts = render_for_reward_model(texts, rm.prompt_format, rm.tokenizer)
        with torch.no_grad():
            if kind == "sequence":
                # Scored as it was trained: the response text in the RM's own tokens, EOS appended, whatever
                # tokenizer the policy has and whether or not the sample reached its EOS.
                scores = rm.score_sequences(rm_prompts, list(responses), settings.batch_size)
            elif cross:
                rows = rm.score_for_policy(rm_prompts, response_token_ids, policy_tokenizer, settings.batch_size)
            else:
                rows = rm.score_token_ids(rm_prompts, response_token_ids, settings.batch_size)
        if placement == "token":
            return [[settings.scale * r for r in row] for row in rows]
        if kind != "sequence":
            scores = [sum(row) if placement == "sum" else (row[-1] if row else 0.0) for row in rows]
        if settings.sigmoid_baseline is not None:
            scores = [1.0 / (1.0 + math.exp(-s)) - settings.sigmoid_baseline for s in scores]
        return [settings.scale * s for s in scores]

    return reward_fn


def saved_reward_spec(spec: str) -> str | None:
    """The folder of an ``rm:PATH`` reward spec, or None for any other spec."""
    return spec[3:] if spec.startswith("rm:") else None


__all__: Sequence[str] = ["SavedRewardSettings", "load_saved_reward_model", "reward_from_saved_rm",
                          "saved_reward_spec"]

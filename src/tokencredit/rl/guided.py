"""Roll-in / roll-out sampling with a guide, and the schedules of the RLGF algorithms (arXiv 2306.11816).

A guided row is written by two policies: the *roll-in* policy writes its first ``h`` response tokens, the
*roll-out* policy continues from there to EOS or ``max_new_tokens``. Which is which depends on the algorithm:

- PPO++ — roll-in guide, roll-out learner: the learner practises from states the guide leads it to.
- AggreVaTeD — roll-in learner, roll-out guide: the guide's continuation measures the learner's prefix.
- LOLS — each update PPO++ with probability ``tau``, else AggreVaTeD.
- D2LOLS — AggreVaTeD until the switch update, PPO++ from then on.

Per row, with probability ``beta`` a switch point ``h`` is drawn uniformly from {1 .. L-1} (L = the roll-in
length, ``max_new_tokens`` by default); otherwise ``h = 0`` and the learner writes the whole row as in plain
PPO. :func:`guided_rollout` records who wrote every token, so the trainer can keep guide tokens out of every
ratio (they are context, not actions of the learner).

A guide is a :class:`Writer`: :class:`ModelWriter` for a causal LM sharing the policy's tokenizer (token level),
or :class:`TextWriter` for any text-completion function (a black-box guide such as an OpenAI-compatible
endpoint), whose text is re-tokenised by the policy's tokenizer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from tokencredit.generation import GenerationOutput, eos_ids, generate

Algorithm = Literal["ppo", "ppo_pp", "aggrevated", "lols", "d2lols"]
ALGORITHMS: tuple[str, ...] = ("ppo", "ppo_pp", "aggrevated", "lols", "d2lols")
RollIn = Literal["guide", "learner"]


class Writer(Protocol):
    """Something that continues token sequences: the learner, or a guide."""

    def write(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, budgets: Sequence[int]) -> list[
            tuple[list[int], bool]]:
        """Per row, up to ``budgets[i]`` new tokens and whether the row ended (EOS); rows with budget 0 get none."""
        ...


@dataclass
class ModelWriter:
    """A causal LM (sharing the policy's tokenizer) as a writer, sampling with the given settings."""

    model: nn.Module
    tokenizer: object
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def write(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, budgets: Sequence[int]) -> list[
            tuple[list[int], bool]]:
        """Sample max(budgets) tokens for the rows that have a budget, then cut each row to its own."""
        out, rows = _rows_with_budget(budgets)
        if not rows:
            return out
        index = torch.tensor(rows, device=prompt_ids.device)
        gen = generate(self.model, self.tokenizer, prompt_ids=prompt_ids[index], prompt_mask=prompt_mask[index],
                       max_new_tokens=max(budgets[i] for i in rows), temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p, generator=self.generator)
        stop = set(eos_ids(self.model, self.tokenizer))
        for i, ids in zip(rows, gen.token_ids()):
            kept = ids[: budgets[i]]
            out[i] = (kept, bool(kept) and kept[-1] in stop)
        return out


@dataclass
class TextWriter:
    """A text-completion function as a writer: ``complete(texts, max_new_tokens) -> continuations``.

    The context is decoded to text, the continuation re-tokenised with the policy's tokenizer and cut to the
    row's budget; a continuation that fits before the budget is taken as finished (EOS appended).
    """

    complete: Callable[[list[str], int], list[str]]
    tokenizer: object

    def write(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, budgets: Sequence[int]) -> list[
            tuple[list[int], bool]]:
        """Ask for the continuation of every row that has a budget."""
        out, rows = _rows_with_budget(budgets)
        if not rows:
            return out
        contexts = [self.tokenizer.decode(prompt_ids[i][prompt_mask[i].bool()].tolist(), skip_special_tokens=False)
                    for i in rows]
        texts = self.complete(contexts, max(budgets[i] for i in rows))
        if len(texts) != len(rows):
            raise ValueError(f"the guide returned {len(texts)} continuations for {len(rows)} requests")
        eos = self.tokenizer.eos_token_id
        for i, text in zip(rows, texts):
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(ids) < budgets[i] and eos is not None:
                out[i] = ([*ids, eos], True)
            else:
                out[i] = (ids[: budgets[i]], False)
        return out


def _rows_with_budget(budgets: Sequence[int]) -> tuple[list[tuple[list[int], bool]], list[int]]:
    """An empty answer for every row, and the indices of the rows that get to write."""
    return [([], False) for _ in budgets], [i for i, b in enumerate(budgets) if b > 0]


def draw_switches(n: int, beta: float, rollin_length: int, rng: random.Random) -> list[int]:
    """Per row: with probability beta a switch point h ~ U{1 .. L-1}, else 0 (no guide)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"guide_beta must be in [0, 1] (got {beta})")
    if rollin_length < 2:
        raise ValueError(f"the roll-in length must be >= 2 to leave a switch point (got {rollin_length})")
    return [rng.randint(1, rollin_length - 1) if rng.random() < beta else 0 for _ in range(n)]


def rollin_of(algorithm: Algorithm, update_idx: int, tau: float, switch_update: int | None,
              rng: random.Random) -> RollIn | None:
    """Who rolls in at this update: "guide" (PPO++), "learner" (AggreVaTeD), or None for plain PPO.

    LOLS draws PPO++ with probability tau each update (from ``rng``, so it is part of the resumable state);
    D2LOLS is AggreVaTeD before ``switch_update`` (0-based) and PPO++ from it on.
    """
    if algorithm == "ppo":
        return None
    if algorithm == "ppo_pp":
        return "guide"
    if algorithm == "aggrevated":
        return "learner"
    if algorithm == "lols":
        return "guide" if rng.random() < tau else "learner"
    if algorithm == "d2lols":
        if switch_update is None:
            raise ValueError("d2lols needs d2lols_switch_update")
        return "learner" if update_idx < switch_update else "guide"
    raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)} (got {algorithm!r})")


@dataclass
class GuidedRollout:
    """The rows of one guided rollout: every response token and who wrote it."""

    token_ids: list[list[int]]
    learner_wrote: list[list[bool]]  # per token: True = the learner sampled it, False = the guide
    finished: list[bool]
    switches: list[int]


def guided_rollout(
    learner: Writer,
    guide: Writer,
    rollin: RollIn,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    switches: Sequence[int],
    max_new_tokens: int,
    pad_id: int,
) -> GuidedRollout:
    """Roll in for ``switches[i]`` tokens, then roll out to EOS or ``max_new_tokens``; h = 0 rows are all learner."""
    if rollin not in ("guide", "learner"):
        raise ValueError(f"rollin must be 'guide' or 'learner' (got {rollin!r})")
    n = prompt_ids.size(0)
    first, second = (guide, learner) if rollin == "guide" else (learner, guide)
    # Roll-in: switched rows only, h tokens each (a row may end sooner, at its EOS).
    head = first.write(prompt_ids, prompt_mask, [min(h, max_new_tokens) for h in switches])
    # Roll-out: switched rows continue from prompt + roll-in; unswitched rows are written by the learner alone.
    contexts = [prompt_ids[i][prompt_mask[i].bool()].tolist() + head[i][0] for i in range(n)]
    ctx_ids, ctx_mask = _left_pad(contexts, pad_id, prompt_ids.device)
    budgets = [0 if head[i][1] else max_new_tokens - len(head[i][0]) for i in range(n)]
    switched = [h > 0 for h in switches]
    if second is learner:
        # PPO++: the learner writes every row's remainder, switched or not, in one pass.
        tail_second = tail_learner = learner.write(ctx_ids, ctx_mask, budgets)
    else:
        tail_second = second.write(ctx_ids, ctx_mask, [b if s else 0 for b, s in zip(budgets, switched)])
        tail_learner = learner.write(ctx_ids, ctx_mask, [0 if s else b for b, s in zip(budgets, switched)])
    token_ids, learner_wrote, finished = [], [], []
    for i in range(n):
        if switched[i]:
            tail, done = tail_second[i] if not head[i][1] else ([], True)
            ids = head[i][0] + tail
            wrote = [rollin == "learner"] * len(head[i][0]) + [rollin == "guide"] * len(tail)
        else:
            ids, done = tail_learner[i]
            wrote = [True] * len(ids)
        token_ids.append(ids)
        learner_wrote.append(wrote)
        finished.append(bool(done))
    return GuidedRollout(token_ids, learner_wrote, finished, list(switches))


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask of token lists."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def as_generation_output(rollout: GuidedRollout, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                         tokenizer: object, pad_id: int) -> tuple[GenerationOutput, torch.Tensor]:
    """The rollout as the trainer's GenerationOutput, and the [B, T] mask of learner-written tokens."""
    width = max(1, max(len(r) for r in rollout.token_ids))
    n = len(rollout.token_ids)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    learner = torch.zeros(n, width, dtype=torch.long)
    for i, (row, wrote) in enumerate(zip(rollout.token_ids, rollout.learner_wrote)):
        if row:
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            learner[i, : len(row)] = torch.tensor([int(w) for w in wrote])
    device = prompt_ids.device
    texts = tokenizer.batch_decode(rollout.token_ids, skip_special_tokens=True)
    gen = GenerationOutput(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=ids.to(device),
                           response_mask=mask.to(device), logprobs=torch.zeros(n, width, device=device),
                           texts=texts, finished=torch.tensor(rollout.finished, device=device))
    return gen, learner.to(device)

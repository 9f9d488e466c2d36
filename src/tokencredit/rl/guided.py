"""Roll-in / roll-out sampling with a guide, and the schedules of the RLGF algorithms (arXiv 2306.11816).

A guided row is written by two policies: the *roll-in* policy writes its first ``h`` response tokens, the
*roll-out* policy continues from there to EOS or ``max_new_tokens``. Which is which depends on the algorithm:

- PPO++ — roll-in guide, roll-out learner: the learner practises from states the guide leads it to.
- AggreVaTeD — roll-in learner, roll-out guide: the guide's continuation measures the learner's prefix.
- LOLS — each update PPO++ with probability ``tau``, else AggreVaTeD.
- D2LOLS — AggreVaTeD until the switch update, PPO++ from then on.

Per row, with probability ``beta`` the row switches writers: the roll-in policy writes a whole answer first,
and the switch point ``h`` is drawn uniformly from {1 .. m-1}, m = the length of that answer (its EOS not
counted), capped at ``rollin_length``; the roll-in keeps its first ``h`` tokens and the roll-out policy writes the
rest. Drawing ``h`` inside the roll-in's actual length (as the paper's code does) means every switched row really
switches; a roll-in shorter than 2 tokens leaves no switch point. Every other row is written by the roll-out policy
alone: a plain learner row under PPO++, a whole guide answer under AggreVaTeD (whose value the guide critic
learns). :func:`guided_rollout` records who wrote every token, so the trainer can keep guide tokens out of every
ratio (they are context, not actions of the learner).

A guide is a :class:`Writer`: :class:`ModelWriter` for a causal LM sharing the policy's tokenizer (token level),
:class:`BestOfNWriter` for such an LM made better by keeping the best of n samples under a score, or
:class:`TextWriter` for any text-completion function (a black-box guide such as an OpenAI-compatible endpoint),
whose text is re-tokenised by the policy's tokenizer.
"""

from __future__ import annotations

import math
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
class BestOfNWriter:
    """A guide that knows more than its model: ``n`` samples per row, the one ``score`` rates highest is kept.

    ``score(contexts, continuations) -> floats`` rates each continuation of its context: the text before it,
    special tokens kept, so a chat prompt reads as it was rendered. The context is the prompt plus whatever the
    row holds already (a learner's prefix under AggreVaTeD); a score that finds the prompt in it can rate the whole
    answer (the RLGF recipe's does). The training reward is the natural score: it makes a guide better than the
    model it samples from without any fine-tuning.
    """

    model: nn.Module
    tokenizer: object
    score: Callable[[list[str], list[str]], Sequence[float]]
    n: int = 4
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def write(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, budgets: Sequence[int]) -> list[
            tuple[list[int], bool]]:
        """Sample n continuations of every row that has a budget and keep each row's best."""
        if self.n < 1:
            raise ValueError(f"n must be at least 1 (got {self.n})")
        out, rows = _rows_with_budget(budgets)
        if not rows:
            return out
        index = torch.tensor(rows, device=prompt_ids.device).repeat_interleave(self.n)
        gen = generate(self.model, self.tokenizer, prompt_ids=prompt_ids[index], prompt_mask=prompt_mask[index],
                       max_new_tokens=max(budgets[i] for i in rows), temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p, generator=self.generator)
        stop = set(eos_ids(self.model, self.tokenizer))
        candidates = [ids[: budgets[i]] for i, ids in zip(index.tolist(), gen.token_ids())]
        contexts = [self.tokenizer.decode(prompt_ids[i][prompt_mask[i].bool()].tolist(), skip_special_tokens=False)
                    for i in index.tolist()]
        texts = self.tokenizer.batch_decode(candidates, skip_special_tokens=True)
        scores = [float(x) for x in self.score(contexts, texts)]
        if len(scores) != len(candidates):
            raise ValueError(f"score returned {len(scores)} values for {len(candidates)} continuations")
        for k, i in enumerate(rows):
            group = range(k * self.n, (k + 1) * self.n)
            best = max(group, key=lambda j: scores[j])  # the first of equals: deterministic
            kept = candidates[best]
            out[i] = (kept, bool(kept) and kept[-1] in stop)
        return out


@dataclass
class TextWriter:
    """A text-completion function as a writer: ``complete(texts, max_new_tokens) -> continuations``.

    The context is decoded to text and the continuation re-tokenised with the policy's tokenizer and cut to the
    row's budget. Each continuation is a string or a ``(text, finished)`` pair, ``finished`` saying whether the
    guide stopped on its own (an OpenAI-compatible endpoint's ``finish_reason == "stop"``). A row ends (EOS
    appended) only when the guide stopped and its text fits the budget. The guide's own token count differs from
    the policy's, so it is asked for ``headroom`` times the largest budget: a bare string that re-tokenises shorter
    than the budget was then not cut by the guide's limit and is taken as finished. A guide that can tell should
    return pairs; that is exact.
    """

    complete: Callable[[list[str], int], Sequence[str | tuple[str, bool]]]
    tokenizer: object
    headroom: float = 2.0

    def write(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, budgets: Sequence[int]) -> list[
            tuple[list[int], bool]]:
        """Ask for the continuation of every row that has a budget."""
        if self.headroom < 1.0:
            raise ValueError(f"headroom must be >= 1 (got {self.headroom})")
        out, rows = _rows_with_budget(budgets)
        if not rows:
            return out
        contexts = [self.tokenizer.decode(prompt_ids[i][prompt_mask[i].bool()].tolist(), skip_special_tokens=False)
                    for i in rows]
        asked = math.ceil(self.headroom * max(budgets[i] for i in rows))
        texts = list(self.complete(contexts, asked))
        if len(texts) != len(rows):
            raise ValueError(f"the guide returned {len(texts)} continuations for {len(rows)} requests")
        eos = self.tokenizer.eos_token_id
        for i, item in zip(rows, texts):
            if isinstance(item, str):
                text, stopped = item, True
            elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
                text, stopped = item[0], bool(item[1])
            else:
                raise ValueError("a guide continuation must be a string or a (text, finished) pair "
                                 f"(got {type(item).__name__})")
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if stopped and len(ids) < budgets[i] and eos is not None:
                out[i] = ([*ids, eos], True)
            else:
                out[i] = (ids[: budgets[i]], False)
        return out


def _rows_with_budget(budgets: Sequence[int]) -> tuple[list[tuple[list[int], bool]], list[int]]:
    """An empty answer for every row, and the indices of the rows that get to write."""
    return [([], False) for _ in budgets], [i for i, b in enumerate(budgets) if b > 0]


def draw_switches(n: int, beta: float, rng: random.Random) -> list[float | None]:
    """Per row: with probability beta a uniform u in [0, 1) that places the switch in the roll-in, else None."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"guide_beta must be in [0, 1] (got {beta})")
    # u, not h: h depends on the roll-in's length, known only after it is written (and, in a multi-process run,
    # only on the rank that owns the row), while the stream must advance alike on every rank.
    return [rng.random() if rng.random() < beta else None for _ in range(n)]


def switch_point(u: float | None, rollin_tokens: Sequence[int], finished: bool, limit: int) -> int:
    """h ~ U{1 .. m-1} from u, m = the roll-in's length without its EOS, capped at limit; 0 = no switch."""
    if u is None:
        return 0
    if not 0.0 <= u < 1.0:
        raise ValueError(f"a switch draw must be in [0, 1) (got {u})")
    m = min(len(rollin_tokens) - int(bool(finished) and len(rollin_tokens) > 0), limit)
    return 1 + int(u * (m - 1)) if m >= 2 else 0


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
    switches: list[int]  # h per row; 0 = written by the roll-out policy alone


def guided_rollout(
    learner: Writer,
    guide: Writer,
    rollin: RollIn,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    draws: Sequence[float | None],
    max_new_tokens: int,
    pad_id: int,
    rollin_length: int | None = None,
) -> GuidedRollout:
    """Roll in and out per ``draws`` (from :func:`draw_switches`); rows without a switch are the roll-out's alone."""
    if rollin not in ("guide", "learner"):
        raise ValueError(f"rollin must be 'guide' or 'learner' (got {rollin!r})")
    n = prompt_ids.size(0)
    if len(draws) != n:
        raise ValueError(f"{len(draws)} switch draws for {n} rows")
    limit = max_new_tokens if rollin_length is None else min(rollin_length, max_new_tokens)
    first, second = (guide, learner) if rollin == "guide" else (learner, guide)
    # The roll-in writes whole answers for the rows that switch, so h can be drawn inside their real length.
    head = first.write(prompt_ids, prompt_mask, [0 if u is None else max_new_tokens for u in draws])
    switches = [switch_point(u, head[i][0], head[i][1], limit) for i, u in enumerate(draws)]
    # h < the roll-in's length, so a kept roll-in never holds its EOS: the roll-out always continues.
    contexts = [prompt_ids[i][prompt_mask[i].bool()].tolist() + head[i][0][: switches[i]] for i in range(n)]
    ctx_ids, ctx_mask = _left_pad(contexts, pad_id, prompt_ids.device)
    tail = second.write(ctx_ids, ctx_mask, [max_new_tokens - h for h in switches])
    token_ids, learner_wrote, finished = [], [], []
    for i in range(n):
        h = switches[i]
        ids, done = head[i][0][:h] + tail[i][0], tail[i][1]
        token_ids.append(ids)
        learner_wrote.append([rollin == "learner"] * h + [rollin == "guide"] * len(tail[i][0]))
        finished.append(bool(done))
    return GuidedRollout(token_ids, learner_wrote, finished, switches)


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


class GuideTraining:
    """What RLGF adds to a PPO trainer: the guide as a writer, the guide critic, the roll-in and switch-point draws,
    and who wrote each token of the last roll-out. Plain PPO has none of it (``PPOTrainer.guided`` is None)."""

    def __init__(self, config: object, guide: object, tokenizer: object, device: torch.device,
                 critic: nn.Module, logits_processors: Sequence[object]) -> None:
        """Wrap ``guide`` (a causal LM with the policy's tokenizer, a writer, or an object with ``complete``) and,
        when some updates roll out with the guide, copy ``critic`` as the guide critic."""
        import copy

        if guide is None:
            raise ValueError(f"algorithm={config.algorithm!r} needs guide=: a causal LM with the policy's "
                             "tokenizer, or an object with complete(texts, max_new_tokens)")
        if logits_processors:
            raise ValueError("logits_processors cannot be combined with a guided algorithm")
        self.config = config
        self.tokenizer = tokenizer
        self.writer = _as_writer(guide, tokenizer, device, config)
        self.critic: nn.Module | None = copy.deepcopy(critic) if config.uses_guide_critic() else None
        # Switch points and LOLS draws: their own stream, so beta = 0 leaves the policy's sampling untouched. The
        # same on every rank: the roll-in is one decision per update and switch points are drawn for the global
        # batch, each rank taking its rows' (so they match a single-process run's).
        self.rng = random.Random(config.seed + 2)
        self.last: tuple[str | None, torch.Tensor] | None = None  # (roll-in, learner mask) of the last roll-out

    def rollout(self, trainer: object, prompts: list[str]) -> GenerationOutput:
        """Roll in with one writer and out with the other; records who wrote every token (see ``last``)."""
        from tokencredit.generation import encode_prompts

        cfg = self.config
        rollin = rollin_of(cfg.algorithm, trainer.update_idx, cfg.lols_tau, cfg.d2lols_switch_update, self.rng)
        # Drawn for the global batch on every rank (same stream), each rank keeping its rows' draws.
        draws = trainer.group.share(draw_switches(len(prompts) * trainer.group.world_size, cfg.guide_beta,
                                                  self.rng))
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, cfg.max_prompt_length, trainer.device)
        learner = ModelWriter(trainer.policy, self.tokenizer, temperature=cfg.temperature, top_k=cfg.top_k,
                              top_p=cfg.top_p, generator=trainer.generator)
        with trainer._amp():
            rows = guided_rollout(learner, self.writer, rollin, prompt_ids, prompt_mask, draws,
                                  cfg.max_new_tokens, self.tokenizer.pad_token_id,
                                  rollin_length=cfg.guide_rollin_length)
        gen, learner_mask = as_generation_output(rows, prompt_ids, prompt_mask, self.tokenizer,
                                                 self.tokenizer.pad_token_id)
        self.last = (rollin, learner_mask)
        return gen

    def values_rollout(self) -> bool:
        """Whether the last roll-out's positions are valued by the guide critic (the guide rolled out)."""
        return self.last is not None and self.critic is not None and self.last[0] == "learner"


def _as_writer(guide: object, tokenizer: object, device: torch.device, cfg: object) -> object:
    """The guide as a writer on ``device``: a model is sampled token by token, a writer is kept, a text-completion
    object is re-tokenised."""
    if isinstance(guide, nn.Module):
        vocab = getattr(getattr(guide, "config", None), "vocab_size", None)
        if vocab is not None and vocab < len(tokenizer):
            raise ValueError(f"the guide's vocabulary ({vocab}) is smaller than the policy tokenizer's "
                             f"({len(tokenizer)}): a token-level guide must share the policy's tokenizer; "
                             "wrap another model as a text guide (complete(texts, max_new_tokens))")
        guide = guide.to(device).eval().requires_grad_(False)
        # Sampling from the trainer's generator (set once it exists), so a guided run is reproducible.
        return ModelWriter(guide, tokenizer, temperature=cfg.guide_temperature, top_k=cfg.guide_top_k,
                           top_p=cfg.guide_top_p)
    if callable(getattr(guide, "write", None)):
        # A writer of our own kind (e.g. BestOfNWriter): its model moves with the trainer, its sampling draws
        # from the trainer's generator, like a model guide's.
        model = getattr(guide, "model", None)
        if isinstance(model, nn.Module):
            guide.model = model.to(device).eval().requires_grad_(False)
        return guide
    if callable(getattr(guide, "complete", None)):
        return TextWriter(guide.complete, tokenizer)
    raise ValueError("guide must be a causal LM (nn.Module), a writer (write(prompt_ids, prompt_mask, "
                     "budgets)) or have complete(texts, max_new_tokens)")

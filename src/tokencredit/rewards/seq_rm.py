"""Sequence reward model: one score per response, read at its last token, trained with Bradley-Terry.

It is a :class:`~tokencredit.rewards.token_rm.TokenRewardModel` whose head output at the last response token
(EOS appended) is the sequence score r(x, y), so it saves, loads, batches and plugs into PPO exactly like the
token model. ``probabilities`` gives sigma(r), which SER's selection rules read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from tokencredit.distributed import is_main_process
from tokencredit.generation import encode_prompts, position_ids_from_mask
from tokencredit.models import attends_only_back, resolve_device
from tokencredit.rewards.fit import fit, validate_fit_config
from tokencredit.rewards.labels import end_token_id
from tokencredit.rewards.records import PreferencePair, random_split
from tokencredit.rewards.token_rm import TokenRewardModel
from tokencredit.rewards.tokens import RewardFn
from tokencredit.runs import atomic_write_json


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry: mean of -log sigma(r_chosen - r_rejected - margin) (margin 0 when None)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    return -F.logsigmoid(diff).mean()


class SequenceRewardModel(TokenRewardModel):
    """A scalar-head model whose output at the last response token is the score of the whole response."""

    LOOKS_BACK = False  # one score at the last token: a bidirectional backbone may read the whole response
    KIND = "sequence"

    def sequence_scores(
        self, prompts: Sequence[str], response_token_ids: Sequence[Sequence[int]], max_prompt_length: int | None = None
    ) -> torch.Tensor:
        """Differentiable scores [B]: the head output at each response's last token."""
        if any(len(r) == 0 for r in response_token_ids):
            raise ValueError("every response needs at least one token (encode_response appends EOS)")
        rewards, mask = self.token_rewards(prompts, response_token_ids, max_prompt_length)
        last = (mask.sum(-1) - 1).clamp(min=0)
        return rewards.gather(1, last[:, None]).squeeze(1)

    def encode_scored(self, response: str, max_tokens: int | None = None) -> list[int]:
        """Response token ids as the score reads them: the response's start, then always the end token.

        The score sits at the end token, so a response cut to ``max_tokens`` keeps it (its first max_tokens - 1
        tokens, then EOS): training and scoring read the score at the same kind of token, however long the text.
        """
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1: the end token is always kept (got {max_tokens})")
        ids = self.encode_response(response, None if max_tokens is None else max_tokens)
        if max_tokens is not None and len(ids) == max_tokens and ids[-1] != end_token_id(self.tokenizer):
            ids[-1] = end_token_id(self.tokenizer)
        return ids

    def _length_limit(self, max_length: int | None) -> int | None:
        """prompt + response tokens a scoring pass may use: ``max_length``, never past the backbone's positions."""
        limit = getattr(self.model.backbone.config, "max_position_embeddings", None)
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2: one prompt token and the end token (got {max_length})")
        if limit is None:
            return max_length
        return limit if max_length is None else min(max_length, limit)

    @torch.no_grad()
    def score_sequences(
        self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16, max_length: int | None = None
    ) -> list[float]:
        """Score of each text response (tokenized by the RM, EOS appended), read as training reads it.

        ``max_length`` bounds prompt + response tokens as in training (responses keep their start and the end
        token, prompts their end); None = the backbone's position limit, so a long text is cut, not an error.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        limit = self._length_limit(max_length)
        out: list[float] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompts), batch_size):
                ids = [self.encode_scored(r, None if limit is None else limit - 1)
                       for r in responses[start : start + batch_size]]
                room = None if limit is None else limit - max(len(r) for r in ids)
                out.extend(self.sequence_scores(list(prompts[start : start + batch_size]), ids, room)
                           .float().tolist())
        finally:
            self.model.train(was_training)
        return out

    @torch.no_grad()
    def prefix_scores(
        self,
        prompts: Sequence[str],
        response_token_ids: Sequence[Sequence[int]],
        batch_size: int = 16,
        one_pass: bool | None = None,
    ) -> list[list[float]]:
        """Raw scores after the prompt alone and after each prefix y<=t of each response: T + 1 floats per response.

        A prefix is read as given, with no end token appended: its score is the head at its last token (the last
        prompt token for the empty response), so a response ending in EOS ends on its sequence score. A causal
        backbone gives every prefix in one pass, since position P + t has read exactly x, y<=t; a bidirectional
        one (BERT) lets each position read later tokens, so every prefix is then scored as a row of its own
        (``batch_size`` rows per pass, O(T^2) tokens). ``one_pass``: None probes the backbone for which it is.
        """
        if len(prompts) != len(response_token_ids):
            raise ValueError(f"{len(prompts)} prompts but {len(response_token_ids)} responses")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self._check_ids(response_token_ids)
        if one_pass is None:
            one_pass = attends_only_back(self.model.backbone)
        responses = [[int(t) for t in ids] for ids in response_token_ids]
        # One pass reads every position of a row; otherwise each prefix is a row whose last position is read.
        jobs = ([(i, ids) for i, ids in enumerate(responses)] if one_pass else
                [(i, ids[:t]) for i, ids in enumerate(responses) for t in range(len(ids) + 1)])
        limit = getattr(self.model.backbone.config, "max_position_embeddings", None)
        out: list[list[float]] = [[] for _ in responses]
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start : start + batch_size]
                width = max(len(ids) for _, ids in chunk)
                if limit and width >= limit:
                    raise ValueError(f"a response of {width} tokens does not fit the reward model's {limit} positions")
                prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [prompts[i] for i, _ in chunk],
                                                         limit - width if limit else None, self.device)
                # Left padding puts each prompt's last token in the last column, where the empty response is read.
                real = prompt_mask[:, -1].tolist() if prompt_ids.size(1) else [0] * len(chunk)
                if not all(real):
                    raise ValueError(f"prompt {chunk[real.index(0)][0]} has no tokens: the score of the empty "
                                     "response is read at the prompt's last token")
                resp = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
                resp_mask = torch.zeros(len(chunk), width, dtype=torch.long)
                for row, (_, ids) in enumerate(chunk):
                    resp[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    resp_mask[row, : len(ids)] = 1
                attn = torch.cat([prompt_mask, resp_mask.to(self.device)], 1)
                scores = self.model(torch.cat([prompt_ids, resp.to(self.device)], 1), attn,
                                    position_ids_from_mask(attn))
                rows = scores[:, prompt_ids.size(1) - 1 :].float().cpu().tolist()
                for (i, ids), row in zip(chunk, rows):
                    out[i].extend(row[: len(ids) + 1] if one_pass else [row[len(ids)]])
        finally:
            self.model.train(was_training)
        return out

    def probabilities(
        self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16, max_length: int | None = None
    ) -> list[float]:
        """sigma(r) of each response: the probabilities SER's selection rules compare."""
        return [1.0 / (1.0 + math.exp(-s)) for s in self.score_sequences(prompts, responses, batch_size, max_length)]

    def as_reward_fn(
        self,
        kind: str = "sequence",
        scale: float = 1.0,
        policy_tokenizer: object | None = None,
        batch_size: int = 16,
        sigmoid: bool = False,
        baseline: float = 0.0,
    ) -> RewardFn:
        """A PPO reward_fn giving scale * (r - baseline) per response (sigma(r) with ``sigmoid``), on its last
        token; the response text is re-tokenized, so the policy may use any tokenizer."""
        if kind != "sequence":
            raise ValueError(f"a sequence reward model gives sequence rewards only (got kind={kind!r})")

        def reward_fn(prompts: list[str], responses: list[str], response_token_ids: list[list[int]]) -> list:
            """Score the decoded responses."""
            scores = self.score_sequences(prompts, responses, batch_size)
            if sigmoid:
                scores = [1.0 / (1.0 + math.exp(-s)) for s in scores]
            return [scale * (s - baseline) for s in scores]

        return reward_fn


@dataclass
class SeqRMConfig:
    """Every sequence-RM training knob, documented where declared."""

    output_dir: str = "runs/seq_rm"  # run folder: config.yaml, metrics.jsonl, eval.json, model/
    seed: int = 0  # seeds the train/eval split and data order
    num_epochs: int = 1
    batch_size: int = 8  # pairs per step
    learning_rate: float = 1e-4
    lr_schedule: Literal["constant", "linear"] = "constant"  # "linear": decay to 0 at the last step
    warmup_ratio: float = 0.0  # share of the steps with a linear rise of the learning rate from 0
    weight_decay: float = 0.0
    max_length: int = 512  # prompt + response tokens; responses keep their start, prompts their end
    max_grad_norm: float | None = 1.0  # None = no clipping
    # bf16 autocast with fp32 trainable weights; "auto" = bf16 where bf16 matmuls are native (AMX, bf16 GPUs)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    eval_fraction: float = 0.1  # pairs held out for the final eval (0 = none)
    progress: bool = True
    log_tensorboard: bool = False
    device: str = "auto"
    # checkpoint every N steps (and after the last) so resume=true continues after a crash; None = no checkpoints
    save_every: int | None = None
    keep_checkpoints: int = 1  # newest checkpoints kept
    resume: bool = False  # continue from the newest checkpoint in output_dir (same data and settings)

    def validate(self) -> None:
        """Check ranges; raise ValueError naming the field."""
        validate_fit_config(self)


def _pair_scores(
    rm: SequenceRewardModel, pairs: Sequence[PreferencePair], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (chosen, rejected) scores of a batch of pairs, in one forward pass."""
    n = len(pairs)
    # The score is read at the end token, so a cut response keeps it (as score_sequences reads it).
    ids = [rm.encode_scored(p.chosen, max_length - 1) for p in pairs]
    ids += [rm.encode_scored(p.rejected, max_length - 1) for p in pairs]
    width = max(len(r) for r in ids)
    scores = rm.sequence_scores([p.prompt for p in pairs] * 2, ids, max_prompt_length=max_length - width)
    return scores[:n], scores[n:]


def score_shift_parameters(
    rm: SequenceRewardModel, pair: PreferencePair, max_length: int = 512
) -> list[torch.nn.Parameter]:
    """Trainable parameters that only add one constant to every score: the head's bias, and the bias of the
    backbone's last LayerNorm or Linear when its output is what the head reads (found by scoring ``pair``).

    Bradley-Terry reads score differences only, so it cannot train them.
    """
    model = rm.model
    last: list = [None, None]  # the last leaf module of the backbone to finish, and its output
    fed: list = []  # that module and output when the head starts, with the head's input

    def finished(module: torch.nn.Module, args: tuple, output: object) -> None:
        last[:] = [module, output]

    def head_starts(module: torch.nn.Module, args: tuple) -> None:
        fed.append((*last, args[0]))

    hooks = [m.register_forward_hook(finished) for m in model.backbone.modules() if next(m.children(), None) is None]
    hooks.append(model.head.register_forward_pre_hook(head_starts))
    was_training = model.training
    model.eval()  # no dropout: the probe draws no random numbers and sees the layers as they compute
    try:
        with torch.no_grad():
            _pair_scores(rm, [pair], max_length)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    shifts = [model.head.bias]
    module, output, head_input = fed[0] if fed else (None, None, None)
    # Anything after that layer (dropout, a projection) would make its bias more than a shift; equal values show
    # the head reads its output as it is.
    if (isinstance(module, (torch.nn.LayerNorm, torch.nn.Linear)) and isinstance(output, torch.Tensor)
            and output.shape == head_input.shape and torch.equal(output.to(head_input.dtype), head_input)):
        shifts.append(module.bias)
    return [p for p in shifts if p is not None and p.requires_grad]


@torch.no_grad()
def evaluate_sequence_reward_model(
    rm: SequenceRewardModel, pairs: Sequence[PreferencePair], batch_size: int = 16, max_length: int | None = None
) -> dict:
    """Pairwise accuracy (chosen scored above rejected) and the mean score gap on the given pairs, each text read
    within ``max_length`` prompt + response tokens as training reads it (None = the backbone's limit)."""
    if not pairs:
        return {"pairs": 0, "pair_accuracy": None, "mean_margin": None}
    prompts = [p.prompt for p in pairs]
    chosen = rm.score_sequences(prompts, [p.chosen for p in pairs], batch_size, max_length)
    rejected = rm.score_sequences(prompts, [p.rejected for p in pairs], batch_size, max_length)
    gaps = [c - r for c, r in zip(chosen, rejected)]
    return {"pairs": len(pairs), "pair_accuracy": sum(g > 0 for g in gaps) / len(gaps),
            "mean_margin": sum(gaps) / len(gaps)}


def train_sequence_reward_model(
    rm: SequenceRewardModel,
    config: SeqRMConfig,
    pairs: Sequence[PreferencePair],
    margins: Sequence[float] | None = None,
    eval_pairs: Sequence[PreferencePair] | None = None,
    run_settings: object | None = None,
) -> list[dict]:
    """Bradley-Terry (optionally with a per-pair margin) on preference pairs; one dict per step.

    Pairs are split by ``eval_fraction`` unless ``eval_pairs`` is given. The last entry is
    ``{"step": ..., "eval": {...}}`` (also ``output_dir/eval.json``); the model is saved to ``output_dir/model``.
    ``run_settings``: what config.yaml records (default ``config``; a command that claimed the folder passes its own).
    """
    config.validate()
    if not pairs:
        raise ValueError("nothing to train on: pass at least one preference pair")
    if margins is not None and len(margins) != len(pairs):
        raise ValueError(f"{len(margins)} margins for {len(pairs)} pairs")
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    rows = list(zip(pairs, margins if margins is not None else [0.0] * len(pairs)))
    if eval_pairs is None:
        train, held = random_split(rows, config.eval_fraction, rng)
        eval_pairs = [p for p, _ in held]
    else:
        train = rows
    rm.to(resolve_device(config.device))
    bs = config.batch_size
    steps_per_epoch = math.ceil(len(train) / bs)

    def epoch_batches(epoch: int) -> Iterator[list[tuple[PreferencePair, float]]]:
        order = rng.permutation(len(train))
        for b in range(steps_per_epoch):
            yield [train[i] for i in order[b * bs : (b + 1) * bs]]

    def loss_fn(batch: list[tuple[PreferencePair, float]]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = _pair_scores(rm, [p for p, _ in batch], config.max_length)
        margin = torch.tensor([m for _, m in batch], device=chosen.device) if margins is not None else None
        loss = bt_loss(chosen, rejected, margin)
        return loss, {"loss/total": loss.item(), "loss/bt": loss.item(),
                      "train/pair_accuracy": (chosen > rejected).float().mean().item()}

    # Bradley-Terry (margins too) reads only score differences: a parameter that shifts every score alike gets
    # no gradient but rounding noise, which Adam would turn into full-size steps (see fit), so it is held fixed.
    shifts = score_shift_parameters(rm, rows[0][0], config.max_length)
    history = fit(rm.model, config, epoch_batches, loss_fn, steps_per_epoch, "sequence rm", invariant=shifts,
                  settings=run_settings)
    metrics = evaluate_sequence_reward_model(rm, eval_pairs, batch_size=bs, max_length=config.max_length)
    out = config.output_dir
    history.append({"step": history[-1]["step"] if history else 0, "eval": metrics})
    if is_main_process():  # rank 0 alone writes under accelerate launch
        atomic_write_json(f"{out}/eval.json", metrics)
        rm.save_pretrained(f"{out}/model")
    return history

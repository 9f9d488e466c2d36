"""PGG reward learning: ground a bounded token reward in sequence-level rankings of K samples (arXiv 2306.00398).

A token reward r_phi(s_t, a_t) in (0, 1) is summed up per sequence by an aggregator, and the K aggregated
scores of one prompt are fitted to the true ranking of its K samples with a Plackett-Luce (ListMLE) loss.

Batch layout: G groups (prompts) of K samples each. Sequence scores and true scores are ``[G, K]``. Token
tensors are either ``[G, K, T]`` or flat ``[G*K, T]`` with the K samples of a group in consecutive rows
(row ``g*K + k``), the order :meth:`TokenRewardModel.token_rewards` returns for prompts repeated K times;
:func:`aggregate` works on any leading shape and :func:`group_mean_length` returns C in the shape of the scores.

The raw outputs of a :class:`~tokencredit.rewards.token_rm.TokenRewardModel` are unbounded head values; for
PGG they are passed through :func:`bounded` (a sigmoid) before aggregation, and :func:`pgg_rm_loss` does this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import torch

from tokencredit.distributed import is_main_process
from tokencredit.models import resolve_device
from tokencredit.precision import autocast, make_adamw
from tokencredit.rewards.fit import fit, validate_fit_config
from tokencredit.runs import atomic_write_json

if TYPE_CHECKING:
    from tokencredit.rewards.records import RankedList
    from tokencredit.rewards.token_rm import TokenRewardModel

Aggregator = Literal["sum", "avg", "softmax", "softmin"]
AGGREGATORS: tuple[str, ...] = ("sum", "avg", "softmax", "softmin")


def bounded(raw: torch.Tensor) -> torch.Tensor:
    """The PGG token reward in (0, 1): sigmoid of the raw head output (a TokenRewardModel's output goes here)."""
    return torch.sigmoid(raw)


def aggregate(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    how: Aggregator,
    scale: torch.Tensor | float | None = None,
    beta: float = 2.0,
) -> torch.Tensor:
    """Sequence score from token rewards ``[..., T]`` -> ``[...]``; padding (mask 0) contributes nothing.

    - ``"sum"``: sum_t r_t (``scale`` is not applied: the sum already grows with length).
    - ``"avg"``: C * mean_t r_t.
    - ``"softmax"``: C * beta * log sum_t exp(r_t / beta), between C*max r and C*(max r + beta*log n).
    - ``"softmin"``: -C * beta * log sum_t exp(-r_t / beta), between C*(min r - beta*log n) and C*min r.

    ``scale`` is C (see :func:`group_mean_length`): a float or a tensor broadcastable to the output shape;
    None means 1. A row with no unmasked token scores 0 under every aggregator and passes no gradient.
    """
    if how not in AGGREGATORS:
        raise ValueError(f"how must be one of {AGGREGATORS} (got {how!r})")
    if rewards.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and mask {tuple(mask.shape)} must have the same shape")
    if rewards.dim() == 0:
        raise ValueError("rewards must have a token dimension (shape [..., T])")
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (got {beta})")
    keep = mask.bool()
    # where, not a product: a non-finite value in a padded slot must not turn into NaN.
    kept = torch.where(keep, rewards, torch.zeros_like(rewards))
    if how == "sum":
        return kept.sum(-1)
    if how == "avg":
        score = kept.sum(-1) / keep.sum(-1).clamp(min=1)
    else:
        empty = ~keep.any(-1)
        sign = 1.0 if how == "softmax" else -1.0
        # -inf drops padding from the log-sum-exp; an empty row gets a finite stand-in (overwritten below),
        # because log-sum-exp over only -inf has a NaN gradient that torch.where would still propagate.
        logits = (sign * rewards / beta).masked_fill(~keep, float("-inf"))
        logits = torch.where(empty.unsqueeze(-1), torch.zeros_like(logits), logits)
        score = sign * beta * torch.logsumexp(logits, dim=-1)
        score = torch.where(empty, torch.zeros_like(score), score)
    if scale is None:
        return score
    return score * torch.as_tensor(scale, dtype=score.dtype, device=score.device)


def group_mean_length(
    mask: torch.Tensor, k: int | None = None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """C: the mean response length of the K samples of each prompt, repeated for every sample.

    ``mask`` is ``[G, K, T]`` (``k`` None) -> ``[G, K]``, or flat ``[G*K, T]`` with consecutive groups of
    ``k`` rows -> ``[G*K]``; either way the result multiplies :func:`aggregate`'s output directly.
    ``valid`` (shape of the result, bool) leaves missing samples out of the mean.
    """
    if mask.dim() == 3 and k is None:
        grouped = mask
    elif mask.dim() == 2 and k is not None:
        if k < 1 or mask.size(0) % k:
            raise ValueError(f"k must be >= 1 and divide the batch size {mask.size(0)} (got k={k})")
        grouped = mask.reshape(mask.size(0) // k, k, mask.size(1))
    else:
        raise ValueError(
            f"mask must be [G, K, T] with k=None or [G*K, T] with k given (got shape {tuple(mask.shape)}, k={k})"
        )
    lengths = grouped.bool().sum(-1).float()
    if valid is None:
        weights = torch.ones_like(lengths)
    else:
        if valid.numel() != lengths.numel():
            raise ValueError(f"valid has {valid.numel()} entries; expected one per sample ({lengths.numel()})")
        weights = valid.reshape(lengths.shape).to(lengths.dtype)
    mean = (lengths * weights).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True).clamp(min=1)
    return mean.expand_as(lengths).reshape(mask.shape[:-1])


def ranking_order(
    true_scores: torch.Tensor,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices ``[G, K]`` of each group's samples best first (higher true score = better).

    Ties are broken uniformly at random with ``generator`` (the global RNG when None); invalid samples are
    placed last.
    """
    if true_scores.dim() != 2:
        raise ValueError(f"true_scores must be [G, K] (got shape {tuple(true_scores.shape)})")
    valid = _valid_mask(valid, true_scores)
    if torch.isnan(true_scores[valid]).any():
        raise ValueError("true_scores contains NaN for a valid sample; mark it invalid with `valid` instead")
    device = generator.device if generator is not None else true_scores.device
    # Shuffle first, then sort stably: tied samples keep their random shuffled order.
    order = torch.rand(true_scores.shape, generator=generator, device=device).argsort(-1).to(true_scores.device)
    keys = true_scores if true_scores.is_floating_point() else true_scores.double()
    order = order.gather(-1, keys.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    # A second stable sort on validity alone puts invalid samples last even among -inf scores.
    return order.gather(-1, (~valid).gather(-1, order).to(torch.uint8).argsort(dim=-1, stable=True))


def listmle_loss(
    scores: torch.Tensor,
    true_scores: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Plackett-Luce / ListMLE: -sum_k [e_(k) - log sum_{i>=k} exp e_(i)] over the true order, mean over groups.

    ``scores`` are the model's sequence scores ``[G, K]``. Give the truth as ``true_scores`` ``[G, K]`` (higher
    is better; ties broken at random with ``generator``) or as ``order`` ``[G, K]`` (sample indices best first).
    ``valid`` ``[G, K]`` (bool) drops missing samples; groups with fewer than 2 valid samples carry no ranking
    and are left out of the mean (the loss is 0 when no group has 2). For K = 2 this is Bradley-Terry.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [G, K] (got shape {tuple(scores.shape)})")
    if (true_scores is None) == (order is None):
        raise ValueError("give exactly one of true_scores and order")
    valid = _valid_mask(valid, scores)
    if true_scores is not None:
        true_scores = torch.as_tensor(true_scores)
        if true_scores.shape != scores.shape:
            raise ValueError(f"true_scores {tuple(true_scores.shape)} must match scores {tuple(scores.shape)}")
        order = ranking_order(true_scores, valid.to(true_scores.device), generator).to(scores.device)
    else:
        order = _check_order(order, valid, scores)
    K = scores.size(1)
    ranked = scores.gather(-1, order)
    ranked_valid = valid.gather(-1, order)
    # later[k, i]: sample i (in true order) is still in the running at step k. An invalid step k keeps only
    # itself, so every log-sum-exp has a finite term and its (zeroed) term has a finite gradient.
    idx = torch.arange(K, device=scores.device)
    later = (idx.unsqueeze(0) >= idx.unsqueeze(1)).unsqueeze(0) & ranked_valid.unsqueeze(1)
    later = torch.where(ranked_valid.unsqueeze(-1), later, torch.eye(K, dtype=torch.bool, device=scores.device))
    denominators = torch.logsumexp(ranked.unsqueeze(1).expand(-1, K, -1).masked_fill(~later, float("-inf")), -1)
    terms = torch.where(ranked_valid, denominators - ranked, torch.zeros_like(ranked))
    counted = valid.sum(-1) >= 2
    if not counted.any():
        return scores.sum() * 0.0
    return terms.sum(-1)[counted].mean()


def _valid_mask(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Bool ``[G, K]`` validity mask (all valid when None)."""
    if valid is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    if valid.shape != like.shape:
        raise ValueError(f"valid {tuple(valid.shape)} must match scores {tuple(like.shape)}")
    return valid.to(device=like.device, dtype=torch.bool)


def _check_order(order: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """An order must be a permutation of 0..K-1 per group, with invalid samples after the valid ones."""
    order = torch.as_tensor(order, device=scores.device).long()
    if order.shape != scores.shape:
        raise ValueError(f"order {tuple(order.shape)} must match scores {tuple(scores.shape)}")
    K = scores.size(1)
    if not torch.equal(order.sort(-1).values, torch.arange(K, device=order.device).expand_as(order)):
        raise ValueError(f"each row of order must be a permutation of 0..{K - 1}")
    ranked_valid = valid.gather(-1, order)
    if (ranked_valid[:, 1:] & ~ranked_valid[:, :-1]).any():
        raise ValueError("order ranks an invalid sample before a valid one; list invalid samples last")
    return order


def pgg_rm_loss(
    token_rm: TokenRewardModel,
    prompts: Sequence[str],
    responses: Sequence[Sequence[Sequence[int]]],
    true_scores: torch.Tensor | Sequence[Sequence[float]],
    how: Aggregator = "avg",
    beta: float = 2.0,
    generator: torch.Generator | None = None,
    max_prompt_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ListMLE loss of the bounded, C-scaled aggregated token rewards of G prompts x K ranked responses.

    ``prompts``: G strings; ``responses[g]``: the K response token-id lists of prompt g (K equal across
    groups, every response non-empty); ``true_scores`` ``[G, K]``: higher is better (e.g. a metric).
    Returns the differentiable loss and float statistics (loss, pairwise ranking accuracy, mean reward, C).
    """
    G = len(prompts)
    if G == 0 or len(responses) != G:
        raise ValueError(f"need one group of responses per prompt and at least one prompt "
                         f"(got {G} prompts, {len(responses)} groups)")
    K = len(responses[0])
    for g, group in enumerate(responses):
        if len(group) != K:
            raise ValueError(f"group {g} has {len(group)} responses; every group needs the same K={K}")
        for k, ids in enumerate(group):
            if len(ids) == 0:
                raise ValueError(f"group {g}, response {k} is empty; an empty response has no token to reward")
    if K < 2:
        raise ValueError(f"each group needs at least 2 responses to rank (got K={K})")
    truth = torch.as_tensor(true_scores, dtype=torch.float64)
    if truth.shape != (G, K):
        raise ValueError(f"true_scores must be [G={G}, K={K}] (got shape {tuple(truth.shape)})")
    flat_prompts = [p for p in prompts for _ in range(K)]
    flat_ids = [list(ids) for group in responses for ids in group]
    raw, mask = token_rm.token_rewards(flat_prompts, flat_ids, max_prompt_length)
    rewards = bounded(raw)
    scale = group_mean_length(mask, K)
    scores = aggregate(rewards, mask, how, scale, beta).view(G, K)
    loss = listmle_loss(scores, truth, generator=generator)
    with torch.no_grad():
        better = truth.unsqueeze(-1) > truth.unsqueeze(-2)
        cpu_scores = scores.cpu()
        agree = (cpu_scores.unsqueeze(-1) > cpu_scores.unsqueeze(-2)) & better
        stats = {
            "pgg/loss": loss.item(),
            "pgg/pair_accuracy": (agree.sum() / better.sum().clamp(min=1)).item(),
            "pgg/mean_token_reward": (rewards * mask).sum().item() / max(int(mask.sum()), 1),
            "pgg/mean_length_scale": scale.float().mean().item(),
        }
    return loss, stats


# ---------------------------------------------------------------------- training a PGG reward model
@dataclass
class PGGRMConfig:
    """Knobs of :func:`train_pgg_reward_model`, documented where declared."""

    output_dir: str = "runs/pgg_rm"  # run folder: config.yaml, metrics.jsonl, eval.json, model/
    seed: int = 0  # seeds the split, data order, tie-breaking and dropout
    num_epochs: int = 2
    batch_size: int = 8  # ranked lists (groups of K) per step
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    max_length: int = 512  # prompt + response tokens; responses keep their start, prompts their end
    aggregator: Aggregator = "avg"  # the paper's ablation found avg best and sum worst on uneven lengths
    beta: float = 2.0  # temperature of the soft-max / soft-min aggregators
    max_grad_norm: float | None = 1.0
    # bf16 autocast with fp32 trainable weights; "auto" = bf16 where bf16 matmuls are native (AMX, bf16 GPUs)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    eval_fraction: float = 0.1  # share of the ranked lists held out for the final eval
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
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {AGGREGATORS} (got {self.aggregator!r})")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0 (got {self.beta})")


class RankedGroup(NamedTuple):
    """One ranked list as the model reads it: K response token-id lists and their true scores."""

    prompt: str
    responses: list[list[int]]
    truth: list[float]


def _groups(rm: TokenRewardModel, lists: Sequence[RankedList], max_length: int) -> list[RankedGroup]:
    """Tokenize ranked lists (EOS appended, cut to max_length - 1); a ranking becomes scores -rank."""
    out = []
    for lst in lists:
        truth = list(lst.scores) if lst.scores is not None else [-float(r) for r in lst.ranking]
        out.append(RankedGroup(lst.prompt, [rm.encode_response(r, max_length - 1) for r in lst.responses], truth))
    return out


def _batches_by_k(groups: Sequence[RankedGroup], order: Sequence[int], size: int) -> list[list[RankedGroup]]:
    """Batches of up to ``size`` groups with the same K, in ``order`` within each K."""
    by_k: dict[int, list[RankedGroup]] = {}
    for i in order:
        by_k.setdefault(len(groups[i].responses), []).append(groups[i])
    return [rows[b : b + size] for rows in by_k.values() for b in range(0, len(rows), size)]


def _group_loss(
    rm: TokenRewardModel, batch: Sequence[RankedGroup], config: PGGRMConfig, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, float]]:
    """pgg_rm_loss of one batch of same-K groups, the prompt cut to what max_length leaves."""
    width = max(len(ids) for g in batch for ids in g.responses)
    loss, stats = pgg_rm_loss(rm, [g.prompt for g in batch], [g.responses for g in batch],
                              [g.truth for g in batch], how=config.aggregator, beta=config.beta,
                              generator=generator, max_prompt_length=max(config.max_length - width, 1))
    return loss, {"loss/total": stats.pop("pgg/loss"), **stats}


def _evaluate_groups(rm: TokenRewardModel, groups: Sequence[RankedGroup], config: PGGRMConfig) -> dict:
    """Pair accuracy (strictly ordered pairs whose aggregated scores agree) and mean ListMLE loss of ``groups``,
    ties broken with a fixed seed, in eval mode and without gradients."""
    generator = torch.Generator().manual_seed(0)
    agree = total = 0
    loss_sum = 0.0
    was_training = rm.model.training
    rm.model.eval()
    try:
        with torch.no_grad():
            for batch in _batches_by_k(groups, range(len(groups)), config.batch_size):
                loss, stats = _group_loss(rm, batch, config, generator)
                loss_sum += loss.item() * len(batch)
                n_pairs = sum(a > b for g in batch for a in g.truth for b in g.truth)
                agree += round(stats["pgg/pair_accuracy"] * n_pairs)
                total += n_pairs
    finally:
        rm.model.train(was_training)
    return {
        "lists": len(groups),
        "rank_pairs": total,
        "rank_pair_accuracy": agree / total if total else None,
        "listmle_loss": loss_sum / len(groups) if groups else None,
        "aggregator": config.aggregator,
    }


def evaluate_pgg_reward_model(
    rm: TokenRewardModel,
    lists: Sequence[RankedList],
    aggregator: Aggregator = "avg",
    beta: float = 2.0,
    batch_size: int = 16,
    max_length: int = 512,
) -> dict:
    """Held-out ranking quality: share of strictly ordered response pairs whose aggregated scores agree, and
    the mean ListMLE loss (ties broken with a fixed seed)."""
    config = PGGRMConfig(aggregator=aggregator, beta=beta, max_length=max_length, batch_size=batch_size)
    return _evaluate_groups(rm, _groups(rm, lists, max_length), config)


# ---------------------------------------------------------------------- one grounding of the PGG trainer
@dataclass
class GroundingFitConfig:
    """How one grounding fits the token reward: fresh ranked lists per step until held-out accuracy stalls."""

    max_steps: int = 300  # reward-model steps at most
    eval_every: int = 10  # steps between held-out checks
    patience: int = 4  # held-out checks without improvement before the fit stops (best weights restored)
    min_steps: int = 0  # no stop for patience before this many steps (a real backbone learns slowly at first)
    batch_size: int = 8  # ranked lists per step (the trainer's draw decides how many of them are fresh)
    learning_rate: float = 1e-4
    max_grad_norm: float | None = 1.0
    aggregator: Aggregator = "avg"
    beta: float = 2.0
    max_length: int = 512

    def validate(self) -> None:
        """Check ranges; raise ValueError naming the field."""
        for name in ("max_steps", "eval_every", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 <= self.min_steps <= self.max_steps:
            raise ValueError(f"min_steps must be in [0, max_steps={self.max_steps}] (got {self.min_steps})")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0 (got {self.learning_rate})")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {AGGREGATORS} (got {self.aggregator!r})")


def _better(check: dict, best: dict) -> bool:
    """A held-out check beats the best so far: higher pair accuracy, or the same accuracy and a ListMLE loss at
    least 1% lower (sharper margins make sharper token weights; smaller gains are not worth more metric calls)."""
    acc, best_acc = check["rank_pair_accuracy"], best["rank_pair_accuracy"]
    if acc is not None and best_acc is not None and acc != best_acc:
        return acc > best_acc
    return check["listmle_loss"] < best["listmle_loss"] - 0.01 * abs(best["listmle_loss"])


def fit_grounding(
    rm: TokenRewardModel,
    draw: Callable[[], Sequence[RankedGroup]],
    held_out: Sequence[RankedGroup],
    config: GroundingFitConfig,
    generator: torch.Generator,
    amp_dtype: torch.dtype | None = None,
) -> dict:
    """Fit the bounded token reward with ListMLE on batches from ``draw()`` until held-out ranking stops improving.

    ``draw()`` returns the next batch of ranked groups (the PGG trainer samples fresh ones from the current policy);
    ``held_out`` are groups sampled for this grounding alone. The held-out pair accuracy (ties: ListMLE loss) is
    checked before the first step and every ``eval_every`` steps; after ``patience`` checks without improvement
    (counted only once ``min_steps`` are done), or ``max_steps``, the trainable weights of the best check are
    restored (the start's, if no step helped).
    Returns the start and best checks, the steps taken, why it stopped and the curve of checks. A fresh AdamW each call,
    as the paper re-creates its optimiser per fit while the weights carry over.
    """
    config.validate()
    if not held_out:
        raise ValueError("a grounding needs held-out ranked lists to know when to stop")
    params = [p for p in rm.model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the reward model has no trainable parameters")
    rm.bounded = True
    optimizer = make_adamw([{"params": params, "lr": config.learning_rate}], weight_decay=0.0, fused=True)
    rm_config = PGGRMConfig(aggregator=config.aggregator, beta=config.beta, max_length=config.max_length,
                            batch_size=config.batch_size)
    device = params[0].device

    def check(step: int, train_loss: float | None) -> dict:
        with autocast(device, amp_dtype):
            result = _evaluate_groups(rm, held_out, rm_config)
        return {"step": step, "rank_pair_accuracy": result["rank_pair_accuracy"],
                "listmle_loss": result["listmle_loss"], "train_loss": train_loss}

    curve = [check(0, None)]
    best, best_state, stale, step, losses = curve[0], _trainable_state(rm.model), 0, 0, []
    stopped = "max_steps"
    rm.model.train()
    while step < config.max_steps:
        batch = list(draw())
        if not batch:
            raise ValueError("draw() returned no ranked groups")
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp_dtype):
            loss, _ = _group_loss(rm, batch, rm_config, generator)
        step += 1
        if torch.isfinite(loss):  # a non-finite step is skipped, as in every reward-model fit here
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
        if step % config.eval_every == 0 or step == config.max_steps:
            curve.append(check(step, float(np.mean(losses)) if losses else None))
            losses = []
            if _better(curve[-1], best):
                best, best_state, stale = curve[-1], _trainable_state(rm.model), 0
            else:
                stale += 1
                if stale >= config.patience and step >= config.min_steps:
                    stopped = "patience"
                    break
    with torch.no_grad():
        named = dict(rm.model.named_parameters())
        for name, value in best_state.items():
            named[name].copy_(value)
    return {"steps": step, "stopped": stopped, "start": curve[0], "best": best, "curve": curve}


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters (what a fit changes), to restore the best check's weights."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_pgg_reward_model(rm: TokenRewardModel, config: PGGRMConfig, lists: Sequence[RankedList],
                           run_settings: object | None = None) -> list[dict]:
    """Train a bounded token RM on ranked lists with ListMLE (PGG, arXiv 2306.00398); one stats dict per step.

    The model is marked bounded (its scores become sigmoid(head) in (0, 1)). The last entry is
    ``{"step": ..., "eval": {...}}`` on the held-out lists (also ``output_dir/eval.json``); the model is saved
    to ``output_dir/model``. ``run_settings``: what config.yaml records (default ``config``).
    """
    from tokencredit.rewards.records import random_split

    config.validate()
    if not lists:
        raise ValueError("nothing to train on: pass at least one ranked list")
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train_lists, eval_lists = random_split(list(lists), config.eval_fraction, rng)
    groups = _groups(rm, train_lists, config.max_length)
    rm.bounded = True
    rm.to(resolve_device(config.device))
    steps_per_epoch = len(_batches_by_k(groups, range(len(groups)), config.batch_size))

    def epoch_batches(epoch: int) -> Iterator[list[RankedGroup]]:
        batches = _batches_by_k(groups, rng.permutation(len(groups)), config.batch_size)
        for b in rng.permutation(len(batches)):
            yield batches[b]

    history = fit(rm.model, config, epoch_batches, lambda batch: _group_loss(rm, batch, config, generator),
                  steps_per_epoch, "pgg rm", streams=[generator], settings=run_settings)
    metrics = evaluate_pgg_reward_model(rm, eval_lists, config.aggregator, config.beta, config.batch_size,
                                        config.max_length)
    out = Path(config.output_dir)
    history.append({"step": history[-1]["step"] if history else 0, "eval": metrics})
    if is_main_process():  # rank 0 alone writes under accelerate launch
        atomic_write_json(out / "eval.json", metrics)
        rm.save_pretrained(out / "model")
    return history

"""Training and evaluating token reward models: the losses (per-token BCE, summed Bradley-Terry, FG's span
losses), the training settings and the loop that mixes token labels, preference pairs and minimal edits."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from tokencredit.distributed import is_main_process
from tokencredit.masked import masked_mean, masked_sum
from tokencredit.models import (
    resolve_device,
)
from tokencredit.rewards.edits import edit_token_labels, span_bt_loss
from tokencredit.rewards.fit import fit, validate_fit_config
from tokencredit.rewards.labels import (
    LABEL_UNITS,
    spans_to_token_labels,
)
from tokencredit.rewards.records import PreferencePair, TokenExample, random_split
from tokencredit.rewards.token_rm import TokenRewardModel
from tokencredit.runs import atomic_write_json

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- losses
def token_bce_loss(
    rewards: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, balanced: bool = False,
    bad_weight: float | None = None,
) -> torch.Tensor:
    """Mean BCE of sigmoid(r_t) against 1 (label +1) / 0 (label -1) over labelled, unmasked tokens.

    ``balanced``: the mean over good tokens and the mean over bad tokens count equally (when both occur), so
    a label set that is mostly bad cannot be fit by calling every token bad.
    ``bad_weight`` (instead of ``balanced``): a bad token's BCE weighs ``bad_weight`` times a good token's. The
    fitted reward then crosses 0 where the chance of being good is bad_weight / (1 + bad_weight): a unit whose
    chance is above that earns, below it costs (the price of a miss against a hit).
    """
    weight = mask.float() * (labels != 0).float()
    targets = (labels > 0).to(rewards.dtype)
    per_token = F.binary_cross_entropy_with_logits(rewards, targets, reduction="none")
    if bad_weight is not None:
        if balanced:
            raise ValueError("balanced and bad_weight are two ways to weigh bad tokens: pass one")
        # A weighted mean over the batch's labelled tokens (not clamped at 1: weights below 1 are the point).
        weighted = weight * torch.where(labels > 0, 1.0, float(bad_weight))
        return (per_token * weighted).sum() / weighted.sum().clamp(min=1e-12)
    if balanced:
        good, bad = weight * (labels > 0).float(), weight * (labels < 0).float()
        if good.sum() > 0 and bad.sum() > 0:
            return 0.5 * (masked_mean(per_token, good) + masked_mean(per_token, bad))
    return masked_mean(per_token, weight)


def anchor_loss(rewards: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared reward over unlabelled (label 0), unmasked tokens; 0 when there are none.

    BCE leaves these tokens untrained, so their rewards are whatever the head extrapolates, and a sum over a
    response adds that noise once per token: anchoring them at 0 makes the sum count the labelled units.
    """
    weight = mask.float() * (labels == 0).float()
    if weight.sum() == 0:
        return rewards.sum() * 0.0  # keeps the graph (and the step) alive when a batch has no such token
    return masked_mean(rewards.float() ** 2, weight)


def summed_bt_loss(
    chosen_rewards: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_rewards: torch.Tensor,
    rejected_mask: torch.Tensor,
) -> torch.Tensor:
    """Bradley-Terry on summed token rewards: mean of -log sigma(sum r(chosen) - sum r(rejected))."""
    chosen_sum = masked_sum(chosen_rewards, chosen_mask.float(), -1)
    margin = chosen_sum - masked_sum(rejected_rewards, rejected_mask.float(), -1)
    return -F.logsigmoid(margin).mean()


# ---------------------------------------------------------------------- training data and config
# FG token-RM losses on minimal edits: name -> (bce_weight, bt_weight, span_bt_weight). "bt" is the only
# token loss for pairs and ranked lists (they have no token labels).
TOKEN_LOSSES: dict[str, dict[str, float]] = {
    # span BT + sequence BT on (chosen or edited, original), both from one forward pass: FG's hybrid
    "hybrid": {"span_bt_weight": 1.0, "edit_bt_weight": 1.0},
    # -log sigma(sum of written-token rewards - sum of removed-token rewards)
    "span_bt": {"span_bt_weight": 1.0},
    "bce": {"bce_weight": 1.0},  # per-token BCE: removed tokens bad, written tokens good
    "bce_bt": {"bce_weight": 1.0, "bt_weight": 1.0},  # per-token BCE + sequence BT
    "bt": {"bt_weight": 1.0},  # sequence BT on summed token rewards only
}


@dataclass
class TokenRMConfig:
    """Every token-RM training knob, documented where declared."""

    output_dir: str = "runs/token_rm"  # run folder: config.yaml, metrics.jsonl, eval.json, model/
    seed: int = 0  # seeds the train/eval split, data order and dropout
    num_epochs: int = 2
    batch_size: int = 8  # token examples per step, and pairs per step (each kind batched separately)
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    max_length: int = 512  # prompt + response tokens; responses keep their start, prompts their end
    bce_weight: float = 1.0  # weight of the per-token BCE on span labels
    # Weight of the mean squared reward at the unlabelled tokens of labelled examples (label 0: stopwords, a word's
    # later tokens, words no one judged): pulls them towards 0 so a response's summed reward counts its labelled
    # units instead of whatever the head extrapolates to the rest (0 = off, the old behaviour)
    anchor_weight: float = 0.0
    balance_labels: bool = False  # good and bad tokens weigh equally in the BCE, whatever their counts
    # A bad token's BCE weight relative to a good one's (instead of balance_labels): the reward crosses 0 where a
    # unit's chance of being good is bad_weight / (1 + bad_weight); None = balance_labels decides
    bad_weight: float | None = None
    # How span labels reach tokens: "token" = every token of a labelled word carries its label; "word" = only the
    # word's first token does (the others are unlabelled), so a word split into k tokens is one unit of credit
    label_unit: Literal["token", "word"] = "token"
    bt_weight: float = 1.0  # weight of Bradley-Terry on summed token rewards of preference pairs
    span_bt_weight: float = 0.0  # weight of span Bradley-Terry on minimal edits (FG)
    # Weight of sequence BT on each edit's (chosen, original) pair, chosen = the edit's chosen or else its
    # edited text: FG's hybrid is span BT + this. Scored in the span-BT forward pass, so it costs no extra pass
    # when an edit has no separate chosen text.
    edit_bt_weight: float = 0.0
    max_grad_norm: float | None = 1.0  # None = no clipping
    # bf16 autocast with fp32 trainable weights; "auto" = bf16 where bf16 matmuls are native (AMX, bf16 GPUs)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    eval_fraction: float = 0.1  # share of each kind of data held out for the final eval
    progress: bool = True  # progress bar
    log_tensorboard: bool = False  # scalars to output_dir/tensorboard when tensorboard is installed
    device: str = "auto"  # "auto" = cuda when available, else cpu
    # checkpoint every N steps (and after the last) so resume=true continues after a crash; None = no checkpoints
    save_every: int | None = None
    keep_checkpoints: int = 1  # newest checkpoints kept
    resume: bool = False  # continue from the newest checkpoint in output_dir (same data and settings)

    def validate(self) -> None:
        """Check ranges; raise ValueError naming the field."""
        validate_fit_config(self)
        if self.label_unit not in LABEL_UNITS:
            raise ValueError(f"label_unit must be one of {LABEL_UNITS} (got {self.label_unit!r})")
        weights = (self.bce_weight, self.bt_weight, self.span_bt_weight, self.edit_bt_weight)
        if not self.anchor_weight >= 0:
            raise ValueError(f"anchor_weight must be >= 0 (got {self.anchor_weight})")
        if self.bad_weight is not None and not (self.bad_weight > 0 and math.isfinite(self.bad_weight)):
            raise ValueError(f"bad_weight must be > 0 and finite, or None (got {self.bad_weight})")
        if self.bad_weight is not None and self.balance_labels:
            raise ValueError("balance_labels and bad_weight are two ways to weigh bad tokens: set one")
        if min(weights) < 0 or sum(weights) == 0:
            raise ValueError("bce_weight, bt_weight, span_bt_weight and edit_bt_weight must be >= 0 and not all 0")


class _TokenRow(NamedTuple):
    """A token example as the model reads it."""

    prompt: str
    ids: list[int]
    labels: list[int]


class _PairRow(NamedTuple):
    """A preference pair as the model reads it."""

    prompt: str
    chosen: list[int]
    rejected: list[int]


class _EditRow(NamedTuple):
    """A minimal edit as the model reads it: both responses with their -1 / +1 token labels."""

    prompt: str
    orig_ids: list[int]
    orig_labels: list[int]
    edit_ids: list[int]
    edit_labels: list[int]
    chosen_ids: list[int] | None  # the edit's separate chosen response, if it has one


def _token_rows(
    rm: TokenRewardModel, examples: Sequence[TokenExample], max_tokens: int | None = None, unit: str = "token"
) -> list[_TokenRow]:
    """Tokenize token examples and project their spans onto the tokens by ``unit`` (see spans_to_token_labels):
    a finished example gets EOS with its end label, an unfinished one no EOS and its end label on its last token;
    with ``max_tokens``, only the tokens training reads (the first max_tokens)."""
    rows = []
    for i, ex in enumerate(examples):
        bad = [s for s in ex.spans if s.end > len(ex.response)]
        if bad:
            raise ValueError(
                f"token example {i}: span ({bad[0].start}, {bad[0].end}) ends beyond the response "
                f"({len(ex.response)} characters)"
            )
        ids, labels = spans_to_token_labels(ex.response, ex.spans, rm.tokenizer, add_eos=ex.finished,
                                            max_tokens=max_tokens, unit=unit, end_label=ex.end_label)
        if not ids:
            raise ValueError(f"token example {i}: an unfinished response with no tokens has nothing to score")
        rows.append(_TokenRow(ex.prompt, ids, labels))
    return rows


def _pair_rows(
    rm: TokenRewardModel, pairs: Sequence[PreferencePair], max_tokens: int | None = None
) -> list[_PairRow]:
    """Tokenize preference pairs (EOS appended; with ``max_tokens``, cut to that many)."""
    return [_PairRow(p.prompt, rm.encode_response(p.chosen, max_tokens), rm.encode_response(p.rejected, max_tokens))
            for p in pairs]


def _edit_rows(rm: TokenRewardModel, edits: Sequence[object], max_tokens: int | None = None) -> list[_EditRow]:
    """Tokenize edit triples and project their diff labels onto the RM's tokens (EOS appended, label 0; with
    ``max_tokens``, cut to that many)."""

    return [_EditRow(e.prompt, *edit_token_labels(e.prompt, e.original, e.edited, rm.tokenizer,
                                                  max_tokens=max_tokens),
                     rm.encode_response(e.chosen, max_tokens) if getattr(e, "chosen", None) else None)
            for e in edits]


def _rewards_truncated(
    rm: TokenRewardModel, prompts: list[str], responses: list[list[int]], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rewards with prompt + response cut to max_length (response start and prompt end kept)."""
    responses = [r[: max_length - 1] for r in responses]
    width = max(len(r) for r in responses)
    return rm.token_rewards(prompts, responses, max_prompt_length=max_length - width)


def _pad_labels(labels: list[list[int]], width: int, device: torch.device) -> torch.Tensor:
    """Right-pad label lists (cut to width) with 0."""
    out = torch.zeros(len(labels), width, dtype=torch.long)
    for i, row in enumerate(labels):
        row = row[:width]
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out.to(device)


def _loss(
    rm: TokenRewardModel,
    config: TokenRMConfig,
    token_batch: list[_TokenRow],
    pair_batch: list[_PairRow],
    edit_batch: list[_EditRow] = (),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted BCE + BT + span-BT loss of one step and its statistics."""
    loss = torch.zeros((), device=rm.device)
    stats: dict[str, float] = {}
    if token_batch and config.bce_weight > 0:
        rewards, mask = _rewards_truncated(rm, [r.prompt for r in token_batch], [r.ids for r in token_batch],
                                           config.max_length)
        labels = _pad_labels([r.labels for r in token_batch], rewards.size(1), rm.device)
        bce = token_bce_loss(rewards, labels, mask, config.balance_labels, config.bad_weight)
        loss = loss + config.bce_weight * bce
        if config.anchor_weight > 0:
            anchor = anchor_loss(rewards, labels, mask)
            loss = loss + config.anchor_weight * anchor
            stats["loss/anchor"] = anchor.item()
        labelled = (labels != 0) & mask.bool()
        correct = ((rewards > 0) == (labels > 0)) & labelled
        stats["loss/bce"] = bce.item()
        stats["train/token_accuracy"] = correct.sum().item() / max(int(labelled.sum()), 1)
    if pair_batch and config.bt_weight > 0:
        n = len(pair_batch)
        prompts = [p.prompt for p in pair_batch] * 2
        # Chosen and rejected in one forward pass: rows [0, n) chosen, [n, 2n) rejected.
        rewards, mask = _rewards_truncated(rm, prompts, [p.chosen for p in pair_batch] +
                                           [p.rejected for p in pair_batch], config.max_length)
        bt = summed_bt_loss(rewards[:n], mask[:n], rewards[n:], mask[n:])
        loss = loss + config.bt_weight * bt
        sums = masked_sum(rewards.detach(), mask.float(), -1)
        stats["loss/bt"] = bt.item()
        stats["train/pair_accuracy"] = (sums[:n] > sums[n:]).float().mean().item()
    if edit_batch and (config.span_bt_weight > 0 or config.edit_bt_weight > 0):
        span_bt, margin, edit_bt, pair_margin = _edit_losses(rm, edit_batch, config.max_length)
        if config.span_bt_weight > 0:
            loss = loss + config.span_bt_weight * span_bt
            stats["loss/span_bt"] = span_bt.item()
            stats["train/span_accuracy"] = (margin > 0).float().mean().item()
        if config.edit_bt_weight > 0:
            loss = loss + config.edit_bt_weight * edit_bt
            stats["loss/edit_bt"] = edit_bt.item()
            stats["train/edit_pair_accuracy"] = (pair_margin > 0).float().mean().item()
    stats["loss/total"] = loss.item()
    return loss, stats


def _edit_losses(
    rm: TokenRewardModel, rows: Sequence[_EditRow], max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(span BT, its per-row margins, sequence BT on (chosen, original), its per-row margins) of edit rows.

    Original, edited and any separate chosen responses go through one forward pass; margins are detached.
    """

    n = len(rows)
    extra = [r for r in rows if r.chosen_ids is not None]
    # Rows [0, n) original, [n, 2n) edited, then the separate chosen responses.
    rewards, mask = _rewards_truncated(
        rm, [r.prompt for r in rows] * 2 + [r.prompt for r in extra],
        [r.orig_ids for r in rows] + [r.edit_ids for r in rows] + [r.chosen_ids for r in extra], max_length)
    labels = _pad_labels([r.orig_labels for r in rows] + [r.edit_labels for r in rows], rewards.size(1), rm.device)
    labels = labels * mask[: 2 * n].long()  # labels past a truncated response do not count
    span = span_bt_loss(rewards[n : 2 * n], labels[n:] > 0, rewards[:n], labels[:n] < 0)
    sums = masked_sum(rewards, mask.float(), -1)
    chosen_row = list(range(n, 2 * n))
    for k, i in enumerate(i for i, r in enumerate(rows) if r.chosen_ids is not None):
        chosen_row[i] = 2 * n + k
    pair_margin = sums[chosen_row] - sums[:n]
    edit_bt = -F.logsigmoid(pair_margin).mean()
    with torch.no_grad():
        margin = masked_sum(rewards[n : 2 * n], (labels[n:] > 0).float(), -1) - masked_sum(
            rewards[:n], (labels[:n] < 0).float(), -1)
    return span, margin, edit_bt, pair_margin.detach()


# ---------------------------------------------------------------------- evaluation
def _ratio(num: int, den: int) -> float | None:
    """num / den, or None when undefined."""
    return num / den if den else None


def evaluate_token_reward_model(
    rm: TokenRewardModel,
    token_examples: Sequence[TokenExample] = (),
    pairs: Sequence[PreferencePair] = (),
    batch_size: int = 16,
    edits: Sequence[object] = (),
    label_unit: str = "token",
) -> dict:
    """Token accuracy/precision/recall (sign of r_t vs label, labelled tokens only), pairwise accuracy, and
    for minimal edits (:class:`~tokencredit.rewards.data.EditTriple`) the span accuracy.

    Precision and recall are for the "good" class (+1); ``token_bad_*`` for the "bad" class (-1). Span accuracy
    is the share of edits whose written tokens outscore their removed ones: sum_{E+} r > sum_{O-} r.
    ``label_unit``: how span labels reach tokens, as the model was trained (:class:`TokenRMConfig`).
    """
    tp = fp = fn = tn = 0
    if token_examples:
        rows = _token_rows(rm, token_examples, unit=label_unit)
        scores = rm.score_token_ids([r.prompt for r in rows], [r.ids for r in rows], batch_size)
        threshold = 0.5 if rm.bounded else 0.0  # a bounded reward calls a token good above sigmoid(0)
        pred = np.array([s > threshold for row in scores for s in row])
        gold = np.array([lab for r in rows for lab in r.labels])
        pred, gold = pred[gold != 0], gold[gold != 0] > 0
        tp, fp = int((pred & gold).sum()), int((pred & ~gold).sum())
        fn, tn = int((~pred & gold).sum()), int((~pred & ~gold).sum())
    pair_correct = 0
    if pairs:
        prow = _pair_rows(rm, pairs)
        prompts = [p.prompt for p in prow]
        chosen = rm.score_token_ids(prompts, [p.chosen for p in prow], batch_size)
        rejected = rm.score_token_ids(prompts, [p.rejected for p in prow], batch_size)
        pair_correct = sum(sum(c) > sum(r) for c, r in zip(chosen, rejected))
    span_correct = 0
    if edits:
        erows = _edit_rows(rm, edits)
        prompts = [e.prompt for e in erows]
        orig = rm.score_token_ids(prompts, [e.orig_ids for e in erows], batch_size)
        edit = rm.score_token_ids(prompts, [e.edit_ids for e in erows], batch_size)
        for e, o_r, e_r in zip(erows, orig, edit):
            gained = sum(r for r, lab in zip(e_r, e.edit_labels) if lab > 0)
            lost = sum(r for r, lab in zip(o_r, e.orig_labels) if lab < 0)
            span_correct += gained > lost
    return {
        "token_examples": len(token_examples),
        "labelled_tokens": tp + fp + fn + tn,
        "token_accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "token_precision": _ratio(tp, tp + fp),
        "token_recall": _ratio(tp, tp + fn),
        "token_bad_precision": _ratio(tn, tn + fn),
        "token_bad_recall": _ratio(tn, tn + fp),
        "pairs": len(pairs),
        "pair_accuracy": _ratio(pair_correct, len(pairs)),
        "edits": len(edits),
        "span_accuracy": _ratio(span_correct, len(edits)),
    }


# ---------------------------------------------------------------------- training

def train_token_reward_model(
    rm: TokenRewardModel,
    config: TokenRMConfig,
    token_examples: Sequence[TokenExample] = (),
    pairs: Sequence[PreferencePair] = (),
    edits: Sequence[object] = (),
    run_settings: object | None = None,
) -> list[dict]:
    """Train rm in place on span labels (BCE), preference pairs (summed BT) and/or minimal edits (span BT,
    :class:`~tokencredit.rewards.data.EditTriple`); one dict per step.

    The last entry is ``{"step": ..., "eval": {...}}`` on the held-out split (also ``output_dir/eval.json``);
    the trained model is saved to ``output_dir/model``. ``run_settings``: what config.yaml records (default
    ``config``; a command that claimed the folder passes its own).
    """
    config.validate()
    uses_tokens = bool(token_examples) and config.bce_weight > 0
    uses_pairs = bool(pairs) and config.bt_weight > 0
    uses_edits = bool(edits) and (config.span_bt_weight > 0 or config.edit_bt_weight > 0)
    if not (uses_tokens or uses_pairs or uses_edits):
        raise ValueError(
            "nothing to train on: pass token_examples (with bce_weight > 0), pairs (with bt_weight > 0) "
            "and/or edits (with span_bt_weight or edit_bt_weight > 0)"
        )
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    tok_train, tok_eval = random_split(list(token_examples), config.eval_fraction, rng) if uses_tokens else ([], [])
    pair_train, pair_eval = random_split(list(pairs), config.eval_fraction, rng) if uses_pairs else ([], [])
    edit_train, edit_eval = random_split(list(edits), config.eval_fraction, rng) if uses_edits else ([], [])
    # Training reads the first max_length - 1 tokens of a response (_rewards_truncated): cut to that here, so a
    # huge response is cut before it is tokenized (same ids and labels).
    keep = config.max_length - 1
    tok_rows, pair_rows = _token_rows(rm, tok_train, keep, config.label_unit), _pair_rows(rm, pair_train, keep)
    edit_rows = _edit_rows(rm, edit_train, keep)
    if tok_rows and not any(lab != 0 for r in tok_rows for lab in r.labels):
        log.warning("no token example has a labelled token; the BCE term will be 0")
    if edit_rows and not any(lab != 0 for r in edit_rows for lab in r.orig_labels + r.edit_labels):
        log.warning("no edit changes a token; the span-BT term will be constant")

    rm.to(resolve_device(config.device))
    bs = config.batch_size
    kinds = (tok_rows, pair_rows, edit_rows)
    steps_per_epoch = max(math.ceil(len(rows) / bs) for rows in kinds)

    def epoch_batches(epoch: int) -> Iterator[tuple[list[_TokenRow], list[_PairRow], list[_EditRow]]]:
        orders = [rng.permutation(len(rows)) for rows in kinds]
        for b in range(steps_per_epoch):
            # Each kind is batched on its own; a shorter kind simply runs out earlier in the epoch.
            yield tuple([rows[i] for i in order[b * bs : (b + 1) * bs]] for rows, order in zip(kinds, orders))

    history = fit(rm.model, config, epoch_batches, lambda batch: _loss(rm, config, *batch), steps_per_epoch,
                  "token rm", settings=run_settings)
    step = history[-1]["step"] if history else 0
    out = Path(config.output_dir)
    metrics = evaluate_token_reward_model(rm, tok_eval, pair_eval, batch_size=bs, edits=edit_eval,
                                          label_unit=config.label_unit)
    history.append({"step": step, "eval": metrics})
    if is_main_process():  # rank 0 alone writes under accelerate launch
        atomic_write_json(out / "eval.json", metrics)
        rm.save_pretrained(out / "model")
    return history

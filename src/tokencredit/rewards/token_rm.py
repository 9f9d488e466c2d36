"""Token reward model r_phi(x, y<=t) of TPPO: a backbone with a scalar head read at every response token.

Input layout: the prompt tokenized as the policy sees it (``tokenizer(prompt)``, default special tokens,
left-padded, see :func:`tokencredit.generation.encode_prompts`), then the response tokens, right-padded.
The reward of response token t is the head output AT token t's position, so it has read y<=t. (The PPO
critic reads the position before token t instead: V(s_t) must not see the action it values.)

Training (:func:`train_token_reward_model`) mixes three kinds of labels, each with its own weight:
- token labels (span labels projected to tokens): masked per-token BCE, sigmoid(r_t) vs 1 (good) / 0 (bad);
- sequence preferences: Bradley-Terry on the summed token rewards, -log sigma(sum r(chosen) - sum r(rejected)),
  which spreads a sequence judgement over the tokens;
- minimal edits (FG): span Bradley-Terry, -log sigma(sum_{E+} r(e) - sum_{O-} r(o)) over the tokens the edit
  wrote and the tokens it removed (:func:`tokencredit.rewards.edits.span_bt_loss`). Span BT plus sequence BT
  on each edit's (chosen or edited, original) pair (``edit_bt_weight``) is FG's hybrid loss.
"""

from __future__ import annotations

import copy
import json
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
from tokencredit.generation import encode_prompts, position_ids_from_mask
from tokencredit.masked import masked_mean, masked_sum
from tokencredit.models import (
    LoraSettings,
    ScalarHeadModel,
    apply_chat,
    is_peft,
    load_tokenizer,
    lora_config,
    make_causal,
    resolve_device,
    resolve_model,
    seeded_init,
    wrap_with_lora,
)
from tokencredit.rewards.edits import edit_token_labels, span_bt_loss
from tokencredit.rewards.fit import fit, validate_fit_config
from tokencredit.rewards.labels import (
    LABEL_UNITS,
    end_token_id,
    map_rewards_by_chars,
    overlapping,
    spans_to_token_labels,
    word_spans,
)
from tokencredit.rewards.records import PreferencePair, TokenExample, random_split
from tokencredit.rewards.tokens import RewardFn
from tokencredit.runs import atomic_write_json
from tokencredit.textbounds import head_within
from tokencredit.token_text import prefix_texts

log = logging.getLogger(__name__)


def same_tokenizer(a: object, b: object) -> bool:
    """True when two tokenizers map text to the same ids (same vocabulary)."""
    if a is b:
        return True
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def _add_lora(model: ScalarHeadModel, lora: LoraSettings, seed: int = 0) -> None:
    """Give the backbone fresh LoRA adapters (drawn from ``seed``) in place; then only adapters and head train."""
    config = lora_config(model.backbone, lora)
    # The backbone is a bare transformer (no LM head), so peft must not treat it as a causal LM.
    config.task_type = "FEATURE_EXTRACTION"
    # Wrapping after ScalarHeadModel.__init__ keeps its position_ids check, made on the bare backbone's
    # signature; peft's wrapper forwards position_ids through **kwargs.
    with seeded_init(seed):
        model.backbone = wrap_with_lora(model.backbone, config)
    model.head.requires_grad_(True)


REWARD_INFO = "tokencredit_reward.json"
RAW_PROMPTS = {"chat_template": False}


def read_reward_info(path_or_name: str | Path) -> dict:
    """The ``tokencredit_reward.json`` of a saved reward model ({} for a plain backbone folder)."""
    info = resolve_model(path_or_name) / REWARD_INFO
    if not info.is_file():
        return {}
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{info} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{info} must hold a JSON object")
    return data


def render_for_reward_model(prompts: Sequence[str], prompt_format: dict, tokenizer: object) -> list[str]:
    """Write prompts the way a reward model's training prompts were written (see ``prompt_format``)."""
    if not prompt_format.get("chat_template"):
        return list(prompts)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the reward model was trained on chat-template prompts but its tokenizer has no template")
    return apply_chat(tokenizer, prompts, prompt_format.get("system_prompt"))


class TokenRewardModel:
    """A ScalarHeadModel and its tokenizer, scoring every response token: r_phi(x, y<=t).

    ``bounded`` (PGG): the scored reward is sigmoid(head) in (0, 1) instead of the raw head value. Training
    losses read the raw head through :meth:`token_rewards` either way; the flag is saved with the model.
    """

    # r(x, y<=t): a bidirectional backbone is run causally. SequenceRewardModel reads one score at the last
    # token, which may see everything, and turns this off.
    LOOKS_BACK = True
    KIND = "token"  # recorded in the saved folder's tokencredit_reward.json

    def __init__(self, model: ScalarHeadModel, tokenizer: object, bounded: bool = False) -> None:
        """Wrap a scalar-head model and the tokenizer its ids belong to."""
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the reward model's tokenizer has neither a pad nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        if self.LOOKS_BACK:
            make_causal(model.backbone, "the reward model's backbone")
        self.model = model
        self.tokenizer = tokenizer
        self.bounded = bounded
        # How the prompts it was trained on were written, saved with it so a PPO run can write them the same way:
        # {"chat_template": False} (as given) or {"chat_template": True, "system_prompt": ...} (this tokenizer's
        # chat template, the prompt as the user turn).
        self.prompt_format: dict = dict(RAW_PROMPTS)

    @classmethod
    def from_pretrained(
        cls, path_or_name: str | Path, lora: LoraSettings | None = None, dtype: torch.dtype | str = torch.float32,
        seed: int = 0,
    ) -> TokenRewardModel:
        """Load a saved TokenRewardModel folder, or any backbone (e.g. "smollm2-135m-instruct") with a zero head."""
        model = ScalarHeadModel.from_pretrained(path_or_name, dtype=dtype, causal=cls.LOOKS_BACK)
        info = read_reward_info(path_or_name)
        rm = cls.from_model(model, load_tokenizer(path_or_name), lora=lora, bounded=bool(info.get("bounded", False)),
                            seed=seed)
        rm.prompt_format = dict(info.get("prompt_format") or RAW_PROMPTS)
        return rm

    @classmethod
    def from_model(
        cls, model: ScalarHeadModel, tokenizer: object, lora: LoraSettings | None = None, bounded: bool = False,
        seed: int = 0,
    ) -> TokenRewardModel:
        """Wrap an in-memory ScalarHeadModel, optionally adding LoRA adapters (drawn from ``seed``)."""
        if lora is not None:
            _add_lora(model, lora, seed)
        return cls(model, tokenizer, bounded=bounded)

    def save_pretrained(self, path: str | Path) -> None:
        """Write backbone, head and tokenizer; LoRA adapters are merged into a copy so the folder is plain."""
        model = self.model
        if is_peft(model.backbone):
            # Merge a copy: the live model keeps its adapters, so training (and its optimiser) can go on.
            merged = ScalarHeadModel.from_backbone(copy.deepcopy(model.backbone).merge_and_unload())
            merged.head.load_state_dict(model.head.state_dict())
            model = merged
        model.save_pretrained(path, tokenizer=self.tokenizer)
        info = {"kind": self.KIND if not self.bounded else "pgg", "bounded": self.bounded,
                "prompt_format": self.prompt_format}
        (Path(path) / REWARD_INFO).write_text(json.dumps(info, indent=1) + "\n")

    @property
    def device(self) -> torch.device:
        """Device of the model."""
        return self.model.device

    def to(self, device: str | torch.device) -> TokenRewardModel:
        """Move the model to a device; returns self."""
        self.model.to(device)
        return self

    # ------------------------------------------------------------------ scoring
    def token_rewards(
        self,
        prompts: Sequence[str],
        response_token_ids: Sequence[Sequence[int]],
        max_prompt_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable rewards [B, T] at every response token and the response mask [B, T]."""
        if len(prompts) != len(response_token_ids):
            raise ValueError(f"{len(prompts)} prompts but {len(response_token_ids)} responses")
        device = self.device
        width = max((len(r) for r in response_token_ids), default=0)
        limit = getattr(self.model.backbone.config, "max_position_embeddings", None)
        if limit:
            # Past the backbone's positions there are no embeddings: prompts lose their start to fit.
            if width >= limit:
                raise ValueError(f"a response of {width} tokens does not fit the reward model's {limit} positions")
            max_prompt_length = min(max_prompt_length or limit, limit - width)
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, max_prompt_length, device)
        resp = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        resp_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, ids in enumerate(response_token_ids):
            resp[i, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
            resp_mask[i, : len(ids)] = 1
        resp, resp_mask = resp.to(device), resp_mask.to(device)
        if width == 0:
            return torch.zeros(len(prompts), 0, device=device), resp_mask
        ids = torch.cat([prompt_ids, resp], 1)
        attn = torch.cat([prompt_mask, resp_mask], 1)
        scores = self.model(ids, attn, position_ids_from_mask(attn))
        # Position P + t holds token t itself: the reward has read y<=t.
        return scores[:, prompt_ids.size(1) :], resp_mask

    def check_tokenizer(self, policy_tokenizer: object) -> None:
        """Raise ValueError when the policy's tokenizer differs from the reward model's."""
        if not same_tokenizer(self.tokenizer, policy_tokenizer):
            raise ValueError(
                f"The reward model's tokenizer (vocab {len(self.tokenizer)}) differs from the policy's "
                f"(vocab {len(policy_tokenizer)}); token ids cannot be scored as given. Use a reward model "
                "trained on the policy's backbone family, or score_for_policy / as_reward_fn(policy_tokenizer=...) "
                "to map rewards through characters."
            )

    def _check_ids(self, response_token_ids: Sequence[Sequence[int]]) -> None:
        """Ids outside the embedding table mean the ids come from another tokenizer."""
        limit = self.model.backbone.get_input_embeddings().num_embeddings
        for i, ids in enumerate(response_token_ids):
            bad = [t for t in ids if not 0 <= int(t) < limit]
            if bad:
                raise ValueError(
                    f"response {i}: token id {bad[0]} is outside the reward model's vocabulary ({limit}); "
                    "the policy uses a different tokenizer: pass policy_tokenizer= to as_reward_fn to map rewards"
                )

    @torch.no_grad()
    def score_token_ids(
        self,
        prompts: Sequence[str],
        response_token_ids: Sequence[Sequence[int]],
        batch_size: int = 16,
        policy_tokenizer: object | None = None,
    ) -> list[list[float]]:
        """Reward of every given response token (ids used as given, so same tokenizer as the policy);
        sigmoid of the head for a bounded (PGG) model."""
        if len(prompts) != len(response_token_ids):
            raise ValueError(f"{len(prompts)} prompts but {len(response_token_ids)} responses")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if policy_tokenizer is not None:
            self.check_tokenizer(policy_tokenizer)
        self._check_ids(response_token_ids)
        out: list[list[float]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompts), batch_size):
                batch_ids = [list(r) for r in response_token_ids[start : start + batch_size]]
                rewards, _ = self.token_rewards(list(prompts[start : start + batch_size]), batch_ids)
                if self.bounded:
                    rewards = torch.sigmoid(rewards)
                rows = rewards.float().cpu().tolist()
                out.extend(row[: len(ids)] for row, ids in zip(rows, batch_ids))
        finally:
            self.model.train(was_training)
        return out

    def score_for_policy(
        self,
        prompts: Sequence[str],
        policy_token_ids: Sequence[Sequence[int]],
        policy_tokenizer: object,
        batch_size: int = 16,
    ) -> list[list[float]]:
        """Token rewards for another tokenizer's tokens, causal: policy token t's reward reads x and y<=t only.

        The text of y<=t decoded on its own (:func:`~tokencredit.token_text.prefix_texts`) is tokenized by the
        RM and scored, and t gets the mean reward of the RM tokens holding characters that t adds
        (:func:`~tokencredit.rewards.labels.map_rewards_by_chars`): neither a merge with characters after t nor
        the number of pieces a word is cut into changes it. A token that adds no character an RM token holds (a
        byte piece of a character, a skipped special token, whitespace a WordPiece RM drops) carries the reward
        of the token before it; the first token of a response then gets the RM's reward at the prompt's last
        token. The RM's end token is appended only when the response ends with one of the policy's end tokens
        (:func:`end_ids`), whose reward it becomes. A bounded RM's rewards stay in (0, 1). Every prefix is one
        more sequence to score, batched ``batch_size`` at a time; for a causal RM a prefix whose RM tokens begin
        a longer scored sequence of the same prompt is read off that sequence.
        """
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("mapping rewards across tokenizers needs a fast reward-model tokenizer (offsets)")
        if len(prompts) != len(policy_token_ids):
            raise ValueError(f"{len(prompts)} prompts but {len(policy_token_ids)} responses")
        policy_ends, rm_end = end_ids(policy_tokenizer), end_token_id(self.tokenizer)
        views = []  # (row, t, text of y<=t, characters t adds, ended) of each token with something to score
        for row, ids in enumerate(policy_token_ids):
            ids = [int(i) for i in ids]
            for t, (text, new) in enumerate(prefix_texts(ids, policy_tokenizer)):
                if t == len(ids) - 1 and ids[t] in policy_ends:
                    views.append((row, t, text, (len(text), len(text)), True))
                elif new < len(text):
                    views.append((row, t, text, (new, len(text)), False))
        enc = (self.tokenizer([v[2] for v in views], add_special_tokens=False, return_offsets_mapping=True)
               if views else {"input_ids": [], "offset_mapping": []})
        jobs = {}  # (row, t) -> (prompt, RM ids to score, their spans, characters t adds)
        for (row, t, _, target, ended), rm_ids, offsets in zip(views, enc["input_ids"], enc["offset_mapping"]):
            rm_ids, spans = list(rm_ids), [tuple(o) for o in offsets]
            if ended:
                rm_ids.append(rm_end)
                spans.append(target)  # empty, at the end of the text: it meets only the policy's end token
            hits = overlapping(spans, target)
            if hits:
                # A causal RM's reward at RM token j reads RM tokens <= j only: what follows the last one needed is
                # not scored, so the sequence can be the start of a longer one.
                cut = max(hits) + 1 if self.LOOKS_BACK else len(rm_ids)
                jobs[(row, t)] = (prompts[row], tuple(rm_ids[:cut]), spans[:cut], target)
        sequences, serves = _sequences_to_score([(p, ids) for p, ids, _, _ in jobs.values()], self.LOOKS_BACK)
        order = sorted(range(len(sequences)), key=lambda k: len(sequences[k][1]))  # like lengths batch together
        scored = self.score_token_ids([sequences[k][0] for k in order], [list(sequences[k][1]) for k in order],
                                      batch_size)
        rewards = dict(zip(order, scored))
        values = {key: map_rewards_by_chars(spans, rewards[k][: len(spans)], [target])[0]
                  for (key, (_, _, spans, target)), k in zip(jobs.items(), serves)}
        first = sorted({prompts[row] for row, ids in enumerate(policy_token_ids) if len(ids) and (row, 0) not in jobs})
        starts = dict(zip(first, _prompt_end_rewards(self, first, batch_size)))
        out = []
        for row, ids in enumerate(policy_token_ids):
            value, line = starts.get(prompts[row]), []
            for t in range(len(ids)):
                value = values.get((row, t), value)
                line.append(value)
            out.append(line)
        return out

    def encode_response(self, response: str, max_tokens: int | None = None) -> list[int]:
        """Response token ids as the reward model reads a text response: no special tokens, then EOS; with
        ``max_tokens``, the first ``max_tokens`` of them (a huge text is cut before it is tokenized)."""
        if max_tokens is not None:
            response = head_within(self.tokenizer, response, max_tokens)
        ids = list(self.tokenizer(response, add_special_tokens=False)["input_ids"]) + [end_token_id(self.tokenizer)]
        return ids if max_tokens is None else ids[: max(max_tokens, 0)]

    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16) -> list[list[float]]:
        """Reward of every token of text responses, tokenized by the RM with EOS appended."""
        return self.score_token_ids(prompts, [self.encode_response(r) for r in responses], batch_size)

    def as_reward_fn(
        self,
        kind: Literal["token", "sequence"] = "token",
        scale: float = 1.0,
        policy_tokenizer: object | None = None,
        batch_size: int = 16,
        center: float = 0.0,
        eos: Literal["keep", "zero"] = "keep",
        length_norm: None = None,
        unfinished: float = 0.0,
        repeats: Literal["keep", "clip", "clip_words"] = "keep",
    ) -> RewardFn:
        """A PPO reward_fn: per-token rewards ("token", TPPO) or their sum per response ("sequence").

        Causal in every option and path (a policy with another tokenizer included, :meth:`score_for_policy`):
        token t's reward reads the prompt and y<=t only, so tokens sampled after t never change it.

        Length control (docs/tppo.md): ``center`` is subtracted from every token's reward, so that a response
        earns or loses nothing merely by having more tokens (pass the mean token reward of samples from the
        starting policy, :func:`mean_token_reward`); ``eos="zero"`` gives the end-of-sequence token reward 0,
        because word labels never reach it and Bradley-Terry on summed rewards makes it carry the length
        preference. A zeroed EOS is not centred. ``unfinished`` is added to the last token of a response cut at
        the length limit without an end token: with a negative end-token reward, running to the limit otherwise
        escapes the cost of ending (pass the mean end-token reward of the samples, e.g. from ``credit_profile``).
        Whether a response was cut is known only at its last step, but that is the step that ran into the limit,
        so the charge lands on the action that incurred it and no earlier token's reward changes.
        ``repeats="clip"``: a token that repeats an earlier token of the same response gets at most 0 — summed
        token rewards are additive, so without it a word the model likes earns its reward again every time it is
        repeated (TREC and AOL: PPO queries became "hospital hospital hospital ..."). ``"clip_words"`` does the
        same for a token whose word, as it stands in the text of y<=t, equals an earlier word of that text
        (lower case, without surrounding punctuation, so "Civil" and " civil," repeat although their token ids
        differ; :func:`repeated_words`). ``length_norm`` was removed: it multiplied every token's reward by
        L / the final length, so a token's reward depended on how many tokens came after it; only None is taken.
        """
        if length_norm is not None:
            raise ValueError(
                f"length_norm was removed (got {length_norm!r}): scaling every token's reward by L / the response's "
                "final length made it depend on tokens sampled after it. Use center= (mean_token_reward) to make "
                "length reward-neutral, and leave length_norm out"
            )
        if kind not in ("token", "sequence"):
            raise ValueError(f"kind must be 'token' or 'sequence' (got {kind!r})")
        if eos not in ("keep", "zero"):
            raise ValueError(f"eos must be 'keep' or 'zero' (got {eos!r})")
        if repeats not in ("keep", "clip", "clip_words"):
            raise ValueError(f"repeats must be 'keep', 'clip' or 'clip_words' (got {repeats!r})")
        cross = policy_tokenizer is not None and not same_tokenizer(self.tokenizer, policy_tokenizer)
        # response_token_ids are the policy's ids whichever tokenizer scores them
        response_tokenizer = policy_tokenizer if policy_tokenizer is not None else self.tokenizer
        ends = end_ids(response_tokenizer)

        def reward_fn(prompts: list[str], responses: list[str], response_token_ids: list[list[int]]) -> list:
            """Score the sampled token ids with the token reward model."""
            if cross:
                rows = self.score_for_policy(prompts, response_token_ids, policy_tokenizer, batch_size)
            else:
                rows = self.score_token_ids(prompts, response_token_ids, batch_size)
            rows = [adjust_token_rewards(row, ids, center, eos == "zero", ends, unfinished,
                                         clip_repeats=repeats != "keep",
                                         repeated=(repeated_words(ids, response_tokenizer, ends)
                                                   if repeats == "clip_words" else None))
                    for row, ids in zip(rows, response_token_ids)]
            if kind == "sequence":
                return [scale * sum(row) for row in rows]
            return [[scale * r for r in row] for row in rows]

        return reward_fn


def _sequences_to_score(
    items: Sequence[tuple[str, tuple[int, ...]]], prefixes: bool
) -> tuple[list[tuple[str, tuple[int, ...]]], list[int]]:
    """The (prompt, ids) sequences to score for these and, per item, the one serving it: equal items share one,
    and with ``prefixes`` (a causal RM) an item that begins a longer sequence of the same prompt is read off it."""
    chosen: list[tuple[str, tuple[int, ...]]] = []
    serves = [0] * len(items)
    found: dict = {}  # exact items, or with prefixes per prompt a trie of token ids whose nodes name a sequence
    for i in sorted(range(len(items)), key=lambda i: -len(items[i][1])):
        prompt, ids = items[i]
        if not prefixes:
            serves[i] = found.setdefault((prompt, ids), len(chosen))
            if serves[i] == len(chosen):
                chosen.append((prompt, ids))
            continue
        node, known = found.setdefault(prompt, {}), True
        for token in ids:
            known = known and token in node
            node = node.setdefault(token, {})
            node.setdefault(None, len(chosen))
        serves[i] = node[None]
        if not known:
            chosen.append((prompt, ids))
    return chosen, serves


@torch.no_grad()
def _prompt_end_rewards(rm: TokenRewardModel, prompts: Sequence[str], batch_size: int) -> list[float]:
    """The RM's reward at each prompt's last token, before any response token (sigmoid for a bounded RM; the
    neutral 0 or 0.5 for a prompt with no tokens)."""
    neutral = 0.5 if rm.bounded else 0.0
    limit = getattr(rm.model.backbone.config, "max_position_embeddings", None)
    out: list[float] = []
    was_training = rm.model.training
    rm.model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            ids, mask = encode_prompts(rm.tokenizer, list(prompts[start : start + batch_size]), limit, rm.device)
            if ids.size(1) == 0:
                out.extend([neutral] * ids.size(0))
                continue
            scores = rm.model(ids, mask, position_ids_from_mask(mask))[:, -1]  # left-padded: the last prompt token
            if rm.bounded:
                scores = torch.sigmoid(scores)
            out.extend(s if real else neutral for s, real in zip(scores.float().cpu().tolist(), mask[:, -1].tolist()))
    finally:
        rm.model.train(was_training)
    return out


def end_ids(tokenizer: object) -> frozenset[int]:
    """Token ids that end a response for this tokenizer (EOS, or SEP for encoders)."""
    ids = {getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "sep_token_id", None)}
    return frozenset(int(i) for i in ids if i is not None)


def adjust_token_rewards(row: Sequence[float], ids: Sequence[int], center: float = 0.0, zero_eos: bool = False,
                         ends: frozenset[int] = frozenset(), unfinished: float = 0.0, clip_repeats: bool = False,
                         repeated: Sequence[bool] | None = None) -> list[float]:
    """One response's token rewards after length control: ``center`` subtracted from each, at most 0 for a token
    repeating an earlier one of the response when ``clip_repeats`` (end tokens aside; ``repeated`` marks the
    repeats instead when given, e.g. :func:`repeated_words`), a final end token's reward set to 0 when
    ``zero_eos``, and ``unfinished`` added to the last token of a response without a final end token (cut at the
    length limit: known only at that last step, the one that ran into the limit). Token t's result reads
    ``row[t]`` and ids up to t only, that last-step charge aside."""
    out = [r - center for r in row]
    if clip_repeats:
        if repeated is None:
            repeated = _repeated_ids(ids, ends)
        for i, again in enumerate(repeated[: len(out)]):
            if again:
                out[i] = min(out[i], 0.0)
    finished = bool(out) and bool(ids) and int(ids[len(out) - 1]) in ends
    if zero_eos and finished:
        out[-1] = 0.0
    if unfinished and out and not finished:
        out[-1] += unfinished
    return out


def _repeated_ids(ids: Sequence[int], ends: frozenset[int]) -> list[bool]:
    """Whether each token id occurred earlier in the response (end tokens never count)."""
    seen: set[int] = set()
    out = []
    for token in (int(t) for t in ids):
        out.append(token in seen and token not in ends)
        seen.add(token)
    return out


def repeated_words(ids: Sequence[int], tokenizer: object, ends: frozenset[int] = frozenset()) -> list[bool]:
    """Whether each token adds characters to a word that repeats an earlier word, judged causally on the text of
    y<=t alone (:func:`~tokencredit.token_text.prefix_texts`): words as the labelers see them
    (:func:`~tokencredit.rewards.labels.word_spans`, so punctuation alone is never a word), compared in lower
    case, as they stand in that prefix. So a word split over tokens is marked from the token that makes it equal
    an earlier word: "civil civ" does not repeat "civil" yet, "civil civil" does even if "ian" comes next, and a
    longer word's first pieces ("Sco" of a second "Scooterama") are not marked. A token that adds no characters
    (a byte piece, an end token) is never marked."""
    marks = []
    for token, (text, new) in zip(ids, prefix_texts(ids, tokenizer)):
        again = False
        if int(token) not in ends and new < len(text):
            seen: set[str] = set()
            for _, end, word in word_spans(text):
                if end > new and word.lower() in seen:  # a word holding characters this token adds
                    again = True
                    break
                seen.add(word.lower())
        marks.append(again)
    return marks


def mean_token_reward(rm: TokenRewardModel, prompts: Sequence[str], response_token_ids: Sequence[Sequence[int]],
                      exclude_eos: bool = False, batch_size: int = 16,
                      rewards: Sequence[Sequence[float]] | None = None) -> float:
    """The mean reward per token the model gives these responses (e.g. the starting policy's samples): the
    ``center`` that makes length reward-neutral on them. ``rewards``: their scores, if already computed."""
    ends = end_ids(rm.tokenizer)
    total, count = 0.0, 0
    if rewards is None:
        rewards = rm.score_token_ids(prompts, response_token_ids, batch_size)
    for row, ids in zip(rewards, response_token_ids):
        keep = len(row) - 1 if exclude_eos and row and int(ids[len(row) - 1]) in ends else len(row)
        total += sum(row[:keep])
        count += keep
    if count == 0:
        raise ValueError("no tokens to average: pass at least one non-empty response")
    return total / count


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

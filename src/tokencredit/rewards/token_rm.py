"""Token reward model r_phi(x, y<=t) of TPPO: a backbone with a scalar head read at every response token.

Input layout: the prompt tokenized as the policy sees it (``tokenizer(prompt)``, default special tokens,
left-padded, see :func:`tokencredit.generation.encode_prompts`), then the response tokens, right-padded.
The reward of response token t is the head output AT token t's position, so it has read y<=t. (The PPO
critic reads the position before token t instead: V(s_t) must not see the action it values.)

Training (:mod:`tokencredit.rewards.token_rm_training`) mixes three kinds of labels, each with its own weight:
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
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from tokencredit.generation import encode_prompts, position_ids_from_mask
from tokencredit.models import (
    LoraSettings,
    ScalarHeadModel,
    apply_chat,
    is_peft,
    load_tokenizer,
    lora_config,
    make_causal,
    resolve_model,
    seeded_init,
    wrap_with_lora,
)
from tokencredit.rewards.labels import (
    end_token_id,
    map_rewards_by_chars,
    overlapping,
    word_spans,
)
from tokencredit.rewards.tokens import RewardFn
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

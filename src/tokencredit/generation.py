"""Batched sampling with a KV cache, left-padded prompts, stop strings and a logits-processor hook."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from tokencredit.textbounds import tail_within

# A logits processor follows the transformers signature: (sequence so far [B, L], scores [B, V]) -> scores.
# The sequence holds the left-padded prompt followed by the tokens generated so far, so a processor can
# force a roll-in prefix (RLGF) by masking every other token to -inf.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GenerationOutput:
    """Prompts and sampled responses of one batch; shapes are [B, P] for prompts and [B, T] for responses."""

    prompt_ids: torch.Tensor
    """[B, P] prompt token ids, left-padded."""
    prompt_mask: torch.Tensor
    """[B, P] 1 on prompt tokens, 0 on left padding."""
    response_ids: torch.Tensor
    """[B, T] generated token ids, right-padded with the pad id. Includes the EOS token or the token that
    completed a stop string, so a policy can learn to stop."""
    response_mask: torch.Tensor
    """[B, T] 1 on generated tokens, 0 on padding."""
    logprobs: torch.Tensor
    """[B, T] log-probability of each sampled token under the distribution it was drawn from (after
    processors, temperature, top-k and top-p); 0 on padding."""
    texts: list[str]
    """Decoded responses without special tokens, cut before a stop string (as chat APIs do)."""
    finished: torch.Tensor
    """[B] True where the response ended with EOS or a stop string, False where it hit max_new_tokens."""

    def token_ids(self) -> list[list[int]]:
        """Response token ids per row, padding removed."""
        lengths = self.response_mask.sum(-1).tolist()
        return [row[: int(n)].tolist() for row, n in zip(self.response_ids, lengths)]


def encode_prompts(
    tokenizer: object, prompts: Sequence[str], max_length: int | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize prompts left-padded; over-long prompts lose their beginning, keeping the most recent text."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    if max_length is not None:
        # Only the last max_length tokens are kept: a huge prompt is cut to a bounded end first (same tokens).
        prompts = [tail_within(tokenizer, p, max_length) for p in prompts]
    old_pad, old_trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    try:
        enc = tokenizer(
            list(prompts),
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        )
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old_pad, old_trunc
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if max_length is not None and ids.size(1) > max_length:
        # A limit below the tokenizer's own special tokens (e.g. BERT's [CLS] ... [SEP]) makes it skip
        # truncation with only a warning; cut the left-padded rows here so the limit always holds.
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (got {max_length})")
        ids, mask = ids[:, -max_length:], mask[:, -max_length:]
    return ids.to(device), mask.to(device)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift a prompt's positions."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def filter_logits(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits outside the top-k set and outside the smallest nucleus holding top_p of the mass."""
    if top_k and top_k < scores.size(-1):
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the best token always stays.
        drop_sorted = (cum - sorted_scores.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def _ends_with_stop(tokenizer: object, rows: torch.Tensor, lengths: torch.Tensor, stops: Sequence[str],
                    tail_tokens: int) -> list[bool]:
    """Whether each row's recent tokens contain a stop string (only the tail is decoded, to stay cheap)."""
    out = []
    for row, n in zip(rows.tolist(), lengths.tolist()):
        tail = tokenizer.decode(row[max(0, n - tail_tokens): n], skip_special_tokens=True)
        out.append(any(s in tail for s in stops))
    return out


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """Text before the first stop string."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def check_sampling_args(temperature: float, greedy: bool, max_new_tokens: int) -> None:
    """Raise ValueError for a temperature or length no sampler can honour."""
    if temperature <= 0 and not greedy:
        raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy=True for argmax decoding")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")


def sample_next(
    scores: torch.Tensor, *, greedy: bool, temperature: float, top_k: int, top_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from float scores [B, V]; return it and its log-prob under the sampled distribution."""
    if greedy:
        tok = scores.argmax(-1)
        return tok, scores.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
    logprobs_all = filter_logits(scores / temperature, top_k, top_p).log_softmax(-1)
    # Inverse-CDF sampling: one uniform per row. torch.multinomial draws an exponential for every vocabulary entry
    # (49k per row for SmolLM2), which was 10% of a CPU decode step. v is in (0, total], so the first index whose
    # cumulative mass reaches v always has non-zero probability: filtered tokens are never drawn.
    cdf = logprobs_all.exp().cumsum(-1)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    tok = torch.searchsorted(cdf, (1.0 - u) * cdf[:, -1:]).clamp_(max=cdf.size(-1) - 1).squeeze(-1)
    return tok, logprobs_all.gather(-1, tok[:, None]).squeeze(-1)


class Decoder(Protocol):
    """What the sampling loop needs from a model: prefill prompts, then feed one token per row at a time."""

    sync_every: int  # steps between reads of "is any row still going?" back to the host

    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Process left-padded prompts; return the logits [B, V] for the first response token."""

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token [B] per row; return the logits [B, V] for the next one."""


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword for a KV cache: ``cache`` where transformers renamed ``past_key_values`` (5.2x, which
    warns on the old name), else ``past_key_values``. A peft wrapper is looked through to its base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: object) -> object:
    """The KV cache a forward pass returned, under its new or old name, without the deprecation warning."""
    keys = out.keys() if hasattr(out, "keys") else ()
    return out["cache"] if "cache" in keys else out["past_key_values"]


class HFDecoder:
    """The plain path: any transformers causal LM with its own (dynamic) KV cache."""

    sync_every = 1

    def __init__(self, model: nn.Module) -> None:
        """Wrap a causal LM."""
        self.model = model
        self.mask: torch.Tensor | None = None
        self.past: object = None
        self.cache_keyword = cache_keyword(model)

    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Run the prompts through the model, keeping its cache."""
        self.mask = prompt_mask.clone()
        # Only the last position's logits are needed: the LM head over every prompt position is wasted work.
        out = self.model(input_ids=prompt_ids, attention_mask=self.mask,
                         position_ids=position_ids_from_mask(self.mask), use_cache=True, logits_to_keep=1)
        self.past = output_cache(out)
        return out.logits[:, -1, :]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row through the cached model."""
        self.mask = torch.cat([self.mask, torch.ones_like(token[:, None])], 1)
        pos = (self.mask.sum(-1, keepdim=True) - 1).clamp(min=0)
        out = self.model(input_ids=token[:, None], attention_mask=self.mask, position_ids=pos,
                         use_cache=True, **{self.cache_keyword: self.past})
        self.past = output_cache(out)
        return out.logits[:, -1, :]


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: object,
    prompts: Sequence[str] | None = None,
    *,
    prompt_ids: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    stop_strings: Sequence[str] = (),
    logits_processors: Sequence[LogitsProcessor] = (),
    max_prompt_length: int | None = None,
    generator: torch.Generator | None = None,
    decoder: Decoder | None = None,
) -> GenerationOutput:
    """Sample responses for a batch of prompts with a KV cache; stops on EOS and on stop strings.

    `decoder` runs the model (default: `HFDecoder`, transformers' own cache); pass a
    `tokencredit.fastdecode.StaticKVDecoder` for the static-cache / CUDA-graph path. Both draw from the same
    generator in the same order, so on CPU they sample the same tokens.
    """
    check_sampling_args(temperature, greedy, max_new_tokens)
    device = next(model.parameters()).device
    if prompt_ids is None:
        if prompts is None:
            raise ValueError("pass prompts or prompt_ids")
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, max_prompt_length, device)
    elif prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

    eos_list = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_list[0]
    stops = [s for s in stop_strings if s]
    # Each token decodes to at least one character in practice, so this many tokens cover any stop string.
    tail_tokens = max((len(s) for s in stops), default=0) + 2
    if decoder is None:
        decoder = HFDecoder(model)
    # Stop strings are matched on the host after every token, so they need a read-back each step anyway.
    sync_every = 1 if stops else max(1, decoder.sync_every)

    was_training = model.training
    model.eval()
    bsz = prompt_ids.size(0)
    alive = torch.ones(bsz, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    logps: list[torch.Tensor] = []
    alive_steps: list[torch.Tensor] = []
    eos_tensor = torch.tensor(eos_list, device=device)
    pad_tensor = torch.full((bsz,), pad_id, dtype=torch.long, device=device)
    try:
        next_logits = decoder.start(prompt_ids, prompt_mask, max_new_tokens)
        for step in range(max_new_tokens):
            scores = next_logits.float()
            if logits_processors:
                seq = torch.cat([prompt_ids, torch.stack(tokens, 1)], 1) if tokens else prompt_ids
                for proc in logits_processors:
                    scores = proc(seq, scores)
            tok, logp = sample_next(scores, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                                    generator=generator)
            tok = torch.where(alive, tok, pad_tensor)
            tokens.append(tok)
            logps.append(torch.where(alive, logp, torch.zeros_like(logp)))
            alive_steps.append(alive)
            alive = alive & ~torch.isin(tok, eos_tensor)
            if stops and bool(alive.any()):
                resp = torch.stack(tokens, 1)
                lengths = torch.stack(alive_steps, 1).sum(-1)
                hit = _ends_with_stop(tokenizer, resp, lengths, stops, tail_tokens)
                alive = alive & ~torch.tensor(hit, device=device)
            if step == max_new_tokens - 1:
                break
            if (step + 1) % sync_every == 0 and not bool(alive.any()):
                break
            next_logits = decoder.step(tok)
    finally:
        model.train(was_training)

    return _assemble(tokenizer, prompt_ids, prompt_mask, tokens, logps, alive_steps, alive, stops)


def _assemble(tokenizer: object, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: list[torch.Tensor],
              logps: list[torch.Tensor], alive_steps: list[torch.Tensor], alive: torch.Tensor,
              stops: list[str]) -> GenerationOutput:
    """The sampled steps as one batch: response ids, mask, log-probs and texts (cut at a stop string)."""
    response_mask = torch.stack(alive_steps, 1)
    # A decoder that reads "any row alive?" only every few steps may run past the end: drop columns where no
    # row was generating (a no-op for the plain path, which stops at once).
    width = int(response_mask.any(0).nonzero().max()) + 1
    response_ids = torch.stack(tokens, 1)[:, :width]
    response_mask = response_mask[:, :width].long()
    logprobs = torch.stack(logps, 1)[:, :width]
    texts = tokenizer.batch_decode(
        [row[: int(n)] for row, n in zip(response_ids.tolist(), response_mask.sum(-1).tolist())],
        skip_special_tokens=True,
    )
    if stops:
        texts = [cut_at_stop(t, stops) for t in texts]
    return GenerationOutput(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=logprobs,
        texts=texts,
        finished=~alive,
    )


def eos_ids(model: nn.Module, tokenizer: object) -> list[int]:
    """All ids that end a response: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        extra = [extra]
    for i in extra or []:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an EOS token; set tokenizer.eos_token")
    return ids

"""The rollout batch every trainer consumes, and the forward passes that score it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from tokencredit.generation import position_ids_from_mask


@dataclass
class RolloutBatch:
    """One batch of sampled responses with everything PPO needs. B rows, P prompt and T response tokens.

    Prompts are left-padded and responses right-padded, so `cat(prompt, response)` is one causal sequence.
    """

    prompt_ids: torch.Tensor  # [B, P] long
    prompt_mask: torch.Tensor  # [B, P] 1 = real token
    response_ids: torch.Tensor  # [B, T] long
    response_mask: torch.Tensor  # [B, T] 1 = generated token (incl. EOS)
    train_mask: torch.Tensor  # [B, T] 1 = token the policy loss trains on (RLGF roll-ins are 0)
    logprobs: torch.Tensor  # [B, T] policy log-probs at rollout time (recomputed by a forward pass)
    ref_logprobs: torch.Tensor  # [B, T] reference log-probs
    values: torch.Tensor  # [B, T] critic values V(s_t) before token t
    scores: torch.Tensor  # [B, T] TokenRewards from the reward source, without KL
    rewards: torch.Tensor  # [B, T] scores minus the KL penalty (when KL is in the reward)
    advantages: torch.Tensor  # [B, T]
    returns: torch.Tensor  # [B, T]
    row_index: torch.Tensor  # [B] index of each row's prompt in the trainer's prompt list
    guide_value_mask: torch.Tensor | None = None  # [B, T] 1 = a guide roll-out token, valued by the guide critic

    def __len__(self) -> int:
        """Number of rows."""
        return self.prompt_ids.size(0)

    def select(self, idx: torch.Tensor) -> RolloutBatch:
        """Rows idx of every field."""
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)
                                if getattr(self, f.name) is not None})

    def input_ids(self) -> torch.Tensor:
        """[B, P+T] prompt followed by response."""
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    def attention_mask(self) -> torch.Tensor:
        """[B, P+T] attention over real prompt and response tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], 1)


def response_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int
) -> torch.Tensor:
    """Logits [B, T, V] that predict each of the last response_len tokens of the sequences."""
    length = input_ids.size(1)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        # Only the positions that predict response tokens need the (vocab-sized) LM head. Given as indices, not
        # a count: a count makes the model slice a non-contiguous view of the hidden states, and when the LM head
        # weight does not require grad (a frozen reference, a LoRA base, inference) torch's matmul then takes its
        # batched path and copies the whole [vocab, hidden] weight once per row (5x slower forward, measured).
        logits_to_keep=torch.arange(length - response_len - 1, length, device=input_ids.device),
        use_cache=False,
    )
    return out.logits[:, :-1, :]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   chunk_rows: int = 4096) -> torch.Tensor:
    """Log-probability [B, T] of tokens under softmax(logits / temperature).

    Computed as logit(token) - logsumexp(logits) over chunks of rows, so a float32 copy of the whole [B, T, V]
    logits (0.8 GB for 64 x 64 tokens of a 49k vocabulary) never exists. Under autograd the chunks are kept
    anyway, so chunking applies only when no gradient is needed.
    """
    flat = logits.reshape(-1, logits.size(-1))
    flat_tokens = tokens.reshape(-1, 1)
    size = flat.size(0) if torch.is_grad_enabled() and logits.requires_grad else chunk_rows
    parts = []
    for rows, toks in zip(flat.split(size), flat_tokens.split(size)):
        rows = rows.float()
        if temperature != 1.0:
            rows = rows / temperature
        parts.append(rows.gather(-1, toks).squeeze(-1) - torch.logsumexp(rows, -1))
    return torch.cat(parts).reshape(tokens.shape)


def response_values(
    critic: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int
) -> torch.Tensor:
    """Critic values [B, T]: the value at the position before each response token, i.e. V(s_t)."""
    values = critic(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask))
    return values[:, -response_len - 1 : -1].float()

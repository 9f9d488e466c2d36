"""Fast decoding for Llama-family causal LMs: a preallocated KV cache and, on CUDA, one captured graph per step.

transformers' own static-cache + compiled `generate` path has crashed for us on GPU (CUDA-graph output
overwritten), so tokencredit owns this loop. `StaticKVDecoder` runs the model's own modules (embeddings,
norms, projections, rotary embedding, LM head — LoRA layers included, since peft wraps the projections in
place) but does the attention and cache bookkeeping itself:

- the cache is one [B, kv_heads, L, head_dim] tensor per layer, allocated once per (batch, length bucket)
  and reused across calls, so a PPO run allocates it once;
- a decode step reads only device tensors (the token, the slot, the key mask), so on CUDA the whole step —
  30 layers, a few hundred kernels — is captured once as a graph and replayed with one launch;
- prompt lengths are bucketed (cache length rounded up) so batches of different prompt lengths reuse the
  same graph.

The sampling loop itself (temperature, top-k/p, EOS, stop strings, logits processors) is shared with the plain
path in `tokencredit.generation.generate`; `tests/test_fastdecode.py` checks that both give the same logits,
tokens and log-probs on CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokencredit.generation import position_ids_from_mask

log = logging.getLogger(__name__)

# Architectures whose decoder layer is: x + attn(norm(x)), then x + mlp(norm(x)), with q/k/v/o projections,
# rotary embeddings and gated MLPs. Qwen3 adds per-head q/k norms, handled below.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Rotary variants whose frequencies do not depend on the current sequence length (dynamic and long RoPE do, which
# would break a captured graph).
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a model that may be wrapped by peft."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `StaticKVDecoder` cannot run this model, or None when it can (Mistral's window is checked per call,
    since it only matters for sequences longer than the window)."""
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    inner = getattr(lm, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(lm, "lm_head"):
        return "the model does not have the usual .model.layers / .lm_head layout"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in _STATIC_ROPE:
        return f"rope type {rope!r} changes with sequence length"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "sliding-window attention is not implemented in the fast decoder"
    if getattr(config, "logit_scale", None) or getattr(config, "final_logit_softcapping", None):
        return "scaled or soft-capped logits are not implemented in the fast decoder"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Swap and negate the two halves of the last dim, the rotation RoPE applies."""
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class _CacheState:
    """Buffers of one (batch, cache length) shape; a captured graph reads and writes exactly these tensors."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_mask: torch.Tensor  # [B, L] True on slots holding a real token
    token: torch.Tensor  # [B] the token fed to the next decode step
    slot: torch.Tensor  # [1] cache slot the next token is written to
    logits: torch.Tensor  # [B, V] output of the last step
    graph: object | None = None
    weights_at_capture: tuple[int, ...] = ()


class StaticKVDecoder:
    """Prefill + one-token decode steps over a preallocated KV cache; steps are CUDA graphs when possible.

    Use through `tokencredit.generation.generate(..., decoder=StaticKVDecoder(model))`. Keep one instance per
    model for a run: it keeps its cache buffers and captured graphs between calls.
    """

    def __init__(self, model: nn.Module, *, cuda_graphs: bool = True, length_bucket: int = 64,
                 sync_every: int = 8) -> None:
        """Wrap `model` (a supported causal LM, optionally a peft model); raise ValueError when unsupported."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"StaticKVDecoder cannot run this model: {reason}")
        if length_bucket < 1 or sync_every < 1:
            raise ValueError("length_bucket and sync_every must be >= 1")
        self.model = model
        self.lm = _causal_lm(model)
        self.inner = self.lm.model
        cfg = self.lm.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        # Mistral attends within a window on every layer; up to the window's length that is full attention.
        self.max_length = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
        self.cuda_graphs = cuda_graphs
        self.length_bucket = length_bucket
        # How often the generation loop may read "is any row still going?" back to the CPU: on a GPU each read
        # stalls the launch queue, so it is read every few steps and surplus steps are trimmed afterwards.
        self.sync_every = sync_every
        self._states: dict[tuple, _CacheState] = {}
        self._state: _CacheState | None = None
        self._next_slot = 0
        self.graph_captures = 0  # how many graphs were captured (tests and benchmarks read it)

    # ------------------------------------------------------------------ the model, written out
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, attn_mask: torch.Tensor,
                 state: _CacheState) -> torch.Tensor:
        """Hidden states [B, S, H] of ids; K/V are written into cache `slots` and attention reads the cache."""
        bsz, seq = ids.shape
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim)
            k = attn.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            state.keys[i].index_copy_(2, slots, k.to(state.keys[i].dtype))
            state.values[i].index_copy_(2, slots, v.to(state.values[i].dtype))
            out = F.scaled_dot_product_attention(
                q, state.keys[i], state.values[i], attn_mask=attn_mask,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )
            h = h + attn.o_proj(out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.inner.norm(h)

    def _decode(self, state: _CacheState) -> None:
        """One step on the state's buffers only (so it can be captured): token -> logits, cache slot filled."""
        state.key_mask.index_fill_(1, state.slot, True)
        positions = state.key_mask.sum(-1, keepdim=True) - 1
        h = self._forward(state.token[:, None], positions, state.slot, state.key_mask[:, None, None, :], state)
        state.logits.copy_(self.lm.lm_head(h[:, -1]))

    # ------------------------------------------------------------------ the protocol generate() uses
    @torch.no_grad()
    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Prefill the cache with left-padded prompts; return the logits [B, V] for the first response token."""
        bsz, plen = prompt_ids.shape
        need = plen + max_new_tokens
        length = -(-need // self.length_bucket) * self.length_bucket
        if self.max_length is not None and length > self.max_length:
            raise ValueError(f"StaticKVDecoder cannot decode {length} tokens: sliding-window attention (window "
                             f"{self.max_length}) is not implemented in the fast decoder")
        state = self._state_for(bsz, length, prompt_ids.device)
        state.key_mask.zero_()
        state.key_mask[:, :plen] = prompt_mask.bool()
        slots = torch.arange(plen, device=prompt_ids.device)
        causal = slots[:, None] >= torch.arange(length, device=prompt_ids.device)[None, :]  # [P, L]
        attn_mask = state.key_mask[:, None, None, :] & causal[None, None]
        # A pad query sees no real key; letting every query see its own slot keeps its softmax finite (a row of
        # all -inf would turn into NaN and, through the cache, poison later layers).
        attn_mask = attn_mask | (slots[:, None] == torch.arange(length, device=prompt_ids.device))[None, None]
        h = self._forward(prompt_ids, position_ids_from_mask(prompt_mask), slots, attn_mask, state)
        state.slot.fill_(plen)
        # Kept on the host as well, so the bounds check never reads the device.
        self._next_slot = plen
        self._state = state
        return self.lm.lm_head(h[:, -1])

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return the logits [B, V] for the next one."""
        state = self._state
        if state is None:
            raise RuntimeError("call start() before step()")
        if self._next_slot >= state.key_mask.size(1):
            raise RuntimeError("the cache is full: more steps than max_new_tokens given to start()")
        state.token.copy_(token)
        if self._use_graph(state) and (state.graph is None or state.weights_at_capture != self._weight_ptrs()):
            try:
                self._capture(state)
            except RuntimeError as err:
                # A module that reads a value back to the host cannot be captured; decoding eagerly is slower
                # but gives the same tokens, so the run goes on without graphs.
                log.warning("CUDA graph capture failed (%s); decoding without graphs from now on", err)
                self.cuda_graphs = False
        if self._use_graph(state):
            state.graph.replay()
        else:
            self._decode(state)
        state.slot.add_(1)
        self._next_slot += 1
        return state.logits

    def release(self) -> None:
        """Free the cache buffers and captured graphs."""
        self._states.clear()
        self._state = None

    # ------------------------------------------------------------------ buffers and graphs
    def _state_for(self, bsz: int, length: int, device: torch.device) -> _CacheState:
        """The buffers for this shape, allocated on first use."""
        dtype = self.lm.lm_head.weight.dtype
        key = (bsz, length, str(device), dtype)
        if key not in self._states:
            shape = (bsz, self.num_kv_heads, length, self.head_dim)
            n = len(self.inner.layers)
            self._states[key] = _CacheState(
                keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
                values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
                key_mask=torch.zeros(bsz, length, dtype=torch.bool, device=device),
                token=torch.zeros(bsz, dtype=torch.long, device=device),
                slot=torch.zeros(1, dtype=torch.long, device=device),
                logits=torch.zeros(bsz, self.lm.lm_head.out_features, dtype=dtype, device=device),
            )
        return self._states[key]

    def _use_graph(self, state: _CacheState) -> bool:
        """Graphs only on CUDA and when enabled. A graph replays the modules as captured, so a peft adapter
        switched off after capture would still be applied: use one decoder per model state."""
        return self.cuda_graphs and state.token.device.type == "cuda"

    def _weight_ptrs(self) -> tuple[int, ...]:
        """Addresses of the weights: a graph replays fixed addresses, so a moved weight means a new capture."""
        return tuple(p.data_ptr() for p in self.model.parameters())

    def _capture(self, state: _CacheState) -> None:
        """Capture `_decode` on this state's buffers (warm-up steps are harmless: each rewrites the same slot)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode(state)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._decode(state)
        state.graph = graph
        state.weights_at_capture = self._weight_ptrs()
        self.graph_captures += 1
        log.info("captured a decode graph for batch %d, cache length %d", *state.key_mask.shape)

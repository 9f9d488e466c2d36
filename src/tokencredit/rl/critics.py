"""PPO's critics: a value model on a copy of the policy's backbone, or a value head on the policy's own trunk."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from tokencredit.models import ScalarHeadModel, is_peft

__all__ = ["SharedValueHead", "capture_lm_head_input", "default_critic", "disable_dropout", "hidden_size"]


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability so recomputed log-probs match the rollout's."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def default_critic(policy: nn.Module) -> ScalarHeadModel:
    """A value model on a copy of the policy's backbone (LoRA merged), with a zero-initialised head."""
    if is_peft(policy):
        base = copy.deepcopy(policy).merge_and_unload()
    else:
        base = copy.deepcopy(policy)
    backbone = base.base_model
    for p in backbone.parameters():
        p.requires_grad_(True)
    return ScalarHeadModel.from_backbone(backbone)


class SharedValueHead(nn.Module):
    """A value head on the policy's final hidden states (PPOConfig.shared_critic): [B, T, H] -> [B, T] float32."""

    FILE = "value_head.safetensors"

    def __init__(self, hidden_size: int) -> None:
        """A zero-initialised float32 linear head."""
        super().__init__()
        self.head = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values of the given positions."""
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def save_pretrained(self, path: str | Path) -> None:
        """Write the head as safetensors (no code, no pickle)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path / self.FILE))

    def load_pretrained(self, path: str | Path) -> None:
        """Load what save_pretrained wrote."""
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(Path(path) / self.FILE)))


def hidden_size(policy: nn.Module) -> int:
    """Width of the hidden states the policy's LM head reads."""
    head = policy.get_output_embeddings() if hasattr(policy, "get_output_embeddings") else None
    if head is None or not hasattr(head, "in_features"):
        raise ValueError("shared_critic needs a causal LM whose get_output_embeddings() is a linear LM head")
    return int(head.in_features)


@contextmanager
def capture_lm_head_input(policy: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, the list holds the hidden states the policy's LM head was called on (its last call)."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        seen[:] = [args[0]]

    handle = policy.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()

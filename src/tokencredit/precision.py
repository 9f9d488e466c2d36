"""Mixed precision: bf16 matrix multiplies where the hardware has them, fp32 master weights for what trains.

On a CPU with AMX or AVX512-BF16 (recent Xeons) a bf16 matmul runs several times faster than an fp32 one
(6.7x measured on this project's 2-core Xeon at 2048^2), and a decode step reads half the bytes. Trainers take
`mixed_precision`:

    "no"    everything in the models' own dtype (fp32 by default): the exact reference numerics
    "bf16"  forward passes under torch.autocast(bfloat16); trainable weights, optimiser state, losses, log-probs
            and values stay fp32; frozen weights are stored in bf16 once (a frozen weight would otherwise be cast
            again at every forward, which on a decode step costs more than it saves)
    "auto"  "bf16" where bf16 matmuls are native (AMX / AVX512-BF16 CPUs, CUDA GPUs with bf16), else "no"
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

CHOICES = ("auto", "no", "bf16")


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matrix multiplies run in hardware on this device (AMX / AVX512-BF16, or a bf16 CUDA GPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if all(p is None for p in probe):
        return _cpuinfo_has(("amx_bf16", "avx512_bf16"))
    return any(bool(p()) for p in probe if p is not None)


def _cpuinfo_has(flags: Iterable[str]) -> bool:
    """Whether /proc/cpuinfo lists any of flags (False where the file cannot be read)."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return False
    words = set(text.split())
    return any(f in words for f in flags)


def validate_mixed_precision(value: str) -> None:
    """Raise ValueError naming the field when value is not one of auto / no / bf16."""
    if value not in CHOICES:
        raise ValueError(f"mixed_precision must be 'auto', 'no' or 'bf16' (got {value!r})")


def resolve_mixed_precision(value: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for a config value on a device: torch.bfloat16, or None for full precision."""
    validate_mixed_precision(value)
    if value == "no":
        return None
    if value == "bf16":
        if torch.device(device).type not in ("cpu", "cuda"):
            raise ValueError(f"mixed_precision='bf16' needs a cpu or cuda device (got {device})")
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else None


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for dtype on device, or a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def freeze_to(models: Iterable[nn.Module | None], dtype: torch.dtype | None) -> int:
    """Store every frozen floating-point parameter of models in dtype; returns how many were converted.

    Trainable parameters are left alone (they are the fp32 master weights). Under autocast a frozen fp32 weight is
    cast to bf16 at every forward; stored in bf16 it is read as is, which halves its memory and its traffic.
    """
    if dtype is None:
        return 0
    n = 0
    seen: set[int] = set()
    for model in models:
        if model is None:
            continue
        for p in model.parameters():
            if id(p) in seen or p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
                continue
            seen.add(id(p))
            p.data = p.data.to(dtype)
            n += 1
        _contiguous_head_input(model)
    return n


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: the first positional input made contiguous."""
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def _contiguous_head_input(model: nn.Module) -> None:
    """Give the output head contiguous input once its weight is stored in a low precision.

    A prefill with ``logits_to_keep=1`` hands the head a strided slice of the hidden states; with a bf16 weight on
    a CPU the matmul then broadcast the whole [vocab, hidden] weight per row (a bmm): measured on SmolLM2, 64
    prompts took 5.9 s and 3.2 GB more instead of 1.6 s, and a PGG grounding of 256 prompts reached 16 GB. A
    copy of the slice is a few KB.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Module) and not getattr(head, "_tokencredit_contiguous", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._tokencredit_contiguous = True


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process instead of handing it back to the OS after every tensor (glibc only).

    A training step frees and re-allocates the same large activation and gradient buffers every time; with glibc's
    defaults each is a fresh mmap that the kernel must fault in and zero page by page (on this project's 2-core CPU
    about a third of a PPO update's CPU time was system time). Raising the mmap threshold to its maximum and
    keeping the freed top of the heap makes those buffers reusable. Process-wide and applied once; returns whether
    it took effect. Memory freed inside the process is reused by the next step (peak RSS rose < 2% in our runs).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = (libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1  # glibc's ceiling for this value on 64-bit
          and libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024) == 1
          and libc.mallopt(m_top_pad, 64 * 1024 * 1024) == 1)
    _ALLOCATOR_TUNED = ok
    return ok


def make_adamw(groups: list[dict], *, fused: bool, **kwargs: float) -> torch.optim.AdamW:
    """AdamW (kwargs: lr, weight_decay, eps), with its fused kernel when asked and torch supports it here."""
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError) as err:  # e.g. a device or dtype the fused kernel does not cover
            log.info("fused AdamW unavailable (%s); using the default implementation", err)
    return torch.optim.AdamW(groups, **kwargs)


def release_free_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc), e.g. between pipeline stages.

    Freed tensors stay in the process's heap; when one process runs several stages (the demo), each stage's peak
    stacks on what the earlier ones left behind unless the free pages are returned.
    """
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc() -> object | None:
    """The C library through ctypes when it is glibc on Linux (mallopt / malloc_trim exist), else None."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None

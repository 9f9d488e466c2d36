"""Which judge to ask and how (the settings every judging command and recipe shares), and the judged win rate."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokencredit.config import ConfigError
from tokencredit.judges.backends import (
    DEFAULT_MAX_PROMPT_CHARS,
    DEFAULT_MAX_RESPONSE_BYTES,
    HFBackend,
    JudgeBackend,
    OpenAIBackend,
)

__all__ = ["JudgeSettings", "make_backend", "win_rate"]


@dataclass
class JudgeSettings:
    """Which judge to ask and how."""

    backend: Literal["openai", "hf"] = "openai"  # openai: an OpenAI-compatible HTTP server; hf: a local model
    base_url: str = "http://127.0.0.1:8000/v1"  # openai: the endpoint, up to /v1
    model: str = "smollm2-135m-instruct"  # openai: the served model name; hf: built-in name or folder
    api_key_env: str = "OPENAI_API_KEY"  # openai: environment variable holding the key ("" = no key)
    concurrency: int = 4  # openai: requests in flight
    timeout: float = 60.0  # openai: wall-clock seconds for one attempt: connect, send, read the whole answer
    max_retries: int = 5  # openai: retries of 408/429/5xx/network failures/timeouts, with exponential backoff
    batch_size: int = 8  # hf: prompts per forward batch
    device: str = "auto"  # hf: where the judge model runs; "auto" = cuda when available, else cpu
    use_logprobs: bool = True  # pairwise: read the preference from the answer letters' log-probabilities
    template: str | None = None  # a file replacing the task's built-in prompt (see judges/templates.py)
    reask_unreadable: bool = False  # ask again for cached answers that could not be read (once per run)
    # openai: the most bytes of one answer body that are read; a larger answer is refused like a malformed one
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    # longest prompt (all messages, in characters) sent to the judge; a longer one is not sent and its record fails
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS


def make_backend(settings: JudgeSettings, cache: str | Path | None) -> JudgeBackend:
    """The configured backend, answering through ``cache``."""
    if settings.backend == "openai":
        return OpenAIBackend(settings.base_url, settings.model, api_key_env=settings.api_key_env, cache=cache,
                             concurrency=settings.concurrency, timeout=settings.timeout,
                             max_retries=settings.max_retries, max_response_bytes=settings.max_response_bytes,
                             max_prompt_chars=settings.max_prompt_chars)
    if settings.backend == "hf":
        return HFBackend.from_pretrained(settings.model, batch_size=settings.batch_size, device=settings.device,
                                         cache=cache, max_prompt_chars=settings.max_prompt_chars)
    raise ConfigError(f"judge backend must be 'openai' or 'hf' (got {settings.backend!r})")


def win_rate(verdicts: Sequence[str | None], n_boot: int = 2000, seed: int = 0) -> dict:
    """Win rate of side a (a tie counts half) over readable verdicts, with a 95% percentile-bootstrap interval."""
    points = [1.0 if v == "a" else 0.0 if v == "b" else 0.5 for v in verdicts if v is not None]
    if not points:
        return {"win_rate": None, "ci95": None, "judged": 0}
    rng = random.Random(seed)
    n = len(points)
    boots = sorted(sum(rng.choice(points) for _ in range(n)) / n for _ in range(n_boot))
    return {"win_rate": sum(points) / n, "ci95": [boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]],
            "judged": n, "wins": points.count(1.0), "losses": points.count(0.0), "ties": points.count(0.5)}

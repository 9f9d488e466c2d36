"""Judge backends: one interface over an OpenAI-compatible HTTP endpoint and a local Hugging Face causal LM.

Both answer chat requests (:class:`ChatRequest` -> :class:`ChatResult`, with per-token log-probabilities when
asked) and score a closed set of answers (:meth:`JudgeBackend.option_logprobs`), which is how a labeler reads a
preference from log-probabilities rather than from sampled text. Every answer goes through a
:class:`~tokencredit.judges.cache.JudgeCache` when one is given, so a rerun of an interrupted job asks only
for what is missing.

HTTP: API key from an environment variable (``OPENAI_API_KEY`` by default; none needed for a local server),
at most ``concurrency`` requests in flight, a timeout per request, and retries with exponential backoff and
jitter on 429, 5xx, connection failures, timeouts and bodies that are not a chat completion (``Retry-After``
is honoured). Other 4xx answers are not retried: they mean the request itself is wrong.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokencredit.judges.cache import JudgeCache, request_key

log = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    """A judge request that failed for good (after retries, or a request the server rejects)."""


@dataclass
class ChatRequest:
    """One chat request to a judge."""

    messages: list[dict]  # [{"role": ..., "content": ...}]
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy: labels should not depend on sampling luck
    top_logprobs: int | None = None  # None: no log-probabilities; k: the k most likely tokens at each step
    seed: int | None = None

    def to_dict(self) -> dict:
        """JSON-able form (also the cache key's request part)."""
        return asdict(self)


@dataclass
class TokenLogprob:
    """A generated token, its log-probability and the most likely alternatives at its step."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)


@dataclass
class ChatResult:
    """A judge's answer."""

    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    cached: bool = False  # served from the cache, not asked

    def to_dict(self) -> dict:
        """JSON-able form, as stored in the cache."""
        out = {"text": self.text, "finish_reason": self.finish_reason, "logprobs": None}
        if self.logprobs is not None:
            out["logprobs"] = [asdict(t) for t in self.logprobs]
        return out

    @classmethod
    def from_dict(cls, data: dict, cached: bool = False) -> ChatResult:
        """Inverse of :meth:`to_dict`."""
        lps = data.get("logprobs")
        return cls(data["text"], data.get("finish_reason"),
                   [TokenLogprob(**t) for t in lps] if lps is not None else None, cached)


@dataclass
class JudgeStats:
    """Counters of one backend: answers from the cache, requests asked, retries made."""

    cached: int = 0
    asked: int = 0
    retries: int = 0


class JudgeBackend:
    """Base class: caching and concurrency around :meth:`_ask` (one uncached request)."""

    concurrency: int = 1

    def __init__(self, cache: JudgeCache | str | Path | None = None) -> None:
        """Use ``cache`` (a JudgeCache or a path to one) for every answer."""
        self.cache = JudgeCache(cache) if isinstance(cache, (str, Path)) else cache
        self.stats = JudgeStats()
        self._stats_lock = threading.Lock()

    def identity(self) -> dict:
        """What, besides the request, decides the answer (part of the cache key)."""
        raise NotImplementedError

    def _ask(self, request: ChatRequest) -> ChatResult:
        """Answer one request (no cache)."""
        raise NotImplementedError

    def _ask_many(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Answer uncached requests; the default runs ``concurrency`` of them at a time, stored as they finish."""

        def one(request: ChatRequest) -> ChatResult:
            """Ask, count and store one answer."""
            result = self._ask(request)
            self._keep(request, result)
            return result

        if self.concurrency <= 1 or len(requests) <= 1:
            return [one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(one, r) for r in requests]
            results, first_error = [], None
            for f in futures:
                try:
                    results.append(f.result())
                except Exception as exc:  # every finished answer is stored before the first error is raised
                    first_error = first_error or exc
                    results.append(None)
            if first_error is not None:
                raise first_error
            return results

    def _keep(self, request: ChatRequest, result: ChatResult) -> None:
        """Count a freshly asked answer and put it in the cache."""
        with self._stats_lock:
            self.stats.asked += 1
        if self.cache is not None:
            self.cache.put(request_key(self.identity(), request.to_dict()), request.to_dict(), result.to_dict())

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Answers in request order: cached ones from the cache, the rest asked (and stored as they arrive)."""
        results: list[ChatResult | None] = [None] * len(requests)
        missing = []
        for i, request in enumerate(requests):
            stored = None
            if self.cache is not None:
                stored = self.cache.get(request_key(self.identity(), request.to_dict()))
            if stored is not None:
                results[i] = ChatResult.from_dict(stored, cached=True)
                self.stats.cached += 1
            else:
                missing.append(i)
        for i, result in zip(missing, self._ask_many([requests[i] for i in missing])):
            results[i] = result
        return results

    def option_logprobs(self, requests: Sequence[ChatRequest], options: Sequence[str]) -> list[dict[str, float]]:
        """Per request, log-probability of each option as the first answer token (-inf when not among the
        returned alternatives); an empty dict when the backend gave no log-probabilities.

        The default asks for one token with the top-20 alternatives and matches options to tokens after
        stripping whitespace; a backend that can score options exactly overrides this.
        """
        asked = [ChatRequest(r.messages, max_tokens=1, temperature=0.0, top_logprobs=20, seed=r.seed)
                 for r in requests]
        out = []
        for result in self.chat(asked):
            if not result.logprobs:
                out.append({})
                continue
            first = result.logprobs[0]
            seen = dict(first.top)
            seen.setdefault(first.token, first.logprob)
            scores = {}
            for option in options:
                matches = [lp for tok, lp in seen.items() if tok.strip() == option]
                scores[option] = max(matches) if matches else -math.inf
            out.append(scores)
        return out


# ---------------------------------------------------------------------- OpenAI-compatible HTTP
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAIBackend(JudgeBackend):
    """A chat model behind an OpenAI-compatible ``/chat/completions`` endpoint (hosted, vLLM, llama.cpp, ...)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        cache: JudgeCache | str | Path | None = None,
        concurrency: int = 4,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        """``base_url`` ends before ``/chat/completions`` (e.g. ``http://127.0.0.1:8000/v1``)."""
        super().__init__(cache)
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("concurrency must be >= 1, max_retries >= 0, timeout > 0 and backoff >= 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff

    def identity(self) -> dict:
        """Endpoint and model."""
        return {"kind": "openai", "base_url": self.base_url, "model": self.model}

    def _body(self, request: ChatRequest) -> dict:
        """The chat-completions request body."""
        body = {"model": self.model, "messages": request.messages, "max_tokens": request.max_tokens,
                "temperature": request.temperature}
        if request.seed is not None:
            body["seed"] = request.seed
        if request.top_logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = request.top_logprobs
        return body

    def _ask(self, request: ChatRequest) -> ChatResult:
        """POST the request, retrying transient failures with exponential backoff."""
        data = json.dumps(self._body(request)).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        problem = ""
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    return _parse_chat(json.loads(raw))
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    problem = f"the server answered with something that is not a chat completion ({exc})"
            except urllib.error.HTTPError as exc:
                detail = _error_message(exc)
                if exc.code not in _RETRY_STATUS:
                    raise JudgeError(f"{url} rejected the request: HTTP {exc.code}: {detail}") from exc
                problem = f"HTTP {exc.code}: {detail}"
                wait = _retry_after(exc)
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
                problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if attempt == self.max_retries:
                break
            with self._stats_lock:
                self.stats.retries += 1
            delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random())
            delay = max(delay, wait or 0.0)
            log.warning("judge request failed (%s); retry %d/%d in %.1fs", problem, attempt + 1,
                        self.max_retries, delay)
            time.sleep(delay)
        raise JudgeError(f"{url}: giving up after {self.max_retries + 1} attempts; last problem: {problem}")


def _parse_chat(payload: dict) -> ChatResult:
    """A ChatResult from a chat-completions response body (KeyError/TypeError/ValueError if it is not one)."""
    choice = payload["choices"][0]
    text = choice["message"]["content"]
    if not isinstance(text, str):
        raise ValueError("message content is not a string")
    logprobs = None
    content = (choice.get("logprobs") or {}).get("content")
    if content is not None:
        logprobs = [TokenLogprob(t["token"], float(t["logprob"]),
                                 {a["token"]: float(a["logprob"]) for a in t.get("top_logprobs") or []})
                    for t in content]
    return ChatResult(text, choice.get("finish_reason"), logprobs)


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The error message of an HTTP error body, or its start."""
    try:
        raw = exc.read().decode("utf-8", "replace")
    except OSError:
        return exc.reason or ""
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw[:200]


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    """Seconds from a Retry-After header, if any (capped at 60)."""
    value = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return min(float(value), 60.0) if value else None
    except ValueError:
        return None


# ---------------------------------------------------------------------- local Hugging Face model
class HFBackend(JudgeBackend):
    """A local causal LM as judge: requests batched through the sampler, options scored exactly."""

    def __init__(self, model: object, tokenizer: object, name: str = "local", batch_size: int = 8,
                 cache: JudgeCache | str | Path | None = None) -> None:
        """Judge with ``model``; ``name`` identifies it in the cache key (use the folder or built-in name)."""
        from tokencredit.serve import ModelServer

        super().__init__(cache)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.server = ModelServer(model, tokenizer, name)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, batch_size: int = 8, device: str = "auto",
                        cache: JudgeCache | str | Path | None = None) -> HFBackend:
        """Load a judge model by built-in name, folder or cached hub id."""
        from tokencredit.serve import ModelServer, ServeConfig

        server = ModelServer.from_config(ServeConfig(model=name_or_path, device=device))
        return cls(server.model, server.tokenizer, str(name_or_path), batch_size, cache)

    def identity(self) -> dict:
        """The model's name."""
        return {"kind": "hf", "model": self.server.name}

    def _ask_many(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Batch requests with the same sampling settings through one generate call each."""
        results: list[ChatResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.max_tokens, r.temperature, r.top_logprobs, r.seed), []).append(i)
        for (max_tokens, temperature, top, seed), idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                body = {"model": self.server.name, "max_tokens": max_tokens, "temperature": temperature,
                        "seed": seed}
                params = self.server.params(body, top)
                prompts = [self.server.render(requests[i].messages) for i in chunk]
                choices, _ = self.server.sample(prompts, params)
                for i, c in zip(chunk, choices):
                    lps = None
                    if top is not None:
                        lps = [TokenLogprob(t, lp, dict(alts)) for t, lp, alts in
                               zip(c.tokens, c.token_logprobs, c.top_logprobs)]
                    results[i] = ChatResult(c.text, c.finish_reason, lps)
                    self._keep(requests[i], results[i])
        return results

    def option_logprobs(self, requests: Sequence[ChatRequest], options: Sequence[str]) -> list[dict[str, float]]:
        """Exact log P(option | rendered prompt) of each option's whole token sequence (not cached: cheap)."""
        import torch

        from tokencredit.generation import encode_prompts, position_ids_from_mask

        model, tokenizer = self.server.model, self.server.tokenizer
        option_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        if any(not ids for ids in option_ids):
            raise ValueError("every option must encode to at least one token")
        out: list[dict[str, float]] = []
        device = next(model.parameters()).device
        single = all(len(ids) == 1 for ids in option_ids)
        for start in range(0, len(requests), self.batch_size):
            prompts = [self.server.render(r.messages) for r in requests[start : start + self.batch_size]]
            p_ids, p_mask = encode_prompts(tokenizer, prompts, None, device)
            if single:
                # One-token options (the usual "A" / "B"): one forward pass over the prompts gives all of them.
                with torch.no_grad():
                    logits = model(input_ids=p_ids, attention_mask=p_mask,
                                   position_ids=position_ids_from_mask(p_mask)).logits[:, -1]
                logp = logits.float().log_softmax(-1)
                out.extend({o: float(logp[i, ids[0]]) for o, ids in zip(options, option_ids)}
                           for i in range(len(prompts)))
                continue
            rows = {}
            for o, ids in zip(options, option_ids):
                tail = torch.tensor(ids, device=device).expand(len(prompts), -1)
                full = torch.cat([p_ids, tail], 1)
                mask = torch.cat([p_mask, torch.ones_like(tail)], 1)
                with torch.no_grad():
                    logits = model(input_ids=full, attention_mask=mask,
                                   position_ids=position_ids_from_mask(mask)).logits.float()
                logp = logits[:, p_ids.size(1) - 1 : -1].log_softmax(-1).gather(-1, tail[..., None]).squeeze(-1)
                rows[o] = logp.sum(-1).tolist()
            out.extend({o: rows[o][i] for o in options} for i in range(len(prompts)))
        return out

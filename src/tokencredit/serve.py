"""`tokencredit serve MODEL`: any local causal LM behind an OpenAI-compatible HTTP API.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (and the same paths without
``/v1``). Supported request fields: ``model`` (must be the served name), ``messages`` / ``prompt`` (a string or a
list of strings), ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (0 = greedy), ``top_p``, ``n``,
``stop``, ``seed``, ``stream``, and log-probabilities (chat: ``logprobs`` + ``top_logprobs`` <= 20;
completions: ``logprobs`` <= 5). Log-probabilities are those of the model's own next-token distribution
(before temperature and top-p); they are computed only for requests that ask for them. A bad request gets a 4xx
JSON body ``{"error": {"message", "type", "param", "code"}}`` as the OpenAI API sends; an unexpected failure gets
a 500 with the same shape. Every answer, errors included, is JSON; a method a route does not take gets a 405 with
an ``Allow`` header.

Requests are served one at a time (one model, and a CPU or one GPU gains little from interleaving them); a
streamed answer is generated first and then sent as server-sent events, one chunk per token, so streaming
clients work but the first token does not arrive earlier.

Limits (``ServeConfig`` fields unless marked; defaults in brackets):

- ``max_tokens_limit`` [2048]: the largest ``max_tokens`` a request may ask for.
- ``default_max_tokens`` [256]: ``max_tokens`` when a request leaves it out, lowered to ``max_tokens_limit`` and to
  what the context has left.
- context [the model's ``max_position_embeddings``, else the tokenizer's ``model_max_length``; ``max_context``
  lowers it]: the longest prompt plus ``max_tokens`` must fit, else a 400 with code ``context_length_exceeded``
  that names the limit. Prompts are never silently cut. A prompt over the context within its first
  ``PREFIX_CHARS_PER_TOKEN`` (16) characters per context token is refused without tokenizing the rest.
- ``max_rows`` [64]: prompts x ``n`` per request (``n`` itself is at most 16, ``stop`` at most 4 strings).
- ``max_body_bytes`` [8 MiB]: a larger ``Content-Length`` gets a 413. A POST needs a ``Content-Length`` (411
  without one). JSON may nest at most 32 levels (``MAX_JSON_DEPTH``); strings with lone UTF-16 surrogates,
  ``NaN`` / ``Infinity`` and seeds outside [-2**63, 2**64 - 1] get a 400.
- ``read_timeout_s`` [30]: a request (request line, headers and body) must have fully arrived this long after the
  server started waiting for it, else the connection is closed (a 408 once the headers are in). This also closes
  idle keep-alive connections, and it bounds each write of an answer to a client that does not read.
- ``max_connections`` [32]: open connections beyond this get an immediate 503 and are closed.
- ``request_timeout_s`` [300]: counted from the moment the body has been read. Waiting for the model counts: a
  request still queued at its deadline gets a 503 (code ``timeout``). Generation that reaches the deadline stops
  there and the answer is sent as it stands, each unfinished choice with ``finish_reason: "length"`` (as if
  ``max_tokens`` had been reached). The prompt's forward pass itself is not interrupted; the context limit
  bounds it.
- ``api_key`` [none]: when set (``--api-key`` or the ``TOKENCREDIT_API_KEY`` environment variable), every route
  needs ``Authorization: Bearer <key>``, compared in constant time; anything else gets a 401. The key is never
  logged or printed.

A client that disconnects while its answer is generated (or while it waits for the model) is noticed between
decode steps: generation stops and nothing is sent. A client that leaves mid-stream ends the stream with one log
line.

Framing (``request_body_length``): a request whose body's end is not certain is refused before anything else,
on every method, and the connection is closed after the answer: any ``Transfer-Encoding`` header (411: bodies
are never chunked), more than one ``Content-Length`` (even equal ones), a ``Content-Length`` that is not plain
ASCII digits (400), and a header line that is not ``Name: value`` (whitespace before the colon, a folded line,
a control character such as NUL or a bare CR) (400), which http.server's parser would drop or split silently.
More generally, whenever an answer goes out before the body was read to exactly its declared length (an error
found from the headers, a body cut short, a 405, a GET with a body, a POST without a ``Content-Length``), the
connection is closed, so no byte after it is ever parsed as a request. ``docs/serve.md`` has the full list of
statuses.

Chat messages take the roles ``system``, ``developer`` (rendered as ``system``), ``user`` and ``assistant``;
any other role (``tool`` and ``function`` included: no tool calls are made) gets a 400 naming the message.
Only a message's role and content reach the chat template. A tokenizer without a chat template renders messages
as ``role: content`` lines followed by ``assistant:``.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import os
import re
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from tokencredit.generation import eos_ids, generate
from tokencredit.rewards.labels import token_pieces

log = logging.getLogger(__name__)

MAX_N = 16
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
MAX_STOP = 4
MAX_JSON_DEPTH = 32
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_BODY_BYTES = 8 * 1024 * 1024
PREFIX_CHARS_PER_TOKEN = 16  # a prompt longer than this many characters per context token is measured on a prefix
API_KEY_ENV = "TOKENCREDIT_API_KEY"
# Chat roles taken. "developer" is OpenAI's newer name for "system" and is rendered as one (chat templates know
# "system"); "tool" and "function" answer tool calls, which this server never makes.
CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass
class ServeConfig:
    """Settings of `tokencredit serve`, limits included (see the module docstring)."""

    model: str = "smollm2-135m-instruct"  # built-in name, model folder (a trained policy) or cached hub id
    host: str = "127.0.0.1"  # loopback by default: exposing a model to a network is a choice to make explicitly
    port: int = 8000  # 0 = any free port (printed at start)
    served_name: str | None = None  # the `model` clients must send; None = the folder or built-in name
    device: str = "auto"  # where the model runs; "auto" = cuda when available, else cpu
    max_tokens_limit: int = 2048  # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request does not say (lowered to what the context has left)
    max_context: int | None = None  # prompt + max_tokens cap below the model's own positions; None = the model's
    max_rows: int = 64  # prompts x n in one request
    max_body_bytes: int = MAX_BODY_BYTES  # largest request body (Content-Length) accepted; larger gets a 413
    read_timeout_s: float = 30.0  # for a whole request to arrive, and for each write to a client
    max_connections: int = 32  # open connections; more get an immediate 503
    request_timeout_s: float | None = 300.0  # from body read to answer; None = no limit
    api_key: str | None = field(default=None, repr=False)  # None = no key needed; repr=False keeps it out of logs


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI-style error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class RequestCancelled(Exception):
    """The client went away before its answer was ready; the work for it was stopped."""


@dataclass
class RequestContext:
    """What the HTTP layer tells the model about one request: its deadline and how to see that the client left."""

    deadline: float | None = None  # a time.monotonic() value
    client_gone: Callable[[], bool] | None = None


@dataclass
class _Params:
    """Sampling parameters of one request, validated."""

    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: list[str]
    seed: int | None
    top_logprobs: int | None  # None: no log-probabilities
    stream: bool
    max_tokens_given: bool = True  # False: the default, which may shrink to fit the context


@dataclass
class _Choice:
    """One generated answer with its tokens and their log-probabilities."""

    text: str
    finish_reason: str
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[list[tuple[str, float]]]


class _Watch:
    """Logits processor run once per decode step: counts steps, stops for a departed client, ends at the deadline."""

    def __init__(self, eos_id: int, deadline: float | None, client_gone: Callable[[], bool] | None) -> None:
        self.eos_id, self.deadline, self.client_gone = eos_id, deadline, client_gone
        self.steps = 0
        self.expired_step: int | None = None  # the step whose token was forced to EOS by the deadline

    def __call__(self, seq: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Raise RequestCancelled if the client left; past the deadline, make EOS the only possible token."""
        step = self.steps
        self.steps += 1
        if self.client_gone is not None and self.client_gone():
            raise RequestCancelled(f"client left after {step} decode steps")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            # Forcing EOS ends every row at this step without another forward pass, and keeps what was generated.
            self.expired_step = step
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.eos_id] = 0.0
            return forced
        return scores


class _LogprobRecorder:
    """Logits processor keeping per step only the drawn token's log-prob and the top-k, not the whole vocabulary."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.chosen: list[torch.Tensor] = []  # [B] per step
        self.top_values: list[torch.Tensor] = []  # [B, k] per step
        self.top_ids: list[torch.Tensor] = []
        self._pending: torch.Tensor | None = None  # this step's distribution, until its token is known

    def __call__(self, seq: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Resolve the previous step with the token it drew (the sequence's last column), then hold this one."""
        if self._pending is not None:
            self._take(seq[:, -1])
        dist = scores.float().log_softmax(-1)
        if self.top:
            values, ids = dist.topk(min(self.top, dist.size(-1)))
            self.top_values.append(values)
            self.top_ids.append(ids)
        self._pending = dist
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        """The held distribution's log-prob of ``tokens`` [B]."""
        self.chosen.append(self._pending.gather(-1, tokens[:, None].to(self._pending.device)).squeeze(-1))
        self._pending = None

    def finish(self, response_ids: torch.Tensor) -> None:
        """Resolve the last step, whose token no later step saw."""
        if self._pending is not None and len(self.chosen) < response_ids.size(1):
            self._take(response_ids[:, len(self.chosen)])
        self._pending = None


def context_limit(model: torch.nn.Module, tokenizer: object) -> int | None:
    """The model's positions (config), else the tokenizer's model_max_length when it is a real number."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        return positions
    length = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a known limit report int(1e30).
    if isinstance(length, int) and 0 < length < 10**9:
        return length
    return None


class ModelServer:
    """The model, its tokenizer and the OpenAI request/response logic, independent of HTTP."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, name: str, config: ServeConfig | None = None
                 ) -> None:
        """Serve ``model`` under ``name``."""
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.config = config or ServeConfig()
        self.lock = threading.Lock()
        limit = context_limit(model, tokenizer)
        if self.config.max_context is not None:
            limit = self.config.max_context if limit is None else min(limit, self.config.max_context)
        self.context_limit = limit
        # Counters for tests and benchmarks.
        self.stats = {"generations": 0, "decode_steps": 0, "cancelled": 0, "deadline_stops": 0}
        self._stats_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: ServeConfig) -> ModelServer:
        """Load the configured model or LoRA adapter folder (fp32 on CPU, bf16 on a GPU) and its tokenizer."""
        from tokencredit.models import load_trained_policy, resolve_device

        model, tokenizer = load_trained_policy(config.model, device=resolve_device(config.device))
        name = config.served_name or (Path(config.model).name if Path(config.model).is_dir() else config.model)
        return cls(model, tokenizer, name, config)

    # ------------------------------------------------------------------ endpoints
    def models(self) -> dict:
        """GET /v1/models."""
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                            "owned_by": "tokencredit"}]}

    def chat_completion(self, body: dict, ctx: RequestContext | None = None) -> dict | Iterator[dict]:
        """POST /v1/chat/completions: a response dict, or chunk dicts when streaming."""
        self._check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ApiError(400, f"messages[{i}] must be an object with string 'role' and 'content'",
                               f"messages[{i}]")
            role = m["role"]
            if role not in CHAT_ROLES:
                shown = repr(role) if len(role) <= 40 else repr(role[:40]) + "..."
                why = " (this server does not make tool calls)" if role in ("tool", "function") else ""
                raise ApiError(400, f"messages[{i}] has role {shown}{why}; the roles taken are "
                                    f"{', '.join(CHAT_ROLES)}", f"messages[{i}].role", "invalid_value")
        # Only role and content reach the chat template: other keys (tool_calls, name, ...) are not rendered.
        messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                    for m in messages]
        logprobs = body.get("logprobs", False)
        if not isinstance(logprobs, bool):
            raise ApiError(400, "'logprobs' must be a boolean for chat completions", "logprobs")
        top = body.get("top_logprobs")
        if top is not None and not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        top = _int(top if top is not None else 0, "top_logprobs", 0, MAX_TOP_LOGPROBS_CHAT)
        params = self.params(body, top if logprobs else None)
        self._check_rows(1, params)
        try:
            prompt = self.render(messages)
        except Exception as exc:  # a chat template may refuse a conversation (e.g. roles that do not alternate)
            raise ApiError(400, f"the chat template could not render these messages: {exc}", "messages") from exc
        lengths = self._check_context([prompt], params, "messages")
        choices, prompt_tokens = self.sample([prompt], params, ctx, lengths)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if params.stream:
            return self._chat_chunks(rid, created, choices)
        out = []
        for i, c in enumerate(choices):
            item = {"index": i, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason, "logprobs": None}
            if params.top_logprobs is not None:
                item["logprobs"] = {"content": [_chat_logprob(t, lp, top_) for t, lp, top_ in
                                                zip(c.tokens, c.token_logprobs, c.top_logprobs)]}
            out.append(item)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.name, "choices": out,
                "usage": _usage(prompt_tokens, choices)}

    def completion(self, body: dict, ctx: RequestContext | None = None) -> dict | Iterator[dict]:
        """POST /v1/completions: a response dict, or chunk dicts when streaming."""
        self._check_model(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", "prompt")
        if body.get("echo"):
            raise ApiError(400, "'echo' is not supported by tokencredit serve", "echo")
        logprobs = body.get("logprobs")
        top = None if logprobs is None else _int(logprobs, "logprobs", 0, MAX_LOGPROBS_COMPLETION)
        params = self.params(body, top)
        self._check_rows(len(prompts), params)
        lengths = self._check_context(prompts, params, "prompt")
        choices, prompt_tokens = self.sample(prompts, params, ctx, lengths)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if params.stream:
            return self._completion_chunks(rid, created, choices)
        out = []
        for i, c in enumerate(choices):
            item = {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
            if params.top_logprobs is not None:
                offsets, pos = [], 0
                for t in c.tokens:
                    offsets.append(pos)
                    pos += len(t)
                item["logprobs"] = {"tokens": c.tokens, "token_logprobs": c.token_logprobs,
                                    "top_logprobs": [dict(top_) for top_ in c.top_logprobs],
                                    "text_offset": offsets}
            out.append(item)
        return {"id": rid, "object": "text_completion", "created": created, "model": self.name, "choices": out,
                "usage": _usage(prompt_tokens, choices)}

    # ------------------------------------------------------------------ helpers
    def _check_model(self, body: object) -> None:
        """The body is a JSON object naming the served model."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required", "model")
        if model != self.name:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{self.name}'", "model",
                           "model_not_found")

    def _check_rows(self, prompts: int, params: _Params) -> None:
        """Prompts x n within max_rows (checked before any prompt is tokenized)."""
        rows = prompts * params.n
        if rows > self.config.max_rows:
            raise ApiError(400, f"{prompts} prompt(s) x n={params.n} = {rows} rows; this server takes at most "
                                f"{self.config.max_rows} per request", "n" if prompts == 1 else "prompt",
                           "too_many_rows")

    def _check_context(self, prompts: list[str], params: _Params, param: str) -> list[int]:
        """Prompt lengths in tokens; the longest plus max_tokens must fit the context (a default shrinks to fit)."""
        limit = self.context_limit
        if limit is None:
            return [len(self.tokenizer(p)["input_ids"]) for p in prompts]
        lengths = []
        for p in prompts:
            # Tokenizing costs ~180 bytes per token: a prompt that is over the limit within its first
            # PREFIX_CHARS_PER_TOKEN * limit characters is refused without tokenizing the rest.
            cut = PREFIX_CHARS_PER_TOKEN * limit
            n = len(self.tokenizer(p[:cut])["input_ids"]) if len(p) > cut else 0
            # +1: the cut may split one token in two, so only a count past limit + 1 is certain to be over.
            if n > limit + 1:
                raise ApiError(400, f"this model's context is {limit} tokens (prompt + max_tokens); the prompt "
                                    f"has more than {limit} tokens", param, "context_length_exceeded")
            lengths.append(len(self.tokenizer(p)["input_ids"]))
        longest = max(lengths)
        if not params.max_tokens_given and longest < limit:
            params.max_tokens = min(params.max_tokens, limit - longest)
        if longest + params.max_tokens > limit:
            raise ApiError(400, f"this model's context is {limit} tokens (prompt + max_tokens); the prompt has "
                                f"{longest} tokens and max_tokens is {params.max_tokens}", param,
                           "context_length_exceeded")
        return lengths

    def params(self, body: dict, top_logprobs: int | None) -> _Params:
        """Validated sampling parameters."""
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        given = max_tokens is not None
        if max_tokens is None:
            max_tokens = min(self.config.default_max_tokens, self.config.max_tokens_limit)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
        seed = body.get("seed")
        if seed is not None:
            low, high = SEED_RANGE
            if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
                # The value is not echoed: a 4000-digit seed would make a 4000-digit error message.
                raise ApiError(400, "'seed' must be an integer between -2**63 and 2**64 - 1", "seed")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean", "stream")
        return _Params(
            max_tokens=_int(max_tokens, "max_tokens", 1, self.config.max_tokens_limit),
            temperature=_number(body.get("temperature", 1.0), "temperature", 0.0, 2.0),
            top_p=_number(body.get("top_p", 1.0), "top_p", 0.0, 1.0, low_open=True),
            n=_int(body.get("n", 1), "n", 1, MAX_N), stop=stop, seed=seed, top_logprobs=top_logprobs,
            stream=stream, max_tokens_given=given,
        )

    def render(self, messages: list[dict]) -> str:
        """Messages as one prompt string: the chat template, or role-prefixed lines without one."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def _count(self, **increments: int) -> None:
        """Add to the stats counters."""
        with self._stats_lock:
            for name, value in increments.items():
                self.stats[name] += value

    def _acquire(self, ctx: RequestContext) -> None:
        """Take the model, giving up when the client leaves or the deadline passes while waiting."""
        while not self.lock.acquire(timeout=0.05):
            if ctx.client_gone is not None and ctx.client_gone():
                self._count(cancelled=1)
                raise RequestCancelled("client left while waiting for the model")
            if ctx.deadline is not None and time.monotonic() >= ctx.deadline:
                raise ApiError(503, "the server was busy with other requests for the whole request timeout "
                                    f"({self.config.request_timeout_s} s); retry later", code="timeout",
                               type_="server_error", headers={"Retry-After": "1"})

    def sample(self, prompts: list[str], params: _Params, ctx: RequestContext | None = None,
               prompt_lengths: list[int] | None = None) -> tuple[list[_Choice], int]:
        """n answers per prompt (prompt-major order) and the number of prompt tokens."""
        ctx = ctx or RequestContext()
        if prompt_lengths is None:
            prompt_lengths = [len(self.tokenizer(p)["input_ids"]) for p in prompts]
        batch = [p for p in prompts for _ in range(params.n)]
        eos = eos_ids(self.model, self.tokenizer)
        watch = _Watch(eos[0], ctx.deadline, ctx.client_gone)
        recorder = _LogprobRecorder(params.top_logprobs) if params.top_logprobs is not None else None
        processors = [watch] if recorder is None else [watch, recorder]

        generator = None
        if params.seed is not None:
            device = next(self.model.parameters()).device
            generator = torch.Generator(device=device).manual_seed(params.seed)
        self._acquire(ctx)
        try:
            with torch.no_grad():
                out = generate(self.model, self.tokenizer, batch, max_new_tokens=params.max_tokens,
                               temperature=params.temperature if params.temperature > 0 else 1.0,
                               top_p=params.top_p, greedy=params.temperature == 0, stop_strings=params.stop,
                               logits_processors=processors, generator=generator)
        except RequestCancelled:
            self._count(cancelled=1)
            raise
        finally:
            self.lock.release()
            self._count(generations=1, decode_steps=watch.steps, deadline_stops=int(watch.expired_step is not None))
        token_lps: list[list[float]] = []
        top_vals: list[list[list[float]]] = []
        top_ids: list[list[list[int]]] = []
        if recorder is not None:
            recorder.finish(out.response_ids)
            if recorder.chosen:
                token_lps = torch.stack(recorder.chosen, 1).tolist()
            if recorder.top_values:
                top_vals = torch.stack(recorder.top_values, 1).tolist()
                top_ids = torch.stack(recorder.top_ids, 1).tolist()
        pieces: dict[int, str] = {}

        def piece(i: int) -> str:
            """One token's text (memoized: top-k alternatives repeat)."""
            if i not in pieces:
                pieces[i] = self.tokenizer.decode([i])
            return pieces[i]

        eos_set = set(eos)
        choices = []
        for row, ids in enumerate(out.token_ids()):
            visible = [t for t in ids if t not in eos_set]
            # Pieces that join to the decoded answer (a lone token's decode can drop its leading space).
            tokens = token_pieces(self.tokenizer, visible, skip_special_tokens=True)
            lps, tops = [], []
            if recorder is not None:
                lps = token_lps[row][: len(visible)]
                if params.top_logprobs:
                    tops = [[(piece(i), v) for v, i in zip(top_vals[row][step], top_ids[row][step])]
                            for step in range(len(visible))]
                else:
                    tops = [[] for _ in visible]
            # A stop string is cut from the text; its tokens leave the log-probabilities too.
            keep, pos = 0, 0
            while keep < len(tokens) and pos < len(out.texts[row]):
                pos += len(tokens[keep])
                keep += 1
            tokens, lps, tops = tokens[:keep], lps[:keep], tops[:keep]
            cut_by_deadline = watch.expired_step is not None and len(ids) == watch.expired_step + 1
            finished = bool(out.finished[row]) and not cut_by_deadline
            choices.append(_Choice(out.texts[row], "stop" if finished else "length", tokens, lps, tops))
        return choices, sum(prompt_lengths)

    def _chat_chunks(self, rid: str, created: int, choices: list[_Choice]) -> Iterator[dict]:
        """chat.completion.chunk events: the role, one chunk per token, then the finish reason."""
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name}
        for i, c in enumerate(choices):
            yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None, "logprobs": None}]}
            for piece in _pieces(c):
                yield {**base, "choices": [{"index": i, "delta": {"content": piece}, "finish_reason": None,
                                            "logprobs": None}]}
            yield {**base, "choices": [{"index": i, "delta": {}, "finish_reason": c.finish_reason,
                                        "logprobs": None}]}

    def _completion_chunks(self, rid: str, created: int, choices: list[_Choice]) -> Iterator[dict]:
        """text_completion events, one per token, the last with the finish reason."""
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.name}
        for i, c in enumerate(choices):
            for piece in _pieces(c):
                yield {**base, "choices": [{"index": i, "text": piece, "finish_reason": None, "logprobs": None}]}
            yield {**base, "choices": [{"index": i, "text": "", "finish_reason": c.finish_reason,
                                        "logprobs": None}]}


def _pieces(choice: _Choice) -> list[str]:
    """The answer cut into token-sized pieces that join to exactly its text (a stop string is not sent)."""
    pieces, pos = [], 0
    for t in choice.tokens:
        if pos >= len(choice.text):
            break
        piece = choice.text[pos : pos + len(t)]
        pieces.append(piece)
        pos += len(piece)
    if pos < len(choice.text):
        pieces.append(choice.text[pos:])
    return pieces


def _chat_logprob(token: str, logprob: float, top: list[tuple[str, float]]) -> dict:
    """One entry of a chat completion's logprobs.content."""
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for t, v in top]}


def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict:
    """The usage block."""
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _int(value: object, name: str, low: int, high: int) -> int:
    """An integer field within [low, high], else a 400."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise ApiError(400, f"'{name}' must be an integer between {low} and {high} (got {shown})", name)
    return value


def _number(value: object, name: str, low: float, high: float, low_open: bool = False) -> float:
    """A number field within [low, high] ((low, high] when low_open), else a 400."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        bracket = "(" if low_open else "["
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise ApiError(400, f"'{name}' must be a number in {bracket}{low}, {high}] (got {shown})", name)
    return float(value)


# ---------------------------------------------------------------------- request bodies
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _reject_constant(name: str) -> object:
    """json.loads hook: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not a JSON value")


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> object:
    """Strictly parse a request body: UTF-8, standard JSON, at most ``max_depth`` levels, no lone surrogates."""
    try:
        # Decoded here, not by json.loads: it would let UTF-8-encoded surrogates through ('surrogatepass').
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not UTF-8: {exc}") from exc
    try:
        value = json.loads(text or "null", parse_constant=_reject_constant)
    except RecursionError as exc:
        raise ApiError(400, f"the request body nests deeper than {max_depth} levels") from exc
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, an integer over Python's digit limit
        message = str(exc)
        raise ApiError(400, f"the request body is not valid JSON: {message[:200]}") from exc
    # json.loads only refuses nesting deep enough to exhaust the stack; the handlers want far less.
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise ApiError(400, f"the request body nests deeper than {max_depth} levels")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ApiError(400, "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff) in a "
                                "string; it is not text") from exc
    return value


# ---------------------------------------------------------------------- HTTP
_ROUTES = {"/models": "GET, HEAD", "/chat/completions": "POST", "/completions": "POST"}
_CONNECTION_GONE = (ConnectionError, TimeoutError)  # BrokenPipe, ConnectionReset/Aborted, and timed-out writes


class _DeadlineReader(io.RawIOBase):
    """A socket reader with one deadline for a whole request: trickled bytes cannot hold a connection forever."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        """Always readable."""
        return True

    def readinto(self, buffer: memoryview) -> int:
        """Read what has arrived; a TimeoutError once the deadline has passed."""
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request did not arrive within read_timeout_s")
            self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _HeaderRecorder(io.BufferedReader):
    """A buffered socket reader that can keep a copy of the lines it hands out (the raw header section)."""

    lines: list[bytes] | None = None  # None: not recording

    def readline(self, size: int | None = -1) -> bytes:
        """One line, also kept while recording."""
        line = super().readline(-1 if size is None else size)
        if self.lines is not None:
            self.lines.append(line)
        return line


# A header line as RFC 9112 writes it: a token name, a colon right after it, a value without control characters
# (tab aside), and CRLF (or a bare LF, which the RFC lets servers accept).
_HEADER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r?\n")
_HUGE_LENGTH = 2**63  # stands for any Content-Length too long to be worth converting: over every limit


def request_body_length(raw_header_lines: list[bytes], headers: Message) -> int | None:
    """The body length a request's headers declare (None: no body), or an ApiError if where it ends is unclear.

    ``raw_header_lines`` are the header lines as received, ending with the empty line; ``headers`` is what
    http.server parsed from them. Every header line must be well formed: http.server's parser drops a line it
    does not understand together with every header after it (a Content-Length included), and takes a bare CR for
    a line break, where a proxy in front may read the same bytes differently.
    """
    *lines, end = raw_header_lines or [b""]
    if end not in (b"\r\n", b"\n"):
        raise ApiError(400, "the header section did not end with an empty line")
    for line in lines:
        if not _HEADER_LINE.fullmatch(line):
            shown = line.rstrip(b"\r\n")[:60].decode("latin-1")
            raise ApiError(400, f"malformed header line {shown!r}: a line must be 'Name: value', with no space "
                                "before the colon, no line folding and no control characters")
    if headers.defects or headers.get_payload():  # cannot happen after the check above; kept as a backstop
        raise ApiError(400, "malformed header section")
    if "Transfer-Encoding" in headers:
        raise ApiError(411, "Transfer-Encoding is not supported (no chunked bodies): send the body with one "
                            "Content-Length header", code="length_required")
    values = headers.get_all("Content-Length") or []
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, f"{len(values)} Content-Length headers: a request may have only one")
    text = values[0].strip(" \t")
    if not (text.isascii() and text.isdigit()):
        raise ApiError(400, f"Content-Length must be a non-negative decimal integer (got {text[:40]!r})")
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else _HUGE_LENGTH


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the peer has closed or reset the connection (readable with nothing to read), without blocking."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            if not poller.poll(0):
                return False
        elif not select.select([sock], [], [], 0)[0]:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def make_handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``server``."""
    config = server.config
    key = config.api_key.encode("utf-8") if config.api_key else None

    class Handler(BaseHTTPRequestHandler):
        """OpenAI-compatible routes over a ModelServer."""

        protocol_version = "HTTP/1.1"
        timeout = config.read_timeout_s  # the socket timeout StreamRequestHandler.setup applies
        _consumed = False  # the body was read to exactly its declared length
        _declared: int | None = None  # the request's Content-Length, once request_body_length has vouched for it
        _framing_checked = False
        _framing_error: ApiError | None = None
        _header_lines: list[bytes] | None = None  # the raw header lines, until the framing check has read them
        _reader: _DeadlineReader | None = None

        def setup(self) -> None:
            """Read requests through a reader with a per-request deadline."""
            super().setup()
            self.rfile.close()  # only drops makefile's reference; the socket stays open
            self._reader = _DeadlineReader(self.connection)
            self.rfile = _HeaderRecorder(self._reader)

        def handle_one_request(self) -> None:
            """Give the next request (request line, headers, body) read_timeout_s to arrive, then handle it."""
            if self._reader is not None and config.read_timeout_s:
                self._reader.deadline = time.monotonic() + config.read_timeout_s
            super().handle_one_request()

        def parse_request(self) -> bool:
            """Parse the request line and headers, then refuse the request if where its body ends is unclear."""
            self._consumed, self._declared = False, None
            self._framing_checked, self._framing_error = False, None
            self._header_lines = []
            recorder = self.rfile if isinstance(self.rfile, _HeaderRecorder) else None
            if recorder is not None:
                recorder.lines = self._header_lines
            try:
                parsed = super().parse_request()  # runs handle_expect_100, which checks the framing first
            finally:
                if recorder is not None:
                    recorder.lines = None
            if not parsed:  # an error answer has been sent
                self._header_lines = None
                return False
            return self._framing_ok()

        def _framing_ok(self) -> bool:
            """Whether the body's end is certain; if not, a 4xx has been sent and the connection will be closed."""
            if not self._framing_checked:
                self._framing_checked = True
                lines, self._header_lines = self._header_lines, None
                try:
                    self._declared = request_body_length(lines or [], self.headers)
                except ApiError as exc:
                    self._framing_error = exc
                    # Nothing after this request can be told apart from its body: the connection must end here.
                    self._send(exc.status, exc.body(), exc.headers, close=True)
            return self._framing_error is None

        def version_string(self) -> str:
            """The Server header, without the Python version."""
            return "tokencredit"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            """Route access logs to logging (quiet by default)."""
            log.debug("%s " + format, self.address_string(), *args)

        def __getattr__(self, name: str) -> object:
            """Any method without a do_ handler (PUT, DELETE, PATCH, OPTIONS, ...) gets a JSON 405, not a 501."""
            if name.startswith("do_"):
                return self._not_allowed
            raise AttributeError(name)

        # -------------------------------------------------------------- methods
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
            """GET /v1/models."""
            if not self._authorized():
                return
            if self._route() == "/models":
                self._send(200, server.models())
            else:
                self._not_allowed()

        def do_HEAD(self) -> None:  # noqa: N802 - the http.server hook name
            """The GET answer's headers without its body."""
            self.do_GET()

        def do_POST(self) -> None:  # noqa: N802 - the http.server hook name
            """POST /v1/chat/completions and /v1/completions."""
            if not self._authorized():
                return
            route = self._route()
            endpoint = {"/chat/completions": server.chat_completion, "/completions": server.completion}.get(route)
            if endpoint is None:
                self._not_allowed()
                return
            try:
                body = self._body()
                deadline = time.monotonic() + config.request_timeout_s if config.request_timeout_s else None
                result = endpoint(body, RequestContext(deadline, self._client_gone))
            except ApiError as exc:
                self._send_error(exc)
                return
            except RequestCancelled as exc:
                log.info("%s left before its answer was ready (%s); generation stopped", self.address_string(),
                         exc)
                self.close_connection = True
                return
            except Exception as exc:  # a failure inside the model must still answer the client
                log.exception("request failed")
                self._send(500, ApiError(500, f"internal error: {exc}", type_="server_error").body(), close=True)
                return
            if isinstance(result, dict):
                self._send(200, result)
            else:
                self._stream(result)

        def _not_allowed(self) -> None:
            """404 for an unknown path, else 405 naming the methods the path takes."""
            if not self._authorized():
                return
            route = self._route()
            if route not in _ROUTES:
                self._send_error(ApiError(404, f"no route {self.command} {self.path[:200]}", code="not_found"))
                return
            allow = _ROUTES[route]
            self._send_error(ApiError(405, f"{self.command} is not allowed on {route}; use {allow}",
                                      code="method_not_allowed", headers={"Allow": allow}))

        # -------------------------------------------------------------- request parts
        def _route(self) -> str:
            """The path without the query and the /v1 prefix."""
            path = self.path.split("?", 1)[0].rstrip("/")
            return path[3:] if path.startswith("/v1/") else path

        def _authorized(self) -> bool:
            """True without a configured key or with the right bearer token; else a 401 has been sent."""
            if key is None:
                return True
            scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
            given = token.strip().encode("latin-1", "replace")  # header text is latin-1-decoded bytes
            # compare_digest runs even for a wrong scheme so timing tells nothing about which check failed.
            if hmac.compare_digest(given, key) and scheme.lower() == "bearer":
                return True
            self._send_error(ApiError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
            return False

        def _content_length(self) -> int:
            """The POST body's length (framing already checked), refusing a missing or oversized one."""
            if self._declared is None:
                raise ApiError(411, "a POST needs a Content-Length header", code="length_required")
            if self._declared > config.max_body_bytes:
                raise ApiError(413, f"the request body is over this server's limit of {config.max_body_bytes} "
                                    "bytes", code="request_too_large")
            return self._declared

        def handle_expect_100(self) -> bool:
            """Refuse before the client sends its body when the headers already rule the request out."""
            if not self._framing_ok() or not self._authorized():
                return False
            if self.command == "POST":
                try:
                    self._content_length()
                except ApiError as exc:
                    self._send_error(exc)
                    return False
            return super().handle_expect_100()

        def _body(self) -> object:
            """The JSON request body (a 408 if it does not arrive within read_timeout_s)."""
            length = self._content_length()
            try:
                raw = self.rfile.read(length) if length else b""
            except TimeoutError as exc:
                raise ApiError(408, f"the request body did not arrive within {config.read_timeout_s} s",
                               code="timeout") from exc
            if len(raw) < length:  # the client closed its side early; _body_unread still says True
                raise ApiError(400, f"the body ended after {len(raw)} of {length} bytes")
            self._consumed = True
            return parse_json_body(raw)

        def _body_unread(self) -> bool:
            """Whether bytes of this request may be left unread (they must never be taken for a request)."""
            if getattr(self, "headers", None) is None or not self._framing_checked or self._framing_error is not None:
                return True  # malformed or unchecked framing: nothing after it can be trusted
            if self._consumed:
                return False
            if self._declared is None:
                # No length means no body, but a POST without one most likely sent a body it cannot delimit.
                return self.command == "POST"
            return self._declared > 0

        def _client_gone(self) -> bool:
            """Whether the client has hung up (polled between decode steps)."""
            return _peer_closed(self.connection)

        # -------------------------------------------------------------- answers
        def _prepare_write(self) -> None:
            """Writes get the full read_timeout_s, not what the request's read deadline left."""
            try:
                self.connection.settimeout(config.read_timeout_s or None)
            except OSError:
                pass

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own errors (bad request line, headers too large, ...) as JSON, closing the connection."""
            if self.request_version == "HTTP/0.9":
                # A line without a version is garbage far more often than an HTTP/0.9 client: answer with headers.
                self.request_version = "HTTP/1.0"
            text = message or self.responses.get(code, ("error",))[0]
            type_ = "server_error" if code >= 500 else "invalid_request_error"
            self._send(code, ApiError(code, text, type_=type_).body(), close=True)

        def _send_error(self, exc: ApiError) -> None:
            """An ApiError as its JSON answer."""
            self._send(exc.status, exc.body(), exc.headers)

        def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None,
                  close: bool = False) -> None:
            """A JSON response; when the request's body was left unread, the connection is closed after it."""
            data = json.dumps(payload).encode()
            close = close or self._body_unread()
            self._prepare_write()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            except _CONNECTION_GONE as exc:
                log.debug("%s left before its answer was sent: %s", self.address_string(), exc)
                self.close_connection = True

        def _stream(self, chunks: Iterator[dict]) -> None:
            """Server-sent events, ended by ``data: [DONE]``."""
            self._prepare_write()
            self.close_connection = True
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except _CONNECTION_GONE as exc:
                log.info("%s left mid-stream (%s)", self.address_string(), type(exc).__name__)

    return Handler


class ServeHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that caps open connections and stays quiet about clients that vanish."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int = 32
                 ) -> None:
        """Bind ``address``; at most ``max_connections`` connections are handled at once."""
        super().__init__(address, handler)
        self.max_connections = max_connections
        self.active_connections = 0
        self._count_lock = threading.Lock()
        self._last_refusal_log = float("-inf")

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        """Hand the connection to a thread, or refuse it at once when the cap is reached."""
        with self._count_lock:
            full = self.active_connections >= self.max_connections
            if not full:
                self.active_connections += 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: tuple) -> None:
        """Handle one connection in its thread; its slot is freed however it ends."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        """Free one connection slot."""
        with self._count_lock:
            self.active_connections -= 1

    def _refuse(self, request: socket.socket) -> None:
        """A 503 written without reading the request (this runs on the accepting thread, so it never blocks)."""
        body = json.dumps(ApiError(503, f"the server has {self.max_connections} open connections, its limit; "
                                        "retry later", code="too_many_connections", type_="server_error").body())
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        try:
            request.setblocking(False)
            request.send((head + body).encode())
            # Closing with unread bytes makes the kernel send a reset, which can swallow the 503: drain what is there.
            for _ in range(16):
                if not request.recv(65536):
                    break
        except OSError:
            pass
        now = time.monotonic()
        if now - self._last_refusal_log >= 10.0:  # a flood of refusals must not become a flood of log lines
            self._last_refusal_log = now
            log.warning("refusing connections: %d are open, the limit (max_connections)", self.max_connections)
        self.shutdown_request(request)

    def handle_error(self, request: socket.socket, client_address: tuple) -> None:
        """One quiet line for a client that hung up; a logged traceback only for real failures."""
        exc = sys.exc_info()[1]
        if isinstance(exc, _CONNECTION_GONE):
            log.debug("connection from %s ended: %s", client_address[0], type(exc).__name__)
        else:
            log.error("error while serving %s", client_address[0], exc_info=True)


def make_http_server(server: ModelServer, host: str = "127.0.0.1", port: int = 0) -> ServeHTTPServer:
    """An HTTP server (not yet serving) for ``server``; port 0 picks a free port (see ``server_address``)."""
    return ServeHTTPServer((host, port), make_handler(server), server.config.max_connections)


def run_serve(config: ServeConfig) -> None:
    """Load the model and serve until interrupted; without a configured key, TOKENCREDIT_API_KEY is used if set."""
    if not config.api_key:
        config.api_key = os.environ.get(API_KEY_ENV) or None
    if not config.api_key and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use the model", config.host)
    server = ModelServer.from_config(config)
    httpd = make_http_server(server, config.host, config.port)
    host, port = httpd.server_address[:2]
    print(json.dumps({"serving": server.name, "base_url": f"http://{host}:{port}/v1",
                      "api_key_required": bool(config.api_key)}), flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()

"""The model-sampling core of `tokencredit serve`: one local causal LM answering OpenAI-style request bodies.

``ModelServer`` takes a request body (a parsed JSON object) and returns the response dict, or the chunk dicts of a
streamed answer; it knows nothing of HTTP. The HTTP server (``tokencredit.serve``) puts it behind the OpenAI
routes, and the judges' local backend (``tokencredit.judges.backends.HFBackend``) calls it directly, so neither
depends on the other.

What it checks and does (the limits are ``ServeConfig`` fields; ``tokencredit.serve``'s module docstring and
``docs/serve.md`` list them all, HTTP ones included):

- Request fields: ``model`` (must be the served name), ``messages`` / ``prompt`` (a string or a list of
  strings), ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (0 = greedy), ``top_p``, ``n``,
  ``stop``, ``seed``, ``stream``, and log-probabilities (chat: ``logprobs`` + ``top_logprobs`` <= 20;
  completions: ``logprobs`` <= 5). A bad field raises ``ApiError`` with the HTTP status and the OpenAI error
  fields.
- Log-probabilities are those of the model's own next-token distribution (before temperature and top-p); they
  are computed only for requests that ask for them, and only the drawn token's and the top-k are kept.
- Limits: ``max_tokens_limit``, ``default_max_tokens`` (shrunk to what the context has left), the context (the
  longest prompt plus ``max_tokens`` must fit; a prompt over it within its first ``PREFIX_CHARS_PER_TOKEN``
  characters per context token is refused without tokenizing the rest), and ``max_rows`` (prompts x ``n``).
- One request generates at a time (``ModelServer.lock``). A ``RequestContext`` carries the request's deadline
  and a check for a departed client: waiting for the model past the deadline raises a 503 ``ApiError``;
  generation that reaches it stops and the unfinished choices end with ``finish_reason: "length"``; a client
  that leaves (seen between decode steps, or while waiting) raises ``RequestCancelled``.
- Chat messages take the roles ``system``, ``developer`` (rendered as ``system``), ``user`` and ``assistant``;
  only a message's role and content reach the chat template, and a tokenizer without one renders
  ``role: content`` lines followed by ``assistant:``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokencredit.generation import eos_ids, generate
from tokencredit.token_text import token_pieces

MAX_N = 16
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
MAX_STOP = 4
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_BODY_BYTES = 8 * 1024 * 1024
PREFIX_CHARS_PER_TOKEN = 16  # a prompt longer than this many characters per context token is measured on a prefix
# Chat roles taken. "developer" is OpenAI's newer name for "system" and is rendered as one (chat templates know
# "system"); "tool" and "function" answer tool calls, which this server never makes.
CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass
class ServeConfig:
    """Settings of `tokencredit serve`, limits included (see tokencredit.serve's module docstring)."""

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
        """Refuse with ``status``; ``headers`` go into the HTTP answer (Allow, Retry-After, ...)."""
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
        """Force ``eos_id`` once ``deadline`` (time.monotonic()) passes; poll ``client_gone`` every step."""
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
        """Keep the ``top`` likeliest tokens per step (0: only the drawn token's log-prob)."""
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

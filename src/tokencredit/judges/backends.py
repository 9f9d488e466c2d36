"""Judge backends: one interface over an OpenAI-compatible HTTP endpoint and a local Hugging Face causal LM.

Both answer chat requests (:class:`ChatRequest` -> :class:`ChatResult`, with per-token log-probabilities when
asked) and score a closed set of answers (:meth:`JudgeBackend.option_logprobs`), which is how a labeler reads a
preference from log-probabilities rather than from sampled text. Every answer goes through a
:class:`~tokencredit.judges.cache.JudgeCache` when one is given, so a rerun of an interrupted job asks only
for what is missing.

HTTP: API key from an environment variable (``OPENAI_API_KEY`` by default; none needed for a local server),
at most ``concurrency`` requests in flight, a wall-clock deadline over each attempt (connect, send and the whole
answer), and retries with exponential backoff and jitter on 408/409/429, 5xx, connection failures, deadlines
and bodies that are not a chat completion (``Retry-After`` is honoured). Redirects are never followed.

What a failure costs depends on whose fault it is. 401/403/404 (and a redirect) mean the endpoint, key or model
is wrong, so the whole job stops (:class:`JudgeError`). Another 4xx is about one request: that request gets a
:class:`ChatResult` with ``error`` set, nothing is cached, and the job goes on. A transient problem that outlasts
every retry stops the job, since the server is unwell; what was answered is in the cache for the rerun.

Two size limits keep a hostile or broken peer from exhausting memory. An answer body is read in chunks and never
past ``max_response_bytes``; a success answer over it counts as a malformed answer (retried, then the job stops).
A request whose messages total more than ``max_prompt_chars`` characters is never sent: that record fails.
"""

from __future__ import annotations

import email.message
import http.client
import json
import logging
import math
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokencredit.judges.cache import JudgeCache, request_key
from tokencredit.judges.errors import JudgeError

log = logging.getLogger(__name__)

# The largest answers the labelers ask for (1024 tokens of text, or one token with 20 alternatives) are tens of
# kilobytes; even top-20 log-probabilities at each of a thousand tokens fit under this.
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# About 250k tokens of English: past the context of any judge this project runs, far below a memory problem.
DEFAULT_MAX_PROMPT_CHARS = 1_000_000
_READ_CHUNK = 64 * 1024


class RequestRejected(JudgeError):
    """The server refused one request (a 4xx about that request); the job marks it failed and goes on."""


class RedirectRefused(JudgeError):
    """The endpoint answered with a redirect, which the judge never follows."""

    def __init__(self, url: str, status: int, location: str | None) -> None:
        """Name the refused redirect: where the request went, the status and the Location it pointed at."""
        super().__init__(
            f"{url} answered HTTP {status} redirecting to {location or '(no Location header)'}; the judge never "
            "follows redirects, so the request and its API key only ever go to base_url: set base_url to the "
            "address that answers directly")
        self.status, self.location = status, location


@dataclass(frozen=True)
class JudgeFailure:
    """Stands in for the option scores of a request the server refused (see :meth:`JudgeBackend.option_logprobs`)."""

    message: str


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
    """A judge's answer, or (``error`` set, empty text) why the server refused to give one."""

    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    cached: bool = False  # served from the cache, not asked
    error: str | None = None  # the request was refused; such a result is never cached

    def to_dict(self) -> dict:
        """JSON-able form, as stored in the cache."""
        out = {"text": self.text, "finish_reason": self.finish_reason, "logprobs": None}
        if self.logprobs is not None:
            out["logprobs"] = [asdict(t) for t in self.logprobs]
        return out

    @classmethod
    def from_dict(cls, data: dict, cached: bool = False) -> ChatResult:
        """Inverse of :meth:`to_dict`; ValueError when ``data`` does not have its shape (a damaged cache row)."""
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise ValueError("no 'text' string")
        finish = data.get("finish_reason")
        if finish is not None and not isinstance(finish, str):
            raise ValueError("'finish_reason' is not a string")
        lps = data.get("logprobs")
        if lps is not None and not isinstance(lps, list):
            raise ValueError("'logprobs' is not a list")
        return cls(data["text"], finish, [_token_logprob(t) for t in lps] if lps is not None else None, cached)


def _number(value: object) -> float:
    """A JSON number as a float (ValueError for anything else, bools included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def _token_logprob(data: object) -> TokenLogprob:
    """A stored TokenLogprob (ValueError when it does not have the shape :meth:`ChatResult.to_dict` writes)."""
    if not isinstance(data, dict) or not isinstance(data.get("token"), str):
        raise ValueError("a log-probability entry without a 'token' string")
    top = data.get("top", {})
    if not isinstance(top, dict):
        raise ValueError("a log-probability entry whose 'top' is not an object")
    return TokenLogprob(data["token"], _number(data.get("logprob")), {str(k): _number(v) for k, v in top.items()})


@dataclass
class JudgeStats:
    """Counters of one backend: answers from the cache, asked, re-asked (unreadable in the cache), refused or too
    long, retries, and damaged cache rows dropped."""

    cached: int = 0
    asked: int = 0
    reasked: int = 0
    failed: int = 0
    retries: int = 0
    discarded: int = 0


def scores_readable(scores: dict[str, float]) -> bool:
    """False when an option score is NaN or +inf: no preference can be read from that answer.

    -inf is allowed: it is how an option that is not among the returned alternatives is scored.
    """
    return not any(math.isnan(v) or v == math.inf for v in scores.values())


class JudgeBackend:
    """Base class: caching and concurrency around :meth:`_ask` (one uncached request)."""

    concurrency: int = 1
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS

    def __init__(self, cache: JudgeCache | str | Path | None = None,
                 max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> None:
        """Use ``cache`` (a JudgeCache or a path to one) for every answer; refuse prompts over ``max_prompt_chars``
        characters (all messages together)."""
        if max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be >= 1 (got {max_prompt_chars})")
        self.cache = JudgeCache(cache) if isinstance(cache, (str, Path)) else cache
        self.max_prompt_chars = max_prompt_chars
        self.stats = JudgeStats()
        self._stats_lock = threading.Lock()

    def identity(self) -> dict:
        """What, besides the request, decides the answer (part of the cache key)."""
        raise NotImplementedError

    def _ask(self, request: ChatRequest) -> ChatResult:
        """Answer one request (no cache); raise RequestRejected when the server refuses this request alone."""
        raise NotImplementedError

    def _ask_many(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Answer uncached requests; the default runs ``concurrency`` of them at a time, stored as they finish.

        A refused request becomes a result with ``error`` set; any other error stops the batch (requests not yet
        started are dropped, those in flight finish and are stored) and is raised.
        """

        def one(request: ChatRequest) -> ChatResult:
            """Ask, count and store one answer."""
            try:
                result = self._ask(request)
            except RequestRejected as exc:
                with self._stats_lock:
                    self.stats.failed += 1
                log.warning("judge request refused: %s", exc)
                return ChatResult("", error=str(exc))
            self._keep(request, result)
            return result

        if self.concurrency <= 1 or len(requests) <= 1:
            return [one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(one, r) for r in requests]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in futures if f in done and f.exception() is not None]
            if errors:
                for f in futures:
                    f.cancel()  # a dead endpoint should not be asked thousands more times before we stop
        if errors:
            raise errors[0]
        return [f.result() for f in futures]

    def _key(self, request: ChatRequest) -> str:
        """The cache key of a request to this backend."""
        return request_key(self.identity(), request.to_dict())

    def _keep(self, request: ChatRequest, result: ChatResult) -> None:
        """Count a freshly asked answer and put it in the cache."""
        with self._stats_lock:
            self.stats.asked += 1
        if self.cache is not None:
            self.cache.put(self._key(request), request.to_dict(), result.to_dict())

    def _too_long(self, request: ChatRequest) -> str | None:
        """Why ``request`` may not be sent (its prompt is over ``max_prompt_chars``), or None."""
        size = sum(len(m.get("content") or "") for m in request.messages)
        if size <= self.max_prompt_chars:
            return None
        reason = (f"prompt of {size} characters is over max_prompt_chars={self.max_prompt_chars}; not sent "
                  "(shorten the record, or raise max_prompt_chars if the judge takes prompts that long)")
        with self._stats_lock:
            self.stats.failed += 1
        log.warning("judge request not sent: %s", reason)
        return reason

    def _cached(self, key: str) -> ChatResult | None:
        """The cached answer of ``key``, or None; a damaged row is dropped with a warning and counts as a miss."""
        try:
            stored = self.cache.get(key)
            return None if stored is None else ChatResult.from_dict(stored, cached=True)
        except ValueError as exc:  # MalformedEntry (not a JSON object), or a shape from_dict refuses
            # One bad row must not end a long job: asking again costs one request, and the fresh answer replaces it.
            log.warning("judge cache %s: the stored answer %s is damaged (%s); dropping it and asking again",
                        self.cache.path, key, exc)
            self.cache.delete(key)
            with self._stats_lock:
                self.stats.discarded += 1
            return None

    def chat(self, requests: Sequence[ChatRequest],
             reask_if: Callable[[int, ChatResult], bool] | None = None) -> list[ChatResult]:
        """Answers in request order: cached ones from the cache, the rest asked (and stored as they arrive).

        ``reask_if(i, answer)`` is asked about each cached answer to ``requests[i]``; where it is true the answer
        is dropped from the cache and the request asked again, so the fresh answer takes the same key. A request
        over ``max_prompt_chars`` is neither looked up nor sent: its result has ``error`` set.
        """
        results: list[ChatResult | None] = [None] * len(requests)
        missing = []
        for i, request in enumerate(requests):
            too_long = self._too_long(request)
            if too_long is not None:
                results[i] = ChatResult("", error=too_long)
                continue
            if self.cache is not None:
                key = self._key(request)
                result = self._cached(key)
                if result is not None:
                    if reask_if is None or not reask_if(i, result):
                        results[i] = result
                        self.stats.cached += 1
                        continue
                    self.cache.delete(key)
                    self.stats.reasked += 1
            missing.append(i)
        for i, result in zip(missing, self._ask_many([requests[i] for i in missing])):
            results[i] = result
        return results

    def option_logprobs(self, requests: Sequence[ChatRequest], options: Sequence[str],
                        reask_unreadable: bool = False) -> list[dict[str, float] | JudgeFailure]:
        """Per request, log-probability of each option as the first answer token (-inf when not among the
        returned alternatives); an empty dict when the backend gave no log-probabilities; a JudgeFailure when
        the server refused the request. With ``reask_unreadable``, cached answers whose scores are not
        readable (see :func:`scores_readable`) are asked again.

        The default asks for one token with the top-20 alternatives and matches options to tokens after
        stripping whitespace; a backend that can score options exactly overrides this.
        """
        asked = [ChatRequest(r.messages, max_tokens=1, temperature=0.0, top_logprobs=20, seed=r.seed)
                 for r in requests]
        reask_if = None
        if reask_unreadable:
            def reask_if(i: int, result: ChatResult) -> bool:
                """Whether a cached answer's option scores cannot be read."""
                return not scores_readable(_option_scores(result, options))

        out: list[dict[str, float] | JudgeFailure] = []
        for result in self.chat(asked, reask_if):
            out.append(JudgeFailure(result.error) if result.error else _option_scores(result, options))
        return out


def _option_scores(result: ChatResult, options: Sequence[str]) -> dict[str, float]:
    """Each option's log-probability as the first token of ``result`` ({} without log-probabilities)."""
    if not result.logprobs:
        return {}
    first = result.logprobs[0]
    seen = dict(first.top)
    seen.setdefault(first.token, first.logprob)
    if not scores_readable(seen):
        # One NaN among the alternatives means the numbers are garbage; which option max() picks would be luck.
        return {option: math.nan for option in options}
    scores = {}
    for option in options:
        matches = [lp for tok, lp in seen.items() if tok.strip() == option]
        scores[option] = max(matches) if matches else -math.inf
    return scores


# ---------------------------------------------------------------------- OpenAI-compatible HTTP
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
# These say the endpoint, key or model is wrong, so every other request would fail the same way.
_FATAL_STATUS = {401, 403, 404}


class _Deadline:
    """A wall-clock limit on one HTTP exchange.

    A socket timeout bounds each read, not the exchange: a server that sends a byte every few seconds is never
    cut by it. So a timer shuts the exchange's socket down when the time is up, which ends a blocked connect,
    send or read at once, wherever the exchange is.
    """

    def __init__(self, seconds: float) -> None:
        """Start the clock."""
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sock: socket.socket | None = None
        self._done = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        """Seconds left (at least a little, so a socket timeout derived from it stays blocking)."""
        return max(self.end - time.monotonic(), 0.01)

    def watch(self, sock: socket.socket) -> None:
        """Cut ``sock`` when the time is up (at once if it already is)."""
        with self._lock:
            self._sock = sock
            if self.expired:
                self._cut()

    def _expire(self) -> None:
        """Timer callback: mark the exchange late and cut its socket, unless it already finished."""
        with self._lock:
            if self._done:
                return
            self.expired = True
            self._cut()

    def _cut(self) -> None:
        """Shut the watched socket down (called with the lock held)."""
        if self._sock is None:
            return
        try:
            # The plain-socket method, so a TLS socket is cut at the TCP level without touching its TLS state
            # from this thread.
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: nothing left to cut

    def stop(self) -> bool:
        """End the watch; True if the time ran out before it ended."""
        with self._lock:
            self._done = True
        self._timer.cancel()
        return self.expired


class _DeadlineMixin:
    """Connection behaviour shared by HTTP and HTTPS: connect within the deadline, then hand it the socket."""

    def __init__(self, *args: object, deadline: _Deadline | None = None, **kwargs: object) -> None:
        """A connection watched by ``deadline`` (None: an ordinary connection)."""
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        """Connect (and for HTTPS, handshake) with no more time than the deadline leaves."""
        if self._deadline is not None:
            self.timeout = self._deadline.remaining()
        super().connect()
        if self._deadline is not None:
            self._deadline.watch(self.sock)


class _DeadlineHTTPConnection(_DeadlineMixin, http.client.HTTPConnection):
    """An HTTP connection under a deadline."""


class _DeadlineHTTPSConnection(_DeadlineMixin, http.client.HTTPSConnection):
    """An HTTPS connection under a deadline."""


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    """Opens http:// requests on connections watched by the request's ``deadline`` attribute."""

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        """Open the request."""
        return self.do_open(_DeadlineHTTPConnection, req, deadline=getattr(req, "deadline", None))


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    """Opens https:// requests on connections watched by the request's ``deadline`` attribute."""

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        """Open the request (default TLS context: certificates and host names are checked)."""
        return self.do_open(_DeadlineHTTPSConnection, req, deadline=getattr(req, "deadline", None))


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Raises on every redirect instead of following it.

    urllib would re-send the request to the new address with its headers, API key included, and turn a POST
    into a GET whose answer would then be cached as the judge's; neither may happen.
    """

    def redirect_request(self, req: urllib.request.Request, fp: object, code: int, msg: str,
                         headers: email.message.Message, newurl: str) -> None:
        """Refuse the redirect, naming where it pointed."""
        fp.close()
        raise RedirectRefused(req.full_url, code, newurl)


@dataclass
class _Reply:
    """Status, headers and body of one HTTP exchange; ``too_large`` says why the body was cut at the size limit."""

    status: int
    headers: email.message.Message
    body: bytes
    too_large: str | None = None


def _read_capped(resp: object, headers: email.message.Message, limit: int) -> tuple[bytes, str | None]:
    """The body of ``resp``, read in chunks and never past ``limit`` bytes: (body, None), or (its start, why it
    stopped) for an answer over the limit; IncompleteRead when the body ends before its Content-Length.
    """
    try:
        claimed = int(headers.get("Content-Length") or "")
    except ValueError:
        claimed = None  # absent or garbled: the chunked read below still stops at the limit
    if claimed is not None and claimed > limit:
        return b"", (f"the server announced Content-Length {claimed} bytes, larger than max_response_bytes={limit}; "
                     "not read")
    body = bytearray()
    while True:
        piece = resp.read(min(_READ_CHUNK, limit + 1 - len(body)))
        if not piece:
            break
        body += piece
        if len(body) > limit:
            # Only an error status's message is still wanted from a body this size, and it comes first.
            return bytes(body[:_READ_CHUNK]), f"the answer is larger than max_response_bytes={limit}; not read further"
    if claimed is not None and len(body) < claimed:
        # A bounded read returns what came before the connection closed, where read() would have raised.
        raise http.client.IncompleteRead(bytes(body), claimed - len(body))
    return bytes(body), None


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
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    ) -> None:
        """``base_url`` ends before ``/chat/completions`` (e.g. ``http://127.0.0.1:8000/v1``); ``timeout`` is the
        wall-clock limit in seconds on one attempt, from connecting to the last byte of the answer;
        ``max_response_bytes`` the most of an answer body that is read."""
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or backoff < 0 or max_response_bytes < 1:
            raise ValueError("concurrency must be >= 1, max_retries >= 0, timeout > 0, backoff >= 0 and "
                             "max_response_bytes >= 1")
        super().__init__(cache, max_prompt_chars)
        self.max_response_bytes = max_response_bytes
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        # Environment proxies still apply; only redirects and the plain connection handlers are replaced.
        self._opener = urllib.request.build_opener(_RefuseRedirects, _DeadlineHTTPHandler, _DeadlineHTTPSHandler)

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

    def _post(self, url: str, data: bytes) -> _Reply:
        """One POST, whole answer read within the deadline; TimeoutError when the deadline cut it."""
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
        if self.api_key:
            # Unredirected: urllib never copies it onto a follow-up request (and redirects are refused anyway).
            req.add_unredirected_header("Authorization", f"Bearer {self.api_key}")
        deadline = _Deadline(self.timeout)
        req.deadline = deadline  # read by the connection handlers
        try:
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    reply = _Reply(resp.status, resp.headers,
                                   *_read_capped(resp, resp.headers, self.max_response_bytes))
            except urllib.error.HTTPError as exc:  # an error status; its body is read under the same deadline
                with exc:
                    reply = _Reply(exc.code, exc.headers, *_read_capped(exc, exc.headers, self.max_response_bytes))
        except (OSError, http.client.HTTPException) as exc:
            if deadline.stop():
                raise TimeoutError(f"no complete answer within {self.timeout:g}s") from exc
            raise
        finally:
            expired = deadline.stop()
        if expired:  # a body without Content-Length ends quietly when its socket is cut: it is not whole
            raise TimeoutError(f"no complete answer within {self.timeout:g}s")
        return reply

    def _ask(self, request: ChatRequest) -> ChatResult:
        """POST the request, retrying transient failures with exponential backoff."""
        data = json.dumps(self._body(request)).encode()
        url = f"{self.base_url}/chat/completions"
        problem = ""
        for attempt in range(self.max_retries + 1):
            wait_s = None
            try:
                reply = self._post(url, data)
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
                problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            else:
                if 200 <= reply.status < 300 and reply.too_large:
                    problem = reply.too_large  # like any other answer that is not a usable chat completion
                elif 200 <= reply.status < 300:
                    try:
                        return _parse_chat(json.loads(reply.body))
                    # RecursionError: a body of nested brackets is deeper than the JSON decoder goes.
                    except (ValueError, KeyError, IndexError, TypeError, RecursionError) as exc:
                        problem = f"the server answered with something that is not a chat completion ({exc})"
                else:
                    problem = f"HTTP {reply.status}: {_error_message(reply.body)}"
                    if 300 <= reply.status < 400:  # one urllib does not treat as a redirect (300, 304, ...)
                        raise RedirectRefused(url, reply.status, reply.headers.get("Location"))
                    if reply.status in _FATAL_STATUS:
                        raise JudgeError(f"{url} rejected the request: {problem} (check base_url, model and the "
                                         "API key; every request would fail the same way)")
                    if 400 <= reply.status < 500 and reply.status not in _RETRY_STATUS:
                        raise RequestRejected(f"{url} rejected this request: {problem}")
                    if reply.status not in _RETRY_STATUS:
                        raise JudgeError(f"{url} failed: {problem}")
                    wait_s = _retry_after(reply.headers)
            if attempt == self.max_retries:
                break
            with self._stats_lock:
                self.stats.retries += 1
            delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random())
            delay = max(delay, wait_s or 0.0)
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


def _error_message(raw: bytes) -> str:
    """The error message of an HTTP error body, or its start."""
    text = raw.decode("utf-8", "replace")
    try:
        return str(json.loads(text)["error"]["message"])[:1000]
    except (ValueError, KeyError, TypeError, RecursionError):
        return text[:200]


def _retry_after(headers: email.message.Message | None) -> float | None:
    """Seconds from a Retry-After header, if any (capped at 60)."""
    value = headers.get("Retry-After") if headers else None
    try:
        return min(float(value), 60.0) if value else None
    except ValueError:
        return None


# ---------------------------------------------------------------------- local Hugging Face model
class HFBackend(JudgeBackend):
    """A local causal LM as judge: requests batched through the sampler, options scored exactly."""

    def __init__(self, model: object, tokenizer: object, name: str = "local", batch_size: int = 8,
                 cache: JudgeCache | str | Path | None = None,
                 max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> None:
        """Judge with ``model``; ``name`` identifies it in the cache key (use the folder or built-in name)."""
        from tokencredit.model_server import ModelServer

        super().__init__(cache, max_prompt_chars)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.server = ModelServer(model, tokenizer, name)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, batch_size: int = 8, device: str = "auto",
                        cache: JudgeCache | str | Path | None = None,
                        max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> HFBackend:
        """Load a judge model by built-in name, folder or cached hub id."""
        from tokencredit.model_server import ModelServer, ServeConfig

        server = ModelServer.from_config(ServeConfig(model=name_or_path, device=device))
        return cls(server.model, server.tokenizer, str(name_or_path), batch_size, cache, max_prompt_chars)

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

    def option_logprobs(self, requests: Sequence[ChatRequest], options: Sequence[str],
                        reask_unreadable: bool = False) -> list[dict[str, float] | JudgeFailure]:
        """Exact log P(option | rendered prompt) of each option's whole token sequence (not cached: cheap, so
        ``reask_unreadable`` has nothing to do); a JudgeFailure for a prompt over ``max_prompt_chars``."""
        refused = [self._too_long(r) for r in requests]
        if any(refused):
            fine = [r for r, why in zip(requests, refused) if why is None]
            scored = iter(self.option_logprobs(fine, options) if fine else [])
            return [JudgeFailure(why) if why else next(scored) for why in refused]
        import torch

        from tokencredit.generation import encode_prompts, position_ids_from_mask

        model, tokenizer = self.server.model, self.server.tokenizer
        option_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        if any(not ids for ids in option_ids):
            raise ValueError("every option must encode to at least one token")
        out: list[dict[str, float] | JudgeFailure] = []
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

"""`tokencredit serve MODEL`: any local causal LM behind an OpenAI-compatible HTTP API.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (and the same paths without
``/v1``). Supported request fields: ``model`` (must be the served name), ``messages`` / ``prompt`` (a string or a
list of strings), ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (0 = greedy), ``top_p``, ``n``,
``stop``, ``seed``, ``stream``, and log-probabilities (chat: ``logprobs`` + ``top_logprobs`` <= 20;
completions: ``logprobs`` <= 5). Log-probabilities are those of the model's own next-token distribution
(before temperature and top-p). A bad request gets a 4xx JSON body ``{"error": {"message", "type", "param",
"code"}}`` as the OpenAI API sends; an unexpected failure gets a 500 with the same shape.

Requests are served one at a time (one model, and a CPU or one GPU gains little from interleaving them); a
streamed answer is generated first and then sent as server-sent events, one chunk per token, so streaming
clients work but the first token does not arrive earlier.

A tokenizer without a chat template renders messages as ``role: content`` lines followed by ``assistant:``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from tokencredit.generation import eos_ids, generate
from tokencredit.rewards.labels import token_pieces

log = logging.getLogger(__name__)

MAX_N = 16
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5


@dataclass
class ServeConfig:
    """Settings of `tokencredit serve`."""

    model: str = "smollm2-135m-instruct"  # built-in name, model folder (a trained policy) or cached hub id
    host: str = "127.0.0.1"  # loopback by default: exposing a model to a network is a choice to make explicitly
    port: int = 8000  # 0 = any free port (printed at start)
    served_name: str | None = None  # the `model` clients must send; None = the folder or built-in name
    device: str = "auto"
    max_tokens_limit: int = 2048  # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request does not say


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI-style error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        """The JSON error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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


@dataclass
class _Choice:
    """One generated answer with its tokens and their log-probabilities."""

    text: str
    finish_reason: str
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[list[tuple[str, float]]]


class ModelServer:
    """The model, its tokenizer and the OpenAI request/response logic, independent of HTTP."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, name: str, config: ServeConfig | None = None
                 ) -> None:
        """Serve ``model`` under ``name``."""
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.config = config or ServeConfig()
        self.lock = threading.Lock()

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

    def chat_completion(self, body: dict) -> dict | Iterator[dict]:
        """POST /v1/chat/completions: a response dict, or chunk dicts when streaming."""
        self._check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ApiError(400, f"messages[{i}] must be an object with string 'role' and 'content'",
                               f"messages[{i}]")
        logprobs = body.get("logprobs", False)
        if not isinstance(logprobs, bool):
            raise ApiError(400, "'logprobs' must be a boolean for chat completions", "logprobs")
        top = body.get("top_logprobs")
        if top is not None and not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        top = _int(top if top is not None else 0, "top_logprobs", 0, MAX_TOP_LOGPROBS_CHAT)
        params = self.params(body, top if logprobs else None)
        prompt = self.render(messages)
        choices, prompt_tokens = self.sample([prompt], params)
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

    def completion(self, body: dict) -> dict | Iterator[dict]:
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
        choices, prompt_tokens = self.sample(prompts, params)
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

    def params(self, body: dict, top_logprobs: int | None) -> _Params:
        """Validated sampling parameters."""
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = self.config.default_max_tokens if max_tokens is None else max_tokens
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, "'seed' must be an integer", "seed")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean", "stream")
        return _Params(
            max_tokens=_int(max_tokens, "max_tokens", 1, self.config.max_tokens_limit),
            temperature=_number(body.get("temperature", 1.0), "temperature", 0.0, 2.0),
            top_p=_number(body.get("top_p", 1.0), "top_p", 0.0, 1.0, low_open=True),
            n=_int(body.get("n", 1), "n", 1, MAX_N), stop=stop, seed=seed, top_logprobs=top_logprobs,
            stream=stream,
        )

    def render(self, messages: list[dict]) -> str:
        """Messages as one prompt string: the chat template, or role-prefixed lines without one."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def sample(self, prompts: list[str], params: _Params) -> tuple[list[_Choice], int]:
        """n answers per prompt (prompt-major order) and the number of prompt tokens."""
        prompt_tokens = sum(len(self.tokenizer(p)["input_ids"]) for p in prompts)
        batch = [p for p in prompts for _ in range(params.n)]
        records: list[torch.Tensor] = []

        def record(seq: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            """Keep the model's own next-token log-probabilities of every step."""
            records.append(scores.float().log_softmax(-1))
            return scores

        generator = None
        if params.seed is not None:
            device = next(self.model.parameters()).device
            generator = torch.Generator(device=device).manual_seed(params.seed)
        with self.lock, torch.no_grad():
            out = generate(self.model, self.tokenizer, batch, max_new_tokens=params.max_tokens,
                           temperature=params.temperature if params.temperature > 0 else 1.0,
                           top_p=params.top_p, greedy=params.temperature == 0, stop_strings=params.stop,
                           logits_processors=[record], generator=generator)
        eos = set(eos_ids(self.model, self.tokenizer))
        choices = []
        for row, ids in enumerate(out.token_ids()):
            visible = [t for t in ids if t not in eos]
            # Pieces that join to the decoded answer (a lone token's decode can drop its leading space).
            tokens = token_pieces(self.tokenizer, visible, skip_special_tokens=True)
            lps, tops = [], []
            for step, tok in enumerate(visible):
                dist = records[step][row]
                lps.append(float(dist[tok]))
                if params.top_logprobs:
                    values, idx = dist.topk(min(params.top_logprobs, dist.numel()))
                    tops.append([(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, idx)])
                else:
                    tops.append([])
            # A stop string is cut from the text; its tokens leave the log-probabilities too.
            keep, pos = 0, 0
            while keep < len(tokens) and pos < len(out.texts[row]):
                pos += len(tokens[keep])
                keep += 1
            tokens, lps, tops = tokens[:keep], lps[:keep], tops[:keep]
            finished = bool(out.finished[row])
            choices.append(_Choice(out.texts[row], "stop" if finished else "length", tokens, lps, tops))
        return choices, prompt_tokens

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
        raise ApiError(400, f"'{name}' must be an integer between {low} and {high} (got {value!r})", name)
    return value


def _number(value: object, name: str, low: float, high: float, low_open: bool = False) -> float:
    """A number field within [low, high] ((low, high] when low_open), else a 400."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        bracket = "(" if low_open else "["
        raise ApiError(400, f"'{name}' must be a number in {bracket}{low}, {high}] (got {value!r})", name)
    return float(value)


# ---------------------------------------------------------------------- HTTP
MAX_BODY_BYTES = 8 * 1024 * 1024


def make_handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``server``."""

    class Handler(BaseHTTPRequestHandler):
        """OpenAI-compatible routes over a ModelServer."""

        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            """Route access logs to logging (quiet by default)."""
            log.debug("%s " + format, self.address_string(), *args)

        def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
            """GET /v1/models."""
            if self._route() == "/models":
                self._send(200, server.models())
            else:
                self._send(404, ApiError(404, f"no route GET {self.path}", code="not_found").body())

        def do_POST(self) -> None:  # noqa: N802 - the http.server hook name
            """POST /v1/chat/completions and /v1/completions."""
            route = self._route()
            endpoint = {"/chat/completions": server.chat_completion, "/completions": server.completion}.get(route)
            try:
                body = self._body()
                if endpoint is None:
                    raise ApiError(404, f"no route POST {self.path}", code="not_found")
                result = endpoint(body)
            except ApiError as exc:
                self._send(exc.status, exc.body())
                return
            except Exception as exc:  # a failure inside the model must still answer the client
                log.exception("request failed")
                self._send(500, ApiError(500, f"internal error: {exc}", type_="server_error").body())
                return
            if isinstance(result, dict):
                self._send(200, result)
            else:
                self._stream(result)

        def _route(self) -> str:
            """The path without the query and the /v1 prefix."""
            path = self.path.split("?", 1)[0].rstrip("/")
            return path[3:] if path.startswith("/v1/") else path

        def _body(self) -> object:
            """The JSON request body."""
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
            raw = self.rfile.read(length) if length else b""
            try:
                return json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc

        def _send(self, status: int, payload: dict) -> None:
            """A JSON response."""
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, chunks: Iterator[dict]) -> None:
            """Server-sent events, ended by ``data: [DONE]``."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for chunk in chunks:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    return Handler


def make_http_server(server: ModelServer, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) for ``server``; port 0 picks a free port (see ``server_address``)."""
    httpd = ThreadingHTTPServer((host, port), make_handler(server))
    httpd.daemon_threads = True
    return httpd


def run_serve(config: ServeConfig) -> None:
    """Load the model and serve until interrupted."""
    server = ModelServer.from_config(config)
    httpd = make_http_server(server, config.host, config.port)
    host, port = httpd.server_address[:2]
    print(json.dumps({"serving": server.name, "base_url": f"http://{host}:{port}/v1"}), flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()

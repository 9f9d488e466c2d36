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

This module is the HTTP layer. The model-sampling core it serves (``ServeConfig``, ``ModelServer``: request
validation, sampling, log-probabilities, the model-side limits) lives in ``tokencredit.model_server``, which the
judges' local backend uses without any HTTP code.
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
from collections.abc import Callable, Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tokencredit.model_server import ApiError, ModelServer, RequestCancelled, RequestContext, ServeConfig

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 32
API_KEY_ENV = "TOKENCREDIT_API_KEY"


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
        """Read from ``sock``; no deadline until handle_one_request sets one."""
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


class _OpenAIHandler(BaseHTTPRequestHandler):
    """OpenAI-compatible routes over a ModelServer; make_handler binds it to one server."""

    protocol_version = "HTTP/1.1"
    model_server: ModelServer  # these three are set by make_handler's subclass
    serve_config: ServeConfig
    api_key_bytes: bytes | None  # the configured API key as bytes; None = no key needed
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
        if self._reader is not None and self.serve_config.read_timeout_s:
            self._reader.deadline = time.monotonic() + self.serve_config.read_timeout_s
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
            self._send(200, self.model_server.models())
        else:
            self._not_allowed()

    def do_HEAD(self) -> None:  # noqa: N802 - the http.server hook name
        """The GET answer's headers without its body."""
        self.do_GET()

    def do_POST(self) -> None:  # noqa: N802 - the http.server hook name
        """POST /v1/chat/completions and /v1/completions."""
        if not self._authorized():
            return
        endpoint = self._endpoint()
        if endpoint is None:
            self._not_allowed()
            return
        try:
            body = self._body()
            result = endpoint(body, RequestContext(self._deadline(), self._client_gone))
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

    def _endpoint(self) -> Callable[[object, RequestContext], dict | Iterator[dict]] | None:
        """The ModelServer method that answers a POST to this path, or None."""
        server = self.model_server
        return {"/chat/completions": server.chat_completion, "/completions": server.completion}.get(self._route())

    def _deadline(self) -> float | None:
        """When the answer is due (a time.monotonic() value), request_timeout_s from now; None = no limit."""
        timeout = self.serve_config.request_timeout_s
        return time.monotonic() + timeout if timeout else None

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
        if self.api_key_bytes is None:
            return True
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        given = token.strip().encode("latin-1", "replace")  # header text is latin-1-decoded bytes
        # compare_digest runs even for a wrong scheme so timing tells nothing about which check failed.
        if hmac.compare_digest(given, self.api_key_bytes) and scheme.lower() == "bearer":
            return True
        self._send_error(ApiError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        return False

    def _content_length(self) -> int:
        """The POST body's length (framing already checked), refusing a missing or oversized one."""
        if self._declared is None:
            raise ApiError(411, "a POST needs a Content-Length header", code="length_required")
        limit = self.serve_config.max_body_bytes
        if self._declared > limit:
            raise ApiError(413, f"the request body is over this server's limit of {limit} bytes",
                           code="request_too_large")
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
            raise ApiError(408, f"the request body did not arrive within {self.serve_config.read_timeout_s} s",
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
            self.connection.settimeout(self.serve_config.read_timeout_s or None)
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


def make_handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``server``."""
    config = server.config

    class Handler(_OpenAIHandler):
        """OpenAI-compatible routes over ``server``."""

        model_server = server
        serve_config = config
        api_key_bytes = config.api_key.encode("utf-8") if config.api_key else None
        timeout = config.read_timeout_s  # the socket timeout StreamRequestHandler.setup applies

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

"""`tokencredit serve` under hostile or broken clients: raw sockets against a live server with small limits.

Every check ends by making sure the server still answers a normal request correctly.
"""

import http.client
import json
import logging
import socket
import struct
import threading
import time
from contextlib import contextmanager

import pytest

from tokencredit import model_server
from tokencredit.model_server import ModelServer, ServeConfig, context_limit
from tokencredit.serve import make_http_server, parse_json_body
from tokencredit.testing import save_tiny_causal_lm

WORDS = "yes no good bad a b c the answer is".split()
KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = dict(max_tokens_limit=64, max_rows=8, max_body_bytes=64 * 1024, read_timeout_s=0.5, max_connections=4,
              request_timeout_s=5.0, api_key=KEY)


class Live:
    """A running server and how to reach it."""

    def __init__(self, server, httpd):
        self.server, self.httpd = server, httpd
        self.port = httpd.server_address[1]

    def wait_idle(self, timeout=3.0):
        """Until every connection has been closed (the accept loop may still be handing one over)."""
        end = time.monotonic() + timeout
        while self.httpd.active_connections and time.monotonic() < end:
            time.sleep(0.02)
        return self.httpd.active_connections


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = save_tiny_causal_lm(tmp_path_factory.mktemp("harden") / "tiny", WORDS)
    server = ModelServer.from_config(ServeConfig(model=str(folder), served_name="tiny", device="cpu", **LIMITS))
    httpd = make_http_server(server, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Live(server, httpd)
    httpd.shutdown()
    httpd.server_close()


def call(live, method, path, body=None, headers=None, raw=None, auth=True):
    """One request on a fresh connection: (status, headers, parsed JSON or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {**(AUTH if auth else {}), **(headers or {})}
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, resp, (json.loads(payload) if payload else None)
    finally:
        conn.close()


def send_raw(live, data, timeout=5.0, shutdown=False):
    """Raw bytes in; everything the server sends until it closes the connection."""
    with socket.create_connection(("127.0.0.1", live.port), timeout=timeout) as s:
        s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def responses(data):
    """Parse back-to-back HTTP responses: [(status, headers dict, body)]."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        n = int(headers.get("content-length", 0))
        out.append((status, headers, rest[:n]))
        data = rest[n:]
    return out


def post_bytes(body, path="/v1/completions", extra="", auth=True):
    """A raw POST with a Content-Length and Connection: close."""
    key = f"Authorization: Bearer {KEY}\r\n" if auth else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n{key}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n").encode() + body


def assert_healthy(live):
    """A normal request still gets a correct answer."""
    status, _, body = call(live, "POST", "/v1/completions", {"model": "tiny", "prompt": "a b", "max_tokens": 4,
                                                             "temperature": 0})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["text"], str)
    assert body["usage"]["completion_tokens"] <= 4
    assert live.wait_idle() == 0


def assert_json_error(status, body, expected_status):
    assert status == expected_status, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


@contextmanager
def slow_model(server, delay=0.02):
    """Each forward pass sleeps ``delay`` and EOS is never drawn: generation runs its full length, slowly."""
    model, eos = server.model, server.tokenizer.eos_token_id
    forward = model.forward

    def slow_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits[..., eos] = float("-inf")
        time.sleep(delay)
        return out

    model.forward = slow_forward
    try:
        yield
    finally:
        del model.forward


# ------------------------------------------------------------------ auth
def test_api_key_is_required_on_every_route_and_never_logged(live, caplog):
    caplog.set_level(logging.DEBUG, logger="tokencredit.serve")
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong-key-xyz"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer \u00e9"}):
        for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat),
                                   ("POST", "/v1/nothing", chat), ("PUT", "/v1/models", None)):
            status, resp, payload = call(live, method, path, body, headers=headers, auth=False)
            assert_json_error(status, payload, 401)
            assert resp.getheader("WWW-Authenticate") == "Bearer"
            assert payload["error"]["code"] == "invalid_api_key"
    status, _, payload = call(live, "GET", "/v1/models")
    assert status == 200 and payload["data"][0]["id"] == "tiny"
    assert_healthy(live)
    assert KEY not in caplog.text and "wrong-key-xyz" not in caplog.text


# ------------------------------------------------------------------ bodies
DEEP = b'{"model": "tiny", "prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}"
CASES = {
    "not json": (b"{not json", 400, None),
    "empty body": (b"", 400, None),
    "array body": (b"[1, 2]", 400, None),
    "not utf-8": (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, None),
    "lone surrogate escape": (b'{"model": "tiny", "prompt": "\\ud800"}', 400, None),
    "lone low surrogate escape": (b'{"model": "tiny", "prompt": "a\\udfffb"}', 400, None),
    "utf-8 encoded surrogate": (b'{"model": "tiny", "prompt": "\xed\xa0\x80"}', 400, None),
    "surrogate in a key": (b'{"model": "tiny", "prompt": "a", "\\udc00": 1}', 400, None),
    "10000-deep nesting": (DEEP, 400, None),
    "40-deep nesting": (b'{"model": "tiny", "prompt": "a", "x": ' + b"[" * 40 + b"]" * 40 + b"}", 400, None),
    "NaN": (b'{"model": "tiny", "prompt": "a", "temperature": NaN}', 400, None),
    "Infinity": (b'{"model": "tiny", "prompt": "a", "max_tokens": Infinity}', 400, None),
    "huge seed": (b'{"model": "tiny", "prompt": "a", "seed": 1' + b"0" * 40 + b"}", 400, "seed"),
    "5000-digit seed": (b'{"model": "tiny", "prompt": "a", "seed": 1' + b"0" * 5000 + b"}", 400, None),
    "negative seed too small": (json.dumps({"model": "tiny", "prompt": "a", "seed": -(2**63) - 1}).encode(), 400,
                                "seed"),
    "float seed": (b'{"model": "tiny", "prompt": "a", "seed": 1.5}', 400, "seed"),
    "unknown model": (b'{"model": "gpt-9", "prompt": "a"}', 404, "model"),
    "no model": (b'{"prompt": "a"}', 400, "model"),
    "n is 0": (b'{"model": "tiny", "prompt": "a", "n": 0}', 400, "n"),
    "n is a string": (b'{"model": "tiny", "prompt": "a", "n": "2"}', 400, "n"),
    "huge n": (b'{"model": "tiny", "prompt": "a", "n": 1000000}', 400, "n"),
    "prompts x n over max_rows": (json.dumps({"model": "tiny", "prompt": ["a"] * 5, "n": 2}).encode(), 400,
                                  "prompt"),
    "9000 prompts": (json.dumps({"model": "tiny", "prompt": ["a"] * 9000}).encode(), 400, "prompt"),
    "32000 prompts, over the body limit": (json.dumps({"model": "tiny", "prompt": ["a"] * 32000}).encode(), 413,
                                           None),
    "max_tokens over the limit": (b'{"model": "tiny", "prompt": "a", "max_tokens": 65}', 400, "max_tokens"),
    "max_tokens float": (b'{"model": "tiny", "prompt": "a", "max_tokens": 1.5}', 400, "max_tokens"),
    "max_tokens bool": (b'{"model": "tiny", "prompt": "a", "max_tokens": true}', 400, "max_tokens"),
    "prompt of token ids": (b'{"model": "tiny", "prompt": [1, 2, 3]}', 400, "prompt"),
    "prompt null": (b'{"model": "tiny", "prompt": null}', 400, "prompt"),
    "stop not strings": (b'{"model": "tiny", "prompt": "a", "stop": [1]}', 400, "stop"),
    "five stops": (b'{"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    "stream not bool": (b'{"model": "tiny", "prompt": "a", "stream": "yes"}', 400, "stream"),
    "logprobs too many": (b'{"model": "tiny", "prompt": "a", "logprobs": 6}', 400, "logprobs"),
    "top_p zero": (b'{"model": "tiny", "prompt": "a", "top_p": 0}', 400, "top_p"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_bodies_get_a_json_4xx(live, name):
    raw, expected, param = CASES[name]
    status, resp, body = call(live, "POST", "/v1/completions", raw=raw)
    assert_json_error(status, body, expected)
    if param is not None:
        assert body["error"]["param"] == param
    assert len(body["error"]["message"]) < 400  # a 5000-digit value is not echoed back
    assert_healthy(live)


def test_chat_body_errors(live):
    base = {"model": "tiny", "max_tokens": 2}
    for extra, param in (({"messages": "hi"}, "messages"), ({"messages": []}, "messages"),
                         ({"messages": [{"role": "user", "content": ["parts"]}]}, "messages[0]"),
                         ({"messages": [{"role": "user", "content": "a"}], "logprobs": 1}, "logprobs"),
                         ({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs"),
                         ({"messages": [{"role": "user", "content": "a"}], "n": 9}, "n")):
        status, _, body = call(live, "POST", "/v1/chat/completions", {**base, **extra})
        assert_json_error(status, body, 400)
        assert body["error"]["param"] == param
    assert_healthy(live)


def test_chat_roles_are_checked(live, monkeypatch):
    base = {"model": "tiny", "max_tokens": 2, "temperature": 0}
    user = {"role": "user", "content": "a"}
    for role, hint in (("wizard", None), ("tool", "tool calls"), ("function", "tool calls"), ("User", None),
                       ("", None), ("x" * 5000, None)):
        messages = [user, {"role": role, "content": "b"}, user]
        status, _, body = call(live, "POST", "/v1/chat/completions", {**base, "messages": messages})
        assert_json_error(status, body, 400)
        error = body["error"]
        assert error["param"] == "messages[1].role" and error["code"] == "invalid_value"
        assert "messages[1]" in error["message"] and repr(role[:40]) in error["message"]
        assert "system, developer, user, assistant" in error["message"] and len(error["message"]) < 400
        if hint:
            assert hint in error["message"]
    seen = []
    render = live.server.render
    monkeypatch.setattr(live.server, "render", lambda messages: seen.append(messages) or render(messages))
    messages = [{"role": "developer", "content": "d"}, {"role": "system", "content": "s"}, user,
                {"role": "assistant", "content": "b", "tool_calls": []}, user]
    status, _, body = call(live, "POST", "/v1/chat/completions", {**base, "messages": messages})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    # developer is rendered as system; keys other than role and content never reach the template.
    assert seen == [[{"role": "system", "content": "d"}, {"role": "system", "content": "s"}, user,
                     {"role": "assistant", "content": "b"}, user]]
    assert_healthy(live)

def test_a_valid_surrogate_pair_is_fine(live):
    status, _, body = call(live, "POST", "/v1/completions",
                           raw=b'{"model": "tiny", "prompt": "a \\ud83d\\ude00", "max_tokens": 2}')
    assert status == 200 and body["usage"]["prompt_tokens"] > 0


def test_prompt_plus_max_tokens_must_fit_the_model_positions(live):
    assert live.server.context_limit == 512  # the tiny model's max_position_embeddings
    prompt = " ".join(["a"] * 500)
    status, _, body = call(live, "POST", "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 64})
    assert_json_error(status, body, 400)
    assert body["error"]["code"] == "context_length_exceeded" and "512" in body["error"]["message"]
    assert body["error"]["param"] == "prompt"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": " ".join(["b"] * 600)}]}
    status, _, body = call(live, "POST", "/v1/chat/completions", chat)
    assert_json_error(status, body, 400)
    assert body["error"]["param"] == "messages"
    # Without max_tokens the default shrinks to what the context has left.
    status, _, body = call(live, "POST", "/v1/completions", {"model": "tiny", "prompt": prompt, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] <= 512 - body["usage"]["prompt_tokens"]
    assert_healthy(live)


def test_a_huge_prompt_is_refused_from_its_prefix(live, monkeypatch):
    seen = []

    class Counting:
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, text, *args, **kwargs):
            seen.append(len(text))
            return self.tok(text, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tok, name)

    prompt = "a " * 30000  # 60 KB, under the body limit
    with monkeypatch.context() as m:
        m.setattr(live.server, "tokenizer", Counting(live.server.tokenizer))
        status, _, body = call(live, "POST", "/v1/completions", {"model": "tiny", "prompt": prompt})
    assert_json_error(status, body, 400)
    assert body["error"]["code"] == "context_length_exceeded" and "more than 512" in body["error"]["message"]
    assert seen == [model_server.PREFIX_CHARS_PER_TOKEN * 512]  # only the prefix was tokenized
    assert_healthy(live)


def test_context_limit_sources(live):
    class Cfg:
        max_position_embeddings = None

    class Model:
        config = Cfg()

    class Tok:
        model_max_length = 300

    class NoLimitTok:
        model_max_length = int(1e30)

    assert context_limit(Model(), Tok()) == 300
    assert context_limit(Model(), NoLimitTok()) is None
    assert context_limit(live.server.model, NoLimitTok()) == 512
    capped = ModelServer(live.server.model, live.server.tokenizer, "x", ServeConfig(max_context=100))
    assert capped.context_limit == 100


def test_parse_json_body_directly():
    assert parse_json_body(b'{"a": [1, {"b": "\\ud83d\\ude00"}]}') == {"a": [1, {"b": "\U0001f600"}]}
    assert parse_json_body(b"") is None
    with pytest.raises(model_server.ApiError, match="nests deeper"):
        parse_json_body(b"[" * 33 + b"]" * 33)
    parse_json_body(b"[" * 32 + b"]" * 32)


# ------------------------------------------------------------------ framing
def test_content_length_problems(live):
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n"
    body = b'{"model": "tiny", "prompt": "a", "max_tokens": 2}'
    cases = {
        "Content-Length: -1\r\n": 400,
        "Content-Length: abc\r\n": 400,
        "Content-Length: 1e3\r\n": 400,
        "Content-Length: +5\r\n": 400,
        "Content-Length: 99999999999999999999999999\r\n": 413,
        f"Content-Length: {64 * 1024 + 1}\r\n": 413,
        f"Content-Length: {len(body)}\r\nContent-Length: {len(body) + 1}\r\n": 400,
        "": 411,
        "Transfer-Encoding: chunked\r\n": 411,
    }
    for extra, expected in cases.items():
        data = head.encode() + extra.encode() + b"\r\n"
        if "chunked" in extra:
            data += f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        out = responses(send_raw(live, data))
        assert len(out) == 1, (extra, out)
        status, headers, payload = out[0]
        assert status == expected, (extra, payload)
        assert headers["content-type"] == "application/json" and json.loads(payload)["error"]["message"]
    assert_healthy(live)


def test_an_unread_body_is_never_parsed_as_a_request(live):
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
    over = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {64 * 1024 + 100}\r\n\r\n").encode() + smuggled
    out = responses(send_raw(live, over))
    assert [r[0] for r in out] == [413] and out[0][1]["connection"] == "close"
    # The same for a 401, a 404 and a 405 answered without reading the body, and a GET that carries one.
    for line, status in ((b"POST /v1/completions", 401), (b"POST /v1/nothing", 404), (b"PUT /v1/completions", 405),
                         (b"GET /v1/models", 200)):
        auth = b"" if status == 401 else b"Authorization: Bearer " + KEY.encode() + b"\r\n"
        data = (line + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: " + str(len(smuggled)).encode()
                + b"\r\n\r\n" + smuggled)
        out = responses(send_raw(live, data))
        assert [r[0] for r in out] == [status] and out[0][1]["connection"] == "close"
    assert_healthy(live)


def exchange(live, data, wait=2.0):
    """Raw bytes in on one connection: (the responses that came back, whether the server then closed it)."""
    out = b""
    with socket.create_connection(("127.0.0.1", live.port), timeout=wait) as s:
        s.sendall(data)
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:  # the server kept the connection open, waiting for another request
                return responses(out), False
            except ConnectionResetError:
                return responses(out), True
            if not chunk:
                return responses(out), True
            out += chunk


AUTH_LINE = f"Authorization: Bearer {KEY}\r\n"
SMUGGLED_GET = f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{AUTH_LINE}\r\n".encode()
SMUGGLED_CHAT = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 2,
                            "temperature": 0}).encode()
SMUGGLED_POST = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{AUTH_LINE}Content-Type: application/json\r\n"
                 f"Content-Length: {len(SMUGGLED_CHAT)}\r\n\r\n").encode() + SMUGGLED_CHAT


def _framed(line, headers, body):
    """A keep-alive request with the given header lines (``{n}`` is the body's length) and raw body."""
    return f"{line} HTTP/1.1\r\nHost: x\r\n{AUTH_LINE}{headers.format(n=len(body))}\r\n".encode() + body


SMUGGLING = {
    # The first Content-Length says there is no body, so the body would be taken for the next request.
    "POST, two Content-Lengths (0 first), GET inside": (
        "POST /v1/chat/completions", "Content-Length: 0\r\nContent-Length: {n}\r\n", SMUGGLED_GET, 400),
    "POST, two Content-Lengths (0 first), chat POST inside": (
        "POST /v1/chat/completions", "Content-Length: 0\r\nContent-Length: {n}\r\n", SMUGGLED_POST, 400),
    "GET, two Content-Lengths (0 first), GET inside": (
        "GET /v1/models", "Content-Length: 0\r\ncontent-length: {n}\r\n", SMUGGLED_GET, 400),
    "GET, two Content-Lengths (0 first), chat POST inside": (
        "GET /v1/models", "Content-Length: 0\r\nContent-Length: {n}\r\n", SMUGGLED_POST, 400),
    "POST, the same Content-Length twice": (
        "POST /v1/chat/completions", "Content-Length: {n}\r\nContent-Length: {n}\r\n", SMUGGLED_GET, 400),
    "POST, an empty Content-Length": ("POST /v1/chat/completions", "Content-Length: \r\n", SMUGGLED_GET, 400),
    "POST, Content-Length +0": ("POST /v1/chat/completions", "Content-Length: +0\r\n", SMUGGLED_GET, 400),
    "POST, Content-Length listing 0 and n": (
        "POST /v1/chat/completions", "Content-Length: 0, {n}\r\n", SMUGGLED_GET, 400),
    "POST, Transfer-Encoding chunked with Content-Length 0": (
        "POST /v1/chat/completions", "Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
        f"{len(SMUGGLED_GET):x}\r\n".encode() + SMUGGLED_GET + b"\r\n0\r\n\r\n", 411),
    "POST, an empty Transfer-Encoding with Content-Length 0": (
        "POST /v1/chat/completions", "Transfer-Encoding: \r\nContent-Length: 0\r\n", SMUGGLED_GET, 411),
    "GET, Transfer-Encoding chunked": (
        "GET /v1/models", "Transfer-Encoding: chunked\r\n",
        f"{len(SMUGGLED_GET):x}\r\n".encode() + SMUGGLED_GET + b"\r\n0\r\n\r\n", 411),
    "POST, Transfer-Encoding identity": (
        "POST /v1/chat/completions", "Transfer-Encoding: identity\r\nContent-Length: {n}\r\n", SMUGGLED_GET, 411),
    # Header lines http.server's parser would silently drop (with every header after them), Content-Length too.
    "POST, Content-Length with a space before the colon": (
        "POST /v1/chat/completions", "Content-Length : {n}\r\n", SMUGGLED_GET, 400),
    "POST, a NUL in a header name before Content-Length": (
        "POST /v1/chat/completions", "X\x00Y: 1\r\nContent-Length: {n}\r\n", SMUGGLED_GET, 400),
    "POST, Content-Length folded into the previous header": (
        "POST /v1/chat/completions", "X-Note: a\r\n Content-Length: {n}\r\n", SMUGGLED_GET, 400),
    "POST, a line without a name before Content-Length": (
        "POST /v1/chat/completions", ": x\r\nContent-Length: {n}\r\n", SMUGGLED_GET, 400),
    # A bare CR is a line break to http.server's parser but part of a value to many proxies.
    "POST, Content-Length after a bare CR": (
        "POST /v1/chat/completions", "X-Note: a\rContent-Length: {n}\r\n", SMUGGLED_GET, 400),
    # No length means no body, but the client sent one: it must not become the next request.
    "POST without a Content-Length, a request as its body": ("POST /v1/chat/completions", "", SMUGGLED_GET, 411),
}


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_ambiguous_framing_gets_one_4xx_and_the_connection_is_closed(live, monkeypatch, name):
    # A long read timeout: a connection left open would wait for the next request, not be closed as idle.
    monkeypatch.setattr(live.server.config, "read_timeout_s", 5.0)
    line, headers, body, expected = SMUGGLING[name]
    before = live.server.stats["generations"]
    out, closed = exchange(live, _framed(line, headers, body))
    assert [r[0] for r in out] == [expected], (name, out)
    status, resp_headers, payload = out[0]
    assert resp_headers["connection"] == "close" and resp_headers["content-type"] == "application/json"
    assert json.loads(payload)["error"]["message"]
    assert closed, "the connection stayed open after a request whose end is unknown"
    assert live.server.stats["generations"] == before  # the smuggled chat completion never ran
    assert live.wait_idle() == 0
    assert_healthy(live)


def test_ambiguous_framing_with_expect_100_is_refused_before_the_body(live, monkeypatch):
    monkeypatch.setattr(live.server.config, "read_timeout_s", 5.0)
    out, closed = exchange(live, _framed("POST /v1/chat/completions", "Expect: 100-continue\r\nContent-Length: 0"
                                         "\r\nContent-Length: {n}\r\n", SMUGGLED_GET))
    assert [r[0] for r in out] == [400] and out[0][1]["connection"] == "close" and closed
    assert_healthy(live)


def test_a_body_shorter_than_declared_gets_a_4xx_and_a_close(live, monkeypatch):
    monkeypatch.setattr(live.server.config, "read_timeout_s", 5.0)
    data = _framed("POST /v1/chat/completions", "Content-Length: 500\r\n", SMUGGLED_CHAT)
    with socket.create_connection(("127.0.0.1", live.port), timeout=2) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # the body ends here, short of its Content-Length
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    (status, headers, payload), = responses(out)
    assert status == 400 and headers["connection"] == "close" and "ended after" in json.loads(payload)["error"][
        "message"]
    assert_healthy(live)


def test_well_framed_requests_keep_the_connection_open(live, monkeypatch):
    # The framing checks must not close connections that are fine: pipelined requests are all answered.
    monkeypatch.setattr(live.server.config, "read_timeout_s", 5.0)
    bad_json = b'{"model": "tiny"'
    data = (SMUGGLED_POST + _framed("POST /v1/completions", "Content-Length: {n}\r\n", bad_json)
            + _framed("GET /v1/models", "Content-Length: 0\r\n", b"") + SMUGGLED_GET)
    out, closed = exchange(live, data, wait=3.0)
    assert [r[0] for r in out] == [200, 400, 200, 200] and not closed
    assert all(r[1].get("connection") != "close" for r in out)
    assert live.wait_idle(timeout=8.0) == 0
    assert_healthy(live)


def test_expect_100_continue_is_refused_before_the_body(live):
    data = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {10**7}\r\nExpect: 100-continue\r\n\r\n").encode()
    out = send_raw(live, data)
    assert b"100 Continue" not in out and [r[0] for r in responses(out)] == [413]
    body = b'{"model": "tiny", "prompt": "a", "max_tokens": 2}'
    data = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode() + body
    out = send_raw(live, data)
    assert out.startswith(b"HTTP/1.1 100 Continue") and b"HTTP/1.1 200" in out
    assert_healthy(live)


def test_malformed_request_lines_get_json(live):
    for data, expected in ((b"GARBAGE\r\n\r\n", 400), (b"GET /v1/models HTTP/2.0\r\n\r\n", 505),
                           (b"GET /v1/models HTTP/1.x\r\n\r\n", 400),
                           (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414)):
        out = responses(send_raw(live, data))
        assert len(out) == 1 and out[0][0] == expected
        assert json.loads(out[0][2])["error"]["message"]
    assert_healthy(live)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FROB"])
def test_other_methods_get_a_json_405_with_allow(live, method):
    status, resp, body = call(live, method, "/v1/chat/completions", raw=b"{}")
    assert_json_error(status, body, 405)
    assert resp.getheader("Allow") == "POST" and resp.getheader("Content-Type") == "application/json"
    status, resp, body = call(live, method, "/v1/models")
    assert status == 405 and resp.getheader("Allow") == "GET, HEAD"
    status, _, body = call(live, method, "/v1/nowhere")
    assert_json_error(status, body, 404)
    assert_healthy(live)


def test_get_on_a_post_route_and_head(live):
    status, resp, body = call(live, "GET", "/v1/completions")
    assert_json_error(status, body, 405)
    assert resp.getheader("Allow") == "POST"
    status, resp, body = call(live, "HEAD", "/v1/models")
    assert status == 200 and body is None and int(resp.getheader("Content-Length")) > 0
    status, resp, body = call(live, "HEAD", "/v1/chat/completions")
    assert status == 405 and body is None
    assert_healthy(live)


# ------------------------------------------------------------------ slow and vanishing clients
def test_a_half_sent_body_frees_its_thread_after_the_read_timeout(live):
    data = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 100\r\n"
            "\r\n").encode() + b'{"model": "ti'
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as s:
        s.sendall(data)
        time.sleep(0.1)
        assert live.httpd.active_connections == 1  # the handler thread is waiting for the rest
        start = time.monotonic()
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        waited = time.monotonic() - start
    assert waited < 2.0  # read_timeout_s is 0.5
    (status, headers, payload), = responses(out)
    assert status == 408 and headers["connection"] == "close" and json.loads(payload)["error"]["code"] == "timeout"
    assert live.wait_idle() == 0
    assert_healthy(live)


def test_idle_and_trickling_connections_are_closed(live):
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as s:
        assert s.recv(100) == b""  # nothing sent: closed after read_timeout_s
    assert time.monotonic() - start < 2.0
    # A byte every 0.2 s never hits a per-read timeout of 0.5 s, but the request as a whole has 0.5 s.
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as s:
        try:
            for b in b"GET /v1/models HTTP/1.1\r\nHost: x\r\n":
                s.send(bytes([b]))
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert time.monotonic() - start < 2.5
    assert live.wait_idle() == 0
    assert_healthy(live)


def test_connections_over_the_cap_get_a_quick_503(live):
    idle = [socket.create_connection(("127.0.0.1", live.port), timeout=5) for _ in range(4)]
    try:
        end = time.monotonic() + 2
        while live.httpd.active_connections < 4 and time.monotonic() < end:
            time.sleep(0.01)
        # Nothing is sent on this one: an answer can only be the refusal (the idle ones would time out silently).
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as s:
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        (status, headers, payload), = responses(out)
        assert status == 503 and json.loads(payload)["error"]["code"] == "too_many_connections"
    finally:
        for s in idle:
            s.close()
    assert live.wait_idle() == 0
    assert_healthy(live)


def _abort(sock):
    """Close with a reset, as a killed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_mid_generation_stops_it(live, capfd, caplog, stream):
    caplog.set_level(logging.DEBUG, logger="tokencredit.serve")
    stats = live.server.stats
    before = dict(stats)
    body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 64, "temperature": 0, "stream": stream})
    with slow_model(live.server, delay=0.03):  # 64 steps would take about 2 s
        s = socket.create_connection(("127.0.0.1", live.port), timeout=5)
        s.sendall(post_bytes(body.encode()))
        end = time.monotonic() + 3
        while stats["decode_steps"] == before["decode_steps"] and live.server.lock.acquire(blocking=False):
            live.server.lock.release()  # not started yet
            assert time.monotonic() < end
            time.sleep(0.01)
        time.sleep(0.2)
        _abort(s)
        end = time.monotonic() + 2
        while stats["cancelled"] == before["cancelled"] and time.monotonic() < end:
            time.sleep(0.01)
    assert stats["cancelled"] == before["cancelled"] + 1
    assert stats["decode_steps"] - before["decode_steps"] < 40
    start = time.monotonic()
    assert_healthy(live)
    assert time.monotonic() - start < 1.5  # not behind the rest of the abandoned generation
    assert "Traceback" not in capfd.readouterr().err and "Traceback" not in caplog.text
    assert len([r for r in caplog.records if "left" in r.getMessage()]) <= 1


def test_a_client_that_leaves_while_queued_is_dropped(live):
    before, cancelled = live.server.stats["generations"], live.server.stats["cancelled"]
    live.server.lock.acquire()  # the model is busy
    try:
        s = socket.create_connection(("127.0.0.1", live.port), timeout=5)
        s.sendall(post_bytes(b'{"model": "tiny", "prompt": "a", "max_tokens": 4}'))
        time.sleep(0.2)
        s.close()
        time.sleep(0.2)
    finally:
        live.server.lock.release()
    assert live.wait_idle() == 0 and live.server.stats["generations"] == before
    assert live.server.stats["cancelled"] == cancelled + 1
    assert_healthy(live)


def test_leaving_mid_stream_is_quiet(live, capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="tokencredit.serve")
    body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 64, "n": 8, "stream": True})
    with slow_model(live.server, delay=0.0):
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", live.port), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(post_bytes(body.encode()))
            assert s.recv(64).startswith(b"HTTP/1.1 200")
            _abort(s)
            assert live.wait_idle() == 0
    assert "Traceback" not in capfd.readouterr().err and "Traceback" not in caplog.text
    assert_healthy(live)


def test_the_request_timeout_ends_generation_with_length(live, monkeypatch):
    monkeypatch.setattr(live.server.config, "request_timeout_s", 0.4)
    before = live.server.stats["deadline_stops"]
    with slow_model(live.server, delay=0.03):
        start = time.monotonic()
        status, _, body = call(live, "POST", "/v1/completions",
                               {"model": "tiny", "prompt": "a", "max_tokens": 64, "n": 2, "temperature": 0})
        took = time.monotonic() - start
    assert status == 200 and took < 1.8  # 64 slow steps take 2 s
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert 0 < body["usage"]["completion_tokens"] < 2 * 64
    assert live.server.stats["deadline_stops"] == before + 1
    assert_healthy(live)


def test_a_request_queued_past_its_timeout_gets_a_503(live, monkeypatch):
    monkeypatch.setattr(live.server.config, "request_timeout_s", 0.3)
    live.server.lock.acquire()
    try:
        status, resp, body = call(live, "POST", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
    finally:
        live.server.lock.release()
    assert_json_error(status, body, 503)
    assert body["error"]["code"] == "timeout" and resp.getheader("Retry-After")
    assert_healthy(live)


# ------------------------------------------------------------------ memory
def test_log_probs_are_kept_only_when_asked_and_only_top_k(live, monkeypatch):
    made = []

    class Recorder(model_server._LogprobRecorder):
        def __init__(self, top):
            super().__init__(top)
            made.append(self)

    monkeypatch.setattr(model_server, "_LogprobRecorder", Recorder)
    body = {"model": "tiny", "prompt": ["a", "b"], "max_tokens": 6, "n": 2, "temperature": 0}
    status, _, resp = call(live, "POST", "/v1/completions", body)
    assert status == 200 and made == [] and all(c["logprobs"] is None for c in resp["choices"])
    status, _, resp = call(live, "POST", "/v1/completions", {**body, "logprobs": 3})
    assert status == 200 and len(made) == 1
    rec = made[0]
    assert rec._pending is None and all(t.shape == (4,) for t in rec.chosen)
    assert all(t.shape == (4, 3) for t in rec.top_values)
    for choice in resp["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
        for value, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
            assert value == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the drawn token is the top one
    assert_healthy(live)

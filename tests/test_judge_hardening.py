"""The judge against broken or hostile endpoints: redirects, dripping answers, refused records, NaN log-probs,
re-asking unreadable cached answers, empty input, huge answers and prompts, jobs that label nothing, and damaged
caches. Every server here is a scripted one on loopback."""

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tokencredit.commands.judge import EvaluateConfig, JudgeRunConfig, run_evaluate, run_judge
from tokencredit.judges.backends import ChatRequest, JudgeError, OpenAIBackend
from tokencredit.judges.cache import JudgeCache
from tokencredit.judges.judge_labelers import PairVerdict, PairwiseLabeler
from tokencredit.record_files import RecordError


class Endpoint:
    """A scripted chat-completions server: ``respond(handler, body)`` writes each answer; requests are recorded."""

    def __init__(self, respond):
        self.respond, self.seen = respond, []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                endpoint.seen.append({"method": self.command, "headers": dict(self.headers), "body": body})
                try:
                    endpoint.respond(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on this answer

            do_GET = do_POST = handle_any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def posts(self):
        return sum(r["method"] == "POST" for r in self.seen)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    started = []

    def start(respond):
        started.append(Endpoint(respond))
        return started[-1]

    yield start
    for endpoint in started:
        endpoint.close()


def send(handler, status, payload, headers=()):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(raw)))
    handler.end_headers()
    handler.wfile.write(raw)


def completion(text, top=None):
    """A chat completion; ``top``: the first token's alternatives {token: logprob} (NaN allowed, as JSON NaN)."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if top is not None:
        choice["logprobs"] = {"content": [{"token": text, "logprob": next(iter(top.values())),
                                           "top_logprobs": [{"token": t, "logprob": v} for t, v in top.items()]}]}
    return {"id": "c", "object": "chat.completion", "choices": [choice]}


def prompt_of(body):
    return body["messages"][-1]["content"]


def prefer_good(body):
    """Log-probabilities of a judge that prefers whichever shown answer says "good"."""
    first = prompt_of(body).split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0]
    return {"A": -0.1, "B": -2.5} if "good" in first else {"A": -2.5, "B": -0.1}


def judge(url, tmp_path, **kw):
    opts = dict(api_key_env="", cache=tmp_path / "cache.sqlite", concurrency=1, timeout=5.0, max_retries=2,
                backoff=0.01)
    opts.update(kw)
    return OpenAIBackend(url, "m", **opts)


def ask(i=0):
    return ChatRequest([{"role": "user", "content": f"question {i}"}], max_tokens=4)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ (a) redirects
@pytest.mark.parametrize("status", [300, 301, 302, 303, 307, 308])
def test_redirect_is_refused_and_the_key_never_leaves_the_origin(serve, tmp_path, monkeypatch, status):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret")
    elsewhere = serve(lambda h, body: send(h, 200, completion("A")))
    target = elsewhere.url + "/chat/completions"
    origin = serve(lambda h, body: send(h, status, {"error": {"message": "moved"}}, [("Location", target)]))
    backend = judge(origin.url, tmp_path, api_key_env="JUDGE_TEST_KEY", max_retries=3)
    with pytest.raises(JudgeError, match=rf"HTTP {status} redirecting to {re.escape(target)}.*never follows"):
        backend.chat([ask()])
    assert origin.posts == 1 and backend.stats.retries == 0  # refused at once, not retried
    assert origin.seen[0]["headers"]["Authorization"] == "Bearer sk-secret"  # the origin does get the key
    assert not any("Authorization" in r["headers"] for r in elsewhere.seen)
    assert elsewhere.seen == []  # the redirect target is never contacted at all (no GET either)
    assert len(backend.cache) == 0


def test_redirect_stops_a_judge_job_without_writing_labels(serve, tmp_path):
    elsewhere = serve(lambda h, body: send(h, 200, completion("Score: 5")))
    origin = serve(lambda h, body: send(h, 302, b"", [("Location", elsewhere.url + "/chat/completions")]))
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "response": "r"}])
    out = tmp_path / "labels.jsonl"
    with pytest.raises(JudgeError, match="redirect"):
        run_judge(JudgeRunConfig(task="rubric", data=str(data), output=str(out), base_url=origin.url, model="m",
                                 api_key_env=""))
    assert not out.exists() and elsewhere.seen == []


# ------------------------------------------------------------------ (b) deadlines
def drip(handler, body):
    """Headers at once, then the body one byte at a time: ten seconds for the whole answer."""
    raw = json.dumps(completion("A")).encode()
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(raw)))
    handler.end_headers()
    for byte in raw:
        handler.wfile.write(bytes([byte]))
        time.sleep(10 / len(raw))


def drip_headers(handler, body):
    """Even the status line and headers arrive a byte every 0.3 s."""
    for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"x" * 40:
        handler.wfile.write(bytes([byte]))
        time.sleep(0.3)


@pytest.mark.parametrize("respond", [drip, drip_headers])
def test_a_dripping_server_is_cut_at_the_deadline(serve, tmp_path, respond):
    slow = serve(respond)
    backend = judge(slow.url, tmp_path, timeout=1.0, max_retries=0)
    start = time.monotonic()
    with pytest.raises(JudgeError, match=r"giving up after 1 attempts.*no complete answer within 1s"):
        backend.chat([ask()])
    assert time.monotonic() - start < 3
    assert len(backend.cache) == 0


def test_a_deadline_is_retried_like_other_transient_failures(serve, tmp_path):
    calls = []

    def respond(handler, body):
        calls.append(1)
        if len(calls) == 1:
            return drip(handler, body)
        send(handler, 200, completion("B"))

    endpoint = serve(respond)
    backend = judge(endpoint.url, tmp_path, timeout=1.0, max_retries=2)
    start = time.monotonic()
    assert backend.chat([ask()])[0].text == "B"
    assert backend.stats.retries == 1 and time.monotonic() - start < 4


# ------------------------------------------------------------------ (c) one refused record
def test_a_record_refused_with_400_is_named_and_the_job_goes_on(serve, tmp_path):
    def respond(handler, body):
        if "poison" in prompt_of(body):
            return send(handler, 400, {"error": {"message": "this prompt is too long"}})
        send(handler, 200, completion("Fine.\nScore: 4"))

    endpoint = serve(respond)
    rows = [{"id": f"r{i}", "prompt": "poison" if i == 2 else f"q{i}", "response": "r"} for i in range(4)]
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "".join(json.dumps(r) + "\n"
                                                                               for r in rows[2:]))
    out = tmp_path / "labels.jsonl"
    cfg = JudgeRunConfig(task="rubric", data=str(data), output=str(out), base_url=endpoint.url, model="m",
                         api_key_env="", concurrency=2, max_retries=3)
    summary = run_judge(cfg)
    assert summary["records"] == 3 and summary["labelled"] == 3 and summary["failed"] == 1
    [failed] = summary["failed_records"]
    assert (failed["index"], failed["line"], failed["id"]) == (2, 4, "r2")  # line 3 of the file is blank
    assert "HTTP 400" in failed["error"] and "this prompt is too long" in failed["error"]
    assert sum("poison" in prompt_of(r["body"]) for r in endpoint.seen) == 1  # a 400 is not retried
    assert json.loads((tmp_path / "labels.jsonl.summary.json").read_text())["failed_records"] == [failed]
    labels = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in labels] == ["q0", "q1", "q3"]
    # A refused request is never cached: the rerun asks for it again and for nothing else.
    posts = endpoint.posts
    again = run_judge(cfg)
    assert again["answers_from_cache"] == 3 and endpoint.posts == posts + 1 and again["failed"] == 1


def test_a_failed_prompt_in_evaluate_is_left_out_and_named(serve, tmp_path):
    def respond(handler, body):
        if "q1" in prompt_of(body):
            return send(handler, 422, {"error": {"message": "unprocessable"}})
        send(handler, 200, completion("A", prefer_good(body)))

    endpoint = serve(respond)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "reference": "meh"} for i in range(3)])
    gens = write_jsonl(tmp_path / "g.jsonl", [{"prompt": f"q{i}", "response": "good"} for i in range(3)])
    result = run_evaluate(EvaluateConfig(prompts=str(prompts), a=str(gens), output_dir=str(tmp_path / "ev"),
                                         base_url=endpoint.url, model="m", api_key_env=""))
    assert result["judged"] == 2 and result["win_rate"] == 1.0 and result["unjudged"] == 1
    assert [f["index"] for f in result["failed_prompts"]] == [1] and "HTTP 422" in result["failed_prompts"][0]["error"]
    verdicts = [json.loads(line) for line in (tmp_path / "ev" / "verdicts.jsonl").read_text().splitlines()]
    assert verdicts[1]["verdict"] is None and "unprocessable" in verdicts[1]["error"]


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_wrong_key_or_endpoint_stops_the_job_clearly(serve, tmp_path, status):
    endpoint = serve(lambda h, body: send(h, status, {"error": {"message": "nope"}}))
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}", "response": "r"} for i in range(3)])
    with pytest.raises(JudgeError, match=rf"HTTP {status}: nope.*check base_url, model and the API key"):
        run_judge(JudgeRunConfig(task="rubric", data=str(data), output=str(tmp_path / "o.jsonl"),
                                 base_url=endpoint.url, model="m", api_key_env="", concurrency=1))
    assert endpoint.posts == 1


def test_every_record_refused_is_an_error(serve, tmp_path):
    endpoint = serve(lambda h, body: send(h, 400, {"error": {"message": "logprobs not supported"}}))
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}", "response": "r"} for i in range(2)])
    with pytest.raises(JudgeError, match="every one of the 2 record.*logprobs not supported"):
        run_judge(JudgeRunConfig(task="rubric", data=str(data), output=str(tmp_path / "o.jsonl"),
                                 base_url=endpoint.url, model="m", api_key_env=""))
    assert json.loads((tmp_path / "o.jsonl.summary.json").read_text())["failed"] == 2


@pytest.mark.parametrize("status", [408, 429])
def test_408_and_429_are_retried(serve, tmp_path, status):
    calls = []

    def respond(handler, body):
        calls.append(1)
        if len(calls) == 1:
            return send(handler, status, {"error": {"message": "later"}}, [("Retry-After", "0")])
        send(handler, 200, completion("A"))

    backend = judge(serve(respond).url, tmp_path)
    assert backend.chat([ask()])[0].text == "A" and backend.stats.retries == 1


# ------------------------------------------------------------------ (d) NaN log-probabilities
def evaluate_files(tmp_path, n=3):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "reference": "meh"} for i in range(n)])
    gens = write_jsonl(tmp_path / "g.jsonl", [{"prompt": f"q{i}", "response": "good"} for i in range(n)])
    return prompts, gens


@pytest.mark.parametrize("top", [{"A": math.nan, "B": math.nan}, {"A": -0.1, "B": math.nan},
                                 {"A": math.inf, "B": -1.0}])
def test_non_finite_logprobs_are_unreadable_and_evaluate_refuses_a_win_rate(serve, tmp_path, capsys, top):
    from tokencredit.cli import main

    endpoint = serve(lambda h, body: send(h, 200, completion("A", top)))
    prompts, gens = evaluate_files(tmp_path)
    args = dict(prompts=str(prompts), a=str(gens), output_dir=str(tmp_path / "ev"), base_url=endpoint.url,
                model="m", api_key_env="")
    with pytest.raises(JudgeError, match=r"no readable verdict for any of the 3 prompt\(s\): 6 judge answer\(s\) "
                                         r"unreadable, 0 prompt\(s\) failed; not reporting a win rate"):
        run_evaluate(EvaluateConfig(**args))
    written = json.loads((tmp_path / "ev" / "evaluate.json").read_text())
    assert written["win_rate"] is None and written["ci95"] is None and written["unjudged"] == 3
    assert written["judge"]["unparseable"] == 6 and "non-finite" in written["judge"]["unparseable_examples"][0]
    assert main(["evaluate", *(f"{k}={v}" for k, v in args.items())]) == 2
    assert "no readable verdict" in capsys.readouterr().err


def test_nan_is_never_a_tie():
    assert PairVerdict(math.nan, math.nan).verdict is None and PairVerdict(math.nan, 0.9).p_a is None
    assert PairVerdict(0.9, 0.8).verdict == "a" and PairVerdict(0.9, 0.1).verdict == "tie"


def test_some_unreadable_answers_leave_a_win_rate_with_the_count(serve, tmp_path):
    def respond(handler, body):
        send(handler, 200, completion("A", {"A": math.nan} if "q0" in prompt_of(body) else prefer_good(body)))

    endpoint = serve(respond)
    prompts, gens = evaluate_files(tmp_path, 4)
    result = run_evaluate(EvaluateConfig(prompts=str(prompts), a=str(gens), output_dir=str(tmp_path / "ev"),
                                         base_url=endpoint.url, model="m", api_key_env=""))
    assert result["judged"] == 3 and result["unjudged"] == 1 and result["judge"]["unparseable"] == 2
    assert result["win_rate"] == 1.0


# ------------------------------------------------------------------ (e) re-asking unreadable cached answers
def test_reask_unreadable_replaces_cached_garbage_under_the_same_key(serve, tmp_path):
    state = {"answer": "I cannot say."}
    endpoint = serve(lambda h, body: send(h, 200, completion(state["answer"])))
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}", "response": "r"} for i in range(2)])
    out, cache = tmp_path / "labels.jsonl", tmp_path / "cache.sqlite"

    def run(**kw):
        return run_judge(JudgeRunConfig(task="rubric", data=str(data), output=str(out), cache=str(cache),
                                        base_url=endpoint.url, model="m", api_key_env="", **kw))

    def failed_run(**kw):
        with pytest.raises(JudgeError, match="none of the 2 record"):  # no label at all is an error
            run(**kw)
        return json.loads((tmp_path / "labels.jsonl.summary.json").read_text())

    first = failed_run()
    assert (first["records"], first["unparseable"], first["answers_asked"]) == (0, 2, 2)
    state["answer"] = "Clear.\nScore: 5"
    cached = failed_run()  # by default what is cached is used, garbage included
    assert cached["answers_from_cache"] == 2 and cached["unparseable"] == 2 and endpoint.posts == 2
    keys = sorted(r[0] for r in JudgeCache(cache)._db.execute("SELECT key FROM answers"))
    reasked = run(reask_unreadable=True)
    assert reasked["answers_reasked"] == 2 and reasked["answers_asked"] == 2 and reasked["records"] == 2
    assert endpoint.posts == 4
    assert sorted(r[0] for r in JudgeCache(cache)._db.execute("SELECT key FROM answers")) == keys
    settled = run(reask_unreadable=True)  # readable now: nothing is asked again
    assert settled["answers_from_cache"] == 2 and settled["answers_reasked"] == 0 and settled["records"] == 2
    assert endpoint.posts == 4


def test_reask_unreadable_in_evaluate_reads_fresh_logprobs(serve, tmp_path):
    state = {"broken": True}
    endpoint = serve(lambda h, body: send(h, 200, completion("A", {"A": math.nan, "B": math.nan}
                                                             if state["broken"] else prefer_good(body))))
    prompts, gens = evaluate_files(tmp_path, 2)
    cfg = dict(prompts=str(prompts), a=str(gens), output_dir=str(tmp_path / "ev"), base_url=endpoint.url,
               model="m", api_key_env="")
    with pytest.raises(JudgeError, match="no readable verdict"):
        run_evaluate(EvaluateConfig(**cfg))
    state["broken"] = False
    with pytest.raises(JudgeError, match="no readable verdict"):  # still the cached NaNs
        run_evaluate(EvaluateConfig(**cfg))
    result = run_evaluate(EvaluateConfig(**cfg, reask_unreadable=True))
    assert result["judged"] == 2 and result["win_rate"] == 1.0 and result["judge"]["unparseable"] == 0


def test_reask_leaves_answers_asked_in_this_run_alone(serve, tmp_path):
    endpoint = serve(lambda h, body: send(h, 200, completion("no idea")))
    backend = judge(endpoint.url, tmp_path)
    verdicts, stats = PairwiseLabeler(backend, use_logprobs=False, reask_unreadable=True).label([("p", "x", "y")])
    assert verdicts[0].verdict is None and stats.unparseable == 2 and endpoint.posts == 2
    assert backend.stats.reasked == 0


# ------------------------------------------------------------------ (f) empty input
@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_input_is_an_error_naming_the_file(tmp_path, capsys, content):
    from tokencredit.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    out = tmp_path / "labels.jsonl"
    with pytest.raises(RecordError, match=r"empty\.jsonl.*no records"):
        run_judge(JudgeRunConfig(data=str(empty), output=str(out), base_url="http://127.0.0.1:9/v1",
                                 api_key_env=""))
    assert main(["judge", f"data={empty}", f"output={out}", "base_url=http://127.0.0.1:9/v1", "api_key_env="]) == 2
    assert str(empty) in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "labels.jsonl.cache.sqlite").exists()
    with pytest.raises(RecordError, match=r"empty\.jsonl"):
        run_evaluate(EvaluateConfig(prompts=str(empty), a="reference", output_dir=str(tmp_path / "ev"),
                                    base_url="http://127.0.0.1:9/v1", api_key_env=""))


# ------------------------------------------------------------------ (g) answer size
def stream_completion(total, status=200, chunk=1 << 20):
    """A responder streaming a ``total``-byte chat completion (no Content-Length); ``sent`` counts what got out."""
    sent = [0]

    def respond(handler, body):
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()
        head, tail = b'{"choices": [{"message": {"content": "', b'"}, "finish_reason": "stop"}]}'
        handler.wfile.write(head)
        piece = b"A" * chunk
        sent[0] = len(head)
        while sent[0] + chunk + len(tail) <= total:
            handler.wfile.write(piece)
            sent[0] += chunk
        handler.wfile.write(tail)
        sent[0] += len(tail)

    return respond, sent


@pytest.mark.parametrize("status", [200, 400])
def test_a_huge_answer_is_refused_with_memory_bounded(serve, tmp_path, status):
    import tracemalloc

    total, cap = 64 << 20, 1 << 20
    respond, sent = stream_completion(total, status)
    backend = judge(serve(respond).url, tmp_path, max_retries=0, max_response_bytes=cap)
    tracemalloc.start()
    try:
        if status == 200:
            with pytest.raises(JudgeError, match=r"larger than max_response_bytes=1048576"):
                backend.chat([ask()])
        else:  # an error body is only read for its message: cut at the cap, and the record fails as usual
            assert backend.chat([ask()])[0].error.startswith(f"{backend.base_url}/chat/completions rejected this "
                                                             "request: HTTP 400")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * cap, f"{peak / 2**20:.1f} MiB held for a {total >> 20} MiB answer"
    assert sent[0] < total // 2  # the client hung up instead of draining the rest
    assert len(backend.cache) == 0


def test_a_content_length_over_the_cap_is_refused_before_reading(serve, tmp_path):
    release = threading.Event()

    def respond(handler, body):
        handler.send_response(200)
        handler.send_header("Content-Length", str(10**12))
        handler.end_headers()
        handler.wfile.write(b'{"choices": [')
        release.wait(5)  # a body that never ends: only the headers may be read

    backend = judge(serve(respond).url, tmp_path, max_retries=0, max_response_bytes=1 << 20, timeout=10.0)
    start = time.monotonic()
    try:
        with pytest.raises(JudgeError, match=r"Content-Length 1000000000000 .*max_response_bytes=1048576"):
            backend.chat([ask()])
    finally:
        release.set()
    assert time.monotonic() - start < 3


def test_an_oversize_answer_is_retried_then_stops_the_job(serve, tmp_path, capsys):
    from tokencredit.cli import main

    endpoint = serve(lambda h, body: send(h, 200, completion("Score: 4 " + "x" * 5000)))
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "response": "r"}])
    out = tmp_path / "labels.jsonl"
    assert main(["judge", "task=rubric", f"data={data}", f"output={out}", f"base_url={endpoint.url}", "model=m",
                 "api_key_env=", "max_retries=1", "max_response_bytes=1000"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tokencredit: error")]
    assert len(errors) == 1 and "Traceback" not in err
    assert re.search(r"giving up after 2 attempts; last problem: .*larger than max_response_bytes=1000", errors[0])
    assert endpoint.posts == 2 and not out.exists()


def test_a_deeply_nested_answer_is_not_a_chat_completion(serve, tmp_path):
    endpoint = serve(lambda h, body: send(h, 200, b"[" * 200_000))
    with pytest.raises(JudgeError, match="giving up after 1 attempts.*not a chat completion"):
        judge(endpoint.url, tmp_path, max_retries=0).chat([ask()])


# ------------------------------------------------------------------ (h) prompt size
@pytest.mark.parametrize("field", ["{prompt:>50000000}", "{prompt!r}", "{prompt!s:>9}", "{prompt:{first}}",
                                   "{prompt.__class__}", "{prompt[0]}", "{}", "{0}"])
def test_template_placeholders_take_no_format_spec_or_conversion(tmp_path, capsys, field):
    from tokencredit.cli import main
    from tokencredit.judges.templates import Template, load_template

    path = tmp_path / "judge.txt"
    path.write_text(f"Q: {{prompt}} {field}\nA: {{first}}\nB: {{second}}\n")
    with pytest.raises(ValueError, match=rf"template {re.escape(str(path))}: .*plain {{name}} placeholders only"):
        load_template("pairwise", path)
    with pytest.raises(ValueError, match=r"plain \{name\} placeholders only"):
        Template("", f"{{prompt}} {field}")
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "a": "x", "b": "y"}])
    assert main(["judge", f"data={data}", f"output={tmp_path / 'o.jsonl'}", f"template={path}",
                 "base_url=http://127.0.0.1:9/v1", "api_key_env="]) == 2
    err = capsys.readouterr().err
    assert "plain {name} placeholders only" in err and len(err.strip().splitlines()) == 1


def test_a_prompt_over_max_prompt_chars_fails_its_record_and_is_never_sent(serve, tmp_path, capsys):
    from tokencredit.cli import main

    endpoint = serve(lambda h, body: send(h, 200, completion("Score: 4")))
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q0", "response": "short"},
                                               {"prompt": "q1", "response": "x" * 5000}])
    summary = run_judge(JudgeRunConfig(task="rubric", data=str(data), output=str(tmp_path / "o.jsonl"),
                                       base_url=endpoint.url, model="m", api_key_env="", max_prompt_chars=2000))
    assert summary["records"] == 1 and summary["failed"] == 1 and endpoint.posts == 1
    failed = summary["failed_records"][0]
    assert failed["index"] == 1 and re.search(r"prompt of \d+ characters .*max_prompt_chars=2000", failed["error"])
    big = write_jsonl(tmp_path / "big.jsonl", [{"prompt": "q", "response": "x" * 5000}])
    assert main(["judge", "task=rubric", f"data={big}", f"output={tmp_path / 'big_labels.jsonl'}",
                 f"base_url={endpoint.url}", "model=m", "api_key_env=", "max_prompt_chars=2000"]) == 2
    err = capsys.readouterr().err
    assert "every one of the 1 record(s)" in err and "max_prompt_chars=2000" in err and "Traceback" not in err
    template = tmp_path / "long.txt"
    template.write_text("Q: {prompt}\nA: {response}\n" + "Be fair. " * 300)
    with pytest.raises(ValueError, match=r"judge template is 27\d\d characters .* over max_prompt_chars=2000"):
        run_judge(JudgeRunConfig(task="rubric", data=str(data), output=str(tmp_path / "o.jsonl"),
                                 template=str(template), base_url=endpoint.url, model="m", api_key_env="",
                                 max_prompt_chars=2000))
    assert endpoint.posts == 1


# ------------------------------------------------------------------ (i) a job that labels nothing
@pytest.mark.parametrize("task,answer,answers,why", [
    ("pairwise", completion("A", {"A": math.nan, "B": math.nan}), 6, "non-finite log-probabilities"),
    ("rubric", completion("I cannot say."), 3, "I cannot say."),
])
def test_a_judge_job_with_no_usable_record_is_an_error(serve, tmp_path, capsys, task, answer, answers, why):
    from tokencredit.cli import main

    state = {"answer": answer}
    endpoint = serve(lambda h, body: send(h, 200, state["answer"]))
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}", "a": "x", "b": "y", "response": "r"}
                                               for i in range(3)])
    out = tmp_path / "labels.jsonl"
    args = ["judge", f"task={task}", f"data={data}", f"output={out}", f"base_url={endpoint.url}", "model=m",
            "api_key_env=", "use_logprobs=true"]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tokencredit: error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    assert re.search(rf"none of the 3 record\(s\) .* got a label: 3 had unreadable judge answers \({answers} "
                     r"unreadable answer\(s\)\) and 0 failed; no labels written", errors[0]), errors[0]
    assert why in errors[0] and "reask_unreadable=true" in errors[0]
    assert not out.exists()  # no empty labels file that a later step could take for a result
    summary = json.loads((tmp_path / "labels.jsonl.summary.json").read_text())
    assert summary["records"] == 0 and summary["error"] == errors[0].removeprefix("tokencredit: error: ")
    if task == "pairwise":
        # A tie is a verdict, as in evaluate: a job whose every pair ties succeeds, with no pairs to write.
        state["answer"] = completion("A")
        assert main([*args, f"cache={tmp_path / 'fresh.sqlite'}", "use_logprobs=false"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["ties"] == 3 and summary["records"] == 0 and out.read_text() == ""


# ------------------------------------------------------------------ (j) a broken cache
def judge_args(tmp_path, url, cache):
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}", "response": "r"} for i in range(2)])
    return ["judge", "task=rubric", f"data={data}", f"output={tmp_path / 'labels.jsonl'}", f"cache={cache}",
            f"base_url={url}", "model=m", "api_key_env="]


@pytest.mark.parametrize("make", ["text", "directory", "schema"])
def test_a_cache_that_is_not_a_judge_cache_is_a_clear_error(serve, tmp_path, capsys, make):
    import sqlite3

    from tokencredit.cli import main

    endpoint = serve(lambda h, body: send(h, 200, completion("Score: 4")))
    cache = tmp_path / "cache.sqlite"
    if make == "text":
        cache.write_text("not a database, just some notes\n" * 100)
    elif make == "directory":
        cache.mkdir()
    else:
        with sqlite3.connect(cache) as db:
            db.execute("CREATE TABLE answers (id INTEGER, value TEXT)")
    assert main(judge_args(tmp_path, endpoint.url, cache)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tokencredit: error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    assert f"judge cache {cache}" in errors[0] and "delete or move it" in errors[0]
    assert endpoint.posts == 0


@pytest.mark.parametrize("response", ["not json {", "[]", '{"text": 5}', '{"finish_reason": "stop"}',
                                      '{"text": "Score: 4", "logprobs": [{"token": "S"}]}',
                                      '{"text": "A", "logprobs": [{"token": "A", "logprob": "x", "top": {}}]}',
                                      '{"text": "A", "logprobs": [{"token": "A", "logprob": -1, "top": [1]}]}'])
def test_a_malformed_cache_row_is_a_miss_with_a_warning(serve, tmp_path, capsys, caplog, response):
    import sqlite3

    from tokencredit.cli import main

    endpoint = serve(lambda h, body: send(h, 200, completion("Score: 4")))
    cache = tmp_path / "cache.sqlite"
    args = judge_args(tmp_path, endpoint.url, cache)
    assert main(args) == 0 and endpoint.posts == 2
    capsys.readouterr()
    with sqlite3.connect(cache) as db:
        key = db.execute("SELECT key FROM answers ORDER BY key LIMIT 1").fetchone()[0]
        db.execute("UPDATE answers SET response = ? WHERE key = ?", (response, key))
    caplog.set_level("WARNING")
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 2 and summary["answers_from_cache"] == 1 and summary["answers_asked"] == 1
    assert summary["cache_rows_discarded"] == 1 and endpoint.posts == 3
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(cache) in w and key[:12] in w and "asking again" in w for w in warned), warned
    assert main(args) == 0 and endpoint.posts == 3  # the fresh answer replaced the bad row
    assert json.loads(capsys.readouterr().out)["answers_from_cache"] == 2

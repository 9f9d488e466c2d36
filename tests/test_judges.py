"""Judge backends and labelers against a real `tokencredit serve` on loopback, with injected faults."""

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tokencredit.judges.backends import ChatRequest, HFBackend, JudgeError, OpenAIBackend
from tokencredit.judges.cache import JudgeCache
from tokencredit.judges.judge_labelers import (
    EditLabeler,
    PairwiseLabeler,
    RubricLabeler,
    SpanLabeler,
    parse_letter,
    parse_score,
    parse_spans,
)
from tokencredit.judges.templates import load_template
from tokencredit.model_server import ModelServer, ServeConfig
from tokencredit.rewards.labels import SpanLabel
from tokencredit.serve import make_handler
from tokencredit.testing import save_tiny_causal_lm

WORDS = "A B yes no good bad score the answer is 1 2 3".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("judge") / "tiny", WORDS)


@pytest.fixture(scope="module")
def server(model_dir):
    return ModelServer.from_config(ServeConfig(model=str(model_dir), served_name="tiny", device="cpu"))


class Faults:
    """A schedule of faults for the next POSTs: "500", "429", "slow", "garbage", or None (serve normally)."""

    def __init__(self):
        self.plan, self.posts, self.lock = [], 0, threading.Lock()

    def next(self):
        with self.lock:
            self.posts += 1
            return self.plan.pop(0) if self.plan else None


@pytest.fixture(scope="module")
def faulty(server):
    """The real server behind a handler that injects the scheduled faults."""
    faults = Faults()
    base = make_handler(server)

    class Handler(base):
        def do_POST(self):  # noqa: N802
            fault = faults.next()
            if fault is None:
                return super().do_POST()
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if fault == "slow":
                time.sleep(1.5)  # past the client's timeout: it has gone when this answer is written
                try:
                    return super()._send(200, {"late": True})
                except BrokenPipeError:
                    return None
            body = b"<html>oops</html>" if fault == "garbage" else json.dumps(
                {"error": {"message": f"injected {fault}"}}).encode()
            self.send_response(200 if fault == "garbage" else int(fault))
            if fault == "429":
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    from http.server import ThreadingHTTPServer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield faults, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def backend(url, tmp_path, **kw):
    opts = dict(cache=tmp_path / "cache.sqlite", concurrency=2, timeout=1.0, max_retries=3, backoff=0.01)
    opts.update(kw)
    return OpenAIBackend(url, "tiny", api_key_env="", **opts)


def request(i, **kw):
    return ChatRequest([{"role": "user", "content": f"question {i}"}], max_tokens=4, **kw)


# ------------------------------------------------------------------ parsing (hand-made answers)
def test_parsers_read_only_what_is_there():
    assert parse_letter("B") == "B" and parse_letter(" (a) because") == "A" and parse_letter("Answer B: ...") == "B"
    assert parse_letter("Both are fine") is None and parse_letter("") is None and parse_letter("C") is None
    assert parse_score("reasons...\nScore: 4") == 4 and parse_score("Score: 2 ... final Score: 5") == 5
    assert parse_score("Score: 7") is None and parse_score("four points") is None
    response = "Paris is in Germany. It is big."
    assert parse_spans("- in Germany\n+ Paris", response) == [SpanLabel(0, 5, 1), SpanLabel(9, 19, -1)]
    assert parse_spans("none", response) == []
    assert parse_spans("- in France", response) is None  # not in the response: the whole answer is unreadable
    assert parse_spans("Paris is wrong", response) is None
    assert parse_spans("- is\n- is", response) == [SpanLabel(6, 8, -1), SpanLabel(24, 26, -1)]


def test_template_override_from_file(tmp_path):
    (tmp_path / "t.txt").write_text("Be strict.\n---\nQ: {prompt}\n1: {first}\n2: {second}\nA or B?")
    t = load_template("pairwise", tmp_path / "t.txt")
    assert t.system == "Be strict." and t.messages(prompt="p", first="x", second="y")[1]["content"].startswith("Q: p")
    (tmp_path / "bad.txt").write_text("Q: {prompt} {first}")
    with pytest.raises(ValueError, match="second"):
        load_template("pairwise", tmp_path / "bad.txt")
    (tmp_path / "extra.txt").write_text("{prompt} {response} {tone}")
    with pytest.raises(ValueError, match="tone"):
        load_template("rubric", tmp_path / "extra.txt")
    with pytest.raises(ValueError, match="unknown judge task"):
        load_template("vibes")


# ------------------------------------------------------------------ HTTP backend against the real server
def test_http_backend_answers_caches_and_resumes(faulty, tmp_path):
    faults, url = faulty
    judge = backend(url, tmp_path)
    results = judge.chat([request(i, top_logprobs=2) for i in range(4)])
    assert all(r.logprobs is not None and not r.cached for r in results)
    assert judge.stats.asked == 4 and len(judge.cache) == 4
    again = backend(url, tmp_path)  # a new process would open the same file
    posts = faults.posts
    replay = again.chat([request(i, top_logprobs=2) for i in range(5)])
    assert [r.text for r in replay[:4]] == [r.text for r in results]
    assert all(r.cached for r in replay[:4]) and not replay[4].cached
    assert faults.posts == posts + 1 and len(again.cache) == 5  # only the new request was asked


def test_transient_faults_are_retried(faulty, tmp_path):
    faults, url = faulty
    faults.plan = ["500", "429", "garbage", "slow"]
    judge = backend(url, tmp_path, concurrency=1, max_retries=4)
    result = judge.chat([request(0)])[0]
    assert isinstance(result.text, str) and judge.stats.retries == 4 and judge.stats.asked == 1


def test_giving_up_and_client_errors_are_clear(faulty, tmp_path):
    faults, url = faulty
    faults.plan = ["503"] * 3
    with pytest.raises(JudgeError, match="giving up after 3 attempts.*503"):
        backend(url, tmp_path, max_retries=2, concurrency=1).chat([request(0)])
    faults.plan = []
    with pytest.raises(JudgeError, match="HTTP 404.*does not exist"):
        OpenAIBackend(url, "other-model", api_key_env="", max_retries=3, backoff=0.01).chat([request(0)])
    with pytest.raises(JudgeError, match="giving up"):  # nothing listens there
        OpenAIBackend("http://127.0.0.1:9/v1", "tiny", api_key_env="", max_retries=1, backoff=0.01).chat(
            [request(0)])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(model_dir, port):
    proc = subprocess.Popen([sys.executable, "-m", "tokencredit.cli", "serve", str(model_dir), "--port", str(port),
                             "--served-name", "tiny", "--device", "cpu"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert json.loads(proc.stdout.readline())["serving"] == "tiny"
    return proc


def test_server_killed_mid_job_then_resumed_without_loss_or_duplicates(model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    items = [(f"question {i}", "yes good", "no bad") for i in range(6)]
    proc = start_serve(model_dir, port)
    judge = backend(url, tmp_path, concurrency=1, max_retries=1, timeout=5.0)
    # Answer two items' requests (both orders), then kill the server while the job goes on.
    PairwiseLabeler(judge, use_logprobs=False).label(items[:2])
    assert len(judge.cache) == 4
    proc.kill()
    proc.wait()
    with pytest.raises(JudgeError):
        PairwiseLabeler(judge, use_logprobs=False).label(items)
    assert len(judge.cache) == 4  # what was answered is kept
    proc = start_serve(model_dir, port)
    try:
        resumed = backend(url, tmp_path, concurrency=1)
        verdicts, stats = PairwiseLabeler(resumed, use_logprobs=False).label(items)
        assert resumed.stats.cached == 4 and resumed.stats.asked == 8  # nothing asked twice
        assert len(resumed.cache) == 12 and len(verdicts) == 6 and stats.total == 6
        # The tiny random model rarely answers with a letter: every item is either judged or counted as unreadable.
        unread = sum(v.verdict is None for v in verdicts)
        assert stats.labelled + stats.ties == 6 - unread
        assert stats.unparseable >= unread
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------ labelers on the local backend
def test_pairwise_labeler_swaps_positions_and_reads_logprobs(model_dir, server):
    local = HFBackend(server.model, server.tokenizer, "tiny", batch_size=4)
    items = [("which is better", "yes good", "no bad"), ("again", "1 2", "3")]
    verdicts, stats = PairwiseLabeler(local).label(items)
    for v in verdicts:
        assert 0 < v.p_a_first < 1 and 0 < v.p_a_second < 1
        assert v.verdict in ("a", "b", "tie")
        expected = "a" if min(v.p_a_first, v.p_a_second) > 0.5 else "b" if max(v.p_a_first, v.p_a_second) < 0.5 \
            else "tie"
        assert v.verdict == expected
    assert stats.labelled + stats.ties == 2 and stats.unparseable == 0
    # Exact option scores: log P(A) and log P(B) of the next token, which the sampler's top logprobs agree with.
    req = request(0)
    exact = local.option_logprobs([req], ["A", "B"])[0]
    top = local.chat([ChatRequest(req.messages, max_tokens=1, top_logprobs=len(WORDS) + 5)])[0].logprobs[0].top
    assert exact["A"] == pytest.approx(top["A"], abs=1e-4) and exact["B"] == pytest.approx(top["B"], abs=1e-4)
    assert math.exp(exact["A"]) + math.exp(exact["B"]) < 1
    # Multi-token options are scored token by token: "A" alone agrees with the one-pass path, "A B" is less likely.
    multi = local.option_logprobs([req], ["A", "A B"])[0]
    assert multi["A"] == pytest.approx(exact["A"], abs=1e-4) and multi["A B"] < multi["A"]


def test_local_judge_refuses_prompts_over_max_prompt_chars(server):
    from tokencredit.judges.backends import JudgeFailure

    local = HFBackend(server.model, server.tokenizer, "tiny", max_prompt_chars=60)
    short = ChatRequest([{"role": "user", "content": "A or B?"}])
    long = ChatRequest([{"role": "user", "content": "yes " * 50}])
    scored = local.option_logprobs([long, short, long], ["A", "B"])
    assert isinstance(scored[0], JudgeFailure) and isinstance(scored[2], JudgeFailure)
    assert "prompt of 200 characters is over max_prompt_chars=60" in scored[0].message
    assert set(scored[1]) == {"A", "B"} and scored[1] == local.option_logprobs([short], ["A", "B"])[0]
    answers = local.chat([long, short])
    assert answers[0].error == scored[0].message and answers[1].error is None and local.stats.failed == 3


class Scripted(HFBackend):
    """A backend whose answers are given by the test (no model), to check what labelers make of them."""

    def __init__(self, answers, finish="stop"):
        from tokencredit.judges.backends import JudgeBackend

        JudgeBackend.__init__(self, None)
        self.answers, self.finish = list(answers), finish

    def identity(self):
        return {"kind": "scripted"}

    def _ask_many(self, requests):
        from tokencredit.judges.backends import ChatResult

        return [ChatResult(self.answers.pop(0), self.finish) for _ in requests]

    def option_logprobs(self, requests, options, reask_unreadable=False):
        return [{} for _ in requests]


def test_labelers_count_unreadable_answers_and_never_invent_labels():
    verdicts, stats = PairwiseLabeler(Scripted(["A", "B", "B", "B", "no idea", "A", "A", "A"])).label(
        [("p", "x", "y")] * 4)
    # (A, then B with swapped order) = a both times; (B, B) = tie; unreadable; (A, A) = tie (position bias).
    assert [v.verdict for v in verdicts] == ["a", "tie", None, "tie"]
    assert (stats.labelled, stats.ties, stats.unparseable) == (1, 2, 1) and stats.examples == ["no idea"]
    scores, stats = RubricLabeler(Scripted(["Good.\nScore: 4", "great"])).label([("p", "r")] * 2)
    assert scores == [4, None] and stats.unparseable == 1
    spans, stats = SpanLabeler(Scripted(["- Germany", "- Spain"])).label([("p", "Paris is in Germany")] * 2)
    assert spans == [[SpanLabel(12, 19, -1)], None] and stats.unparseable == 1
    edits, stats = EditLabeler(Scripted(["Paris is in France.", " Paris  is in Germany ", ""])).label(
        [("p", "Paris is in Germany")] * 3)
    assert edits == ["Paris is in France.", None, None] and (stats.labelled, stats.ties, stats.unparseable) == (1, 1, 1)


def test_cache_keys_cover_the_whole_request(tmp_path):
    cache = JudgeCache(tmp_path / "c.sqlite")
    from tokencredit.judges.cache import request_key

    ident = {"kind": "openai", "model": "m"}
    keys = {request_key(ident, request(0).to_dict()), request_key(ident, request(1).to_dict()),
            request_key(ident, request(0, temperature=1.0).to_dict()),
            request_key({"kind": "openai", "model": "n"}, request(0).to_dict())}
    assert len(keys) == 4
    cache.put("k", {"a": 1}, {"text": "first"})
    cache.put("k", {"a": 1}, {"text": "second"})
    assert cache.get("k") == {"text": "first"} and len(cache) == 1 and cache.get("missing") is None


# ------------------------------------------------------------------ commands
def test_win_rate_counts_ties_half_and_brackets_the_estimate():
    from tokencredit.judges.settings import win_rate

    r = win_rate(["a", "a", "b", "tie", None, "a"])
    assert r["judged"] == 5 and r["win_rate"] == pytest.approx(3.5 / 5)
    assert (r["wins"], r["losses"], r["ties"]) == (3, 1, 1)
    low, high = r["ci95"]
    assert 0 <= low <= r["win_rate"] <= high <= 1 and high - low > 0.2  # five verdicts: a wide interval
    assert win_rate([None, None])["win_rate"] is None
    narrow = win_rate(["a"] * 300 + ["b"] * 100)
    assert narrow["ci95"][1] - narrow["ci95"][0] < 0.1


def test_judge_command_writes_reward_records_and_reruns_from_cache(faulty, tmp_path, capsys):
    from tokencredit.cli import main

    _, url = faulty
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "a": "yes good", "b": "no bad"}) + "\n" for i in range(5)))
    args = ["judge", "task=pairwise", f"data={data}", f"output={tmp_path / 'labels.jsonl'}", f"base_url={url}",
            "model=tiny", "api_key_env=", "max_retries=1"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["total"] == 5 and first["answers_asked"] > 0 and first["answers_from_cache"] == 0
    # The tiny vocabulary fits in the top-20 alternatives, so every preference is read from log-probabilities.
    assert first["unparseable"] == 0 and first["labelled"] + first["ties"] == 5
    labels = (tmp_path / "labels.jsonl").read_text()
    assert len(labels.splitlines()) == first["records"] == first["labelled"]
    for line in labels.splitlines():
        rec = json.loads(line)
        assert {rec["chosen"], rec["rejected"]} == {"yes good", "no bad"} and rec["p_chosen"] > 0.5
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["answers_asked"] == 0 and (tmp_path / "labels.jsonl").read_text() == labels
    summary = json.loads((tmp_path / "labels.jsonl.summary.json").read_text())
    assert summary["records"] == first["records"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "a": "x"}\n')
    assert main(["judge", f"data={tmp_path / 'bad.jsonl'}", f"output={tmp_path / 'o.jsonl'}", f"base_url={url}",
                 "model=tiny", "api_key_env="]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_judge_spans_and_edits_feed_the_reward_loaders(tmp_path):
    from tokencredit.commands.judge import JudgeRunConfig, run_judge
    from tokencredit.rewards.data import load_edits

    data = tmp_path / "responses.jsonl"
    data.write_text(json.dumps({"prompt": "capital of France?", "response": "Paris is in Germany"}) + "\n")

    class Fixed(Scripted):
        pass

    import tokencredit.commands.judge as commands

    answers = {"spans": "- in Germany\n+ Paris", "edits": "Paris is in France"}
    for task, answer in answers.items():
        original = commands.make_backend
        commands.make_backend = lambda settings, cache, a=answer: Fixed([a])
        try:
            summary = run_judge(JudgeRunConfig(task=task, data=str(data), output=str(tmp_path / f"{task}.jsonl")))
        finally:
            commands.make_backend = original
        assert summary["records"] == 1 and summary["unparseable"] == 0
    spans = json.loads((tmp_path / "spans.jsonl").read_text())["spans"]
    assert spans == [{"start": 0, "end": 5, "label": 1}, {"start": 9, "end": 19, "label": -1}]
    triples = load_edits(tmp_path / "edits.jsonl")
    assert triples[0].original == "Paris is in Germany" and triples[0].edited == "Paris is in France"


def test_evaluate_reports_win_rate_against_references(server, tmp_path):
    import tokencredit.commands.judge as commands
    from tokencredit.commands.judge import EvaluateConfig, run_evaluate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}", "reference": "yes good answer"}) + "\n"
                               for i in range(6)))
    gens = tmp_path / "gens.jsonl"
    gens.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "yes good answer" if i < 3 else "no"}) + "\n"
                            for i in range(6)))
    original = commands.make_backend
    commands.make_backend = lambda settings, cache: HFBackend(server.model, server.tokenizer, "tiny", cache=cache)
    try:
        result = run_evaluate(EvaluateConfig(prompts=str(prompts), a=str(gens), output_dir=str(tmp_path / "ev")))
    finally:
        commands.make_backend = original
    assert result["prompts"] == 6 and result["judged"] == 6 and result["judge"]["unparseable"] == 0
    assert 0 <= result["ci95"][0] <= result["win_rate"] <= result["ci95"][1] <= 1
    metrics = result["metrics_vs_reference"]
    assert metrics["b"]["rougeL"] == pytest.approx(1.0) and metrics["a"]["rougeL"] < 1.0
    verdicts = [json.loads(line) for line in (tmp_path / "ev" / "verdicts.jsonl").read_text().splitlines()]
    assert len(verdicts) == 6 and all(v["verdict"] in ("a", "b", "tie") for v in verdicts)
    # Identical answers (the first three) cannot be told apart by position-swapped judging: ties.
    assert all(v["verdict"] == "tie" for v in verdicts[:3])
    missing = tmp_path / "few.jsonl"
    missing.write_text(json.dumps({"prompt": "q0", "response": "x"}) + "\n")
    with pytest.raises(Exception, match="no response for 5"):
        run_evaluate(EvaluateConfig(prompts=str(prompts), a=str(missing), output_dir=str(tmp_path / "ev2")))

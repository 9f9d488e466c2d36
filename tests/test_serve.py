"""`tokencredit serve` on loopback with a tiny model, driven by the official openai client and raw HTTP."""

import json
import math
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from tokencredit.model_server import ModelServer, ServeConfig
from tokencredit.serve import make_http_server
from tokencredit.testing import save_tiny_causal_lm

openai = pytest.importorskip("openai")

WORDS = "yes no good bad a b c the answer is".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("serve") / "tiny", WORDS)


@pytest.fixture(scope="module")
def base_url(model_dir):
    server = ModelServer.from_config(ServeConfig(model=str(model_dir), served_name="tiny", device="cpu"))
    httpd = make_http_server(server, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)


def post(base_url, path, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(base_url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_models_and_chat_completion_with_logprobs(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "good or bad"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=3, n=2)
    assert len(resp.choices) == 2
    for choice in resp.choices:
        assert choice.finish_reason in ("stop", "length")
        content = choice.logprobs.content
        assert "".join(t.token for t in content).strip() == choice.message.content.strip()
        for entry in content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
            # Greedy decoding picks the most likely token: its logprob is the top one.
            assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
            assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-5
    assert resp.choices[0].message.content == resp.choices[1].message.content  # greedy: same answer
    assert resp.usage.completion_tokens == sum(len(c.logprobs.content) for c in resp.choices)


def test_seeded_sampling_repeats_and_completions_batch(client):
    kwargs = dict(model="tiny", prompt=["the answer is", "a b"], max_tokens=6, temperature=1.0, seed=7, logprobs=2)
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len(first.choices) == 2 and [c.index for c in first.choices] == [0, 1]
    lp = first.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_streaming_joins_to_the_full_answer(client):
    messages = [{"role": "user", "content": "a b c"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                            stream=True)
    pieces, reasons = [], []
    for chunk in stream:
        delta = chunk.choices[0].delta
        pieces.append(delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == full.choices[0].message.content
    assert reasons[-1] == full.choices[0].finish_reason and all(r is None for r in reasons[:-1])


def test_bad_requests_get_openai_style_4xx(client, base_url):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="a", max_tokens=0)
    status, body = post(base_url, "/chat/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(base_url, "/chat/completions", {"model": "tiny", "messages": [{"role": "user"}]})
    assert status == 400 and body["error"]["param"] == "messages[0]"
    status, body = post(base_url, "/chat/completions", {"model": "tiny", "messages": [{"role": "user",
                        "content": "a"}], "temperature": 3})
    assert status == 400 and body["error"]["param"] == "temperature"
    status, body = post(base_url, "/completions", {"model": "tiny", "prompt": "a", "logprobs": 9})
    assert status == 400 and body["error"]["param"] == "logprobs"
    status, body = post(base_url, "/embeddings", {"model": "tiny"})
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = post(base_url, "/completions", {"prompt": "a"})
    assert status == 400 and body["error"]["param"] == "model"


def test_the_command_serves_on_loopback_with_the_key_from_the_environment(model_dir):
    key = "sk-from-env-4242"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENCREDIT_API_KEY": key}
    proc = subprocess.Popen([sys.executable, "-m", "tokencredit.cli", "serve", str(model_dir), "--port", "0",
                             "--served-name", "tiny", "--device", "cpu", "max_rows=2", "port=9"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        info = json.loads(line)
        assert info["serving"] == "tiny" and info["base_url"].startswith("http://127.0.0.1:")
        assert info["api_key_required"] is True and key not in line
        client = openai.OpenAI(base_url=info["base_url"], api_key=key, max_retries=0, timeout=30)
        resp = client.completions.create(model="tiny", prompt="yes", max_tokens=3, temperature=0)
        assert resp.choices[0].finish_reason in ("stop", "length")
        stranger = openai.OpenAI(base_url=info["base_url"], api_key="guess", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
        # key=value sets any limit; the --port flag wins over port=9.
        with pytest.raises(openai.BadRequestError, match="max_rows|rows"):
            client.completions.create(model="tiny", prompt="yes", max_tokens=2, n=3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_stop_strings_end_the_answer_and_its_logprobs(client):
    free = client.completions.create(model="tiny", prompt="a", max_tokens=12, temperature=0, logprobs=1)
    words = free.choices[0].text.split()
    if len(words) < 3:
        pytest.skip("the tiny model stopped too early to place a stop string")
    stop = " " + words[2]
    cut = client.completions.create(model="tiny", prompt="a", max_tokens=12, temperature=0, logprobs=1, stop=stop)
    choice = cut.choices[0]
    assert choice.finish_reason == "stop" and stop not in choice.text
    assert free.choices[0].text.startswith(choice.text)
    assert "".join(choice.logprobs.tokens) == choice.text


def test_a_lora_adapter_folder_is_served_with_its_base_merged(model_dir, tmp_path):
    import torch

    from tokencredit.models import LoraSettings, is_peft, load_policy, load_tokenizer

    policy = load_policy(model_dir, lora=LoraSettings(r=4))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter: it changes the outputs
    policy.save_pretrained(tmp_path / "policy")
    load_tokenizer(model_dir).save_pretrained(tmp_path / "policy")
    server = ModelServer.from_config(ServeConfig(model=str(tmp_path / "policy"), device="cpu"))
    assert server.name == "policy" and not is_peft(server.model)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
        base = load_policy(model_dir)(input_ids=ids).logits
        assert torch.allclose(server.model(input_ids=ids).logits, expected, atol=1e-4)
    assert not torch.allclose(base, expected, atol=1e-3)

"""A bounded local load test of `tokencredit serve`: throughput, latency and memory, before and after abuse.

One process: the server runs in a thread on loopback (port 0) and C client threads send completions for a fixed
time (phase "before"); then a burst of bad requests (malformed bodies, oversized and half-sent bodies, wrong
methods and keys, prompts over the context, clients that vanish mid-generation or mid-stream); then the same load
again (phase "after"). Reported per phase: requests/s, p50/p95 latency, errors, and this process's VmRSS and
VmHWM from /proc/self/status; for the burst, the statuses each kind of bad request got. The result is printed and
written to results/serve_load.json.

    python benchmarks/serve_load.py                    # tiny random model, ~35 s
    python benchmarks/serve_load.py --model smollm2    # the built-in SmolLM2-135M, if already cached

Nothing is downloaded: the tiny model is built in a temporary folder; SmolLM2 is used only from
~/.cache/tokencredit/models (or $TOKENCREDIT_CACHE).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

KEY = "bench-key"
WORDS = "yes no good bad a b c the answer is".split()


def memory_mb() -> dict:
    """VmRSS and VmHWM of this process, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = round(int(value.split()[0]) / 1024, 1)
    return out


def post(port: int, body: dict, timeout: float = 60.0) -> int:
    """One completion on a fresh connection; the HTTP status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def load_phase(port: int, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """C clients send completions back to back for ``seconds``."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < end:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7,
                    "seed": rng.randrange(10**6)}
            start = time.monotonic()
            try:
                status = post(port, body)
            except OSError as exc:
                status = type(exc).__name__
            took = time.monotonic() - start
            with lock:
                statuses[status] += 1
                if status == 200:
                    latencies.append(took)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    ok = sorted(latencies)
    return {"seconds": round(wall, 2), "requests_ok": len(ok), "statuses": {str(k): v for k, v in statuses.items()},
            "requests_per_s": round(len(ok) / wall, 2),
            "p50_ms": round(1000 * statistics.median(ok), 1) if ok else None,
            "p95_ms": round(1000 * ok[min(len(ok) - 1, int(0.95 * len(ok)))], 1) if ok else None,
            "memory_mb": memory_mb(), "load_average_1m_after": round(os.getloadavg()[0], 2)}


def raw_exchange(port: int, data: bytes, *, half_close: bool = False, abort_after: float | None = None,
                 timeout: float = 30.0) -> str:
    """Send raw bytes; the status of the first response, or how the connection ended."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        if abort_after is not None:
            time.sleep(abort_after)
            # A reset, as a killed client sends.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return "aborted"
        if half_close:
            s.shutdown(socket.SHUT_WR)
        first = b""
        while b"\r\n" not in first:
            chunk = s.recv(4096)
            if not chunk:
                break
            first += chunk
        return first.split(b" ", 2)[1].decode() if first.startswith(b"HTTP/") else "closed"
    except OSError as exc:
        return type(exc).__name__
    finally:
        s.close()


def bad_requests(model: str, context: int) -> dict[str, dict]:
    """Kinds of bad request: bytes to send and how to send them."""
    auth = f"Authorization: Bearer {KEY}\r\n"

    def post_raw(body: bytes, extra: str = "", length: int | None = None, key: str = auth) -> bytes:
        n = len(body) if length is None else length
        return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{key}Content-Length: {n}\r\nConnection: close\r\n"
                f"{extra}\r\n").encode() + body

    long_prompt = " ".join(["a"] * (context + 10))
    huge_prompt = "a " * 500_000  # 1 MB
    slow = json.dumps({"model": model, "prompt": "a b c", "max_tokens": 256, "temperature": 1.0}).encode()
    return {
        "bad_json": {"data": post_raw(b"{nope")},
        "deep_nesting": {"data": post_raw(b'{"model": "x", "prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}")},
        "lone_surrogate": {"data": post_raw(b'{"model": "x", "prompt": "\\ud800"}')},
        "huge_seed": {"data": post_raw(json.dumps({"model": model, "prompt": "a", "seed": 10**40}).encode())},
        "content_length_negative": {"data": post_raw(b"{}", length=-1)},
        "content_length_abc": {"data": (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: abc\r\n"
                                        "Connection: close\r\n\r\n{}").encode()},
        "content_length_missing": {"data": f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()},
        "chunked": {"data": (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
                             "2\r\n{}\r\n0\r\n\r\n").encode()},
        "body_over_limit": {"data": post_raw(b"x" * 1000, length=100 * 1024 * 1024)},
        "half_sent_body": {"data": post_raw(b'{"model": ', length=1000), "half_close": False},
        "put": {"data": f"PUT /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n".encode()},
        "delete": {"data": f"DELETE /v1/models HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode()},
        "wrong_key": {"data": post_raw(b"{}", key="Authorization: Bearer nope\r\n")},
        "prompt_over_context": {"data": post_raw(json.dumps({"model": model, "prompt": long_prompt,
                                                             "max_tokens": 16}).encode())},
        "one_mb_prompt": {"data": post_raw(json.dumps({"model": model, "prompt": huge_prompt}).encode())},
        "too_many_rows": {"data": post_raw(json.dumps({"model": model, "prompt": ["a"] * 5000}).encode())},
        "left_mid_generation": {"data": post_raw(slow), "abort_after": 0.05},
        "left_mid_stream": {"data": post_raw(json.dumps({"model": model, "prompt": "a", "max_tokens": 64, "n": 8,
                                                         "stream": True}).encode()), "abort_after": 0.3},
    }


def burst(port: int, model: str, context: int, rounds: int, clients: int) -> dict:
    """Every kind of bad request ``rounds`` times, spread over ``clients`` threads; statuses per kind."""
    kinds = bad_requests(model, context)
    jobs = [name for _ in range(rounds) for name in kinds]
    random.Random(0).shuffle(jobs)
    results: dict[str, Counter] = {name: Counter() for name in kinds}
    lock = threading.Lock()

    def worker(mine: list[str]) -> None:
        for name in mine:
            spec = kinds[name]
            status = raw_exchange(port, spec["data"], half_close=spec.get("half_close", False),
                                  abort_after=spec.get("abort_after"))
            with lock:
                results[name][status] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(jobs[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"requests": len(jobs), "seconds": round(time.monotonic() - start, 2),
            "statuses": {name: dict(c) for name, c in results.items()}, "memory_mb": memory_mb()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=12.0, help="length of each load phase")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="times each kind of bad request is sent in the burst")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from tokencredit.model_server import ModelServer, ServeConfig
    from tokencredit.models import default_cache_dir
    from tokencredit.serve import make_http_server
    from tokencredit.testing import save_tiny_causal_lm

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    tmp = tempfile.TemporaryDirectory()
    if a.model == "tiny":
        folder = save_tiny_causal_lm(Path(tmp.name) / "tiny", WORDS)
    else:
        folder = default_cache_dir() / "smollm2-135m-instruct"
        if not (folder / "config.json").is_file():
            print(f"SmolLM2 is not cached at {folder}; run `tokencredit serve smollm2-135m-instruct` once",
                  file=sys.stderr)
            return 2
    # Defaults except a short read timeout, so the burst's half-sent bodies are given up on within a second.
    config = ServeConfig(model=str(folder), served_name="bench", device="cpu", port=0, api_key=KEY,
                         read_timeout_s=1.0)
    memory_start = memory_mb()
    server = ModelServer.from_config(config)
    httpd = make_http_server(server, "127.0.0.1", 0)
    port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        memory_loaded = memory_mb()
        post(port, {"model": "bench", "prompt": "a", "max_tokens": 2})  # warm-up
        # The machine may be shared: a high load average before a phase explains a slow one.
        load_before = round(os.getloadavg()[0], 2)
        before = load_phase(port, "bench", a.clients, a.seconds, a.max_tokens)
        abuse = burst(port, "bench", server.context_limit or 2048, a.rounds, a.clients)
        end = time.monotonic() + 10
        while httpd.active_connections and time.monotonic() < end:
            time.sleep(0.05)
        abuse["open_connections_after"] = httpd.active_connections
        after = load_phase(port, "bench", a.clients, a.seconds, a.max_tokens)
    finally:
        httpd.shutdown()
        httpd.server_close()
        tmp.cleanup()
    result = {
        "model": a.model, "clients": a.clients, "seconds_per_phase": a.seconds, "max_tokens": a.max_tokens,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "limits": {k: getattr(config, k) for k in ("max_tokens_limit", "max_rows", "max_body_bytes",
                                                     "read_timeout_s", "max_connections", "request_timeout_s")},
        "context_limit": server.context_limit,
        "memory_mb": {"start": memory_start, "model_loaded": memory_loaded}, "load_average_1m_start": load_before,
        "before": before, "burst": abuse, "after": after, "server_stats": dict(server.stats),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

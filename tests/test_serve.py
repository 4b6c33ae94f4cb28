"""`gemmatune serve` against the official openai client on loopback: a real server process, a tiny model,
two adapters. Answers are checked against `gemmatune generate --greedy` with the same adapter."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from gemmatune.cli import main
from tests.conftest import write_jsonl
from tests.serve_process import API_KEY, ServerProcess, serve_args

PROMPTS = ["Route the ticket: my parcel is late", "hi", "Where is my refund?", "Bonjour", "x" * 40, "Reset password"]
MAX = 12


@pytest.fixture(scope="module")
def server(tiny_gemma3, two_adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    proc = ServerProcess(serve_args(tiny_gemma3, two_adapters, tmp / "runs"), tmp / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_gemma3, two_adapters, tmp_path_factory) -> dict:
    """`gemmatune generate --greedy` answers, keyed by (prompt or 'chat:'+message, adapter)."""
    a, b = two_adapters
    tmp = tmp_path_factory.mktemp("reference")
    rows = [{"prompt": p} for p in PROMPTS] + [{"messages": [{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": "hello"}]}]
    out = tmp / "answers.jsonl"
    assert main(["generate", "--base", str(tiny_gemma3), "--adapter", f"a={a}", "--adapter", f"b={b}",
                 "--precision", "fp32", "--greedy", "--max-new-tokens", str(MAX), "--use", "a,b,base",
                 "--input", str(write_jsonl(tmp / "q.jsonl", rows)), "--output", str(out)]) == 0
    answers = {}
    for line in out.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        key = row.get("prompt") or "chat:" + row["messages"][-1]["content"]
        answers[key, row["adapter"]] = (row["generation"], row["stopped"])
    return answers


def finish(stopped: bool) -> str:
    return "stop" if stopped else "length"


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"base", "a", "b"}
    assert models["a"].parent == "base" and models["b"].parent == "base"
    assert client.models.retrieve("b").id == "b"


@pytest.mark.parametrize("adapter", ["a", "b", "base"])
def test_completion_per_request_adapter_matches_generate(client, reference, adapter):
    for prompt in PROMPTS[:3]:
        out = client.completions.create(model=adapter, prompt=prompt, max_tokens=MAX, temperature=0)
        text, stopped = reference[prompt, adapter]
        assert out.choices[0].text == text
        assert out.choices[0].finish_reason == finish(stopped)
        assert out.usage.completion_tokens <= MAX and out.usage.prompt_tokens > 0
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # the adapters really differ, so the match above is per adapter and not the base's answer three times
    assert len({reference[PROMPTS[0], n][0] for n in ("a", "b", "base")}) == 3


def test_chat_streaming_and_not_match_generate(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    text, stopped = reference["chat:hello", "b"]
    out = client.chat.completions.create(model="b", messages=messages, max_tokens=MAX, temperature=0)
    assert out.choices[0].message.content == text
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == finish(stopped)
    chunks = list(client.chat.completions.create(model="b", messages=messages, max_tokens=MAX, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) >= 2  # it streamed, in more than one piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish(stopped)
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_streamed_completion_equals_plain(client, reference):
    stream = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=MAX, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == reference[PROMPTS[0], "a"][0]


def test_max_tokens_stop_and_seed(client, reference):
    full, _ = reference[PROMPTS[0], "a"]
    out = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    assert full.startswith(out.choices[0].text)
    stop = next(full[i:i + 2] for i in range(1, len(full) - 1) if full[i:i + 2].strip() and "\ufffd" not in
                full[i:i + 2])
    out = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=MAX, temperature=0, stop=[stop])
    assert out.choices[0].text == full[:full.index(stop)] and out.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="b", prompt="hi", max_tokens=MAX, temperature=1.0, top_p=0.9,
                                         seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same text


def test_errors_are_openai_bodies_and_server_survives(server, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found" and err.value.param == "model"
    anonymous = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], n=2)
    assert "n=1" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="a", prompt="hi", max_tokens=100_000)
    assert err.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="a", messages=[])
    for body in [b'{"model": "a",', b'[1, 2]', b'{"model": "a", "messages": [{"role": "pirate", "content": "x"}]}',
                 b'{"model": "a", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}']:
        status, reply = post(server.url + "/v1/chat/completions", body)
        assert status == 400 and reply["error"]["type"] == "invalid_request_error", body
    status, reply = post(server.url + "/v1/completions", b'{"model": "a", "prompt": "' + b"x" * 70_000 + b'"}')
    assert status == 413 and "at most 65536" in reply["error"]["message"]
    status, reply = post(server.url + "/v1/completions", b"{}", key=None)
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    status, _ = get(server.url + "/api/runs", key=None)
    assert status == 401  # the key guards the page's data routes too
    assert client.completions.create(model="a", prompt="still alive?", max_tokens=2, temperature=0).choices


def post(url: str, body: bytes, key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return _send(urllib.request.Request(url, data=body, headers=headers, method="POST"))


def get(url: str, key: str | None = API_KEY) -> tuple[int, dict]:
    return _send(urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {}))


def _send(request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_load_16_clients_batched_zero_errors_health_answers(server, client, reference):
    """16 concurrent clients x 8 requests: no errors, every answer as if alone, served in shared batches."""
    jobs = [(PROMPTS[(c + i) % len(PROMPTS)], ("a", "b", "base")[(c * 8 + i) % 3]) for c in range(16) for i in range(8)]
    before = get(server.url + "/health")[1]
    health: list[int] = []
    running = threading.Event()
    running.set()

    def watch():
        while running.is_set():
            health.append(get(server.url + "/health")[0])
            time.sleep(0.2)

    def one_client(c: int) -> list[tuple[str, str, str]]:
        own = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        answers = []
        for prompt, adapter in jobs[c * 8:(c + 1) * 8]:
            out = own.completions.create(model=adapter, prompt=prompt, max_tokens=MAX, temperature=0)
            answers.append((prompt, adapter, out.choices[0].text))
        return answers

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            results = [a for answers in pool.map(one_client, range(16)) for a in answers]
    finally:
        running.clear()
        watcher.join()
    assert len(results) == 128  # pool.map re-raises any client's error: zero errors
    for prompt, adapter, text in results:
        assert text == reference[prompt, adapter][0], (prompt, adapter)
    assert health and set(health) == {200}
    after = get(server.url + "/health")[1]
    rows, batches = after["rows"] - before["rows"], after["batches"] - before["batches"]
    assert rows == 128 and batches < rows / 2, (rows, batches)  # concurrent requests shared forward passes


def test_serve_cli_refuses_bad_limits_in_one_line(capsys):
    assert main(["serve", "--max-batch", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-batch must be >= 1"


def test_sigterm_lets_in_flight_requests_finish(server, client):
    """Last in this file: it stops the module's server (the fixture's own stop then has nothing to do)."""
    stream = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=64, temperature=0, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    server.proc.send_signal(signal.SIGTERM)
    rest = list(chunks)  # the stream carries on to its end after SIGTERM
    assert rest and rest[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].text for c in [first, *rest])
    # uvicorn re-raises the SIGTERM it caught once the in-flight requests are done: the conventional exit status
    assert server.proc.wait(60) == -signal.SIGTERM
    log = server.log.read_text()
    assert "Traceback" not in log and "every request in flight was answered" in log


"""Careless and hostile clients against a real `gemmatune serve` (issue 28): every client mistake is a 4xx with
OpenAI's error object, no answer names a server path, and a few hundred random bodies built from the
chat-completions schema leave the server answering with flat memory."""

from __future__ import annotations

import base64
import json
import random
import time
import urllib.error
import urllib.request

import pytest

from tests.serve_process import API_KEY, ServerProcess, serve_args

FUZZ_BODIES = 300
FUZZ_SEED = 28


@pytest.fixture(scope="module")
def server(tiny_gemma3, two_adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    # Later options win: a small max_tokens keeps the fuzz's valid requests quick; a body limit room for 700 KB.
    args = serve_args(tiny_gemma3, two_adapters, tmp / "runs") + ["--max-tokens-limit", "4",
                                                                  "--max-body-bytes", str(2 << 20)]
    proc = ServerProcess(args, tmp / "server.log")
    yield proc
    proc.stop()


def send(server, path: str, body: bytes | None = None, method: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    request = urllib.request.Request(server.url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def chat(server, **fields) -> tuple[int, dict]:
    body = {"model": "a", "max_tokens": 2, **fields}
    return send(server, "/v1/chat/completions", json.dumps(body).encode())


def is_openai_error(reply: dict) -> bool:
    error = reply.get("error")
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"} and "detail" not in reply


USER = {"role": "user", "content": "hi"}
BOT = {"role": "assistant", "content": "hello"}
CLIENT_MISTAKES = {  # issue 28 cases 4 and 7: each was a 500, or silently ignored
    "tiny-temperature": ({"messages": [USER], "temperature": 1e-300}, 200, None),
    "seed-over-64-bits": ({"messages": [USER], "seed": 2**80}, 400, "seed"),
    "lone-surrogate": ({"messages": [{"role": "user", "content": "\ud800"}]}, 400, "surrogate"),
    "lone-surrogate-in-part": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
                               400, "surrogate"),
    "two-users-in-a-row": ({"messages": [USER, USER]}, 400, "alternate"),
    "only-assistant": ({"messages": [BOT]}, 400, "messages[0]"),
    "ends-with-assistant": ({"messages": [USER, BOT]}, 400, "last message"),
    "5000-user-messages": ({"messages": [USER] * 5000}, 400, "at most 256"),
    "two-system-messages": ({"messages": [{"role": "system", "content": "a"}, {"role": "developer", "content": "b"},
                                          USER]}, 400, "system"),
    "tools": ({"messages": [USER], "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool"),
    "tool-choice": ({"messages": [USER], "tool_choice": "required"}, 400, "tool"),
}


@pytest.mark.parametrize("case", list(CLIENT_MISTAKES))
def test_client_mistakes_are_4xx(server, case):
    fields, want, needle = CLIENT_MISTAKES[case]
    status, reply = chat(server, **fields)
    assert status == want, (case, status, reply)
    if want == 400:
        assert is_openai_error(reply) and needle in reply["error"]["message"], reply
    else:
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")


def test_no_answer_names_a_server_path_or_is_fastapis(server):
    """issue 28 case 5: a garbage image named the server's temp file; bad UTF-8 and unknown routes got FastAPI's
    {"detail": ...}."""
    garbage = base64.b64encode(random.Random(5).randbytes(520_000)).decode()
    status, reply = chat(server, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{garbage}"}}]}])
    assert status == 400 and is_openai_error(reply), reply
    message = reply["error"]["message"]
    assert "/tmp" not in message and "gemmatune-serve-" not in message and "messages-0" not in message, message
    for path, body, method, want in [
        ("/v1/chat/completions", b'{"model": "a", "messages": [{"role": "user", "content": "\xff\xfe"}]}', None, 400),
        ("/v1/nothing-here", None, None, 404),
        ("/v1/models", b"{}", "POST", 405),
    ]:
        status, reply = send(server, path, body, method)
        assert status == want and is_openai_error(reply), (path, status, reply)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


STRANGE_STRINGS = ["", "a", "\u0000", "\ud800", "\udfff", "😀" * 50, "\u202e\u200b", "x" * 5000, "base", "b",
                   "../../etc/passwd", "<script>", "%s%n", "\n\r\t", "🏳️‍🌈", "null"]
EXTREMES = [0, -1, 1, 2, 2.0000001, -0.0, 1e-300, 1e308, -1e308, 2**63, 2**64, 2**80, -(2**63) - 1, 0.5, 3,
            True, False, None]


def _value(rng: random.Random, depth: int = 0):
    """Any JSON value: the wrong type for whatever field it lands in, most of the time."""
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice(STRANGE_STRINGS)
    if kind == 1:
        return rng.choice(EXTREMES)
    if kind == 2:
        return rng.uniform(-3, 3)
    if kind == 3:
        return None
    if kind == 4:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 5:
        return {rng.choice(["role", "content", "type", "text", "url", "x"]): _value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return "x" * rng.randrange(100)


def _content(rng: random.Random):
    if rng.random() < 0.6:
        return rng.choice(STRANGE_STRINGS[:12]) if rng.random() < 0.5 else "hello"
    parts = []
    for _ in range(rng.randrange(1, 3)):
        kind = rng.choice(["text", "image_url", "input_audio", "video"])
        if kind == "text":
            parts.append({"type": "text", "text": rng.choice(STRANGE_STRINGS)})
        elif kind == "image_url":
            url = rng.choice(["data:image/png;base64,AAAA", "data:image/png;base64,!!", "http://example.com/x.png",
                              "file:///etc/passwd", "data:;base64," + base64.b64encode(b"\x89PNG\r\n").decode()])
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "input_audio":
            parts.append({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": rng.choice(
                ["wav", "mp3"])}})
        else:
            parts.append({"type": kind, kind: _value(rng)})
    return parts


HOSTILE = {  # per field of the schema: values a careless or hostile client sends
    "model": ["nope", "\ud800", "", 5, None, ["a"]],
    "messages": [[], None, "hi", [{"role": "tool", "content": "x"}], [{"role": "pirate", "content": "x"}],
                 [{"role": "assistant", "content": "x"}], [{"role": "user", "content": "a"}] * 3,
                 [{"role": "system", "content": "s"}, {"role": "user"}], [{"content": "no role"}]],
    "max_tokens": [0, -1, 5, 2**70, 1.5, "4"],
    "temperature": [1e-300, 5e-324, -0.1, 2.5, 1e308, "hot", True],
    "top_p": [1e-300, 0, 1.5, -1, None],
    "seed": [-1, -(2**63) - 1, 2**63, 2**64 - 1, 2**64, 2**80, 1.5, "7"],
    "stop": ["x", ["a", "b"], [""], ["\ud800"], ["x"] * 5, 5, [None]],
    "stream": [True, "yes", 2],
    "n": [0, 2, 2**80],
    "logprobs": [True, 5],
    "tools": [[{"type": "function"}], "all", []],
    "tool_choice": ["auto", "none", {"type": "function"}],
    "stream_options": [{"include_usage": True}, "x", []],
    "presence_penalty": [2**80, "x"],
    "user": STRANGE_STRINGS,
}


def fuzz_body(rng: random.Random) -> tuple[str, dict]:
    """A valid request of the chat-completions (or completions) schema, then 0 to 5 of its fields replaced by a
    wrong type, an extreme or strange unicode (HOSTILE, or any JSON value)."""
    body = {"model": rng.choice(["a", "b", "base"]), "max_tokens": rng.randrange(1, 5),
            "temperature": rng.choice([0, 0.7, 1.0, 2.0]), "top_p": rng.choice([1.0, 0.9, 0.5])}
    if rng.random() < 0.3:
        body["seed"] = rng.randrange(-(2**63), 2**64)
    if rng.random() < 0.3:
        body["stream"] = True
    completion = rng.random() < 0.2
    if completion:
        body["prompt"] = rng.choice(["hello", "😀 émoji", "x" * 200])
    else:
        turns = rng.choice([1, 1, 3])
        body["messages"] = [{"role": "user" if k % 2 == 0 else "assistant", "content": "hello"} for k in range(turns)]
        if rng.random() < 0.2:
            body["messages"].insert(0, {"role": "system", "content": "Be brief."})
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 5])):
        key = rng.choice([*HOSTILE, "content", "any"])
        if key == "content" and "messages" in body and isinstance(body["messages"], list) and body["messages"]:
            body["messages"][-1] = {"role": "user", "content": _content(rng)}
        elif key == "any":
            body[rng.choice(list(body))] = _value(rng)
        elif key in HOSTILE:
            body[key] = rng.choice(HOSTILE[key])
    if completion:
        body.pop("messages", None)
        return "/v1/completions", body
    return "/v1/chat/completions", body


def test_fuzz_schema_bodies_only_2xx_4xx_server_alive_rss_flat(server):
    rng = random.Random(FUZZ_SEED)
    statuses: dict[int, int] = {}
    baseline = None
    started = time.monotonic()
    for i in range(FUZZ_BODIES):
        path, body = fuzz_body(rng)
        data = json.dumps(body).encode()  # ensure_ascii: lone surrogates travel as \\ud800 escapes, as clients send
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        request = urllib.request.Request(server.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status = response.status
                response.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            reply = json.loads(exc.read())
            assert is_openai_error(reply), (body, reply)
        assert status < 500, (status, body)
        statuses[status] = statuses.get(status, 0) + 1
        if i == 50:  # after warm-up: allocator pools and tokenizer caches have grown to their size
            baseline = _rss_kib(server.proc.pid)
    assert server.proc.poll() is None
    assert send(server, "/health")[0] == 200
    grown = _rss_kib(server.proc.pid) - baseline
    assert grown < 64 * 1024, f"RSS grew {grown} KiB over {FUZZ_BODIES - 50} requests"
    assert statuses.get(200, 0) >= 10 and sum(n for s, n in statuses.items() if 400 <= s < 500) >= 100, statuses
    assert time.monotonic() - started < 120
    assert "Traceback" not in server.log.read_text()

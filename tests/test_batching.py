"""Concurrent requests in one mixed batch each get what they would get alone (gemmatune.serve.batching)."""

from __future__ import annotations

import threading

import torch

from gemmatune.infer.load import load
from gemmatune.serve.batching import Batcher, Job

PROMPTS = ["Route the ticket: my parcel is late", "hi", "x" * 30]


def test_one_batch_rows_answer_as_if_alone(tiny_gemma3, two_adapters):
    a, b = two_adapters
    tuned = load([f"a={a}", f"b={b}"], base=str(tiny_gemma3), precision="fp32")
    cases = [(p, adapter, k) for i, p in enumerate(PROMPTS) for adapter, k in
             [("a", 3 + i), ("b", 12), ("base", 8 - i)]]
    alone = [tuned.generate(p, adapter=adapter, greedy=True, max_new_tokens=k)[0] for p, adapter, k in cases]
    # one more: a stop string taken from the middle of an answer, so that row ends early on it
    long = tuned.generate(PROMPTS[0], adapter="b", greedy=True, max_new_tokens=12)[0].text
    stop = long[4:6]
    results: dict[int, object] = {}
    streamed: dict[int, list[str]] = {}
    finished = threading.Event()

    def job(i: int, prompt: str, adapter: str, k: int, stops: list[str]) -> Job:
        def done(result):
            results[i] = result
            if len(results) == len(cases) + 1:
                finished.set()

        streamed[i] = []
        return Job(row={"instruction": prompt, "input": ""}, adapter=adapter, max_tokens=k, greedy=True,
                   temperature=1.0, top_p=1.0, seed=None, stop=stops, emit=streamed[i].append, done=done)

    batcher = Batcher(tuned, max_batch=32)
    for i, (p, adapter, k) in enumerate(cases):
        batcher.submit(job(i, p, adapter, k, []))
    batcher.submit(job(len(cases), PROMPTS[0], "b", 12, [stop]))
    batcher.start()  # everything queued before the worker starts is its first batch
    assert finished.wait(120)
    batcher.close(30)
    assert batcher.status()["batches"] == 1 and batcher.status()["rows"] == len(cases) + 1
    for i, gen in enumerate(alone):
        result = results[i]
        assert result.text == gen.text, cases[i]
        assert result.finish_reason == ("stop" if gen.stopped else "length")
        assert result.completion_tokens == gen.new_tokens
        assert "".join(streamed[i]) == gen.text  # the streamed pieces add up to the answer
    cut = results[len(cases)]
    assert cut.text == long[:long.index(stop)] and cut.finish_reason == "stop"
    assert "".join(streamed[len(cases)]) == cut.text


def _answer(tuned, specs: list[dict]) -> list[str]:
    """Texts for jobs submitted together before the worker starts: one batch."""
    results: dict[int, object] = {}
    finished = threading.Event()

    def job(i: int, spec: dict) -> Job:
        def done(result):
            results[i] = result
            if len(results) == len(specs):
                finished.set()

        return Job(row={"instruction": spec.get("prompt", "hi"), "input": ""}, adapter=spec.get("adapter", "b"),
                   max_tokens=8, greedy=spec.get("greedy", False), temperature=spec.get("temperature", 1.0),
                   top_p=spec.get("top_p", 1.0), seed=spec.get("seed"), stop=[], emit=None, done=done)

    batcher = Batcher(tuned, max_batch=32)
    for i, spec in enumerate(specs):
        batcher.submit(job(i, spec))
    batcher.start()
    assert finished.wait(120)
    batcher.close(30)
    assert batcher.status()["batches"] == 1
    return [results[i].text for i in range(len(specs))]


def test_a_seed_is_the_requests_own(tiny_gemma3, two_adapters):
    """issue 28 case 6: a request's seed went through torch.manual_seed, the process-wide RNG. Now each row has its
    own generator: the same seed gives the same text whatever shares the batch, and changes nothing else."""
    a, b = two_adapters
    tuned = load([f"a={a}", f"b={b}"], base=str(tiny_gemma3), precision="fp32")
    seven = {"seed": 7, "top_p": 0.9, "prompt": PROMPTS[0]}
    eight = {"seed": 8, "temperature": 0.7, "adapter": "a"}
    alone = _answer(tuned, [seven])[0]
    state = torch.get_rng_state()
    mixed = _answer(tuned, [{"prompt": "x"}, eight, {"greedy": True}, seven, {"seed": 2**64 - 1, "adapter": "base"}])
    assert mixed[3] == alone
    assert _answer(tuned, [eight])[0] == mixed[1]  # its neighbours' seeds did not change it either
    assert torch.equal(torch.get_rng_state(), state)  # torch's global RNG was never touched
    # An unseeded request after a seeded one is not made repeatable by that seed.
    unseeded = [_answer(tuned, [seven, {"prompt": "Where is my refund?"}])[1] for _ in range(3)]
    assert len(set(unseeded)) > 1, unseeded


def test_an_answered_client_sees_its_row_counted(tiny_gemma3):
    """CI at 3572aff: the health check's rows/batches were counted after `generate` returned, but a row is answered
    while the batch runs, so a client could read /health right after its answer and miss its own row."""
    tuned = load([], base=str(tiny_gemma3), precision="fp32")
    batcher = Batcher(tuned)
    seen: list[dict] = []
    answered = threading.Event()

    def done(result):
        seen.append(batcher.status())  # what /health shows the moment the client has its answer
        answered.set()

    batcher.start()
    for n in (1, 2):
        answered.clear()
        batcher.submit(Job(row={"instruction": "hi", "input": ""}, adapter="base", max_tokens=2, greedy=True,
                           temperature=1.0, top_p=1.0, seed=None, stop=[], emit=None, done=done))
        assert answered.wait(120)
        assert seen[-1]["rows"] == n and seen[-1]["batches"] == n, seen
    batcher.close(30)

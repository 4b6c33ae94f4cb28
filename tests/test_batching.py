"""Concurrent requests in one mixed batch each get what they would get alone (gemmatune.batching)."""

from __future__ import annotations

import threading

from gemmatune.batching import Batcher, Job
from gemmatune.infer import load

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

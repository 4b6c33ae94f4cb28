import pytest
import torch

from gemmatune.errors import GemmatuneError
from gemmatune.infer.load import load
from gemmatune.infer.model import BASE

PROMPTS = ["hi", "Route the ticket: my parcel is late", "a", "Where is order 12345? It has been two weeks now.", "ok?"]


def test_generation_returns_only_new_tokens_and_stops_at_stop_ids(tiny_gemma3):
    tuned = load(base=str(tiny_gemma3), precision="fp32")
    assert tuned.stop_ids == [1, 5]  # EOS and <end_of_turn>
    free = tuned.generate("hi", greedy=True, max_new_tokens=10)[0]
    prompt = tuned.prompt_ids("hi")
    with torch.no_grad():
        raw = tuned.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                   eos_token_id=tuned.stop_ids, pad_token_id=0)[0].tolist()
    assert raw[: len(prompt)] == prompt
    assert free.token_ids == raw[len(prompt):]  # the new ids, and nothing of the prompt
    assert free.text == tuned.tokenizer.decode(free.token_ids, skip_special_tokens=True)
    assert not free.stopped and free.new_tokens == 10
    # Make the 4th generated token a stop token: generation must end there and leave it out of the text.
    k = free.token_ids.index(free.token_ids[3])
    tuned.stop_ids = [1, 5, free.token_ids[3]]
    stopped, other = tuned.generate(["hi", "something longer that goes on"], greedy=True, max_new_tokens=10)
    assert stopped.stopped and stopped.token_ids == free.token_ids[:k] and stopped.new_tokens == k + 1
    assert stopped.text == tuned.tokenizer.decode(free.token_ids[:k])
    assert all(t not in tuned.stop_ids and t != 0 for t in other.token_ids)


@pytest.mark.parametrize("model_fixture", ["tiny_gemma3", "tiny_gemma3n"])
def test_left_padded_batch_equals_one_by_one_greedy(model_fixture, request):
    tuned = load(base=str(request.getfixturevalue(model_fixture)), precision="fp32")
    prompts = PROMPTS[:3]
    batched = tuned.generate(prompts, greedy=True, max_new_tokens=6, batch_size=len(prompts))
    single = [tuned.generate(p, greedy=True, max_new_tokens=6)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert len({len(tuned.prompt_ids(p)) for p in prompts}) == 3  # the batch really was padded


def test_mixed_batch_rows_equal_single_adapter_runs(tiny_gemma3, two_adapters):
    a, b = two_adapters
    tuned = load([str(a), f"second={b}"], precision="fp32")
    assert list(tuned.adapters) == ["a", "second"] and tuned.default_adapter == "a"
    names = ["a", "second", BASE, "a", "second"]
    mixed = tuned.generate(PROMPTS, adapter=names, greedy=True, max_new_tokens=8, batch_size=5)
    assert [g.adapter for g in mixed] == names
    for prompt, name, got in zip(PROMPTS, names, mixed, strict=True):
        alone = tuned.generate(prompt, adapter=name, greedy=True, max_new_tokens=8)[0]
        assert got.token_ids == alone.token_ids, name
    # the three variants really differ, so the comparison above means something
    outs = {n: tuned.generate(PROMPTS[1], adapter=n, greedy=True, max_new_tokens=8)[0].token_ids
            for n in ("a", "second", BASE)}
    assert len({tuple(v) for v in outs.values()}) == 3


def test_sampling_is_repeatable_with_a_seed(tiny_gemma3):
    tuned = load(base=str(tiny_gemma3), precision="fp32")
    first = tuned.generate(PROMPTS[:2], seed=7, max_new_tokens=8, temperature=1.0)
    again = tuned.generate(PROMPTS[:2], seed=7, max_new_tokens=8, temperature=1.0)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]


def test_adapter_errors_name_the_problem(tiny_gemma3, two_adapters, tmp_path):
    a, _ = two_adapters
    with pytest.raises(GemmatuneError, match="no adapter_config.json"):
        load([str(tmp_path)])
    with pytest.raises(GemmatuneError, match="full model folder"):
        load([str(tiny_gemma3)])
    with pytest.raises(GemmatuneError, match="both named"):
        load([str(a), str(a)])
    with pytest.raises(GemmatuneError, match="reserved"):
        load([f"base={a}"])
    tuned = load([str(a)], precision="fp32")
    with pytest.raises(GemmatuneError, match="not loaded; loaded: base, a"):
        tuned.generate("hi", adapter="missing")
    with pytest.raises(GemmatuneError, match="one per prompt"):
        tuned.generate(["x", "y"], adapter=["a"])


def test_an_adapter_for_another_base_is_refused_not_silently_ignored(tiny_gemma3n, two_adapters):
    # PEFT alone only warns on a Gemma 3 adapter over Gemma 3n (same module names) and then acts as the base.
    a, _ = two_adapters
    with pytest.raises(GemmatuneError, match=str(a)):
        load([str(a)], base=str(tiny_gemma3n), precision="fp32")

"""Sampling from the candidate tokens (infer/sampling.py) against transformers' own warpers over the whole
vocabulary: the same tokens with the same probabilities, draws that follow them, and generate using it."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from gemmatune.infer.sampling import FIRST_FETCH, candidates, draw

SETTINGS = [(0.7, 0.95, 64), (1.0, 0.9, 0), (0.7, 1.0, 64), (1.3, 0.5, 0), (0.2, 0.99, 0), (1.0, 0.95, 1),
            (1.0, 0.999, 0), (0.5, 0.0, 0), (1.0, 1.0, 5000)]


def _transformers_probs(scores: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    s = TemperatureLogitsWarper(temperature)(None, scores[None].clone())
    if top_k:
        s = TopKLogitsWarper(top_k)(None, s)
    if top_p < 1:
        s = TopPLogitsWarper(max(top_p, 1e-12))(None, s)  # the warper refuses 0; any tiny top_p keeps the best alone
    return torch.softmax(s, -1)[0].double()


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), SETTINGS)
def test_candidates_are_the_tokens_and_probabilities_transformers_samples_from(temperature, top_p, top_k):
    vocab = 5000
    scores = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 3  # no ties
    want = _transformers_probs(scores, temperature, top_p, top_k)
    tokens, probs = candidates(scores, temperature, top_p, top_k)
    got = torch.zeros(vocab, dtype=torch.float64)
    got[tokens] = probs
    assert torch.equal(got > 0, want > 0)  # the same support
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-12)
    assert torch.all(probs[:-1] >= probs[1:])  # likeliest first


def test_a_nucleus_wider_than_the_first_fetch_is_fetched_whole():
    scores = torch.linspace(0, 1, 5000)  # nearly flat: half the mass is ~2,300 tokens
    want = _transformers_probs(scores, 1.0, 0.5, 0)
    tokens, probs = candidates(scores, 1.0, 0.5, 0)
    assert tokens.numel() == (want > 0).sum() > 4 * FIRST_FETCH
    assert torch.allclose(probs, want[tokens], rtol=1e-5)


def test_tokens_tied_with_the_kth_stay_and_tied_scores_get_equal_probabilities():
    scores = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0])
    tokens, probs = candidates(scores, 1.0, 1.0, 3)  # the 3rd ties with the 4th and 5th: transformers keeps all
    want = _transformers_probs(scores, 1.0, 1.0, 3)
    assert sorted(tokens.tolist()) == [0, 1, 2, 3, 4]
    assert torch.allclose(probs, want[tokens], rtol=1e-6)
    many = torch.full((600,), 2.0)
    many[0] = 3.0
    tokens, _ = candidates(many, 1.0, 1.0, 2)  # ties past the first fetch (2 x top_k) are fetched too
    assert tokens.numel() == 600


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), [(1.0, 1.0, 0), (0.8, 0.9, 0), (1.0, 1.0, 4)])
def test_draws_follow_the_probabilities(temperature, top_p, top_k):
    scores = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0])
    want = _transformers_probs(scores, temperature, top_p, top_k)
    generator = torch.Generator().manual_seed(0)
    n = 20_000
    counts = torch.bincount(torch.tensor([draw(scores, temperature, top_p, top_k, generator) for _ in range(n)]),
                            minlength=scores.numel()).double()
    sigma = torch.sqrt(want * (1 - want) / n)
    assert torch.all((counts / n - want).abs() <= 5 * sigma + 1e-12), (counts / n, want)


def test_a_tiny_temperature_picks_the_best_without_nan():
    scores = torch.tensor([0.5, 2.0, 1.9, -1.0])
    assert draw(scores, 1e-300, 1.0) == 1
    assert draw(scores, 1e-300, 0.9, 2) == 1


def test_generate_samples_reproducibly_and_without_sorting_the_vocabulary(tiny_gemma3):
    from gemmatune.infer.load import load

    tuned = load(base=str(tiny_gemma3), precision="fp32")
    prompts = ["hello", "Route the ticket: my parcel is late"]
    runs = [tuned.generate(prompts, greedy=False, seed=3, temperature=1.0, top_k=40, top_p=0.9, max_new_tokens=6)
            for _ in range(2)]
    assert [g.token_ids for g in runs[0]] == [g.token_ids for g in runs[1]]
    with torch.profiler.profile() as prof:
        tuned.generate(prompts, greedy=False, seed=4, top_k=0, top_p=0.9, max_new_tokens=4)
    names = {e.name for e in prof.events()}
    assert "aten::sort" not in names and "aten::multinomial" not in names
    greedy = tuned.generate(prompts, greedy=True, max_new_tokens=6)
    top1 = tuned.generate(prompts, greedy=False, seed=5, top_k=1, max_new_tokens=6)  # one candidate: greedy's
    assert [g.token_ids for g in top1] == [g.token_ids for g in greedy]

"""Packed batches whose examples share their first tokens: computed once, the same logits, loss and gradients as
each example alone; what is shared, what never is; tokens seen still count every example's tokens."""

import pytest
import torch
import torch.nn.functional as F

from gemmatune.config import ModelConfig
from gemmatune.data.examples import SHARED_PREFIX_MIN, PackCollator, shared_prefix
from gemmatune.kernels import attention
from gemmatune.kernels.attention import packed_layout, shared_tokens
from gemmatune.models.loading import load_model
from tests.conftest import tiny_config

PREFIX = 20  # longer than the tiny models' sliding window (16), so the window cuts into the shared rows
TAILS = (5, 30, 1, 12)


def _examples(seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(6, 262, (PREFIX,), generator=g).tolist()
    out = []
    for n in TAILS:
        ids = common + torch.randint(6, 262, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (PREFIX + 1) + ids[PREFIX + 1:]})
    return out


def _load(model_dir):
    return load_model(ModelConfig(name=str(model_dir)), "fp32", packing=True).model.eval()


def test_the_collator_keeps_the_shared_tokens_once_with_the_positions_of_each_example():
    examples = _examples()
    batch = PackCollator(share_prefix=True)(examples)
    assert batch["input_ids"].shape[1] == PREFIX + sum(TAILS)
    bounds, contexts = packed_layout(batch["position_ids"])
    assert contexts == [None] + [(0, PREFIX)] * 3
    assert [end - start for start, end in bounds] == [PREFIX + TAILS[0], *TAILS[1:]]
    for (start, end), ex in zip(bounds[1:], examples[1:], strict=True):
        assert batch["input_ids"][0, start:end].tolist() == ex["input_ids"][PREFIX:]
        assert batch["position_ids"][0, start:end].tolist() == list(range(PREFIX, len(ex["input_ids"])))
        assert batch["labels"][0, start:end].tolist() == [-100, *ex["labels"][PREFIX + 1:]]
    total = sum(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape[1] + shared_tokens(batch["position_ids"]) == total


def test_only_tokens_outside_the_loss_are_shared_and_only_where_it_pays():
    examples = _examples()
    assert shared_prefix(examples) == PREFIX
    # one example trains from its 8th token: the 7th predicts it, so only 6 could be shared (< the minimum)
    early = [*examples[:3], dict(examples[3], labels=[-100] * 7 + examples[3]["input_ids"][7:])]
    assert shared_prefix(early) == 0
    later = [*examples[:3], dict(examples[3], labels=[-100] * 12 + examples[3]["input_ids"][12:])]
    assert shared_prefix(later) == 11 >= SHARED_PREFIX_MIN
    trained_prompts = [dict(e, labels=[-100, *e["input_ids"][1:]]) for e in examples]  # data.train_on_prompt
    assert shared_prefix(trained_prompts) == 0
    assert shared_prefix(examples[:1]) == 0
    assert shared_prefix([*examples[:3], dict(examples[3], media=[object()])]) == 0  # soft tokens look alike
    assert PackCollator()(examples)["input_ids"].shape[1] == sum(len(e["input_ids"]) for e in examples)


@pytest.mark.parametrize("model_fixture", ["tiny_gemma3", "tiny_gemma3n", "tiny_gemma4"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded groups", "sdpa per example"])
def test_shared_rows_give_each_example_its_own_logits_and_gradients(model_fixture, padded, request, monkeypatch):
    if not padded:
        monkeypatch.setattr(attention, "PADDED_WEIGHTS", 0)
    model = _load(request.getfixturevalue(model_fixture))
    examples = _examples()

    def loss_and_grads(batch):
        model.zero_grad()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        labels = batch["labels"][0]
        F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    shared, shared_grads = loss_and_grads(PackCollator(share_prefix=True)(examples))
    plain, plain_grads = loss_and_grads(PackCollator()(examples))
    assert shared.shape[0] == PREFIX + sum(TAILS) < plain.shape[0]
    bounds, _ = packed_layout(PackCollator(share_prefix=True)(examples)["position_ids"])
    plain_bounds, _ = packed_layout(PackCollator()(examples)["position_ids"])
    for (start, end), (_, plain_end) in zip(bounds, plain_bounds, strict=True):
        assert torch.allclose(shared[start:end], plain[plain_end - (end - start):plain_end], atol=2e-5)
    assert shared_grads.keys() == plain_grads.keys() and shared_grads
    for name, grad in shared_grads.items():
        assert (grad - plain_grads[name]).norm() <= 1e-5 * plain_grads[name].norm(), name  # rounding apart


def test_training_counts_every_examples_tokens_and_shares_the_prompt(tiny_gemma3, alpaca_file, tmp_path,
                                                                     monkeypatch):
    import json

    from gemmatune.data import examples
    from gemmatune.runs.folder import read_metrics
    from gemmatune.train.recipe import train

    shared, measure = [], examples.shared_prefix
    monkeypatch.setattr(examples, "shared_prefix", lambda batch: shared.append(measure(batch)) or shared[-1])
    seen, losses = {}, {}
    for share in (True, False):
        cfg = tiny_config(tiny_gemma3, alpaca_file, tmp_path / str(share), max_steps=3, save_steps=3,
                          share_prefix=share)
        run_dir = train(cfg).run_dir
        state = json.loads(next(run_dir.glob("checkpoints/checkpoint-3/trainer_state.json")).read_text())
        seen[share] = state["num_input_tokens_seen"]
        losses[share] = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert shared and min(shared) >= SHARED_PREFIX_MIN  # the rows' chat turn and instruction, once per batch
    assert seen[True] == seen[False] > 0
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_evaluation_shares_the_prompt_as_training_does(tiny_gemma3, tmp_path, monkeypatch):
    from gemmatune.data import examples
    from gemmatune.infer import evaluation
    from gemmatune.infer.load import load
    from tests.conftest import ALPACA_ROWS, make_adapter

    tuned = load([f"a={make_adapter(tiny_gemma3, tmp_path / 'a', seed=3)}"], template="chat", precision="fp32")
    shared, measure = [], examples.shared_prefix
    monkeypatch.setattr(examples, "shared_prefix", lambda batch: shared.append(measure(batch)) or shared[-1])
    got = evaluation.response_loss(tuned, ALPACA_ROWS, "a", max_tokens=150)
    assert shared and min(shared) >= SHARED_PREFIX_MIN
    monkeypatch.setattr(evaluation, "reads_shared_prefixes", lambda model: False)
    want = evaluation.response_loss(tuned, ALPACA_ROWS, "a", max_tokens=150)
    assert got[1] == want[1] and got[0] == pytest.approx(want[0], rel=1e-5)

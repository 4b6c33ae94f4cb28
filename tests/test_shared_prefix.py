"""Packed batches whose examples share their first tokens: computed once, the same logits, loss and gradients as
each example alone; what is shared, what never is; tokens seen still count every example's tokens."""

import pytest
import torch
import torch.nn.functional as F

from gemmatune.config import ModelConfig
from gemmatune.data.examples import SHARED_PREFIX_MIN, PackCollator, prefix_groups
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


def _two_preambles(seed: int = 2) -> tuple[list[dict], list[int]]:
    """Examples as Alpaca's template makes them: two preambles (rows with and without an input) alike in their
    first 9 tokens, 20 and 26 tokens long, interleaved; and the order the groups pack them in."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(6, 262, (9,), generator=g).tolist()
    preambles = [head + torch.randint(6, 262, (n - 9,), generator=g).tolist() for n in (20, 26)]
    out = []
    for k, n in enumerate((5, 30, 1, 12, 7, 3)):
        common = preambles[k % 2]
        ids = common + torch.randint(6, 262, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (len(common) + 1) + ids[len(common) + 1:]})
    return out, [i for members, _ in prefix_groups(out) for i in members]


def shared_count(batch: list[dict]) -> int:
    return sum((len(members) - 1) * shared for members, shared in prefix_groups(batch))


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
    assert prefix_groups(examples) == [([0, 1, 2, 3], PREFIX)]
    assert shared_count(examples) == 3 * PREFIX
    # one example trains from its 8th token: the 7th predicts it, so it could share only 6 (< the minimum):
    # it stays alone, the others share
    early = [*examples[:3], dict(examples[3], labels=[-100] * 7 + examples[3]["input_ids"][7:])]
    assert prefix_groups(early) == [([0, 1, 2], PREFIX), ([3], 0)]  # groups in the batch's order
    # prompts that go on past the common prefix sort by their own tokens, but one group keeps the batch's order
    longer = [dict(e, labels=([-100] * (PREFIX + 3) + e["input_ids"][PREFIX + 3:])[:len(e["input_ids"])])
              for e in examples]
    assert prefix_groups(longer) == [([0, 1, 2, 3], PREFIX)]
    later = [*examples[:3], dict(examples[3], labels=[-100] * 12 + examples[3]["input_ids"][12:])]
    assert shared_count(later) == 2 * PREFIX  # sharing 11 with it would save 33, without it 40
    trained_prompts = [dict(e, labels=[-100, *e["input_ids"][1:]]) for e in examples]  # data.train_on_prompt
    assert prefix_groups(trained_prompts) == [([0, 1, 2, 3], 0)]  # nothing shared: the batch as it came
    assert prefix_groups(examples[:1]) == [([0], 0)]
    with_media = [*examples[:3], dict(examples[3], media=[object()])]
    assert prefix_groups(with_media) == [([0, 1, 2, 3], 0)]  # soft tokens look alike
    assert PackCollator()(examples)["input_ids"].shape[1] == sum(len(e["input_ids"]) for e in examples)


def test_two_preambles_make_two_groups():
    """What the whole batch has in common is 9 tokens here (45 saved); each preamble's group shares more: 92."""
    examples, order = _two_preambles()
    assert prefix_groups(examples) == [([0, 2, 4], 20), ([1, 3, 5], 26)]
    assert shared_count(examples) == 2 * 20 + 2 * 26
    batch = PackCollator(share_prefix=True)(examples)
    bounds, contexts = packed_layout(batch["position_ids"])
    total = sum(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape[1] == total - 92 and shared_tokens(batch["position_ids"]) == 92
    for (start, end), context, i in zip(bounds, contexts, order, strict=True):
        skip = 0 if context is None else context[1] - context[0]
        assert batch["input_ids"][0, start:end].tolist() == examples[i]["input_ids"][skip:]
        assert batch["position_ids"][0, start:end].tolist() == list(range(skip, len(examples[i]["input_ids"])))
        if context is not None:  # its context is the first rows of its group's first example
            assert batch["input_ids"][0, context[0]:context[1]].tolist() == examples[i]["input_ids"][:skip]


@pytest.mark.parametrize("model_fixture", ["tiny_gemma3", "tiny_gemma3n", "tiny_gemma4"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded groups", "sdpa per example"])
def test_shared_rows_give_each_example_its_own_logits_and_gradients(model_fixture, padded, request, monkeypatch):
    if not padded:
        monkeypatch.setattr(attention, "PADDED_WEIGHTS", 0)
    model = _load(request.getfixturevalue(model_fixture))
    examples, order = _two_preambles()

    def loss_and_grads(batch):
        model.zero_grad()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        labels = batch["labels"][0]
        F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    shared, shared_grads = loss_and_grads(PackCollator(share_prefix=True)(examples))
    plain, plain_grads = loss_and_grads(PackCollator()(examples))
    assert shared.shape[0] == plain.shape[0] - 92
    bounds, _ = packed_layout(PackCollator(share_prefix=True)(examples)["position_ids"])
    plain_bounds, _ = packed_layout(PackCollator()(examples)["position_ids"])
    for (start, end), i in zip(bounds, order, strict=True):  # the groups packed example `i` k-th
        plain_end = plain_bounds[i][1]
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

    shared, measure = [], examples.prefix_groups
    monkeypatch.setattr(examples, "prefix_groups", lambda batch: shared.append(shared_count(batch)) or measure(batch))
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
    shared, measure = [], examples.prefix_groups
    monkeypatch.setattr(examples, "prefix_groups", lambda batch: shared.append(shared_count(batch)) or measure(batch))
    got = evaluation.response_loss(tuned, ALPACA_ROWS, "a", max_tokens=150)
    assert shared and min(shared) >= SHARED_PREFIX_MIN
    monkeypatch.setattr(evaluation, "reads_shared_prefixes", lambda model: False)
    want = evaluation.response_loss(tuned, ALPACA_ROWS, "a", max_tokens=150)
    assert got[1] == want[1] and got[0] == pytest.approx(want[0], rel=1e-5)

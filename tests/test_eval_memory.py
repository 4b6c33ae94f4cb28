"""Evaluation needs no more memory than training: the response loss is training's label-only chunked loss on
token-bounded batches, and generation computes one position of logits per step."""

import pytest
import torch
import torch.nn.functional as F

from gemmatune.config import ModelConfig
from gemmatune.data.templates import tokenize_row
from gemmatune.infer.evaluation import packs_natively, response_loss, token_batches
from gemmatune.infer.load import load
from gemmatune.infer.model import BASE, TunedModel
from gemmatune.models import loss
from gemmatune.models.loading import load_model
from gemmatune.models.loss import IGNORE, CausalLMParts, causal_lm_parts, chunked_cross_entropy_sum
from tests.conftest import ALPACA_ROWS, make_adapter, record_lm_head_calls
from tests.test_evaluation import CHAT_ROWS

# Lengths vary (61 to ~250 tokens, all longer than the tiny models' sliding window of 16; the longest is over
# the 150-token budget the tests use) and chat rows have two labelled assistant turns.
ROWS = [dict(r, input=r["input"] * (i % 4 + 1)) for i, r in enumerate(ALPACA_ROWS[:6])] + CHAT_ROWS
ROWS.append(dict(ALPACA_ROWS[7], input=ALPACA_ROWS[7]["input"] * 10))


def _full_logits_loss(model, tokenizer, rows, template) -> tuple[float, int]:
    """The plain computation, row by row without padding: the model's full logits, then cross-entropy on the
    response tokens (Gemma 3n's final softcap is applied by the model's own forward)."""
    total, count = 0.0, 0
    for row in rows:
        ex = tokenize_row(row, template, tokenizer)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0, :-1].float()
        targets = torch.tensor(ex.labels[1:])
        total += F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum").item()
        count += int((targets != IGNORE).sum())
    return total / count, count


@pytest.fixture(scope="module")
def adapters_by_model(tiny_gemma3, tiny_gemma3n, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-adapters")
    return {"tiny_gemma3": make_adapter(tiny_gemma3, root / "g3", seed=3),
            "tiny_gemma3n": make_adapter(tiny_gemma3n, root / "g3n", seed=4)}


def _tuned(model_dir, adapter, packing: bool) -> TunedModel:
    if packing:
        return load([f"a={adapter}"], template="chat", precision="fp32")  # as `gemmatune eval` loads
    # A model a user loaded themselves with plain sdpa: rows are right-padded instead of packed.
    from peft import PeftModel

    loaded = load_model(ModelConfig(name=str(model_dir)), "fp32", packing=False)
    model = PeftModel.from_pretrained(loaded.model, str(adapter), adapter_name="a")
    return TunedModel(model, loaded.tokenizer, loaded.family, "chat", {"a": "chat"}, "fp32")


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("model_fixture", ["tiny_gemma3", "tiny_gemma3n"])
def test_response_loss_equals_full_logits_loss(model_fixture, packing, adapters_by_model, request):
    tuned = _tuned(request.getfixturevalue(model_fixture), adapters_by_model[model_fixture], packing)
    assert packs_natively(tuned.model) == packing
    if model_fixture == "tiny_gemma3n":
        assert causal_lm_parts(tuned.model).softcap == 30.0  # the final softcap is in the comparison
    losses = {}
    for name in ("a", BASE):
        # 150 tokens per batch: several batches, and the longest row (over the budget) alone in one
        got, got_count = response_loss(tuned, ROWS, name, max_tokens=150)
        with tuned.adapter_context([name]):
            want, want_count = _full_logits_loss(tuned.model, tuned.tokenizer, ROWS, "chat")
        assert got_count == want_count
        assert got == pytest.approx(want, rel=1e-5), name
        losses[name] = got
    # The adapter really was applied: it moves the loss by more than the tolerance above.
    assert losses["a"] != pytest.approx(losses[BASE], rel=1e-4)


def test_response_loss_with_a_lora_wrapped_lm_head(tiny_gemma3, tmp_path):
    """A head that is not a plain Linear (LoRA on lm_head) still gets the chunked loss, through its own forward."""
    adapter = make_adapter(tiny_gemma3, tmp_path / "head", seed=5, targets=("q_proj", "lm_head"))
    tuned = load([str(adapter)], template="chat", precision="fp32")
    parts = causal_lm_parts(tuned.model, any_head=True)
    assert causal_lm_parts(tuned.model) is None and type(parts.head) is not torch.nn.Linear
    got, _ = response_loss(tuned, ROWS, "head")
    with tuned.adapter_context(["head"]):
        want, _ = _full_logits_loss(tuned.model, tuned.tokenizer, ROWS, "chat")
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_eval_batches_respect_the_token_budget_and_run_the_head_only_on_response_tokens(
        tiny_gemma3, adapters_by_model, packing, monkeypatch):
    tuned = _tuned(tiny_gemma3, adapters_by_model["tiny_gemma3"], packing)
    parts = causal_lm_parts(tuned.model, any_head=True)
    monkeypatch.setattr(loss, "chunk_rows", lambda vocab, dtype: 7)  # chunks of at most 7 rows
    body_tokens = []
    parts.body.register_forward_hook(lambda mod, args, kwargs, out: body_tokens.append(kwargs["input_ids"].shape),
                                     with_kwargs=True)
    head_rows = record_lm_head_calls(monkeypatch)
    budget = 150
    _, count = response_loss(tuned, ROWS, "a", max_tokens=budget)
    longest = max(len(tokenize_row(r, "chat", tuned.tokenizer).input_ids) for r in ROWS)
    assert len(body_tokens) > 2
    for shape in body_tokens:
        assert shape[0] * shape[1] <= budget or (shape[0] == 1 and shape[1] == longest > budget)
        assert not packing or shape[0] == 1  # packed: one row of concatenated examples
    # The LM head saw 2-D [rows, vocab] chunks of at most 7 rows, in all exactly one row per response token.
    assert all(len(s) == 2 and s[0] <= 7 for s in head_rows)
    assert sum(s[0] for s in head_rows) == count


def test_token_batches_bound_tokens_padded_and_packed():
    lengths = [5, 40, 12, 12, 3, 30, 90, 8]
    for padded in (True, False):
        batches = token_batches(lengths, 48, padded=padded)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            cost = len(b) * max(lengths[i] for i in b) if padded else sum(lengths[i] for i in b)
            assert cost <= 48 or b == [6]  # the 90-token row is a batch of its own
    assert token_batches(lengths, 10_000, padded=False, max_rows=3) == [[4, 0, 7], [2, 3, 5], [1, 6]]
    assert token_batches([], 48, padded=True) == []


def test_loss_without_grad_builds_no_gradient(monkeypatch):
    """Under no_grad the chunk gradient is never formed, even when the head's weight requires grad (a plain
    transformers model loaded for `gemmatune eval` without adapters is not frozen)."""
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 64, bias=False)
    assert head.weight.requires_grad
    hidden, targets = torch.randn(10, 16, generator=gen), torch.randint(0, 64, (10,), generator=gen)
    want = F.cross_entropy(head(hidden).float(), targets, reduction="sum").item()
    formed = []
    real = loss._cross_entropy_and_grad_
    monkeypatch.setattr(loss, "_cross_entropy_and_grad_",
                        lambda *a: formed.append(a[4]) or real(*a))  # a[4]: need_grad
    with torch.no_grad():
        got = chunked_cross_entropy_sum(hidden, targets, CausalLMParts(None, head, None), chunk=3)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert formed and not any(formed)  # need_grad was False for every block
    formed.clear()
    with_grad = chunked_cross_entropy_sum(hidden, targets, CausalLMParts(None, head, None), chunk=3)
    assert all(formed) and with_grad.requires_grad  # with gradients enabled, training's path is unchanged


def test_loss_without_grad_under_autocast_casts_the_fp32_head_once():
    """fp32 frozen weights under bf16 autocast (a model handed over with fp32 weights): the same bf16 logits as the
    head's own autocast forward, from one cast of the weight instead of one per chunk."""
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(32, 256, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(20, 32, generator=gen), torch.randint(0, 256, (20,), generator=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(head(hidden).float(), targets, reduction="sum").item()
        with torch.profiler.profile(record_shapes=True) as prof:
            got = chunked_cross_entropy_sum(hidden, targets, CausalLMParts(None, head, None), chunk=6).item()
    assert got == pytest.approx(want, rel=1e-6)
    weight_casts = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
                    and list(e.input_shapes[0]) == [256, 32]]
    assert len(weight_casts) == 1  # 4 chunks, one cast of the [256, 32] weight


@pytest.mark.parametrize("model_fixture", ["tiny_gemma3", "tiny_gemma3n"])
def test_generation_computes_logits_for_one_position_per_step(model_fixture, adapters_by_model, request):
    """transformers' generate passes logits_to_keep=1: the LM head never sees more than the last position,
    in the prefill of a left-padded batch as in each decode step."""
    tuned = load([str(adapters_by_model[model_fixture])], base=str(request.getfixturevalue(model_fixture)),
                 template="chat", precision="fp32")
    shapes = []
    head = causal_lm_parts(tuned.model).head
    head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    prompts = ["hi", "Route the ticket: my parcel is late, it has been two weeks now", "ok?"]
    names = [tuned.default_adapter, BASE, tuned.default_adapter]
    for adapter in (tuned.default_adapter, BASE, names):  # one adapter, the base, and a mixed batch
        shapes.clear()
        gens = tuned.generate(prompts, adapter=adapter, greedy=True, max_new_tokens=5, batch_size=3)
        steps = max(g.new_tokens for g in gens)
        assert len(shapes) >= min(steps, 2)  # the prefill and at least one decode step were seen
        assert all(s[:2] == (len(prompts), 1) for s in shapes), shapes

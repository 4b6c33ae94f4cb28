"""Packed batches: per-example results equal separate runs, on Gemma 3 and Gemma 3n, sdpa and eager."""

import pytest
import torch
import torch.nn.functional as F

from gemmatune.compat import attn_implementation
from gemmatune.config import ModelConfig
from gemmatune.data.examples import PackCollator
from gemmatune.hardware import packed_row_length
from gemmatune.models.loading import load_model
from gemmatune.models.packing import PACKED_SDPA, attention_for_packing, sequence_bounds

# Lengths straddle the tiny models' sliding window (16): the longest example needs the window band.
LENGTHS = (7, 23, 1, 12, 40)


def _examples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(6, 262, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_collator_packs_one_row_with_restarting_positions_and_no_cross_boundary_labels():
    batch = PackCollator()(_examples())
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask, no padding
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    starts = [b for b, _ in sequence_bounds(batch["position_ids"])]
    assert starts == [0, 7, 30, 31, 43]
    assert all(batch["labels"][0, s].item() == -100 for s in starts)
    assert batch["position_ids"][0, 30:31].tolist() == [0] and batch["position_ids"][0, 43:].tolist() == list(range(40))


def test_a_filled_row_is_a_multiple_of_its_length_and_the_filler_ends_the_last_example_outside_the_loss():
    examples = _examples()
    plain = PackCollator()(examples)
    to_96 = lambda n: -(-n // 32) * 32  # noqa: E731
    filled = PackCollator(row_length=to_96, pad_id=0)(examples)
    n = sum(LENGTHS)  # 83 -> 96
    assert filled["input_ids"].shape == (1, 96)
    for key in plain:
        assert filled[key][0, :n].tolist() == plain[key][0].tolist()
    assert filled["input_ids"][0, n:].tolist() == [0] * 13 and filled["labels"][0, n:].tolist() == [-100] * 13
    assert filled["position_ids"][0, n:].tolist() == list(range(40, 53))  # the last example (40 tokens) goes on
    assert sequence_bounds(filled["position_ids"]) == [*sequence_bounds(plain["position_ids"])[:-1], (43, 96)]
    assert PackCollator(row_length=to_96)(examples)["input_ids"].shape == (1, n)  # no pad token: not filled
    assert PackCollator(row_length=to_96, pad_id=0, max_position=52)(examples)["input_ids"].shape == (1, n)
    assert PackCollator(row_length=to_96, pad_id=0, max_position=53)(examples)["input_ids"].shape == (1, 96)
    with_media = [dict(ex, media=["image"]) if k == 1 else ex for k, ex in enumerate(examples)]
    assert PackCollator(row_length=to_96, pad_id=0)(with_media)["input_ids"].shape == (1, n)


def test_a_cpu_fills_rows_to_a_sixteenth_of_their_power_of_two():
    assert [packed_row_length(n, "cpu") for n in (1, 16, 17, 276, 511, 512, 513, 1100, 2049)] == \
        [16, 16, 32, 288, 512, 512, 544, 1152, 2176]
    assert all(packed_row_length(n, "cpu") - n < max(16, n / 16) for n in range(1, 5000))
    assert len({packed_row_length(n, "cpu") for n in range(600, 1300)}) == 19  # kernel sets to build, not 700
    assert packed_row_length(1100, "cuda") == 1100


@pytest.mark.parametrize("model_fixture", ["tiny_gemma3", "tiny_gemma3n", "tiny_gemma4"])
def test_filler_changes_no_logits_loss_or_gradients(model_fixture, request):
    model = _load(request.getfixturevalue(model_fixture), None)
    examples = _examples()

    def run(batch):
        model.zero_grad()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        loss = F.cross_entropy(logits[:-1], batch["labels"][0, 1:], ignore_index=-100, reduction="sum")
        loss.backward()
        return logits.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}

    logits, loss, grads = run(PackCollator()(examples))
    filled_logits, filled_loss, filled_grads = run(PackCollator(row_length=lambda n: 128, pad_id=0)(examples))
    assert filled_logits.shape[0] == 128
    assert torch.allclose(filled_logits[:sum(LENGTHS)], logits, atol=2e-5)
    assert filled_loss == pytest.approx(loss, rel=1e-6)
    assert filled_grads.keys() == grads.keys() and grads
    for name, grad in filled_grads.items():
        assert (grad - grads[name]).norm() <= 1e-5 * grads[name].norm(), name


def _load(model_dir, attn):
    return load_model(ModelConfig(name=str(model_dir), attn_implementation=attn), "fp32", packing=True).model.eval()


@pytest.mark.parametrize("model_fixture", ["tiny_gemma3", "tiny_gemma3n"])
@pytest.mark.parametrize("attn", [None, "eager"])
def test_packed_per_example_losses_equal_separate_runs(model_fixture, attn, request):
    model = _load(request.getfixturevalue(model_fixture), attn)
    assert attn_implementation(model.config) == (PACKED_SDPA if attn is None else "eager")
    examples = _examples()
    batch = PackCollator()(examples)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        for (start, end), ex in zip(sequence_bounds(batch["position_ids"]), examples, strict=True):
            alone = model(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits[0]
            assert torch.allclose(packed[start:end], alone, atol=2e-5), (start, end)
            labels = torch.tensor(ex["labels"][1:])
            if (labels != -100).any():
                loss_packed = F.cross_entropy(packed[start:end - 1], labels)
                loss_alone = F.cross_entropy(alone[:-1], labels)
                assert abs(loss_packed.item() - loss_alone.item()) < 1e-5


def test_packed_attention_keeps_padding_masks_for_ordinary_batches(tiny_gemma3):
    """A model loaded for packing still honours an attention mask (evaluation, generation)."""
    from transformers import AutoModelForCausalLM

    packed_model = _load(tiny_gemma3, None)
    plain = AutoModelForCausalLM.from_pretrained(tiny_gemma3, attn_implementation="sdpa", dtype=torch.float32).eval()
    ids = torch.tensor([[0, 0, 2, 40, 50, 60], [2, 41, 51, 61, 71, 81]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = packed_model(input_ids=ids, attention_mask=mask).logits
        b = plain(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-5)


def test_attention_choice_keeps_what_the_user_named():
    assert attention_for_packing("eager") == "eager"
    assert attention_for_packing(None) == (PACKED_SDPA if not torch.cuda.is_available() else
                                           attention_for_packing("sdpa"))


def test_generation_loads_never_pick_flash_attention(tiny_gemma3, monkeypatch):
    """`load` (generate, eval, serve, merge) takes per-example sdpa even where FlashAttention-2 would be chosen
    for training: FA2 fails on fp32 weights (merge, --precision fp32) and on pre-Ampere GPUs."""
    import gemmatune.models.packing as packing
    from gemmatune.infer.load import load

    monkeypatch.setattr(packing, "flash_attention_available", lambda: True)
    assert attention_for_packing(None) == "flash_attention_2"  # training's choice where flash-attn runs
    assert attention_for_packing(None, allow_flash=False) == PACKED_SDPA
    tuned = load(base=str(tiny_gemma3), template="chat", precision="fp32")
    assert attn_implementation(tuned.model.config) == PACKED_SDPA


def test_packed_attention_splits_the_row_itself():
    """Without any mask, the function alone keeps examples apart (GQA, sliding window on the long one)."""
    from types import SimpleNamespace

    from gemmatune.models.packing import packed_sdpa_attention

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    lengths = (5, 20, 9)
    q = torch.randn(1, 4, sum(lengths), 8)
    k, v = torch.randn(1, 2, sum(lengths), 8), torch.randn(1, 2, sum(lengths), 8)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    out, _ = packed_sdpa_attention(module, q, k, v, None, position_ids=pos, sliding_window=16, scaling=0.3)
    start = 0
    for n in lengths:
        i = torch.arange(n)
        band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 16)
        sl = slice(start, start + n)
        ref = F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl].repeat_interleave(2, 1),
                                             v[:, :, sl].repeat_interleave(2, 1), attn_mask=band, scale=0.3)
        assert torch.allclose(out[0, sl], ref[0].transpose(0, 1), atol=1e-6)
        start += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("longest", [512, 10])
def test_padded_attention_equals_sdpa_per_example(monkeypatch, dtype, longest):
    """Padded groups (all examples at once; with `longest` 10, the 20-token example by sdpa and the rest padded,
    put back in the row's order) against sdpa per example: outputs and q/k/v gradients, with GQA and a sliding
    window shorter than the padding of the short examples (a padded row that sees nothing would be NaN)."""
    from types import SimpleNamespace

    from gemmatune.kernels import attention
    from gemmatune.models.packing import packed_sdpa_attention

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=True)
    lengths = (3, 20, 9, 1)
    q, k, v = (torch.randn(1, h, sum(lengths), 32, dtype=dtype, requires_grad=True) for h in (4, 2, 2))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    grad = torch.randn(1, sum(lengths), 4, 32, dtype=dtype)
    results = []
    monkeypatch.setattr(attention, "PADDED_LONGEST", longest)
    monkeypatch.setattr(attention, "CALL_COST", 0 if longest == 10 else attention.CALL_COST)  # groups of one
    for weights in (0, attention.PADDED_WEIGHTS):
        monkeypatch.setattr(attention, "PADDED_WEIGHTS", weights)
        padded = [p for _, p in attention.attention_groups(list(lengths), 4)]
        assert any(padded) == bool(weights) and all(padded) == (bool(weights) and longest > 20)
        out, _ = packed_sdpa_attention(module, q, k, v, None, position_ids=pos, sliding_window=4, scaling=0.2,
                                       dropout=0.0)
        out.backward(grad)
        results.append([out.detach().float(), *(x.grad.float() for x in (q, k, v))])
        q.grad = k.grad = v.grad = None
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for stock, padded in zip(*results, strict=True):
        assert torch.isfinite(padded).all()
        assert (padded - stock).norm() <= tolerance * stock.norm()


def test_attention_groups_pad_only_where_it_pays():
    """Short examples share one padded group; one long example among short ones gets its own (padding it with them
    would do 4x the work); examples too long, or weights over the cap, go to sdpa."""
    from gemmatune.kernels.attention import PADDED_LONGEST, PADDED_WEIGHTS, attention_groups

    assert attention_groups([90, 60, 45, 70, 80, 40, 55, 65], 4) == [([0, 4, 3, 7, 1, 6, 2, 5], True)]
    assert attention_groups([256] * 4, 4) == [([0, 1, 2, 3], True)]
    assert attention_groups([30, 500, 40, 20], 4) == [([1], True), ([2, 0, 3], True)]
    assert attention_groups([100, PADDED_LONGEST + 1], 4) == [([1], False), ([0], True)]
    side = int((PADDED_WEIGHTS / 8 / 2) ** 0.5)
    assert attention_groups([side] * 2, 8) == [([0, 1], True)]
    assert attention_groups([side + 1] * 2, 8) == [([0, 1], False)]


def test_packed_gradients_equal_the_sum_over_separate_examples(tiny_gemma3):
    """The backward through the per-example attention (gradients of q, k, v gathered back into the row)."""
    model = _load(tiny_gemma3, None)
    examples = _examples(1)
    batch = PackCollator()(examples)

    def loss_sum(logits, labels):
        return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")

    model.zero_grad()
    packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
    loss_sum(packed, batch["labels"][0]).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for ex in examples:
        alone = model(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits[0]
        loss_sum(alone, torch.tensor([-100, *ex["labels"][1:]])).backward()
    assert packed_grads and packed_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in packed_grads.items():
        other = dict(model.named_parameters())[name].grad
        assert torch.allclose(grad, other, rtol=1e-4, atol=1e-5), name


def test_training_on_cpu_fills_its_rows_and_counts_only_the_examples_tokens(tiny_gemma3, alpaca_file, tmp_path,
                                                                          monkeypatch):
    import json

    from gemmatune.data import examples
    from gemmatune.train.recipe import train
    from tests.conftest import tiny_config

    rows, pack = [], examples.PackCollator.__call__

    def recording(self, batch):
        out = pack(self, batch)
        rows.append((out["input_ids"].shape[1], sum(len(b["input_ids"]) for b in batch)))
        return out

    monkeypatch.setattr(examples.PackCollator, "__call__", recording)
    cfg = tiny_config(tiny_gemma3, alpaca_file, tmp_path, max_steps=3, save_steps=3, share_prefix=False)
    run_dir = train(cfg).run_dir
    assert rows and all(length == packed_row_length(length, "cpu") >= tokens for length, tokens in rows)
    assert any(length > tokens for length, tokens in rows)
    state = json.loads(next(run_dir.glob("checkpoints/checkpoint-3/trainer_state.json")).read_text())
    assert state["num_input_tokens_seen"] == sum(tokens for _, tokens in rows[:3])  # the filler is not seen

"""The chunked, label-only loss: same value and LoRA gradients as the plain loss, and no full logits."""

import pytest
import torch

from gemmatune.config import LoraConfig, ModelConfig
from gemmatune.data.examples import PackCollator
from gemmatune.models.loading import load_model
from gemmatune.models.lora import attach_lora
from gemmatune.models.loss import causal_lm_loss, causal_lm_parts
from gemmatune.train.recipe import disable_cache
from tests.conftest import record_lm_head_calls
from tests.test_packing import _examples


def _peft_model(model_dir):
    loaded = load_model(ModelConfig(name=str(model_dir)), "fp32", packing=True)
    disable_cache(loaded.model, loaded.family)
    model, _ = attach_lora(loaded.model, LoraConfig(r=4, lora_dropout=0.0), loaded.family)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; random B makes every LoRA gradient non-trivial
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    return model


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_fixture", ["tiny_gemma3", "tiny_gemma3n"])
def test_chunked_loss_equals_plain_loss_and_gradients(model_fixture, request):
    model = _peft_model(request.getfixturevalue(model_fixture))
    if model_fixture == "tiny_gemma3n":
        assert causal_lm_parts(model).softcap == 30.0  # the softcap path is exercised
    batch = PackCollator()(_examples())
    plain = model(**batch).loss
    plain.backward()
    expected = _lora_grads(model)
    model.zero_grad()
    chunked = causal_lm_loss(model, batch, chunk=5)  # several chunks, the last one partial
    chunked.backward()
    got = _lora_grads(model)
    assert abs(chunked.item() - plain.item()) < 1e-5
    assert len(got) > 10
    for name, grad in expected.items():
        # fp32 summation order differs (chunks vs one matmul, and with the kernels earlier tests left selected):
        # compare relative to the tensor's norm; a wrong gradient is off by O(1), not 1e-5.
        assert (got[name] - grad).norm() <= 5e-5 * grad.norm() + 1e-7, name
    assert any(g.abs().max() > 0 for g in got.values())


def test_loss_divides_by_num_items_in_batch(tiny_gemma3):
    model = _peft_model(tiny_gemma3)
    batch = PackCollator()(_examples())
    n = int((batch["labels"][0, 1:] != -100).sum())
    with torch.no_grad():
        own = causal_lm_loss(model, batch)
        over_two = causal_lm_loss(model, batch, num_items_in_batch=torch.tensor(2 * n))
    assert torch.allclose(over_two, own / 2)


def test_trainer_runs_the_lm_head_only_on_label_positions_in_train_and_eval(tiny_gemma3, tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from gemmatune.data.examples import ExampleDataset
    from gemmatune.data.templates import Tokenized
    from gemmatune.train.trainer import GemmatuneTrainer

    model = _peft_model(tiny_gemma3)
    examples = [Tokenized(e["input_ids"], e["labels"]) for e in _examples()]
    batch = PackCollator()(_examples())
    tokens, label_tokens = batch["input_ids"].numel(), int((batch["labels"] != -100).sum())
    head_calls = record_lm_head_calls(monkeypatch)
    module_calls = []  # the head module's own forward: a full-logits pass would show up here
    hook = causal_lm_parts(model).head.register_forward_hook(lambda *a: module_calls.append(1))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=len(examples),
                             per_device_eval_batch_size=len(examples), max_steps=1, report_to="none",
                             use_cpu=True, remove_unused_columns=False, save_strategy="no")
    trainer = GemmatuneTrainer(model=model, args=args, train_dataset=ExampleDataset(examples),
                               eval_dataset=ExampleDataset(examples), data_collator=PackCollator(),
                               run_dir=tmp_path, packing=True)
    assert trainer.path.chunked_loss
    trainer.train()
    # one chunk: every label row, nothing else
    assert [c[0] for c in head_calls] == [label_tokens] and label_tokens < tokens
    head_calls.clear()
    metrics = trainer.evaluate()
    assert [c[0] for c in head_calls] == [label_tokens]
    assert module_calls == []
    hook.remove()
    with torch.no_grad():
        expected = model(**batch).loss.item()
    assert abs(metrics["eval_loss"] - expected) < 1e-5


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_bf16_chunked_loss_keeps_a_confident_tokens_gradient(softcap, monkeypatch):
    """Under bf16 autocast the softmax goes to bf16 for the matmul; the target column must not: p - 1 for a
    token predicted at p = 0.999 rounds to 0 in bf16, which would drop that row's gradient altogether."""
    from gemmatune.models import loss
    from gemmatune.models.loss import CausalLMParts, chunked_cross_entropy_sum

    gen = torch.Generator().manual_seed(0)
    vocab, dim, n = 512, 32, 12
    monkeypatch.setattr(loss, "LOGITS_PER_FP32_BLOCK", 3 * vocab)  # fp32 blocks of 3 rows in chunks of 5
    monkeypatch.setattr(loss, "GRADIENT_ROWS", 2)  # each chunk's gradient product in pieces of 2, 2 and 1 rows
    head = torch.nn.Linear(dim, vocab, bias=False, dtype=torch.bfloat16).requires_grad_(False)  # frozen, as in LoRA
    head.weight.copy_(torch.randn(vocab, dim, generator=gen))
    targets = torch.randint(0, vocab, (n,), generator=gen)
    hidden = torch.randn(n, dim, generator=gen) * 0.1
    hidden[: n // 2] += (0.9 if softcap is None else 2.0) * head.weight[targets[: n // 2]].float()
    hidden = hidden.bfloat16().requires_grad_()

    # Reference in fp64 on the same bf16-rounded logits the autocast LM head produces (the plain loss path
    # rounds them too); the gradient through the rounding is the straight-through one, as autograd gives it.
    w = head.weight.double()
    raw = (hidden.detach().double() @ w.T).bfloat16().double()
    factor = torch.ones_like(raw)
    logits = raw
    if softcap is not None:
        logits = softcap * torch.tanh(raw / softcap)
        factor = 1 - torch.tanh(raw / softcap) ** 2
    probs = torch.softmax(logits, -1)
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    expected_grad = ((probs - torch.nn.functional.one_hot(targets, vocab)) * factor) @ w
    p_target = probs[torch.arange(n), targets]
    # p - 1 is representable in fp32 down to ~1e-7; in bf16 a p above 0.998 is 1.0, so that gradient is lost.
    in_range = p_target < 0.9999
    assert ((p_target > 0.99) & in_range).sum() >= 3  # the case this test is about

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_cross_entropy_sum(hidden, targets, CausalLMParts(None, head, softcap), chunk=5)
    got.backward()
    assert abs(got.item() - expected.item()) <= 1e-2 * expected.item()
    err = (hidden.grad.double() - expected_grad).norm(dim=1) / expected_grad.norm(dim=1)
    assert err[in_range].max() < 0.05, err  # bf16 matmul rounding only, confident rows included


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_is_exact_for_targets_whose_probability_underflows(dtype, monkeypatch):
    """The loss is -log softmax[target]; where that probability underflows fp32 (a target logit ~150 below the
    row's best) the log is taken from a recomputed log_softmax, so the loss stays finite and exact."""
    from gemmatune.models import loss
    from gemmatune.models.loss import CausalLMParts, chunked_cross_entropy_sum

    gen = torch.Generator().manual_seed(1)
    vocab, dim, n = 256, 16, 10
    monkeypatch.setattr(loss, "LOGITS_PER_FP32_BLOCK", 3 * vocab)  # blocks of 3 rows in chunks of 4
    head = torch.nn.Linear(dim, vocab, bias=False, dtype=dtype).requires_grad_(False)
    head.weight.copy_(torch.randn(vocab, dim, generator=gen))
    targets = torch.randint(0, vocab, (n,), generator=gen)
    hidden = torch.randn(n, dim, generator=gen)
    hidden[::3] -= 12.0 * head.weight[targets[::3]].float()  # those targets' logits end up far below the rest
    hidden = hidden.to(dtype).requires_grad_()

    raw = (hidden.detach().double() @ head.weight.double().T).to(dtype).double()  # the logits the head gives
    probs = torch.softmax(raw, -1)
    assert (probs[torch.arange(n), targets] < 1e-40).sum() >= 3  # the case this test is about
    expected = torch.nn.functional.cross_entropy(raw, targets, reduction="sum")
    expected_grad = (probs - torch.nn.functional.one_hot(targets, vocab)) @ head.weight.double()

    got = chunked_cross_entropy_sum(hidden, targets, CausalLMParts(None, head, None), chunk=4)
    got.backward()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.isfinite(got) and abs(got.item() - expected.item()) <= tolerance * expected.item()
    err = (hidden.grad.double() - expected_grad).norm(dim=1) / expected_grad.norm(dim=1)
    assert err.max() < tolerance, err


def test_chunked_loss_writes_every_chunk_into_one_logits_buffer(monkeypatch):
    """A plain Linear head: each chunk's logits go into the same buffer (no fresh [chunk, vocab] per chunk),
    and loss and gradients equal the full-logits ones."""
    import gemmatune.models.loss as loss_module
    from gemmatune.models.loss import CausalLMParts, chunked_cross_entropy_sum

    outs = []
    original = loss_module._head_matmul

    def recording(head, hidden):
        logits_of, dtype = original(head, hidden)
        return (lambda h, out=None: outs.append(out) or logits_of(h, out)), dtype

    monkeypatch.setattr(loss_module, "_head_matmul", recording)
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(32, 256, bias=False)
    hidden = torch.randn(20, 32, generator=gen, requires_grad=True)
    targets = torch.randint(0, 256, (20,), generator=gen)
    got = chunked_cross_entropy_sum(hidden, targets, CausalLMParts(None, head, None), chunk=6)
    got.backward()
    got_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    want = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    want.backward()
    assert len(outs) == 4 and all(o is not None for o in outs)
    assert len({o.untyped_storage().data_ptr() for o in outs}) == 1
    assert torch.allclose(got, want, rtol=1e-5)
    assert torch.allclose(got_grads[0], hidden.grad, atol=1e-5)
    assert torch.allclose(got_grads[1], head.weight.grad, atol=1e-5)


def test_a_chunk_holds_the_same_bytes_of_logits_whatever_their_dtype():
    """Gemma's vocabulary: 512 rows of bf16 logits or 256 of fp32 (256 MiB), and never fewer than one row."""
    from gemmatune.models.loss import LOGITS_BYTES_PER_CHUNK, chunk_rows

    assert chunk_rows(262144, torch.bfloat16) == 512
    assert chunk_rows(262144, torch.float32) == chunk_rows(262144, None) == 256
    assert chunk_rows(LOGITS_BYTES_PER_CHUNK, torch.float32) == 1

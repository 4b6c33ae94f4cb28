"""The chunked, label-only loss: same value and LoRA gradients as the plain loss, and no full logits."""

import pytest
import torch

from gemmatune.config import LoraSection, ModelConfig
from gemmatune.loading import load_model
from gemmatune.lora import attach_lora
from gemmatune.loss import causal_lm_loss, causal_lm_parts
from gemmatune.packing import PackCollator
from gemmatune.train import disable_cache
from tests.test_packing import _examples


def _peft_model(model_dir):
    loaded = load_model(ModelConfig(name=str(model_dir)), "fp32", packing=True)
    disable_cache(loaded.model, loaded.family)
    model, _ = attach_lora(loaded.model, LoraSection(r=4, lora_dropout=0.0), loaded.family)
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
        # fp32 summation order differs (chunks vs one matmul): compare relative to the tensor's norm.
        assert (got[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-7, name
    assert any(g.abs().max() > 0 for g in got.values())


def test_loss_divides_by_num_items_in_batch(tiny_gemma3):
    model = _peft_model(tiny_gemma3)
    batch = PackCollator()(_examples())
    n = int((batch["labels"][0, 1:] != -100).sum())
    with torch.no_grad():
        own = causal_lm_loss(model, batch)
        over_two = causal_lm_loss(model, batch, num_items_in_batch=torch.tensor(2 * n))
    assert torch.allclose(over_two, own / 2)


def test_trainer_runs_the_lm_head_only_on_label_positions_in_train_and_eval(tiny_gemma3, tmp_path):
    from transformers import TrainingArguments

    from gemmatune.data import ExampleDataset
    from gemmatune.templates import Tokenized
    from gemmatune.trainer import ChunkedLossTrainer

    model = _peft_model(tiny_gemma3)
    examples = [Tokenized(e["input_ids"], e["labels"]) for e in _examples()]
    batch = PackCollator()(_examples())
    tokens, label_tokens = batch["input_ids"].numel(), int((batch["labels"] != -100).sum())
    rows_seen = []
    head = causal_lm_parts(model).head
    head.register_forward_hook(lambda mod, args, out: rows_seen.append(args[0].shape[0]))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=len(examples),
                             per_device_eval_batch_size=len(examples), max_steps=1, report_to="none",
                             use_cpu=True, remove_unused_columns=False, save_strategy="no")
    trainer = ChunkedLossTrainer(model=model, args=args, train_dataset=ExampleDataset(examples),
                                 eval_dataset=ExampleDataset(examples), data_collator=PackCollator())
    trainer.train()
    assert rows_seen == [label_tokens] and label_tokens < tokens  # one chunk: every label row, nothing else
    rows_seen.clear()
    metrics = trainer.evaluate()
    assert rows_seen == [label_tokens]
    with torch.no_grad():
        expected = model(**batch).loss.item()
    assert abs(metrics["eval_loss"] - expected) < 1e-5

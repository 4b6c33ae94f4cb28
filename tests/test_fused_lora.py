"""The fused LoRA branch (kernels/lora.py) against PEFT's own LoRA layer: outputs and gradients in fp32 and under bf16
autocast, with and without a base bias, 4-bit bases, the dropout masks LoraDropout draws (so its distribution tests
hold here; the expected gradient is in tests/test_lora_dropout.py), merging, and that PEFT really hands the layer
to it."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from gemmatune.compat import lora_variants
from gemmatune.config import load_config
from gemmatune.kernels.lora import fusable, use_fused_lora
from gemmatune.models.loading import load_model
from gemmatune.models.lora import attach_lora
from gemmatune.train.lora_dropout import use_fast_lora_dropout


class _Block(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.q, self.o = torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(96, 64, bias=bias)

    def forward(self, x):
        return self.o(torch.nn.functional.gelu(self.q(x)))


def _pair(p: float, bias: bool = True):
    torch.manual_seed(0)
    peft = get_peft_model(_Block(bias), LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules=["q", "o"],
                                                   init_lora_weights=False))
    fused = copy.deepcopy(peft)
    assert use_fused_lora(fused) == 2
    return peft, fused


def _run(model, x, autocast: bool, seed: int = 0):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, x.grad, grads


def _close(got, want, tolerance):
    return (got.float() - want.float()).norm() <= tolerance * want.float().norm()


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_branch_equals_peft_layer(monkeypatch, autocast, bias):
    from gemmatune.kernels.lora import LoraBranch

    peft, fused = _pair(0.0, bias)
    x = torch.randn(2, 10, 64)
    want = _run(peft, x, autocast)
    calls = []
    forward = LoraBranch.forward
    monkeypatch.setattr(LoraBranch, "forward", staticmethod(lambda *args: calls.append(1) or forward(*args)))
    got = _run(fused, x, autocast)
    assert len(calls) == 2  # PEFT handed both layers to the variant (a PEFT that stopped would fail here)
    tolerance = 1e-6 if not autocast else 1e-2
    assert _close(got[0], want[0], tolerance) and _close(got[1], want[1], tolerance)
    assert want[2].keys() == got[2].keys() and len(got[2]) == 4
    assert all(_close(got[2][n], want[2][n], tolerance) and got[2][n].dtype == torch.float32 for n in want[2])


def test_fused_dropout_draws_lora_dropouts_masks_and_eval_mode_has_none():
    peft, fused = _pair(0.3)
    assert use_fast_lora_dropout(peft) == 2 and use_fast_lora_dropout(fused) == 2
    x = torch.randn(2, 10, 64)
    want, got = _run(peft.train(), x, False, seed=5), _run(fused.train(), x, False, seed=5)
    assert _close(got[0], want[0], 1e-6) and all(_close(got[2][n], want[2][n], 1e-6) for n in want[2])
    different = _run(fused, x, False, seed=6)
    assert not _close(different[0], got[0], 1e-3)  # the dropout is on: another seed, other masks
    with torch.no_grad():
        assert torch.allclose(fused.eval()(x), peft.eval()(x), atol=1e-6)
        assert torch.equal(fused(x), fused(x))


def test_merge_with_the_fused_variant_is_w_plus_scaled_ba():
    peft, fused = _pair(0.1)
    merged = fused.merge_and_unload()
    for name in ("q", "o"):
        layer = getattr(peft.base_model.model, name)
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        assert torch.allclose(getattr(merged, name).weight, layer.base_layer.weight + delta, atol=1e-6)


def test_dora_adapters_are_left_to_peft():
    torch.manual_seed(0)
    model = get_peft_model(_Block(False), LoraConfig(r=4, target_modules=["q", "o"], use_dora=True))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert not any(fusable(m, "default") for m in layers) and use_fused_lora(model) == 0
    assert all(type(lora_variants(m)["default"]).__name__ != "FusedLora" for m in layers)


def test_fused_branch_on_a_4bit_base(tiny_gemma3n_4bit):
    cfg = load_config(None, [f"model.name={tiny_gemma3n_4bit}", "model.quantization=4bit", "lora.lora_dropout=0"])
    loaded = load_model(cfg.model, "bf16")
    model, _ = attach_lora(loaded.model, cfg.lora, loaded.family, quantized=True, autocast=True)
    ids = torch.randint(6, 200, (2, 12))

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    want_loss, want = loss_and_grads()
    assert use_fused_lora(model) > 0
    got_loss, got = loss_and_grads()
    assert got_loss == pytest.approx(want_loss, rel=1e-2) and got.keys() == want.keys()
    assert all(_close(got[n], want[n], 5e-2) for n in want)

"""The lean RMSNorm: the same outputs and gradients as the transformers module, without its fp32 input copy."""

import pytest
import torch

from gemmatune.config import LoraConfig, ModelConfig
from gemmatune.data.examples import PackCollator
from gemmatune.models.loading import load_model
from gemmatune.models.lora import attach_lora
from gemmatune.train.norms import LeanRMSNorm, use_lean_rms_norm
from gemmatune.train.recipe import disable_cache
from tests.test_packing import _examples


def _model(model_dir, lean: bool):
    loaded = load_model(ModelConfig(name=str(model_dir)), "fp32", packing=True)
    disable_cache(loaded.model, loaded.family)
    gen = torch.Generator().manual_seed(3)
    for name, p in loaded.model.named_parameters():
        if "norm" in name:  # the tiny models start with trivial norm scales; make the scale matter
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.3 + 1.0)
    replaced = use_lean_rms_norm(loaded.model, loaded.family.rms_norm, loaded.family.rms_norm_offset) if lean else 0
    torch.manual_seed(0)  # the same LoRA A matrices in both models
    model, _ = attach_lora(loaded.model, LoraConfig(r=4, lora_dropout=0.0), loaded.family)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    return model, replaced


@pytest.mark.parametrize("model_fixture", ["tiny_gemma3", "tiny_gemma3n"])
def test_lean_norm_model_matches_the_transformers_norms(model_fixture, request):
    model_dir = request.getfixturevalue(model_fixture)
    batch = PackCollator()(_examples())
    results = []
    for lean in (False, True):
        model, replaced = _model(model_dir, lean)
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads, set(model.state_dict()), replaced))
    (plain_loss, plain_grads, plain_keys, _), (lean_loss, lean_grads, lean_keys, replaced) = results
    assert replaced >= 4 * 6 if model_fixture == "tiny_gemma3" else replaced > 0
    assert lean_keys == plain_keys  # same parameter names: checkpoints and merges are unaffected
    assert abs(lean_loss - plain_loss) < 1e-5
    for name, grad in plain_grads.items():
        assert (lean_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-7, name


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_lean_norm_in_bf16_equals_the_reference_and_saves_no_fp32_copy(offset):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm

    reference = Gemma3RMSNorm(256) if offset else Gemma3nRMSNorm(256)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(256))
    reference.weight.requires_grad_(False)
    lean = LeanRMSNorm(reference, offset)
    x = torch.randn(2, 300, 256).bfloat16()
    grad = torch.randn(2, 300, 256).bfloat16()
    outputs = []
    for module in (reference, lean):
        xi = x.clone().requires_grad_()
        saved: list[torch.Tensor] = []

        def keep(t, saved=saved):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            y = module(xi)
        y.backward(grad)
        outputs.append((y, xi.grad, saved))
    (y_ref, g_ref, saved_ref), (y_lean, g_lean, saved_lean) = outputs
    assert torch.equal(y_lean, y_ref)
    assert (g_lean.float() - g_ref.float()).norm() <= 1e-2 * g_ref.float().norm()
    def full_fp32(saved):
        return [t for t in saved if t.dtype == torch.float32 and t.shape == x.shape]

    assert not full_fp32(saved_lean)  # only the input (bf16), the weight and one fp32 value per row are kept
    assert full_fp32(saved_ref)  # what the transformers module keeps

"""LoRA dropout (lora_dropout.py) against PEFT's nn.Dropout: the same distribution (drop rate, scale, no bias
across the four 16-bit lanes of a draw, independent elements, calls and layers), the same expected gradient, also
through the fused branch of kernels/lora.py (where a mask shared between q and k would not give it), masks recomputed
identically under gradient checkpointing, and `lora_dropout: 0` left exactly as PEFT makes it."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from gemmatune.kernels.lora import drop_rate, dropped, use_fused_lora
from gemmatune.runs.folder import read_metrics
from gemmatune.train import train
from gemmatune.train.lora_dropout import LoraDropout, use_fast_lora_dropout
from tests.conftest import tiny_config

N = 1_000_000


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_each_element_is_dropped_with_probability_p_and_the_rest_scaled_to_keep_the_mean(p):
    torch.manual_seed(0)
    out = dropped(torch.ones(N // 500, 500), p)
    rate = drop_rate(p)
    assert abs(rate - p) <= 1 / 131072
    zero = out == 0
    assert torch.all(zero | (out == 1 / (1 - rate)))  # kept elements scaled by exactly 1 / keep rate
    sigma = math.sqrt(p * (1 - p) / N)
    assert abs(zero.float().mean().item() - p) < 5 * sigma
    assert abs(out.mean().item() - 1) < 5 * sigma / (1 - p)
    # each of the four 16-bit lanes of a 64-bit draw drops at the same rate (a lane with a fixed sign bit would not)
    lanes = zero.flatten().view(-1, 4).float().mean(0)
    assert torch.all((lanes - p).abs() < 5 * 2 * sigma), lanes
    # neighbours and successive calls are independent: both dropped at rate p^2
    both = (zero.flatten()[1:] & zero.flatten()[:-1]).float().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / N)
    again = dropped(torch.ones(N // 500, 500), p) == 0
    assert abs((zero & again).float().mean().item() - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / N)


def _two_readers(p: float):
    """q and k read one tensor (as attention's projections do), o reads another."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.o = (torch.nn.Linear(16, 16) for _ in range(3))

        def forward(self, x):
            h = torch.tanh(self.q(x)) * torch.sigmoid(self.k(x))
            return self.o(h)

    torch.manual_seed(0)
    model = get_peft_model(Block(), LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["q", "k", "o"],
                                               init_lora_weights=False))
    return model.train()


def _mean_lora_grads(model, x, draws: int):
    grads = []
    for _ in range(draws):
        model.zero_grad()
        model(x).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    stacked = torch.stack(grads)
    return stacked.mean(0), stacked.std(0) / math.sqrt(draws)


class _SharedMask(torch.nn.Module):
    """What lora_dropout.py does not do: one mask for every layer that reads the same tensor."""

    def __init__(self, p, memo):
        super().__init__()
        self.p, self.memo = p, memo

    def forward(self, x):
        if self.memo.get("x") is not x:
            self.memo.update(x=x, out=torch.nn.functional.dropout(x, self.p, True))
        return self.memo["out"]


def _largest_z(got, got_se, want, want_se):
    return ((got - want).abs() / torch.sqrt(want_se**2 + got_se**2).clamp_min(1e-12)).max().item()


def test_torchs_seed_fixes_the_masks():
    x = torch.ones(64, 640)
    torch.manual_seed(7)
    first, second = dropped(x, 0.1), dropped(x, 0.1)
    torch.manual_seed(7)
    assert torch.equal(dropped(x, 0.1), first)  # what a resumed run or a checkpointed recomputation relies on
    assert not torch.equal(first, second)


@pytest.mark.parametrize("install", [use_fast_lora_dropout, use_fused_lora], ids=["LoraDropout", "fused branch"])
def test_the_expected_gradient_equals_peft_dropouts(install):
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    want, want_se = _mean_lora_grads(_two_readers(0.3), x, 3000)
    ours = _two_readers(0.3)
    assert install(ours) == 3
    got, got_se = _mean_lora_grads(ours, x, 3000)
    assert _largest_z(got, got_se, want, want_se) < 5  # 5 standard errors on every coordinate
    # The test can tell: one mask shared by q and k (which meet in a product) moves the expected gradient.
    shared, memo = _two_readers(0.3), {}
    for module in shared.modules():
        if isinstance(module, LoraLayer):
            module.lora_dropout["default"] = _SharedMask(0.3, memo)
    other, other_se = _mean_lora_grads(shared, x, 3000)
    assert _largest_z(other, other_se, want, want_se) > 8


def test_each_layer_draws_its_own_mask_and_eval_mode_has_none():
    model = _two_readers(0.5)
    use_fast_lora_dropout(model)
    fed = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            module.lora_A["default"].register_forward_pre_hook(
                lambda _, args, name=name: fed.__setitem__(name.rsplit(".", 1)[-1], args[0]))
    x = torch.randn(64, 16)
    model(x)
    zero_q, zero_k = fed["q"] == 0, fed["k"] == 0
    assert 0.3 < zero_q.float().mean() < 0.7 and not torch.equal(zero_q, zero_k)  # q and k read x: own masks
    model.eval()
    fed.clear()
    model(x)
    assert torch.equal(fed["q"], x) and torch.equal(fed["k"], x)


def test_no_dropout_leaves_peft_layers_exactly_as_they_are():
    model = _two_readers(0.0)
    assert use_fast_lora_dropout(model) == 0
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in layers)
    assert not any(isinstance(m, LoraDropout) for m in model.modules())


def test_gradient_checkpointing_recomputes_the_same_masks(tiny_gemma3, alpaca_file, tmp_path):
    def losses(name, **kwargs):
        cfg = tiny_config(tiny_gemma3, alpaca_file, tmp_path / name, max_steps=4, **kwargs)
        cfg.lora.lora_dropout = 0.3
        return [m["loss"] for m in read_metrics(train(cfg).run_dir) if "loss" in m]

    plain = losses("plain")
    assert losses("ckpt", gradient_checkpointing=True) == pytest.approx(plain, rel=1e-5)
    # the dropout is on: without it the losses differ
    cfg = tiny_config(tiny_gemma3, alpaca_file, tmp_path / "none", max_steps=4)
    none = [m["loss"] for m in read_metrics(train(cfg).run_dir) if "loss" in m]
    assert none != pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_a_mask_applied_to_the_bits_is_torch_where_bit_for_bit(dtype):
    from gemmatune.kernels.lora import keep_, keep_mask, kept

    values = [1.5, -2.0, -0.0, 0.0, float("inf"), float("-inf"), float("nan"), 1e-30, -7.25, 65504.0]
    x = torch.tensor(values, dtype=dtype).repeat(40).view(20, 20)
    keep = keep_mask(x, 0.5)
    assert keep.dtype == torch.bool and 0 < keep.sum() < keep.numel()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    want = torch.where(keep, x, 0).view(ints)  # a dropped element is +0 whatever its sign, a NaN kept as it is
    assert torch.equal(kept(x, keep).view(ints), want)
    assert torch.equal(keep_(x.clone(), keep).view(ints), want)
    assert torch.equal(kept(x.t(), keep.t()).view(ints), want.t())  # any strides

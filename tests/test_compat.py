"""One test per assumption compat.py makes about a library's internals.

Each failure message names the library and its installed version. When one fails after an upgrade, read the new
library code named in the test and change compat.py (not the test's expectation alone); then refresh the lock
(README: "Versions").
"""

from __future__ import annotations

import inspect

import pytest
import torch

from gemmatune import compat
from tests.conftest import gemma3_config, gemma3n_config


def _where(package: str) -> str:
    return f"{package} {compat.version_of(package)}"


# --- transformers ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, class_name, offset", [("gemma3", "Gemma3RMSNorm", 1.0),
                                                        ("gemma3n", "Gemma3nRMSNorm", 0.0)])
def test_rms_norm_epsilon_is_read_and_the_lean_norm_computes_the_same(module, class_name, offset):
    """transformers 5.25 renamed Gemma3nRMSNorm.eps to variance_epsilon; compat reads either."""
    import importlib

    from gemmatune.train.norms import LeanRMSNorm, same_output

    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    norm = getattr(modeling, class_name)(64, eps=3e-6)
    with torch.no_grad():
        norm.weight.normal_()
    assert compat.rms_norm_eps(norm) == 3e-6, f"{_where('transformers')}: {class_name}'s epsilon moved"
    lean = LeanRMSNorm(norm, offset)
    assert same_output(norm, lean), f"{_where('transformers')}: {class_name} computes differently now"


def test_a_norm_with_other_math_is_left_to_the_library(caplog):
    """The swap checks itself: a norm whose output the lean one does not reproduce stays as it is."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from gemmatune.train.norms import use_lean_rms_norm

    class ShiftedNorm(Gemma3RMSNorm):  # a release that changed the math
        def forward(self, x):
            return super().forward(x) + 1.0

    model = torch.nn.Sequential(ShiftedNorm(64), ShiftedNorm(64))
    assert use_lean_rms_norm(model, "ShiftedNorm", 1.0) == 0
    assert all(type(m) is ShiftedNorm for m in model)
    assert "keeping the library's norms" in caplog.text
    plain = torch.nn.Sequential(Gemma3RMSNorm(64), Gemma3RMSNorm(64))
    assert use_lean_rms_norm(plain, "Gemma3RMSNorm", 1.0) == 2


def test_a_norm_without_a_known_epsilon_is_named():
    class Norm(torch.nn.Module):
        epsilon = 1e-6

    with pytest.raises(compat.LibraryChanged, match=r"transformers \S+: Norm has none of"):
        compat.rms_norm_eps(Norm())


def test_attn_implementation_is_what_the_model_was_loaded_with(tiny_gemma3):
    from transformers import AutoModelForCausalLM

    from gemmatune.models.packing import PACKED_SDPA, register_packed_attention

    register_packed_attention()
    for name in ("eager", PACKED_SDPA):
        model = AutoModelForCausalLM.from_pretrained(tiny_gemma3, attn_implementation=name)
        assert compat.attn_implementation(model.config) == name, f"{_where('transformers')}: config field moved"


def test_keys_to_not_convert_names_the_tied_lm_head():
    from transformers import Gemma3ForCausalLM

    with torch.device("meta"):
        model = Gemma3ForCausalLM(gemma3_config())
    assert "lm_head" in compat.keys_to_not_convert(model), f"{_where('transformers')}: get_keys_to_not_convert"


def test_the_private_trainer_methods_the_atomic_save_overrides_are_unchanged():
    """TrainerHooks points `_get_output_dir` at a staging folder while the stock `_save_checkpoint` runs; if this
    fails, read the new `_save_checkpoint` and check that every file it writes still lands under the folder
    `_get_output_dir` returns."""
    from transformers import Trainer

    where = _where("transformers")
    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"], where
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"], where
    save = inspect.getsource(Trainer._save_checkpoint)
    assert save.count("self._get_output_dir(") == 1 and "run_dir = self._get_output_dir(trial=trial)" in save, where
    assert "output_dir = os.path.join(run_dir, checkpoint_folder)" in save, where


def test_the_trainer_internals_the_chunked_loss_relies_on_are_unchanged():
    """TrainerHooks sets `model_accepts_loss_kwargs` so the Trainer counts label tokens over the accumulated batch,
    and `loss_is_scaled_for_ga` so it does not divide by the accumulation steps again; a change would scale the
    loss wrongly: read the new `_get_num_items_in_batch` and `training_step`."""
    from transformers import Trainer

    where = _where("transformers")
    assert "self.model_accepts_loss_kwargs" in inspect.getsource(Trainer._get_num_items_in_batch), where
    step = inspect.getsource(Trainer.training_step)
    if "loss_is_scaled_for_ga" in vars(Trainer):
        assert "if self.loss_is_scaled_for_ga is not None:" in step, where
    else:  # before the flag (5.6 has none): no division when the model takes loss kwargs and the count is known
        assert "not self.model_accepts_loss_kwargs or num_items_in_batch is None" in step, where
    assert list(inspect.signature(Trainer.compute_loss).parameters) == [
        "self", "model", "inputs", "return_outputs", "num_items_in_batch"], where
    hooks = compat.TrainerHooks
    assert hooks.loss_is_scaled_for_ga is True and issubclass(hooks, Trainer)


# --- PEFT -----------------------------------------------------------------------------------------------------

def test_peft_lora_layers_have_the_input_cast_switch():
    """PEFT's own helper sets the flag compat sets for good; LoRA layers start with it on."""
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting
    from peft.tuners.lora import LoraLayer
    from transformers import Gemma3ForCausalLM

    where = _where("peft")
    assert "cast_input_dtype_enabled" in inspect.getsource(disable_input_dtype_casting), where
    model = get_peft_model(Gemma3ForCausalLM(gemma3_config()), LoraConfig(r=2, target_modules=["q_proj"]))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.cast_input_dtype_enabled is True for m in layers), where
    for layer in layers:
        compat.skip_lora_input_cast(layer)
    assert all(m.cast_input_dtype_enabled is False for m in layers)
    with pytest.raises(compat.LibraryChanged, match=r"peft \S+: Linear has no cast_input_dtype_enabled"):
        compat.skip_lora_input_cast(torch.nn.Linear(2, 2))


def test_peft_applies_the_lora_dropout_module_to_the_layers_own_input_before_lora_a():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    class TwoReaders(torch.nn.Module):  # q and k read one tensor, as in attention
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.q(x) + self.k(x)

    model = get_peft_model(TwoReaders(), LoraConfig(r=2, lora_dropout=0.5, target_modules=["q", "k"]))
    seen, fed = [], []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return x * 2

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        dropouts = compat.lora_dropout_modules(layer)
        assert isinstance(dropouts["default"], torch.nn.Dropout), _where("peft")
        dropouts["default"] = Recorder()
        layer.lora_A["default"].register_forward_pre_hook(lambda _, args: fed.append(args[0]))
    x = torch.randn(3, 8)
    model.train()(x)
    assert len(seen) == 2 and all(t is x for t in seen), \
        f"{_where('peft')}: the LoRA dropout no longer gets the layer's own input; see lora_dropout.py"
    assert len(fed) == 2 and all(torch.equal(f, x * 2) for f in fed), \
        f"{_where('peft')}: lora_A no longer takes the dropout's output"
    with pytest.raises(compat.LibraryChanged, match=r"peft \S+: Linear has no lora_dropout ModuleDict"):
        compat.lora_dropout_modules(torch.nn.Linear(2, 2))


def test_peft_hands_an_adapter_with_a_variant_to_the_variants_forward_and_merge():
    """The hook kernels/lora.py uses: forward gets (layer, adapter, x = the layer's input, result = the base output)
    and returns the layer's output; merging asks the variant for the merged weight."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    layer = model.base_model.model[0]
    calls = []

    class Recorder(compat.lora_variant_base()):
        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            calls.append((module, active_adapter, x, result.clone()))
            return result + 1

        @staticmethod
        def merge_safe(module, active_adapter, orig_weight):
            calls.append("merge")
            return orig_weight * 0

    compat.lora_variants(layer)["default"] = Recorder()
    x = torch.randn(3, 8)
    out = model(x)
    assert len(calls) == 1, f"{_where('peft')}: the LoRA layer no longer calls its variant's forward"
    module, adapter, seen, result = calls[0]
    assert module is layer and adapter == "default" and seen is x, _where("peft")
    assert torch.equal(result, layer.base_layer(x)) and torch.equal(out, result + 1), _where("peft")
    layer.merge(safe_merge=True)
    assert calls[-1] == "merge" and torch.equal(layer.base_layer.weight, torch.zeros(8, 8)), \
        f"{_where('peft')}: merging no longer asks the variant"
    with pytest.raises(compat.LibraryChanged, match=r"peft \S+: Linear has no lora_variant dict"):
        compat.lora_variants(torch.nn.Linear(2, 2))


# --- bitsandbytes ---------------------------------------------------------------------------------------------

def test_bitsandbytes_4bit_layers_have_the_cpu_repack_switch():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.bfloat16, quant_type="nf4")
    assert hasattr(layer, "support_avx512bf16_for_cpu"), \
        f"{_where('bitsandbytes')}: Linear4bit's CPU-repack switch moved; see compat.keep_training_layout"
    compat.keep_training_layout(layer)
    assert layer.support_avx512bf16_for_cpu is False
    forward = inspect.getsource(type(layer).forward)
    assert "support_avx512bf16_for_cpu" in forward, f"{_where('bitsandbytes')}: forward no longer reads the switch"


# --- torch ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_the_fused_cpu_attention_op_equals_sdpa(causal):
    q, k, v = (torch.randn(1, 2, 9, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3)
    got = compat.fused_cpu_attention(q, k, v, causal, 0.3)
    assert torch.allclose(got, want, atol=1e-5), f"{_where('torch')}: aten flash attention for CPU"


def test_storage_key_is_one_per_storage_also_on_meta():
    for device in ("cpu", "meta"):
        a, b = torch.empty(4, 4, device=device), torch.empty(4, 4, device=device)
        same = {compat.storage_key(a), compat.storage_key(a[1:]), compat.storage_key(a.t())}
        assert len(same) == 1, (device, _where("torch"))
        assert compat.storage_key(a) != compat.storage_key(b), (device, _where("torch"))


def test_gemma3n_text_norms_are_swapped_in_a_real_model():
    """The whole family, end to end: every Gemma3nRMSNorm of a model becomes lean, and the model's output stays."""
    from transformers import Gemma3nForCausalLM

    from gemmatune.train.norms import use_lean_rms_norm

    torch.manual_seed(0)
    model = Gemma3nForCausalLM(gemma3n_config()).eval()
    ids = torch.randint(6, 200, (1, 20))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        count = sum(type(m).__name__ == "Gemma3nRMSNorm" for m in model.modules())
        assert use_lean_rms_norm(model, "Gemma3nRMSNorm", 0.0) == count > 0
        assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5), _where("transformers")


def test_meta_nonzero_can_assume_every_element_true():
    mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    x = torch.empty(2, 5, 3, device="meta")
    with compat.meta_nonzero_assumes_all_true():
        assert x[mask].shape == (10, 3), _where("torch")


def test_a_schedulers_last_lr_is_what_get_last_lr_returns():
    # stopping/budget.py sets each group's rate when it replans the schedule; the Trainer logs get_last_lr().
    from gemmatune.compat import set_last_lr

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    set_last_lr(scheduler, [0.125])
    assert scheduler.get_last_lr() == [0.125]

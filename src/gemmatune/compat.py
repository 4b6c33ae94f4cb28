"""Every non-public name of transformers, PEFT, bitsandbytes and torch that gemmatune uses, and nothing else.

Each function or class here wraps one assumption about a library's internals, checked against the versions
in `requirements-lock.txt` (torch 2.13, transformers 5.25, peft 0.21.2, bitsandbytes 0.50.2).
tests/test_compat.py holds one test per assumption; each fails with a message naming the library, its
installed version and what changed, so an upgrade that breaks one is found by the suite, not by a user.
Everything else in gemmatune uses public APIs only (`grep -n '\\._[a-z]'` outside this module finds no
library attribute).
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import torch


class LibraryChanged(RuntimeError):
    """An assumption about a library's internals no longer holds (after an upgrade)."""


def version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def changed(package: str, what: str) -> LibraryChanged:
    return LibraryChanged(f"{package} {version_of(package)}: {what} (gemmatune/compat.py; tested with the "
                          "versions in requirements-lock.txt)")


# --- transformers ---------------------------------------------------------------------------------------------

# The attribute holding an RMSNorm's epsilon: `eps` in Gemma 3 (and Gemma 3n before transformers 5.25),
# `variance_epsilon` in Gemma 3n from 5.25 on.
RMS_NORM_EPS_ATTRIBUTES = ("eps", "variance_epsilon")


def rms_norm_eps(norm: torch.nn.Module) -> float:
    """The epsilon of a transformers RMSNorm module."""
    for name in RMS_NORM_EPS_ATTRIBUTES:
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    raise changed("transformers", f"{type(norm).__name__} has none of {RMS_NORM_EPS_ATTRIBUTES} (its epsilon)")


def attn_implementation(config) -> str | None:
    """The attention implementation a model was loaded with (transformers keeps it only as a private field)."""
    return getattr(config, "_attn_implementation", None)


def keys_to_not_convert(model: torch.nn.Module) -> list[str]:
    """transformers' own list of modules a quantizer leaves alone (the LM head and weights tied to it)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return list(get_keys_to_not_convert(model))


def __getattr__(name: str):
    # TrainerHooks subclasses transformers.Trainer, whose import costs ~2 s: built when training asks for it.
    if name == "TrainerHooks":
        return _trainer_hooks()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _trainer_hooks() -> type:
    from transformers import Trainer

    class TrainerHooks(Trainer):
        """The private parts of `transformers.Trainer` that GemmatuneTrainer changes, behind public-named hooks.

        - `_save_checkpoint` / `_get_output_dir`: no public hook runs before the Trainer writes `checkpoint-N`,
          or lets the writing be redirected (`on_save` runs after a kill could leave half a folder). The stock
          save runs unchanged, with `_get_output_dir` answering `checkpoint_write_dir()` while it runs;
          `save_checkpoint(folder, stock_save)` decides what happens around it.
        - `model_accepts_loss_kwargs` (set in the Trainer's `__init__`): True makes the Trainer count label tokens
          over the accumulated batch (`num_items_in_batch`) for every model, also those whose forward takes no
          loss kwargs (Gemma3nForConditionalGeneration).
        - `loss_is_scaled_for_ga`: compute_loss already divides by that count, so the Trainer must not divide by
          the accumulation steps again (transformers before the flag, 5.6 say, skips that division whenever
          `model_accepts_loss_kwargs` is set and the count is known, which it then is).
        """

        loss_is_scaled_for_ga = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = True

        def checkpoint_write_dir(self) -> Path | None:
            """Where the stock save code writes `checkpoint-N` now; None: the output folder."""
            return None

        def save_checkpoint(self, folder: Path, stock_save: Callable[[], None]) -> None:
            """Save a checkpoint under `folder`; `stock_save()` runs the Trainer's own save code."""
            stock_save()

        def _get_output_dir(self, trial) -> str:
            redirected = self.checkpoint_write_dir()
            return str(redirected) if redirected is not None else super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial) -> None:
            self.save_checkpoint(Path(super()._get_output_dir(trial)), lambda: super(TrainerHooks, self)
                                 ._save_checkpoint(model, trial))

    return TrainerHooks


# --- PEFT -----------------------------------------------------------------------------------------------------

def skip_lora_input_cast(lora_layer: torch.nn.Module) -> None:
    """Let a PEFT LoRA layer take its input as it comes. Under autocast each matmul casts anyway, and PEFT's own
    cast copied every projection input. This is the flag `peft.helpers.disable_input_dtype_casting` sets for the
    length of a `with` block; training needs it for good."""
    if not hasattr(lora_layer, "cast_input_dtype_enabled"):
        raise changed("peft", f"{type(lora_layer).__name__} has no cast_input_dtype_enabled flag")
    lora_layer.cast_input_dtype_enabled = False


def lora_dropout_modules(lora_layer: torch.nn.Module) -> torch.nn.ModuleDict:
    """A PEFT LoRA layer's dropout per adapter, which its forward applies to the layer's own input tensor just
    before lora_A (`lora_B(lora_A(dropout(x)))`): lora_dropout.py puts a cheaper one with the same distribution
    in its place."""
    dropouts = getattr(lora_layer, "lora_dropout", None)
    if not isinstance(dropouts, torch.nn.ModuleDict):
        raise changed("peft", f"{type(lora_layer).__name__} has no lora_dropout ModuleDict")
    return dropouts


def lora_variants(lora_layer: torch.nn.Module) -> dict:
    """A PEFT LoRA layer's variants per adapter (DoRA and the like): its forward hands an adapter that has one to
    `variant.forward(layer, active_adapter=, x=, result=)` instead of computing `result + lora_B(lora_A(dropout(x)))
    * scaling`, and merging to the variant's merge_safe / merge_unsafe / unmerge. kernels/lora.py puts its fused
    branch there. PEFT calls these methods private ("prone to change"); checked with peft 0.21.2."""
    variants = getattr(lora_layer, "lora_variant", None)
    if not isinstance(variants, dict):
        raise changed("peft", f"{type(lora_layer).__name__} has no lora_variant dict")
    return variants


def lora_variant_base() -> type:
    """PEFT's base class of LoRA variants (peft.tuners.lora.layer.LoraVariant)."""
    try:
        from peft.tuners.lora.layer import LoraVariant
    except ImportError as err:
        raise changed("peft", "peft.tuners.lora.layer.LoraVariant is gone") from err
    return LoraVariant


# --- torch ----------------------------------------------------------------------------------------------------

def set_last_lr(scheduler: torch.optim.lr_scheduler.LRScheduler, lrs: list[float]) -> None:
    """What `scheduler.get_last_lr()` returns (the Trainer logs it as the learning rate) after the time budget sets
    each group's rate itself: torch keeps it in the private `_last_lr` and has no setter."""
    if not isinstance(getattr(scheduler, "_last_lr", None), list):
        raise changed("torch", f"{type(scheduler).__name__} keeps no _last_lr list for get_last_lr()")
    scheduler._last_lr = list(lrs)


# --- bitsandbytes ---------------------------------------------------------------------------------------------

def keep_training_layout(layer: torch.nn.Module) -> None:
    """Stop a bitsandbytes `Linear4bit` from repacking its weight for the CPU inference kernel.

    On a CPU with AVX512-BF16 the first eval-mode forward rewrites the weight into that kernel's layout for
    good, and that kernel has no autograd: later training forwards pass no gradient to the layers below.
    `support_avx512bf16_for_cpu` is the layer's own switch for the path.
    """
    if not hasattr(layer, "support_avx512bf16_for_cpu"):
        raise changed("bitsandbytes", f"{type(layer).__name__} has no support_avx512bf16_for_cpu switch")
    layer.support_avx512bf16_for_cpu = False


# --- torch ----------------------------------------------------------------------------------------------------

def fused_cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                        scale: float | None) -> torch.Tensor:
    """The fused (flash) attention kernel CPUs run for an unmasked sdpa, called directly: on the meta device
    `F.scaled_dot_product_attention` takes the math path, whose saved tensors are not what CPUs and GPUs keep."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)[0]


def storage_key(t: torch.Tensor) -> int:
    """One key per storage, also on the meta device (where every data pointer is 0): torch has no public
    storage identity."""
    return t.untyped_storage()._cdata


def meta_nonzero_assumes_all_true():
    """A context in which `nonzero()` of a meta tensor (which has no values) assumes every element true, so a boolean
    index works on the meta device: torch's own switch for that, in a private config module."""
    from torch.fx.experimental import _config

    if not hasattr(_config, "meta_nonzero_assume_all_nonzero"):
        raise changed("torch", "torch.fx.experimental._config has no meta_nonzero_assume_all_nonzero switch")
    return _config.patch(meta_nonzero_assume_all_nonzero=True)

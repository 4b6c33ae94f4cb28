"""What we know about each model family, as data: one small module per family, of the types defined here.

`registry.family_for(model_type)` is the only lookup; the rest of the code reads fields, never model types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SEVEN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def language_model_projections(towers: tuple[str, ...], names: tuple[str, ...] = SEVEN_PROJECTIONS) -> str:
    """A LoRA target regex (PEFT full-matches it) for the modules called `names` (default: the 7 projections)
    outside every module named in `towers`: the bare names would also wrap a vision or audio tower's q/k/v."""
    return rf"^(?!.*(?:{'|'.join(towers)})).*\.(?:{'|'.join(names)})$"


@dataclass(frozen=True)
class GgufLayout:
    """How llama.cpp's loader for this family wants the Hugging Face tensors and config (read by gguf_model.py and
    gguf_lora.py; the norm offset is `ModelFamily.rms_norm_offset`, the tensors skipped its `tower_modules`). The
    tokenizer is written as SentencePiece (gguf_vocab.py): every family with a layout has one."""

    arch: str
    """`gguf.MODEL_ARCH` member: llama.cpp's architecture name, and its map of tensor names."""
    hparams: Callable[[object], list[tuple[str, object]]]
    """(GGUFWriter method, value) pairs for the family's keys, from the text config (a transformers config)."""
    renames: tuple[tuple[str, str], ...] = ()
    """(regex, replacement) applied to a Hugging Face tensor name before llama.cpp's name map sees it."""
    stacked: tuple[str, ...] = ()
    """Module lists (`model.X.0.weight`, `model.X.1.weight`, ...) llama.cpp reads as one 3-D tensor `model.X.weight`."""
    keep_f32: tuple[str, ...] = ()
    """GGUF tensor names (without `blk.N.`) written in F32 whatever the requested type."""
    vocab_sized: tuple[str, ...] = ("token_embd.weight",)
    """GGUF tensors with one row per token: cut or zero-padded to the GGUF vocabulary's size."""
    kv_shared_placeholders: tuple[str, ...] = ()
    """GGUF tensors (without `blk.N.`) of KV-shared layers that transformers builds without (they read an earlier
    layer's cache) but llama.cpp's loader requires, though its graph never reads them: written as zeros."""


MEDIA_TOKEN_ATTRS = ("image_token", "boi_token", "eoi_token", "audio_token", "boa_token", "eoa_token")
"""The tokenizer attributes that name a Gemma 3n / Gemma 4 processor's image and audio markers and soft tokens."""


@dataclass(frozen=True)
class MediaDefaults:
    """What a family's processor does with images and audio, for `plan` where the checkpoint's processor files are
    not at hand (tower_memory.py reads them when they are)."""

    image_size: int = 0
    """The side images are resized to, for a tower that takes a pixel grid (Gemma 3n: 768)."""
    max_soft_tokens: int = 0
    """Soft tokens an image gets at most, for a tower that takes patches (Gemma 4: 280)."""
    mel_bins: int = 0
    """Mel bins of the audio features, where the audio config does not say (Gemma 4: 128)."""
    audio_hop: int = 160
    """Samples between two audio frames (10 ms at 16 kHz)."""
    audio_frame: int = 512
    """Samples in one frame's window (32 ms)."""


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    """`config.model_type` values this family covers."""
    lora_targets: str | tuple[str, ...] = SEVEN_PROJECTIONS
    """Default LoRA targets: module names, or a regex PEFT full-matches against module paths."""
    chat_template: str | None = None
    """Jinja chat template for tokenizers that ship none (e.g. a GGUF); None: keep the tokenizer's."""
    stop_tokens: tuple[str, ...] = ()
    """Tokens besides EOS that end a reply (the end-of-turn marker of the chat format)."""
    fp16_safe: bool = True
    """False where fp16 activations are known to overflow: fp16 is then refused."""
    known_ids: tuple[str, ...] = ()
    """Real hub ids of this family, for 'did you mean' on near misses."""
    text_config_attr: str | None = None
    """Attribute holding the text config on multimodal configs (flags like use_cache live there)."""
    multimodal_model_types: tuple[str, ...] = ()
    """`config.model_type` values of full multimodal checkpoints (language model + towers)."""
    text_class: str | None = None
    """transformers class that loads the language model alone from a multimodal checkpoint (text data);
    None: AutoModelForCausalLM decides."""
    text_key_mapping: tuple[tuple[str, str], ...] = ()
    """(regex, replacement) renames of checkpoint keys for loading `text_class` from a multimodal checkpoint, where
    transformers has none of its own (Gemma 4 in 5.25: without it the language model loads with random weights,
    reported only in a log table)."""
    multimodal_class: str | None = None
    """transformers class of the full model, for `model.multimodal: true`; None: not offered."""
    multimodal_requires: tuple[str, ...] = ()
    """Import names the full model needs beyond gemmatune's dependencies (the `multimodal` extra)."""
    tower_modules: tuple[str, ...] = ()
    """Module-name parts of the non-language towers: frozen, and given adapters only where `lora.towers` asks."""
    towers: tuple[tuple[str, tuple[str, ...], str], ...] = ()
    """(tower name for `lora.towers`, module-name parts that belong to it, LoRA target regex inside it)."""
    patch_images: bool = False
    """The vision tower takes an image as patches with their (x, y) positions, at most the processor's soft-token
    budget of them (Gemma 4), not as a pixel grid: `plan` measures the tower with such an image (tower_memory.py)."""
    audio_mask_marks_frames: bool = False
    """The audio tower's mask is True on real frames (Gemma 4), not on padding (Gemma 3n)."""
    keep_unquantized: tuple[str, ...] = ()
    """Linear modules (dotted name suffixes) that 4-bit loading must leave alone because the model code reads
    or rewrites their weights directly; see quantization.py for the rules every family gets."""
    bundled_configs: tuple[tuple[str, str], ...] = ()
    """(hub id, JSON file in this package) pairs: the real configs, so `plan` works offline. A file is the text
    config (Gemma 3n) or the whole multimodal config (Gemma 4), whose text_config stands for text data."""
    rms_norm: str | None = None
    """Class name of the family's RMSNorm, replaced for training by `norms.LeanRMSNorm` (same math, no fp32
    input copy kept for backward); None: left as it is."""
    rms_norm_offset: float = 0.0
    """The norm multiplies by (weight + offset): Gemma 3 stores weight - 1 (offset 1.0), Gemma 3n the scale."""
    gguf: GgufLayout | None = None
    """How to write the family as a GGUF for llama.cpp; None: `export --format gguf` refuses it."""
    ollama_chat_template: str | None = None
    """The chat format as an Ollama (Go text/template) TEMPLATE, for `export --ollama` of a chat-template run."""
    expert_parameters: tuple[str, ...] = ()
    """Mixture-of-experts weights stored as 3-D parameters (not nn.Linear, so no module target reaches them): the
    PEFT `target_parameters` that `lora.experts: true` adds. Empty: the family has no experts."""
    media: MediaDefaults | None = None
    """The processor's image and audio settings; None for a family without towers."""
    residual_streams_attr: str | None = None
    """Text-config attribute with the number of parallel residual streams (Gemma 3n AltUp); None: one stream."""
    moe_parts: tuple[tuple[str, str], ...] = ()
    """(report name, module-name part) of a mixture-of-experts layer's parts, so the trainable report says which of
    them got LoRA (experts, router, shared MLP) and which did not."""
    thinking_markers: tuple[str, str] | None = None
    """The tokens that open and close a reply's thinking (reasoning) span: kept out of the loss unless
    `data.train_on_thinking`."""

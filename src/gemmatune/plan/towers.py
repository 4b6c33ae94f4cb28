"""Activation memory of a multimodal model's towers (Gemma 3n's and Gemma 4's vision and audio encoders), for `plan`.

Measured, not modelled: the full model is built on the meta device (no weights, no RAM), LoRA is attached as
`gemmatune train` attaches it, and one image (or one 30 s clip) goes through the tower's own forward under
`torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd keeps for backward; those bytes
(each storage once, parameters and buffers excluded) plus the soft tokens the tower hands to the language model
are the figure. A tower without adapters runs with no tensor that needs a gradient, so it keeps nothing for
backward and costs only its soft tokens.

Two things the meta device cannot see are set here:
- attention: meta tensors run `scaled_dot_product_attention` as its unfused math (which keeps the whole
  score matrix); CPU and CUDA run a fused kernel that keeps q, k, v, the output and a log-sum-exp per row.
  `_FusedAttention` routes the call to that fused kernel's op (its meta shape function), so the saved bytes
  are the fused kernel's.
- masks: the probes hold no padding, so a mask's all() is True (a meta tensor cannot say so; see below).
- dtype: the meta model is fp32; under bf16/fp16 compute the figure is scaled by 2/4 (activations follow
  the compute dtype; the few fp32 tensors autocast keeps are not separated out).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from gemmatune.compat import fused_cpu_attention, meta_nonzero_assumes_all_true, storage_key
from gemmatune.data.media import MAX_AUDIO_SECONDS, SAMPLE_RATE
from gemmatune.models import MediaDefaults, ModelFamily


def clip_frames(seconds: float = MAX_AUDIO_SECONDS, media: MediaDefaults | None = None) -> int:
    """Audio frames of a clip, as the family's feature extractor frames it (10 ms hops of 32 ms windows: Gemma 3n's
    2,997 frames for 30 s; Gemma 4's 20 ms windows give 2,999, the same to 0.1%)."""
    media = media or MediaDefaults()
    samples = int(seconds * SAMPLE_RATE)
    return (samples - media.audio_frame) // media.audio_hop + 1


@dataclass(frozen=True)
class TowerMemory:
    tower: str  # "vision" | "audio"
    unit: str  # what one unit is: "image 768x768", "30 s clip"
    trained: bool  # LoRA in the tower (activations kept for backward)
    saved_bytes: float  # kept for backward per unit
    output_bytes: float  # the soft tokens per unit (handed to the language model)

    @property
    def per_unit(self) -> float:
        return self.saved_bytes + self.output_bytes


class _FusedAttention(TorchFunctionMode):
    """On the meta device, run scaled_dot_product_attention as the fused kernel CPUs and GPUs run (see above)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            if kwargs.get("attn_mask") is None and not kwargs.get("dropout_p") and len(args) == 3:
                k, v = k.expand(q.shape[:-2] + k.shape[-2:]), v.expand(q.shape[:-2] + v.shape[-2:])
                return fused_cpu_attention(q, k, v, kwargs.get("is_causal", False), kwargs.get("scale"))
        if func is torch.Tensor.all and len(args) == 1 and not kwargs and args[0].dtype == torch.bool:
            # A mask's "anything masked?" check (Gemma 4's vision encoder skips its mask when nothing is): a meta
            # tensor has no value to answer with, and the probe holds no padding, so every mask is all True.
            return torch.tensor(True)
        return func(*args, **kwargs)


def _no_padding(device: torch.device):
    """On the meta device, let masks be indexed with (Gemma 4's towers keep the real positions by a boolean index):
    torch's meta nonzero() can assume every element true, which is so for a probe without padding."""
    if device.type != "meta":
        return nullcontext()
    return meta_nonzero_assumes_all_true()


def saved_tensor_bytes(model: torch.nn.Module, forward) -> tuple[int, object]:
    """(bytes autograd keeps for backward during `forward()`, its result); each storage counted once, the
    model's parameters and buffers excluded (they are weights, counted elsewhere)."""
    weights = {storage_key(t) for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        key = storage_key(t)
        if key not in weights:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return sum(seen.values()), result


def measure_towers(peft_model, trained: list[str], family: ModelFamily, image_size: int | None = None,
                   clip_seconds: float = MAX_AUDIO_SECONDS, dtype_bytes: int = 2, soft_tokens: int | None = None,
                   mel_bins: int | None = None) -> list[TowerMemory]:
    """Per-unit activation memory of each tower of a Gemma 3n- or Gemma 4-style model (`get_image_features`,
    `get_audio_features`) with LoRA attached. `peft_model` may live on the meta device (plan) or on the CPU
    (the tests' reference measurement, with real tensors). `family` says how the towers take their inputs;
    `image_size`, `soft_tokens` and `mel_bins` are the processor's (default: the family's `media`)."""
    media = family.media or MediaDefaults()
    image_size = image_size or media.image_size
    soft_tokens = soft_tokens or media.max_soft_tokens
    mel_bins = mel_bins or media.mel_bins
    inner = peft_model.get_base_model().model
    device = next(peft_model.parameters()).device
    dtype = next(p.dtype for p in peft_model.parameters() if p.is_floating_point())
    scale = dtype_bytes / torch.empty((), dtype=dtype).element_size()
    frames = clip_frames(clip_seconds, media)
    config = peft_model.config
    if family.patch_images:
        vision = config.vision_config
        side = math.isqrt(soft_tokens) * vision.pooling_kernel_size  # the largest square image within the budget
        grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1)
        # The tower and its embedder, as get_image_features runs them, without its split into one tensor per
        # image (sizes read from tensor values, which the meta device has not).
        image = (f"image {side * vision.patch_size}x{side * vision.patch_size}",
                 lambda: inner.embed_vision(inner.vision_tower(
                     pixel_values=torch.zeros(1, side * side, 3 * vision.patch_size ** 2, device=device, dtype=dtype),
                     pixel_position_ids=grid.reshape(1, side * side, 2).to(device)).last_hidden_state[None]))
    else:
        image = (f"image {image_size}x{image_size}",
                 lambda: inner.get_image_features(torch.zeros(1, 3, image_size, image_size, device=device,
                                                              dtype=dtype), return_dict=True).pooler_output)
    marks_frames = family.audio_mask_marks_frames
    # A full clip: every frame real, which each family's mask says its own way.
    full = torch.full((1, frames), marks_frames, device=device)
    probes = {
        "vision": image,
        "audio": (f"{clip_seconds:g} s clip",
                  lambda: inner.get_audio_features(
                      torch.zeros(1, frames, mel_bins if marks_frames else config.audio_config.input_feat_size,
                                  device=device, dtype=dtype), full, return_dict=True).pooler_output),
    }
    out = []
    for tower in ("vision", "audio"):
        if getattr(config, f"{tower}_config", None) is None:  # a model without this tower (Gemma 4 26B/31B: audio)
            continue
        unit, forward = probes[tower]
        with _FusedAttention() if device.type == "meta" else nullcontext(), _no_padding(device):
            saved, soft = saved_tensor_bytes(peft_model, forward)
        out.append(TowerMemory(tower, unit, tower in trained, saved * scale, soft.numel() * dtype_bytes))
    return out



def image_size(model_name: str, default: int) -> int:
    """The side images are resized to, from a local checkpoint's processor files (preprocessor_config.json, or
    the image_processor inside processor_config.json), else `default`."""
    import json
    from pathlib import Path

    folder = Path(model_name).expanduser()
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        file = folder / name
        if file.is_file():
            data = json.loads(file.read_text(encoding="utf-8"))
            size = ((data.get(key) or {}) if key else data).get("size") or {}
            if "height" in size:
                return int(size["height"])
    return default


def processor_setting(model_name: str, part: str, key: str, default: int) -> int:
    """`key` of the processor's `part` ("image_processor", "feature_extractor") in a local checkpoint's
    processor_config.json (or preprocessor_config.json), else `default`."""
    import json
    from pathlib import Path

    folder = Path(model_name).expanduser()
    for name, section in (("processor_config.json", part), ("preprocessor_config.json", None)):
        file = folder / name
        if file.is_file():
            data = json.loads(file.read_text(encoding="utf-8"))
            value = ((data.get(section) or {}) if section else data).get(key)
            if value is not None:
                return int(value)
    return default

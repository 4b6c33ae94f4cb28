"""`gemmatune plan CONFIG`: what will train and how much memory it takes, before loading any weights.

Parameter counts are exact (PEFT on a meta-device model, see model_shape.py). Memory is an estimate:
weights per storage kind, LoRA parameters, gradients, optimizer state, activations and logits for the
configured batch and length, and the runtime's own baseline. Activations and logits follow the training path
the trainer takes (`trainer.training_path`), through a handful of measured per-token factors (`PathMemory`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from gemmatune.config import Config
from gemmatune.errors import GemmatuneError
from gemmatune.hardware import DTYPE_NAMES, device_kind, resolve_precision, weight_dtype
from gemmatune.plan.shape import ModelShape, measure
from gemmatune.plan.towers import TowerMemory
from gemmatune.train.trainer import TrainingPath, training_path

GIB = 1024**3
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# bitsandbytes nf4: 4 bits per weight, one absmax per 64 weights; double quantization stores that absmax
# in 8 bits with one fp32 constant per 256 blocks, instead of an fp32 absmax per block.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_BYTES_NO_DOUBLE_QUANT = 0.5 + 4 / 64
# Optimizer state bytes per trainable (fp32) parameter.
_OPTIMIZER_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "adamw_hf": 8, "adafactor": 4, "sgd": 0,
                    "adamw_bnb_8bit": 2, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8}


@dataclass(frozen=True)
class PathMemory:
    """Bytes kept for backward per token on a training path, as a few named factors (bf16 compute; fp32
    doubles activations).

    hidden_bytes:   per decoder layer, per hidden unit (norm inputs, LoRA inputs and dropout masks, attention in/out)
    stream_bytes:   per layer, per hidden unit, per extra residual stream (Gemma 3n AltUp keeps 4 streams)
    mlp_bytes:      per layer, per MLP intermediate unit (gate, up, activation, product, down-proj LoRA input)
    logits_bytes:   per vocabulary entry at the loss peak (logits, their fp32 copy, log-softmax, gradients)
    overhead_bytes: the process' own baseline (CPU: Python + libraries + allocator slack; CUDA: context)
    """

    name: str
    hidden_bytes: float
    stream_bytes: float
    mlp_bytes: float
    logits_bytes: float
    overhead_bytes: float
    chunk_logits: bool = False  # the loss materialises one chunk of rows at a time, not every token


# The model's own loss over full [tokens, vocab] logits (multi-process runs). Measured on this CPU with padded
# batches, fp32 frozen weights under bf16 autocast, LoRA r=16 with dropout, the stock RMSNorms and PEFT's input
# casts. Every path trains the lean body of CPU_CHUNKED_LOSS below, so these per-layer factors over-estimate a
# multi-process run (on the safe side); re-measuring this path would tighten them.
# - Per-layer factors: benchmarks/activation_bytes.py counts the bytes autograd saves per layer per token on
#   real-width layers: 70,676 (Gemma 3 270M: hidden 640, MLP 2048) and 491,498 (Gemma 3n E4B: hidden 2048,
#   MLP 16384, 4 AltUp streams). With mlp_bytes fixed at 16 (gate, up, activation, product, down-proj LoRA
#   input and its dropout mask), hidden_bytes=59 and stream_bytes=17.6 reproduce both totals; how the total
#   splits between hidden and MLP is the assumption.
# - logits_bytes=16 counts the loss' vocab-wide tensors (bf16 logits, fp32 copy, log-softmax, two gradients).
# - Checked against a whole run's peak RSS in tests/test_plan.py (the quick start on this path: within 25%).
CPU_FULL_LOGITS = PathMemory("full logits", hidden_bytes=59, stream_bytes=17.6, mlp_bytes=16, logits_bytes=16,
                             overhead_bytes=0.9 * GIB)
# On CUDA (not measured on a GPU yet: benchmarks/gpu_smoke.py compares); the CUDA context (~0.5 GiB) is outside
# torch.cuda.max_memory_allocated.
CUDA_FULL_LOGITS = replace(CPU_FULL_LOGITS, overhead_bytes=0.5 * GIB)

# The label-only chunked loss (loss.py; single-process runs, packed or padded): the LM head runs only on label
# positions, in chunks of LOGITS_BYTES_PER_CHUNK of logits, so the loss holds at most one chunk's vocab-wide tensors
# (chunk_logits=True) instead of [tokens, vocab]: the bf16 logits, overwritten in place by their gradient, plus a
# 16 MiB fp32 block (logits_bytes=2.5). Per-layer factors measured with benchmarks/activation_bytes.py on the
# body gemmatune trains (bf16 frozen weights, lean RMSNorms, no PEFT input casts): 50,452 bytes per layer per
# token (270M) and 337,306 (E4B); with mlp_bytes=16 that is hidden_bytes=27.6 and stream_bytes=3.0.
CPU_CHUNKED_LOSS = replace(CPU_FULL_LOGITS, name="label-only chunked loss", hidden_bytes=27.6, stream_bytes=3.0,
                           logits_bytes=2.5, chunk_logits=True)
CUDA_CHUNKED_LOSS = replace(CPU_CHUNKED_LOSS, overhead_bytes=0.5 * GIB)


def path_memory(path: TrainingPath, device: str) -> PathMemory:
    """The factors for a training path on `device` ("cpu" or "cuda"). Packed and padded batches keep the same
    bytes per token; the padding is counted in the tokens (the batch's longest row sets its length)."""
    if path.chunked_loss:
        factors = CUDA_CHUNKED_LOSS if device == "cuda" else CPU_CHUNKED_LOSS
    else:
        factors = CUDA_FULL_LOGITS if device == "cuda" else CPU_FULL_LOGITS
    return replace(factors, name=f"{device}, {path.describe()}")


@dataclass
class Settings:
    """What the estimate depends on besides the model; suggestions vary these."""

    device: str
    precision: str
    weights: str  # fp32 | bf16 | fp16 | nf4
    double_quant: bool
    rank: int
    batch: int
    seq_len: int
    gradient_checkpointing: bool
    optim: str
    towers: list[TowerMemory] = field(default_factory=list)  # a multimodal model's towers, per image / clip
    images: int = 0  # images per example (the most in one)
    clips: int = 0  # audio clips per example
    sequences: int = 1  # sequences per example: 2 for dpo/orpo (a pair's chosen and rejected answers, one forward)


@dataclass
class Estimate:
    parts: dict[str, float]  # bytes per device

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def estimate(shape: ModelShape, s: Settings, path: PathMemory) -> Estimate:
    tokens = s.batch * s.sequences * s.seq_len
    if s.weights == "nf4":
        per = NF4_BYTES if s.double_quant else NF4_BYTES_NO_DOUBLE_QUANT
        kept = 2  # non-converted weights stay in the compute dtype (bf16); lora.freeze_quantized keeps them so
        weights = shape.quantizable_params * per + (shape.total_params - shape.quantizable_params) * kept
    else:
        weights = shape.total_params * _DTYPE_BYTES[s.weights]
    # Autocast casts each fp32 frozen weight to bf16 per matmul and autograd keeps that copy for backward.
    cast_copies = shape.linear_params * 2 if s.weights == "fp32" and s.precision == "bf16" else 0
    lora = s.rank * shape.lora_params_per_rank  # PEFT keeps adapters in fp32
    act_scale = 2.0 if s.precision == "fp32" else 1.0
    per_layer_token = shape.hidden * (path.hidden_bytes + (shape.streams - 1) * path.stream_bytes)
    full_layers = sum(per_layer_token + i * path.mlp_bytes for i in shape.intermediate)
    if s.gradient_checkpointing:
        # Only each layer's input streams are kept; one layer's activations exist at a time in backward.
        kept_inputs = shape.layers * shape.streams * shape.hidden * 2
        activations = tokens * act_scale * (kept_inputs + full_layers / shape.layers)
    else:
        activations = tokens * act_scale * full_layers
    return Estimate({
        "weights": weights,
        "bf16 weight copies": cast_copies,
        "LoRA parameters": lora * 4,
        "gradients": lora * 4,
        "optimizer state": lora * _OPTIMIZER_BYTES.get(s.optim, 8),
        "activations": activations,
        "tower activations": _tower_bytes(s),
        "logits and loss": _loss_rows(tokens, shape.vocab, path) * shape.vocab * path.logits_bytes,
        "runtime": path.overhead_bytes,
    })


def _tower_bytes(s: Settings) -> float:
    """The towers' activations for one batch: every image and clip of the batch goes through its tower in the
    same forward, and a tower with LoRA keeps its activations until backward."""
    per_example = {"vision": s.images, "audio": s.clips}
    return s.batch * sum(t.per_unit * per_example[t.tower] for t in s.towers)


def _loss_rows(tokens: int, vocab: int, path: PathMemory) -> int:
    import torch

    from gemmatune.models.loss import chunk_rows

    # bf16 logits, as logits_bytes counts them (fp32 logits come in chunks of half the rows)
    return min(tokens, chunk_rows(vocab, torch.bfloat16)) if path.chunk_logits else tokens


def parse_size(text: str) -> int:
    """'16GiB', '24GB', '16G', '8192MiB' -> bytes (GB and G are read as GiB: what GPU vendors' cards hold)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise GemmatuneError(f"--device-memory: {text!r} is not a size like 16GiB or 24GB")
    scale = {"": GIB, "K": 1024, "M": 1024**2, "G": GIB, "T": 1024**4}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


@dataclass
class Plan:
    shape: ModelShape
    settings: Settings
    training_path: TrainingPath  # what the trainer will run
    path: PathMemory  # its memory factors
    estimate: Estimate
    world_size: int
    grad_accum: int
    seq_note: str
    device_memory: int | None
    suggestion: tuple[list[str], Estimate] | None

    def lines(self) -> list[str]:
        sh, s, est = self.shape, self.settings, self.estimate
        share = 100 * sh.lora_params / max(1, sh.total_params)
        weights = s.weights
        if s.weights == "nf4":
            weights = "nf4 4-bit" + (" + double quantization" if s.double_quant else "")
        out = [
            f"model: {sh.model_class} from {sh.source}: {sh.total_params:,} parameters, {sh.layers} layers",
            f"LoRA r={s.rank}: {len(sh.wrapped)} modules wrapped ({sh.wrapped_summary()}); "
            f"{sh.lora_params:,} trainable parameters ({share:.3f}%)",
            f"training: {s.device}, {s.precision} compute, weights {weights}, optimizer {s.optim}"
            + (", gradient checkpointing" if s.gradient_checkpointing else ""),
            f"batch per device: {s.batch} x {s.seq_len} tokens ({self.seq_note})"
            + (f", x{s.sequences} sequences per example (dpo/orpo: chosen and rejected; grpo: the sampled answers)"
               if s.sequences > 1 else "") + f"; world size {self.world_size}: "
            f"{s.batch * self.world_size * self.grad_accum} sequences per optimizer step (weights are replicated "
            "on every device under data parallelism; only the batch is split)",
        ]
        per_example = {"vision": s.images, "audio": s.clips}
        for t in s.towers:
            kept = f"{t.saved_bytes / GIB:.2f} GiB kept for backward, LoRA in the tower" if t.trained else \
                "frozen: nothing kept for backward"
            out.append(f"tower activations, {t.tower}: {t.per_unit / GIB:.3f} GiB per {t.unit} ({kept}, "
                       f"{t.output_bytes / 2**20:.1f} MiB soft tokens) x {per_example[t.tower]} per example")
        out.append(f"memory per device (estimate; activations/logits from the '{self.path.name}' path):")
        for part, size in est.parts.items():
            if size:
                out.append(f"  {part:<18} {size / GIB:8.2f} GiB")
        out.append(f"  {'total':<18} {est.total / GIB:8.2f} GiB")
        if self.device_memory:
            fits = est.total <= self.device_memory
            out.append(f"fits {self.device_memory / GIB:.0f} GiB: {'yes' if fits else 'no'}")
            if not fits and self.suggestion:
                sets, sug = self.suggestion
                out.append(f"suggested: {' '.join('--set ' + x for x in sets)} -> {sug.total / GIB:.2f} GiB")
            elif not fits:
                out.append("suggested: nothing within these settings fits; use a larger device or a smaller model")
        return out


def _settings(cfg: Config, device: str) -> Settings:
    if device == device_kind():
        precision = resolve_precision(cfg.train.precision)
    else:
        precision = "bf16" if cfg.train.precision == "auto" else cfg.train.precision
    if cfg.model.quantization == "4bit":
        weights = "nf4"
    elif cfg.model.dtype != "auto":
        weights = cfg.model.dtype
    else:
        weights = DTYPE_NAMES[weight_dtype(precision, device)]
    return Settings(device, precision, weights, True, cfg.lora.r, cfg.train.per_device_train_batch_size,
                    cfg.data.max_length, cfg.train.gradient_checkpointing, cfg.train.optim)


def suggest(shape: ModelShape, s: Settings, path: PathMemory, limit: int, grad_accum: int):
    """The first change (in order of least harm to the result) that fits: a smaller batch with more
    accumulation (same effective batch), gradient checkpointing, 4-bit weights, then a smaller rank."""
    tried: list[tuple[list[str], Settings]] = []
    batch = s.batch
    while batch > 1:
        batch //= 2
        accum = grad_accum * s.batch // batch
        tried.append(([f"train.per_device_train_batch_size={batch}", f"train.gradient_accumulation_steps={accum}"],
                      replace(s, batch=batch)))
    one = replace(s, batch=1)
    base_sets = tried[-1][0] if tried else []
    tried.append((base_sets + ["train.gradient_checkpointing=true"], replace(one, gradient_checkpointing=True)))
    ckpt = tried[-1]
    if s.weights != "nf4":
        tried.append((ckpt[0] + ["model.quantization=4bit"], replace(ckpt[1], weights="nf4")))
    last = tried[-1]
    rank = s.rank
    while rank > 4:
        rank //= 2
        tried.append((last[0] + [f"lora.r={rank}"], replace(last[1], rank=rank)))
    for sets, settings in tried:
        est = estimate(shape, settings, path)
        if est.total <= limit:
            return sets, est
    return None


@dataclass(frozen=True)
class DataExtent:
    longest: int  # tokens in the longest training example
    images: int  # most images in one example
    clips: int  # most audio clips in one example


def data_extent(cfg: Config) -> DataExtent | None:
    """The longest training example and the most image/audio parts in one, when the data is a local file and
    the tokenizer (and, for a multimodal model, the processor) is local; None otherwise (a hub model's
    tokenizer is not downloaded for a plan)."""
    from gemmatune.data.examples import tokenize_data
    from gemmatune.data.rows import is_local, read_data
    from gemmatune.models.loading import load_processor, load_tokenizer, resolve_source

    if not cfg.data.train_file or not is_local(cfg.data.train_file):
        return None
    if cfg.model.name != "embedded" and not Path(cfg.model.name).expanduser().exists():
        return None  # a hub id: resolving it would probe the hub, and its tokenizer is not fetched for a plan
    source = resolve_source(cfg.model)
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)
    processor = load_processor(source, tokenizer, cfg.model.trust_remote_code) if cfg.model.multimodal else None
    if cfg.train.method == "grpo":  # prompts: a sequence is a prompt and its longest sampled answer
        from gemmatune.data.prompts import read_prompts, tokenize_prompts

        prompts = tokenize_prompts(read_prompts(cfg.data, cfg.train.seed), tokenizer, cfg.data).train.examples
        return DataExtent(max(len(p.ids) for p in prompts) + cfg.train.max_completion_length, 0, 0)
    if cfg.train.method != "sft":  # preference pairs: a sequence is the prompt and its longer answer
        from gemmatune.data.pairs import read_pairs, tokenize_pairs

        pairs = tokenize_pairs(read_pairs(cfg.data, cfg.train.seed), tokenizer, cfg.data).train.examples
        return DataExtent(max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs), 0, 0)
    examples = tokenize_data(read_data(cfg.data, cfg.train.seed), tokenizer, cfg.data, processor).train.examples
    if not examples:
        return None
    count = [[sum(p.kind == kind for p in e.media) for e in examples] for kind in ("image", "audio")]
    return DataExtent(max(len(e.input_ids) for e in examples), max(count[0]), max(count[1]))


def tower_memory(cfg: Config, precision: str) -> list[TowerMemory]:
    """Each tower's activation memory per image / clip, measured on the meta device (tower_memory.py)."""
    from peft import get_peft_model

    from gemmatune.models import MediaDefaults
    from gemmatune.models.loading import build_on_meta, choose_model_class
    from gemmatune.models.lora import peft_lora_config
    from gemmatune.models.meta import load_architecture
    from gemmatune.models.registry import family_for
    from gemmatune.plan.towers import image_size, measure_towers, processor_setting

    config, where = load_architecture(cfg)
    family = family_for(config.model_type)
    model = build_on_meta(choose_model_class(cfg.model, config.model_type, family, where), config)
    for param in model.parameters():
        param.requires_grad_(False)  # frozen base, as attach_lora leaves it
    peft_model = get_peft_model(model, peft_lora_config(cfg.lora, family))
    name, media = cfg.model.name, family.media or MediaDefaults()
    soft_tokens = processor_setting(name, "image_processor", "max_soft_tokens", media.max_soft_tokens)
    mel_bins = processor_setting(name, "feature_extractor", "feature_size", media.mel_bins)
    return measure_towers(peft_model, list(cfg.lora.towers), family, image_size=image_size(name, media.image_size),
                          dtype_bytes=_DTYPE_BYTES[precision], soft_tokens=soft_tokens, mel_bins=mel_bins)


def make_plan(cfg: Config, device_memory: int | None = None, world_size: int = 1, device: str | None = None,
              seq_len: int | None = None) -> Plan:
    if world_size < 1:
        raise GemmatuneError(f"--world-size must be >= 1, got {world_size}")
    device = device or device_kind()
    shape = measure(cfg)
    settings = _settings(cfg, device)
    if not shape.family.fp16_safe and settings.precision == "fp16":
        raise GemmatuneError("config key train.precision: fp16 overflows in this model family; use bf16 or fp32")
    seq_note = "data.max_length"
    if seq_len is not None:
        settings.seq_len, seq_note = seq_len, "--seq-len"
    extent = data_extent(cfg) if seq_len is None or cfg.model.multimodal else None
    if seq_len is None and extent is not None:
        # Batches are padded to their longest row, so the longest example sets the peak.
        settings.seq_len = extent.longest
        seq_note = f"the longest training example; data.max_length={cfg.data.max_length}"
    if cfg.model.multimodal and shape.per_tower:
        settings.towers = tower_memory(cfg, settings.precision)
        # Most parts in one example from the data; without local data, one image and one clip per example.
        settings.images, settings.clips = (extent.images, extent.clips) if extent else (1, 1)
    training = training_path(cfg.train.packing, world_size)
    path = path_memory(training, device)
    if cfg.train.method != "sft":
        # dpo / orpo (train/preference.py): both answers of a pair in one forward pass, and the answer tokens' log-probs
        # through the LM head a chunk at a time, recomputed in backward: one chunk's vocab-wide tensors (bf16
        # logits, fp32 copy, log-softmax and their gradients) at a time. DPO's reference pass runs once before
        # training, without gradients: less than a training step.
        # grpo: each prompt's group of sampled answers goes through one forward pass with gradients.
        settings.sequences = cfg.train.num_generations if cfg.train.method == "grpo" else 2
        path = replace(path, name=f"{path.name}, {cfg.train.method}", logits_bytes=16, chunk_logits=True)
    est = estimate(shape, settings, path)
    suggestion = None
    if device_memory and est.total > device_memory:
        suggestion = suggest(shape, settings, path, device_memory, cfg.train.gradient_accumulation_steps)
    return Plan(shape, settings, training, path, est, world_size, cfg.train.gradient_accumulation_steps, seq_note,
                device_memory, suggestion)

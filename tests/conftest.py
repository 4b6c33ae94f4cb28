"""Tiny random Gemma 3 / Gemma 3n text models and a byte-level tokenizer, built from configs here.

Saved as ordinary Hugging Face folders, so tests exercise the same loading path as a user's local model.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch

from gemmatune.models.gemma3 import CHAT_TEMPLATE

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
VOCAB = 272  # 6 specials + 256 bytes, rounded up
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


def require(condition: bool, what: str) -> None:
    """Skip a test whose outside part (a browser, a built llama.cpp, a second torch) is absent here; in CI
    (`GEMMATUNE_TEST_ALL=1`, set by .ci/run, which installs those parts) the same absence is a failure."""
    if not condition:
        (pytest.fail if os.environ.get("GEMMATUNE_TEST_ALL") == "1" else pytest.skip)(f"needs {what}")


@pytest.fixture(autouse=True, scope="session")
def _fast_cpu():
    # Random tiny weights produce denormals; without flushing, steps are ~80x slower on CPU.
    torch.set_flush_denormal(True)
    torch.set_num_threads(2)


def make_tokenizer(specials: list[str] = SPECIALS, extra_specials: tuple[str, ...] = (),
                   chat_template: str = CHAT_TEMPLATE):
    """Byte-level tokenizer: `specials` (pad, eos, bos, unk, start and end of turn: ids 0-5), the 256 bytes, then
    `extra_specials` (from id 262)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for tok in extra_specials:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[*specials[4:], *extra_specials],
    )
    tok.chat_template = chat_template
    return tok


# Gemma 4's chat tokens in place of Gemma 3's (same ids 4 and 5), plus its thinking-channel tokens (262-264).
GEMMA4_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
GEMMA4_EXTRA = ("<|channel>", "<channel|>", "<|think|>")


def make_gemma4_tokenizer():
    from gemmatune.models.gemma4 import CHAT_TEMPLATE as GEMMA4_TEMPLATE

    return make_tokenizer(GEMMA4_SPECIALS, GEMMA4_EXTRA, GEMMA4_TEMPLATE)


def gemma3_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
        max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )


def gemma3n_config(**overrides):
    from transformers import Gemma3nTextConfig

    values = dict(
        vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=64, hidden_size_per_layer_input=16,
        intermediate_size=128, num_hidden_layers=10, num_kv_shared_layers=5, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, laurel_rank=8, altup_num_inputs=4,
        activation_sparsity_pattern=[0.95] * 2 + [0.0] * 8, sliding_window=16, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return Gemma3nTextConfig(**{**values, **overrides})


def gemma3_4bit_config():
    """Gemma 3 text whose projections all fit bitsandbytes' CPU kernel (outputs x32, inputs x64)."""
    config = gemma3_config()
    config.num_hidden_layers, config.num_attention_heads, config.head_dim, config.query_pre_attn_scalar = 2, 2, 32, 32
    config.layer_types = ["sliding_attention", "full_attention"]
    return config


def gemma3_multimodal_config():
    """Gemma 3 4B's layout (Gemma3ForConditionalGeneration): the text model above plus a tiny SigLIP tower whose
    MLP is 100 wide, like the real 4304: not a multiple of 32."""
    from transformers import Gemma3Config

    return Gemma3Config(
        text_config=gemma3_4bit_config().to_dict(),
        vision_config={"hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        mm_tokens_per_image=4, boi_token_index=269, eoi_token_index=270, image_token_index=271,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )


def gemma3n_4bit_config(vocab_size: int = VOCAB):
    """Gemma 3n text whose LAuReL and per-layer projections fit bitsandbytes' CPU kernel (the real ones do)."""
    # KV-shared layers (2, 3) reuse the last non-shared layer of their own type: both types come first.
    return gemma3n_config(laurel_rank=64, hidden_size_per_layer_input=64, num_hidden_layers=4, num_kv_shared_layers=2,
                          activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0], vocab_size=vocab_size,
                          layer_types=["sliding_attention", "full_attention"] * 2)


def gemma4_config(kind: str = "e", **overrides):
    """Tiny Gemma 4 text configs. "e": E2B/E4B-style, with per-layer embeddings (PLE) and KV sharing (layers 2-3
    reuse the keys/values of layers 0-1, one of each attention type), final logit softcap; "moe": 26B-A4B-style,
    4 experts (top 2) beside the shared MLP, keys = values on full-attention layers; "dense": 31B-style. Full-attention
    layers have their own (wider) head_dim, as in the real models."""
    from transformers import Gemma4TextConfig

    values = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, global_head_dim=64, sliding_window=16, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        # The LM head is the (tied) embedding after a norm of fixed scale: with the default 0.02 init the logits of
        # a tiny model cannot spread far enough for LoRA to bring the loss below ~4.4 nats (seen here); 0.1 can.
        initializer_range=0.1,
    )
    values.update({
        "e": dict(hidden_size_per_layer_input=16, num_kv_shared_layers=2, final_logit_softcapping=30.0),
        "moe": dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                    attention_k_eq_v=True, num_global_key_value_heads=1),
        "dense": {},
    }[kind])
    config = Gemma4TextConfig(**{**values, **overrides})
    config.architectures = ["Gemma4ForCausalLM"]
    return config


def gemma4_unified_config(multimodal: bool = False):
    """Tiny Gemma 4 12B "unified" (images and audio embedded into the transformer itself): the language model as the
    12B's, keys = values on full-attention layers with one global key/value head, no PLE, no KV sharing. With
    `multimodal`, the whole `Gemma4UnifiedConfig` (small embedders) as a checkpoint stores it."""
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedTextConfig

    text = Gemma4UnifiedTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1, attention_k_eq_v=True,
        sliding_window=16, max_position_embeddings=512, layer_types=["sliding_attention", "full_attention"] * 2,
        final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.1,
    )
    if not multimodal:
        text.architectures = ["Gemma4UnifiedForCausalLM"]
        return text
    config = Gemma4UnifiedConfig(text_config=text.to_dict(), vision_config={"mm_embed_dim": 32, "output_proj_dims": 32,
                                                                           "mm_posemb_size": 16},
                                 audio_config={"audio_embed_dim": 32}, image_token_id=265, audio_token_id=266,
                                 boi_token_id=267, eoi_token_id=268, boa_token_id=269, eoa_token_index=270,
                                 video_token_id=264)
    config.architectures = ["Gemma4UnifiedForConditionalGeneration"]
    return config


def gemma4_multimodal_config(vision: bool = True, audio: bool = True):
    """E4B's layout, tiny: the E-style text model with a 1-layer vision encoder (4x4 patches of 4 pixels, pooled 2x2)
    and a 1-layer audio conformer (8 mel bins here), both with clipped linears (clamps from the checkpoint)."""
    from transformers import Gemma4Config

    vision_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=2,
                         position_embedding_size=64, use_clipped_linears=True)
    audio_config = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
                        output_proj_dims=32, use_clipped_linears=True)
    config = Gemma4Config(text_config=gemma4_config("e").to_dict(), vision_config=vision_config if vision else None,
                          audio_config=audio_config if audio else None, image_token_id=265, audio_token_id=266,
                          boi_token_id=267, eoi_token_id=268, boa_token_id=269, eoa_token_index=270,
                          video_token_id=271, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config.architectures = ["Gemma4ForConditionalGeneration"]
    return config


# Gemma 4's media tokens, named as its chat tokens are (`<|turn>` / `<turn|>`): begin/end markers and a soft token per
# kind. Ids 265-270 in the order of gemma4_multimodal_config's token ids; the processor adds `<|video|>` as 271.
GEMMA4_MEDIA_TOKENS = {"image_token": "<|image|>", "audio_token": "<|audio|>", "boi_token": "<|image>",
                       "eoi_token": "<image|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}
GEMMA4_MEL_BINS = 8  # the tiny conformer's subsampling_conv_channels[0]: the real 128 mel bins shrunk with it


def needs_gemma4_processor():
    """Gemma4Processor cannot be built without torchvision: it takes a video processor, and without torchvision
    transformers' video-processor mapping is a stub that fails the processor's type check. PyPI's torchvision does
    not import beside the CPU torch of the main environment, so these tests run in CI's multimodal environment."""
    _needs_multimodal_imports(("torchvision",), "a torchvision that imports beside this torch")


def make_gemma4_processor(folder: Path):
    """Gemma4Processor for the tiny multimodal Gemma 4 (4-pixel patches pooled 2x2, 8 mel bins) around the Gemma 4
    tokenizer with the media tokens, saved in `folder` as AutoProcessor reads it from a real checkpoint. A 64x64
    image gets 64 soft tokens (the smallest budget the image processor takes, 70, holds 16x16 patches pooled 2x2)."""
    from transformers import (
        AutoTokenizer,
        Gemma4AudioFeatureExtractor,
        Gemma4ImageProcessorPil,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    tok = make_gemma4_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(GEMMA4_MEDIA_TOKENS.values())},
                           replace_extra_special_tokens=False)
    tok.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder, **GEMMA4_MEDIA_TOKENS)
    assert [tok.convert_tokens_to_ids(t) for t in GEMMA4_MEDIA_TOKENS.values()] == list(range(265, 271))
    vision = dict(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)
    processor = Gemma4Processor(Gemma4AudioFeatureExtractor(feature_size=GEMMA4_MEL_BINS),
                                Gemma4ImageProcessorPil(**vision), tok, Gemma4VideoProcessor(**vision),
                                chat_template=tok.chat_template)
    processor.save_pretrained(folder)
    return processor


def save_tiny(config, folder: Path, seed: int = 0, tokenizer=None) -> Path:
    import transformers

    torch.manual_seed(seed)
    model_class = getattr(transformers, config.architectures[0]) if config.architectures else None
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    model = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    model.generation_config.eos_token_id = [1, 5]
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    (tokenizer or make_tokenizer()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    return save_tiny(gemma3_config(), tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_gemma3n(tmp_path_factory) -> Path:
    return save_tiny(gemma3n_config(), tmp_path_factory.mktemp("tiny-gemma3n"))


@pytest.fixture(scope="session")
def tiny_gemma4(tmp_path_factory) -> Path:
    """E-style tiny Gemma 4 (PLE, KV sharing) with a tokenizer that has Gemma 4's chat and thinking tokens."""
    return save_tiny(gemma4_config("e"), tmp_path_factory.mktemp("tiny-gemma4"), tokenizer=make_gemma4_tokenizer())


@pytest.fixture(scope="session")
def tiny_gemma4_unified(tmp_path_factory) -> Path:
    return save_tiny(gemma4_unified_config(), tmp_path_factory.mktemp("tiny-gemma4-unified"),
                     tokenizer=make_gemma4_tokenizer())


@pytest.fixture(scope="session")
def tiny_gemma4_moe(tmp_path_factory) -> Path:
    return save_tiny(gemma4_config("moe"), tmp_path_factory.mktemp("tiny-gemma4-moe"),
                     tokenizer=make_gemma4_tokenizer())


@pytest.fixture(scope="session")
def tiny_gemma3_4bit(tmp_path_factory) -> Path:
    return save_tiny(gemma3_4bit_config(), tmp_path_factory.mktemp("tiny-gemma3-4bit"))


@pytest.fixture(scope="session")
def tiny_gemma3_multimodal(tmp_path_factory) -> Path:
    config = gemma3_multimodal_config()
    config.architectures = ["Gemma3ForConditionalGeneration"]
    return save_tiny(config, tmp_path_factory.mktemp("tiny-gemma3-multimodal"))


@pytest.fixture(scope="session")
def tiny_gemma3n_4bit(tmp_path_factory) -> Path:
    return save_tiny(gemma3n_4bit_config(), tmp_path_factory.mktemp("tiny-gemma3n-4bit"))


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


ALPACA_ROWS = [
    {"instruction": "Route the ticket.", "input": f"My parcel {i} is late", "output": f"team: shipping {i % 3}"}
    for i in range(24)
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)


def tiny_config(model_dir: Path, train_file: Path, out: Path, **train_overrides):
    """A Config for a fast CPU run on a tiny model: fp32, no warmup, a few steps."""
    from gemmatune.config import load_config

    overrides = [
        f"model.name={model_dir}", f"data.train_file={train_file}", "data.max_length=128", "data.template=chat",
        f"train.output_dir={out}", "train.run_name=run", "train.precision=fp32", "train.warmup_steps=0",
        "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=1", "train.learning_rate=5e-3",
        "train.logging_steps=1", "train.save_steps=1000", "lora.lora_dropout=0.0", "train.num_threads=2",
    ]
    overrides += [f"train.{k}={v}" for k, v in train_overrides.items()]
    return load_config(None, overrides)


def record_lm_head_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of the logits of every LM-head call the chunked loss makes, whichever way it calls the head
    (one matmul into a reused buffer for a plain Linear, the module itself otherwise)."""
    import gemmatune.models.loss as loss_module

    calls: list[tuple[int, ...]] = []
    original = loss_module._head_matmul

    def recording(head, hidden):
        logits_of, dtype = original(head, hidden)

        def logits(h, out=None):
            result = logits_of(h, out)
            calls.append(tuple(result.shape))
            return result

        return logits, dtype

    monkeypatch.setattr(loss_module, "_head_matmul", recording)
    return calls


def make_adapter(base_dir: Path, out: Path, seed: int, r: int = 4, targets=("q_proj", "v_proj", "down_proj")) -> Path:
    """A random-initialised PEFT adapter on `base_dir`, saved as a plain PEFT folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # init_lora_weights=False: B is random too, so the adapter really changes the output.
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def two_adapters(tiny_gemma3, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return (make_adapter(tiny_gemma3, root / "a", seed=1),
            make_adapter(tiny_gemma3, root / "b", seed=2, r=2, targets=("k_proj", "o_proj", "up_proj")))


# --- a tiny multimodal Gemma 3n (text + audio tower + timm vision tower) and its processor
MEDIA_TOKENS = {"boi_token": "<start_of_image>", "boa_token": "<start_of_audio>", "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>", "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>"}
# Ids 262..267 in the order added. As in the real vocabulary, the begin markers are ordinary text ids and the
# vision (end-of-image, image) and audio (end-of-audio, audio, ...) ids start the embedders' ranges.
BOI, BOA, EOI, IMAGE, EOA, AUDIO = range(262, 268)
TINY_IMAGE_SIZE = 64  # the vision tower maps 64x64 to 4x4 = 16 soft tokens
TINY_IMAGE_TOKENS = 16
TINY_AUDIO_TOKENS = 8  # a clip of up to ~1.2 s (100 frames a second, reduced 4 x 4 by the audio tower)


def needs_multimodal():
    """The tiny multimodal model needs timm, which needs a torchvision built for this torch. CI runs the
    `multimodal` tests in a second environment that has them and sets GEMMATUNE_MULTIMODAL_CI=1 for the main one,
    which then skips them instead of failing (.ci/run fails the run when the second environment's tests fail)."""
    _needs_multimodal_imports(("timm", "torchvision"), "timm and a torchvision that imports beside this torch")


def _needs_multimodal_imports(modules: tuple[str, ...], what: str) -> None:
    try:
        for module in modules:
            importlib.import_module(module)
        ok = True
    except Exception:
        ok = False
    if not ok and os.environ.get("GEMMATUNE_MULTIMODAL_CI") == "1":
        pytest.skip("runs in the multimodal environment of .ci/run")
    require(ok, f"{what} (pip install 'gemmatune[multimodal]')")


def gemma3n_multimodal_config():
    """Gemma 3n's full layout, tiny: the 10-layer text model above; an audio conformer of 2 layers; the real timm
    MobileNetV5 encoder (every block of it) at 1/16 of its channels, fusing to 4x4 instead of 16x16."""
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nVisionConfig

    text = gemma3n_config(vocab_size_per_layer_input=EOI)
    vision = Gemma3nVisionConfig(vocab_size=AUDIO - EOI - 1, vocab_offset=EOI,
                                 model_args={"channel_multiplier": 0.0625, "msfa_output_resolution": 4})
    audio = Gemma3nAudioConfig(vocab_size=VOCAB - EOA, vocab_offset=EOA, hidden_size=32, conf_num_attention_heads=2,
                               conf_num_hidden_layers=2, sscp_conv_channel_size=(8, 4))
    config = Gemma3nConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), audio_config=audio.to_dict(),
                           audio_soft_tokens_per_image=TINY_AUDIO_TOKENS,
                           vision_soft_tokens_per_image=TINY_IMAGE_TOKENS,
                           boi_token_id=BOI, eoi_token_id=EOI, image_token_id=IMAGE, boa_token_id=BOA,
                           eoa_token_id=EOA, audio_token_id=AUDIO, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config.architectures = ["Gemma3nForConditionalGeneration"]
    return config


def make_multimodal_processor(folder: Path):
    """Gemma3nProcessor around the byte tokenizer (with the six media tokens) for the tiny model, saved in
    `folder`: the same files AutoProcessor reads from a real checkpoint."""
    from transformers import AutoTokenizer, Gemma3nAudioFeatureExtractor, Gemma3nProcessor, SiglipImageProcessor

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(MEDIA_TOKENS.values())},
                           replace_extra_special_tokens=False)
    tok.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder, **MEDIA_TOKENS)  # named: tok.image_token, tok.image_token_id...
    assert [tok.convert_tokens_to_ids(MEDIA_TOKENS[k]) for k in MEDIA_TOKENS] == [BOI, BOA, EOI, IMAGE, EOA, AUDIO]
    image_processor = SiglipImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Gemma3nProcessor(Gemma3nAudioFeatureExtractor(), image_processor, tok, chat_template=CHAT_TEMPLATE,
                                 audio_seq_length=TINY_AUDIO_TOKENS, image_seq_length=TINY_IMAGE_TOKENS)
    processor.save_pretrained(folder)
    return processor


@pytest.fixture(scope="session")
def tiny_gemma3n_multimodal(tmp_path_factory) -> Path:
    needs_multimodal()
    import transformers

    folder = tmp_path_factory.mktemp("tiny-gemma3n-multimodal")
    torch.manual_seed(0)
    model = transformers.Gemma3nForConditionalGeneration(gemma3n_multimodal_config())
    model.generation_config.eos_token_id = [1, 5]
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    make_multimodal_processor(folder)
    return folder


def media_rows(folder: Path, n: int = 8) -> list[dict]:
    """`n` chat rows, alternately with an image and with an audio clip (files written into `folder`, paths relative
    to it); each reply names the picture's colour or the tone's pitch, so a model must see or hear to learn it."""
    import numpy as np
    from PIL import Image

    from gemmatune.data.media import SAMPLE_RATE, write_wav

    rows = []
    for i in range(n):
        if i % 2 == 0:
            colour = ("red", "blue")[i // 2 % 2]
            pixels = np.zeros((TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), dtype=np.uint8)
            pixels[..., 0 if colour == "red" else 2] = 200 + i
            Image.fromarray(pixels).save(folder / f"img{i}.png")
            part, answer = {"type": "image", "path": f"img{i}.png"}, colour
        else:
            pitch = ("low", "high")[i // 2 % 2]
            t = np.arange(int(SAMPLE_RATE * (0.5 + 0.1 * (i % 3)))) / SAMPLE_RATE
            write_wav(folder / f"tone{i}.wav", 0.5 * np.sin(2 * np.pi * (220 if pitch == "low" else 1760) * t))
            part, answer = {"type": "audio", "path": f"tone{i}.wav"}, pitch
        rows.append({"messages": [
            {"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": f"It is {answer}."},
        ]})
    return rows

"""Tiny random Gemma 3 / Gemma 3n text models and a byte-level tokenizer, built from configs here.

Saved as ordinary Hugging Face folders, so tests exercise the same loading path as a user's local model.
"""

from __future__ import annotations

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


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
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
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


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


def save_tiny(config, folder: Path, seed: int = 0) -> Path:
    import transformers

    torch.manual_seed(seed)
    model_class = getattr(transformers, config.architectures[0]) if config.architectures else None
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    model = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    model.generation_config.eos_token_id = [1, 5]
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    return save_tiny(gemma3_config(), tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_gemma3n(tmp_path_factory) -> Path:
    return save_tiny(gemma3n_config(), tmp_path_factory.mktemp("tiny-gemma3n"))


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

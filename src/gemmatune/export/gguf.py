"""`gemmatune export RUN --format gguf|gguf-lora|gguf-base`: a run as a GGUF file for llama.cpp, Ollama and LM Studio.

`gguf`: the adapter is merged into a 16-bit (or fp32) copy of the base by `gemmatune.export.merge.merge` (never into
4-bit weights), then `gguf_model` writes it (f32/f16/bf16/q8_0) with PyPI's `gguf` package; k-quants go through
llama.cpp's own quantizer (`llama_model_quantize` in `llama-cpp-python`, the `gguf` extra) from a bf16 GGUF.
`gguf-lora`: the adapter alone (`gguf_lora`), for `llama-server -m BASE --lora FILE`. `gguf-base`: the base alone,
the file such a LoRA applies to.

Every file is written under a temporary name beside the output and renamed at the end: a failure (bad input, a
full disk) leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from gemmatune.errors import GemmatuneError
from gemmatune.export.gguf_model import check_family_exports, gguf_family, text_config, write_model_gguf
from gemmatune.export.gguf_tensors import TYPES
from gemmatune.infer.load import adapter_source
from gemmatune.models import ModelFamily
from gemmatune.runs.files import is_out_of_space, ordinary_modes
from gemmatune.runs.folder import read_merged_info

log = logging.getLogger(__name__)

GGUF_WRITER = f"gemmatune's GGUF writer, gguf {version('gguf')}"
FORMATS = ("gguf", "gguf-lora", "gguf-base")
# Types gemmatune writes itself.
WRITER_TYPES = tuple(TYPES)
# K-quants: llama.cpp's quantizer, from a bf16 GGUF. Values: llama.cpp's llama_ftype names.
K_QUANTS = {
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
QUANTS = (*WRITER_TYPES, *K_QUANTS)
LORA_TYPES = WRITER_TYPES


@dataclass
class GgufExport:
    path: Path
    quant: str
    template: str  # the template the run was trained with, now the GGUF's chat template
    stop_tokens: list[str]
    modelfile: Path | None = None


def export(fmt: str, adapter: str | Path, out: str | Path, quant: str = "f16", base: str | None = None,
           ollama: bool = False, overwrite: bool = False) -> GgufExport:
    """`gemmatune export`: the run as a GGUF (`fmt` gguf), its adapter alone (gguf-lora) or its base model alone
    (gguf-base)."""
    check_format(fmt)
    if ollama and fmt != "gguf":
        raise GemmatuneError("--ollama goes with --format gguf (a Modelfile for the merged model)")
    if fmt == "gguf-lora":
        return export_gguf_lora(adapter, out, quant, base=base, overwrite=overwrite)
    if fmt == "gguf-base":
        base_name, template = run_base(adapter, base)
        return base_gguf(base_name, out, quant, template=template, overwrite=overwrite)
    return export_gguf(adapter, out, quant, base=base, ollama=ollama, overwrite=overwrite)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise GemmatuneError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")


def check_request(fmt: str, quant: str, out: Path, overwrite: bool) -> None:
    """Refuse bad options before any model is loaded."""
    check_format(fmt)
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
    from gemmatune.export.merge import merge

    out = Path(out)
    check_request("gguf", quant, out, overwrite)
    if ollama and out.with_name("Modelfile").exists() and not overwrite:
        raise GemmatuneError(f"{out.with_name('Modelfile')} already exists; choose another --out folder or add "
                             "--overwrite")
    if ollama and (out.with_name("Modelfile").exists() or out.with_name("Modelfile").is_symlink()):
        _check_replaceable_file(out.with_name("Modelfile"), b"FROM ", "an Ollama Modelfile")
    source = adapter_source(adapter)  # a folder that is not a run fails here, before a model is loaded
    check_family_exports(source.folder.family)  # and a family GGUF export does not write, before the merge
    out.parent.mkdir(parents=True, exist_ok=True)
    modelfile = out.with_name("Modelfile") if ollama else None
    with _space_errors(out), tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        merged = merge(source, Path(tmp) / "merged", base=base)
        template = read_merged_info(merged).template
        jinja, stop_tokens, family = _chat_format(merged, template)
        modelfile_text = ollama_modelfile(out, template, stop_tokens, family) if modelfile is not None else ""
        result = _convert(merged, Path(tmp), quant, jinja, source.name)
        if modelfile is not None:
            modelfile_tmp = Path(tmp) / "Modelfile"
            modelfile_tmp.write_text(modelfile_text, encoding="utf-8")
        _publish(result, out)
        if modelfile is not None:
            _publish(modelfile_tmp, modelfile)
    log.info("wrote %s (%s, %s, template %s)", out, quant, GGUF_WRITER, template)
    return GgufExport(out, quant, template, stop_tokens, modelfile)


def export_gguf_lora(adapter: str | Path, out: str | Path, quant: str = "f16", base: str | None = None,
                     overwrite: bool = False) -> GgufExport:
    """The adapter alone as a GGUF LoRA (`gguf_lora`), for `llama-server --lora`.

    The base GGUF it applies to must hold the same base weights: export the base with `base_gguf`, or use a GGUF
    converted from the same checkpoint."""
    out = Path(out)
    check_request("gguf-lora", quant, out, overwrite)
    from gemmatune.export.gguf_lora import write_lora_gguf

    source = adapter_source(adapter)
    check_family_exports(source.folder.family)
    base_dir = _local_base_folder(base or source.folder.base.name)
    gguf_family(text_config(base_dir)[0].model_type)
    template = source.folder.template or "chat"
    out.parent.mkdir(parents=True, exist_ok=True)
    with _space_errors(out), tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        result = Path(tmp) / "adapter.gguf"
        write_lora_gguf(Path(source.path), base_dir, result, quant, name=source.name)
        _publish(result, out)
    return GgufExport(out, quant, template, [])


def base_gguf(base: str, out: str | Path, quant: str = "f16", template: str = "chat",
              overwrite: bool = False) -> GgufExport:
    """The base model alone as a GGUF (the file a GGUF LoRA is applied to), tokenizer prepared as for `export_gguf`."""
    out = Path(out)
    check_request("gguf-base", quant, out, overwrite)
    base_dir = _local_base_folder(base)
    gguf_family(text_config(base_dir)[0].model_type)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _space_errors(out), tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        jinja, stop_tokens, _ = _chat_format(base_dir, template)
        _publish(_convert(base_dir, Path(tmp), quant, jinja, Path(base).name), out)
    return GgufExport(out, quant, template, stop_tokens)


def _convert(folder: Path, tmp: Path, quant: str, jinja: str, name: str) -> Path:
    """The model folder as a GGUF of type `quant` in `tmp`: written in that type, or (a k-quant) written in bf16 and
    quantized by llama.cpp."""
    direct = quant if quant in WRITER_TYPES else "bf16"
    converted = tmp / f"model-{direct}.gguf"
    write_model_gguf(folder, converted, direct, jinja, name=name)
    if quant not in K_QUANTS:
        return converted
    quantized = tmp / f"model-{quant}.gguf"
    _quantize(converted, quantized, quant)
    return quantized


def _publish(written: Path, out: Path) -> None:
    """A finished file into place, with the modes the umask means (a temp file's 0600 would stay)."""
    ordinary_modes(written)
    os.replace(written, out)


def run_base(adapter: str | Path, base: str | None = None) -> tuple[str, str]:
    """The base model a run was trained on (or `base`) and the run's template."""
    source = adapter_source(adapter)
    return base or source.folder.base.name, source.folder.template or "chat"


def _local_base_folder(name: str) -> Path:
    """The base model as a local Hugging Face folder (the LoRA writer reads its config)."""
    from gemmatune.config import ModelConfig
    from gemmatune.models.loading import embedded_model_dir, resolve_source

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


def _chat_format(folder: Path, template: str) -> tuple[str, list[str], ModelFamily]:
    """The training template as a Jinja chat template for the GGUF, its stop tokens (as text), and the family (one
    line naming the families a GGUF export writes, for any other)."""
    from transformers import AutoTokenizer

    from gemmatune.data.templates import gguf_chat_template

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    family = gguf_family(config.get("model_type", ""))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stops = [tokenizer.eos_token]
    if template == "chat":
        stops += [t for t in family.stop_tokens if t not in stops]
    return gguf_chat_template(template, tokenizer), stops, family


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
        if is_out_of_space(exc):
            raise GemmatuneError(f"cannot write {self.out}: the disk is full; nothing was written") from None
        if isinstance(exc, OSError):
            raise GemmatuneError(f"cannot write {self.out}: {exc.strerror or exc}; nothing was written") from None
        return False


def ollama_modelfile(gguf: Path, template: str, stop_tokens: list[str], family: ModelFamily) -> str:
    """An Ollama Modelfile for the GGUF: its prompt format is the training template, its stops the run's."""
    from gemmatune.data.templates import ollama_template

    lines = [f"FROM ./{gguf.name}", f'TEMPLATE """{ollama_template(template, family.ollama_chat_template)}"""']
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stop_tokens]
    return "\n".join(lines) + "\n"

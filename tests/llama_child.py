"""llama.cpp (llama-cpp-python) in a child process, for the GGUF tests.

A crash inside llama.cpp (ggml's AMX kernels segfaulted on q8_0 models in a native build of 0.3.36) kills the
process it runs in; here that is a child, so it fails the one test that asked, with the signal named, and the
suite goes on. `call(name, **kwargs)` runs `name` below in `python -m tests.llama_child` and returns its JSON.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULT = "llama-child-result: "


def call(name: str, timeout: float = 600, **kwargs):
    """Run `name(**kwargs)` in a child process; a crash or error there fails the calling test (one line)."""
    proc = subprocess.run([sys.executable, "-m", "tests.llama_child", name], input=json.dumps(kwargs), text=True,
                          capture_output=True, timeout=timeout, cwd=ROOT)
    if proc.returncode < 0:
        pytest.fail(f"llama.cpp crashed in {name} ({signal.Signals(-proc.returncode).name}); stderr: "
                    f"{proc.stderr[-1500:]}", pytrace=False)
    results = [line[len(RESULT):] for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not results:
        pytest.fail(f"llama.cpp child {name} exited {proc.returncode}: {proc.stderr[-3000:]}", pytrace=False)
    return json.loads(results[-1])


# --- what the child runs -------------------------------------------------------------------------------------

def _llama(gguf: str, lora: str | None = None, vocab_only: bool = False):
    import llama_cpp

    return llama_cpp.Llama(model_path=gguf, n_ctx=256, n_batch=256, n_threads=2, verbose=False, lora_path=lora,
                           vocab_only=vocab_only)


def greedy(gguf: str, prompts: list[list[int]], max_new_tokens: int, lora: str | None = None):
    """Greedy tokens per prompt, stopping where llama.cpp's vocabulary says end-of-generation:
    [[tokens, stopped, stop token or None], ...]."""
    import llama_cpp

    llm = _llama(gguf, lora)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out = []
    for prompt in prompts:
        tokens, stopped, stop = [], False, None
        for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                stopped, stop = True, token
                break
            tokens.append(token)
            if len(tokens) >= max_new_tokens:
                break
        out.append([tokens, stopped, stop])
    return out


def end_of_generation(gguf: str, n_vocab: int, whole_model: bool = False) -> list[int]:
    """The token ids llama.cpp ends generation on (vocabulary only, unless `whole_model`)."""
    import llama_cpp

    llm = _llama(gguf, vocab_only=not whole_model)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]


def tokenize(gguf: str, texts: list[str], ids: list[list[int]] | None = None, whole_model: bool = False):
    """llama.cpp's tokens of each text (special tokens parsed, no BOS) and its text of each id list."""
    llm = _llama(gguf, vocab_only=not whole_model)
    tokens = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
    detok = [llm.detokenize(i, special=True).decode() for i in (ids or [])]
    return {"tokens": tokens, "texts": detok}


def system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode()


def segfault() -> None:
    """Dies as a crash in native code does (the runner's own test)."""
    import ctypes

    ctypes.string_at(0)


if __name__ == "__main__":
    kwargs = json.loads(sys.stdin.read() or "{}")
    result = globals()[sys.argv[1]](**kwargs)
    print(RESULT + json.dumps(result), flush=True)

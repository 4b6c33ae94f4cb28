#!/usr/bin/env bash
# Installs llama-cpp-python (llama.cpp's runtime and quantizer, for `gemmatune export` and the GGUF tests) into the
# active Python environment, built so that it runs on any x86-64 CPU with AVX2 (2013 on), AMX left out.
#
# PyPI has llama-cpp-python only as a source distribution, and its default build is native (-march=native): on an
# Intel CPU with AMX that compiles in ggml's AMX backend, which crashed (SIGSEGV in ggml_backend_amx_mul_mat, at
# `ldtilecfg`) on q8_0 models in llama-cpp-python 0.3.36. GGML_NATIVE=OFF builds the generic x86-64 set instead:
# SSE3..AVX2, FMA, F16C, BMI2; no AVX512, no AMX (llama_print_system_info() lists what was built in).
#
#   bash tools/install_llama_cpp.sh                 # portable build (what CI tests)
#   LLAMA_NATIVE=1 bash tools/install_llama_cpp.sh  # your choice: tuned to this CPU (AVX512, and AMX where present)
#
# pip's own wheel cache would hand back a wheel built with other flags (its key ignores CMAKE_ARGS), so the wheel is
# built with --no-cache-dir into a folder of our own named after the version and the flags, and reused from there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
lock="$root/requirements-lock.txt"
version=$(sed -n 's/^llama-cpp-python==//p' "$lock")
flags="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
if [ "${LLAMA_NATIVE:-0}" = 1 ]; then
    flags="$flags -DGGML_NATIVE=ON"
    kind=native-$(uname -n)
else
    flags="$flags -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    kind=portable
fi
key=$(printf '%s' "$version $flags" | sha256sum | cut -c1-16)
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/gemmatune/llama-cpp-wheels/$version-$kind-$key"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $version ($kind; about 6 minutes on 2 cores) into $wheels" >&2
    tmp="$wheels.tmp.$$"
    rm -rf "$tmp" && mkdir -p "$tmp"
    CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$tmp" "llama-cpp-python==$version"
    rm -rf "$wheels" && mv "$tmp" "$wheels"
fi
pip install -q --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
pip install -q -c "$lock" "llama-cpp-python==$version"  # its pure-Python dependencies, at the locked versions

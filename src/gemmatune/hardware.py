"""What the machine can do (device, native bf16, usable cores) and the one precision policy that follows.

The policy is the same on CPU and CUDA: compute in bf16 under autocast where the hardware has bf16 and runs it
at least about as fast as fp32 (on a CPU that is measured, not read from the flags; fp32 elsewhere), frozen
base weights stored in the compute dtype for training, LoRA weights and optimizer state in fp32, and PEFT's
per-layer input casts off whenever autocast runs (it casts for each matmul anyway). Inference (generation,
evaluation, serving) keeps the base weights in the dtype training stores them in, on CPU as on CUDA.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch

from gemmatune.errors import GemmatuneError

log = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matmul instructions (AVX512_BF16 or AMX), where bf16 is ~2x fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# bf16 is chosen on a CPU only where its matmuls are at least as fast as fp32 ones (AMD Zen 4: 2.2x). Intel Xeons
# with AVX512_BF16 but no AMX run them at 0.5x when quiet, and near 0.9x while another process shares the cores.
BF16_MIN_SPEED_RATIO = 1.0


def matmul_gflops(dtypes: tuple[torch.dtype, ...], size: int = 1024, rounds: int = 5) -> list[float]:
    """Measured CPU matmul speed per dtype on this process's threads: the best of `rounds` size^3 products,
    the dtypes taking turns so that a load from another process slows them alike rather than one of them."""
    pairs = [(torch.randn(size, size).to(d), torch.randn(size, size).to(d)) for d in dtypes]
    for a, b in pairs:
        a @ b  # the first call builds the kernel (oneDNN JIT for bf16)
    best = [float("inf")] * len(dtypes)
    for _ in range(rounds):
        for i, (a, b) in enumerate(pairs):
            start = time.perf_counter()
            a @ b
            best[i] = min(best[i], time.perf_counter() - start)
    return [2 * size**3 / t / 1e9 for t in best]


@functools.cache
def cpu_bf16_speed() -> tuple[float, float]:
    """(bf16, fp32) matmul GFLOP/s measured on this CPU, once per process (~0.15 s)."""
    bf16, fp32 = matmul_gflops((torch.bfloat16, torch.float32))
    return bf16, fp32


def choose_cpu_precision(has_bf16: bool, bf16_gflops: float, fp32_gflops: float) -> str:
    """bf16 on a CPU with bf16 instructions whose bf16 matmuls are at least as fast as fp32 ones, else fp32.

    The instruction flags alone do not say it: an AMD Zen 4 runs bf16 at 2.2x fp32, an Intel Xeon with
    AVX512_BF16 but no AMX (or AMX hidden by a VM) at 0.5x.
    """
    return "bf16" if has_bf16 and bf16_gflops >= BF16_MIN_SPEED_RATIO * fp32_gflops else "fp32"


def cpu_auto_precision() -> str:
    """`auto` on this CPU, measured; logged once with the figures behind it."""
    if not cpu_has_native_bf16():
        return "fp32"
    bf16, fp32 = cpu_bf16_speed()
    chosen = choose_cpu_precision(True, bf16, fp32)
    _log_choice(chosen, bf16, fp32)
    return chosen


@functools.cache
def _log_choice(chosen: str, bf16: float, fp32: float) -> None:
    log.info("precision auto -> %s: this CPU's matmuls run %.0f GFLOP/s in bf16, %.0f in fp32 (measured)%s",
             chosen, bf16, fp32, "" if chosen == "bf16" else "; train.precision=bf16 uses ~35% less memory, slower")


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(requested: str, fp16_safe: bool = True) -> str:
    """Turn `auto|bf16|fp16|fp32` into what will run here, refusing what cannot work."""
    kind = device_kind()
    if requested == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return cpu_auto_precision()
    if requested == "fp16":
        if kind != "cuda":
            raise GemmatuneError("config key train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        if not fp16_safe:
            raise GemmatuneError(
                "config key train.precision: fp16 overflows in this model family (activations pass 65,504); "
                "use bf16 (or fp32 on GPUs without bf16)"
            )
    if requested == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise GemmatuneError("config key train.precision: this GPU has no bf16; use fp32")
    return requested


def usable_cores() -> int:
    """Cores this process may run on (affinity / cgroup-aware where the OS tells us)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def set_threads(requested: int | None) -> int:
    """Set torch's intra-op threads; more threads than cores is 2-10x slower on small machines."""
    n = requested or usable_cores()
    torch.set_num_threads(n)
    return n


# On a CPU torch runs matmuls through oneDNN, which builds (JIT-compiles) a kernel for each matrix shape and keeps
# it in a cache. A packed batch is one row whose length changes every step, so nearly every step built its kernels
# anew: on a 2-core Xeon with AMX a bf16 [T, 640] x [640, 2048] product runs at ~500 GFLOP/s with a new kernel,
# ~2,300 with a cached one. Rows filled to a coarser grid of lengths meet their kernels again: a step of 1/16 of
# the length's power of two costs at most 1/16 more tokens (under 3% on average).
PACKED_ROW_MIN_STEP = 16


def packed_row_length(length: int, device: str) -> int:
    """The length a packed row of `length` tokens is filled to on `device`: on a CPU the next multiple of 1/16 of
    its power of two (of 16 at least: 276 -> 288, 1,100 -> 1,152); elsewhere `length` (a GPU builds no kernel per
    shape)."""
    if device != "cpu":
        return length
    step = max(PACKED_ROW_MIN_STEP, 1 << max(0, length.bit_length() - 5))
    return -(-length // step) * step


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for training and inference alike, on any device; None: plain fp32."""
    return DTYPES[precision] if precision in ("bf16", "fp16") else None


def weight_dtype(precision: str, device: str | None = None) -> torch.dtype:
    """The dtype frozen base weights are stored in at `precision`, for training and inference, CPU and CUDA alike.

    Under bf16 autocast every matmul reads them as bf16 anyway, so storing them in bf16 halves their memory
    (270M on CPU: 4.3 -> 3.2 GiB peak) at the same speed or better. fp16 weights only where fp16 runs (CUDA).
    Inference included: with fp32 weights, autocast casts every weight again at every decode step (on a 2-core
    Xeon, 43% of a step went to casting Gemma's 262k x 640 LM head; generation 2.5x slower than from bf16
    weights). On a CPU bf16 weights need contiguous linear inputs (infer.model.contiguous_linear_inputs).
    """
    if precision == "bf16" or (precision == "fp16" and (device or device_kind()) == "cuda"):
        return DTYPES[precision]
    return torch.float32

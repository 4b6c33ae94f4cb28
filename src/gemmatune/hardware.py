"""What the machine can do: device, native bf16, usable cores; and the precision that follows."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gemmatune.errors import GemmatuneError


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matmul instructions (AVX512_BF16 or AMX), where bf16 is ~2x fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(requested: str, fp16_safe: bool = True) -> str:
    """Turn `auto|bf16|fp16|fp32` into what will run here, refusing what cannot work."""
    kind = device_kind()
    if requested == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_native_bf16() else "fp32"
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

"""Packed attention on this machine: sdpa once per example against the grouped, padded path (kernels/attention.py),
forward + backward of one layer's attention with the embedded Gemma 3 270M's shapes (4 query heads, 1 KV head,
head dim 256, bf16, sliding window 512), for several packed rows; medians, ratios and the groups chosen.

    python benchmarks/packed_attention.py            # ~1 min here

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

from gemmatune.hardware import usable_cores  # noqa: E402
from gemmatune.kernels import attention  # noqa: E402
from gemmatune.models.packing import packed_sdpa_attention  # noqa: E402

HEADS, KV_HEADS, DIM = 4, 1, 256
ROWS = {"8 x 40-90 (quick start)": [90, 60, 45, 70, 80, 40, 55, 65], "4 x 150-300": [300, 250, 200, 150],
        "one long, three short": [500, 120, 100, 80], "4 mixed": [450, 400, 150, 60], "4 x 512": [512] * 4}


def milliseconds(lengths: list[int], padded: bool, repeats: int = 9) -> float:
    """Median forward + backward time with the padded path on or off (off: every group goes to sdpa)."""
    attention.PADDED_WEIGHTS = 1 << 22 if padded else 0
    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True, training=True)
    total = sum(lengths)
    q, k, v = (torch.randn(1, h, total, DIM, dtype=torch.bfloat16, requires_grad=True)
               for h in (HEADS, KV_HEADS, KV_HEADS))
    grad = torch.randn(1, total, HEADS, DIM, dtype=torch.bfloat16)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        out, _ = packed_sdpa_attention(module, q, k, v, None, position_ids=positions, sliding_window=512,
                                       scaling=DIM**-0.5, dropout=0.0)
        out.backward(grad)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(usable_cores())
    cap = attention.PADDED_WEIGHTS
    result = {}
    for name, lengths in ROWS.items():
        groups = attention.attention_groups(lengths, HEADS)
        sdpa, grouped = milliseconds(lengths, False), milliseconds(lengths, True)
        result[name] = {"lengths": lengths, "sdpa_ms": round(sdpa, 2), "grouped_ms": round(grouped, 2),
                        "speedup": round(sdpa / grouped, 2), "groups": groups}
        print(f"{name:26s} sdpa per example {sdpa:7.2f} ms   grouped {grouped:7.2f} ms   {sdpa / grouped:.2f}x   "
              f"groups {groups}", flush=True)
    attention.PADDED_WEIGHTS = cap
    print(json.dumps(result))


if __name__ == "__main__":
    main()

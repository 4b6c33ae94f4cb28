"""LoRA dropout: PEFT's nn.Dropout against gemmatune's LoraDropout (train/lora_dropout.py), forward + backward, on the
LoRA inputs of one decoder layer of the embedded Gemma 3 270M (hidden 640, MLP 2048; q/k/v/gate/up read a
tokens x 640 tensor, o reads tokens x 1024, down tokens x 2048), side by side in one process, alternating, medians.

    python benchmarks/lora_dropout.py [--tokens 2048] [--p 0.1] [--rounds 9] [--threads N]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (input width, how many of the 7 projections read an input of that width) in one Gemma 3 270M layer
LAYER_INPUTS = ((640, 5), (1024, 1), (2048, 1))


def layer_seconds(dropout, tokens: int, dtype) -> float:
    """Forward + backward of the layer's 7 LoRA dropouts (each on its own input, as PEFT applies them)."""
    import torch

    inputs = [torch.randn(tokens, width, dtype=dtype, requires_grad=True) for width, n in LAYER_INPUTS
              for _ in range(n)]
    start = time.perf_counter()
    outs = [dropout(x) for x in inputs]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per batch (default 4 x 512)")
    parser.add_argument("--p", type=float, default=0.1, help="dropout rate (default: the config's 0.1)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from gemmatune.hardware import usable_cores
    from gemmatune.train.lora_dropout import LoraDropout

    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    result = {"tokens": args.tokens, "p": args.p, "threads": threads, "rounds": args.rounds}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        variants = {"peft": torch.nn.Dropout(args.p).train(), "gemmatune": LoraDropout(args.p).train()}
        times: dict[str, list[float]] = {v: [] for v in variants}
        for module in variants.values():  # warm-up
            layer_seconds(module, args.tokens, dtype)
        for r in range(args.rounds):
            for v in variants if r % 2 == 0 else list(variants)[::-1]:
                times[v].append(layer_seconds(variants[v], args.tokens, dtype))
        peft, ours = (statistics.median(times[v]) for v in variants)
        result[name] = {"peft_ms_per_layer": round(1e3 * peft, 2), "gemmatune_ms_per_layer": round(1e3 * ours, 2),
                        "speedup": round(peft / ours, 2)}
        print(f"{name}: PEFT nn.Dropout {1e3 * peft:.2f} ms per layer (7 LoRA inputs, forward + backward), "
              f"gemmatune {1e3 * ours:.2f} ms: {peft / ours:.2f}x", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

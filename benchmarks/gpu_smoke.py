"""GPU check: a real-size Gemma 3n text model with random weights, QLoRA and bf16 LoRA, against the planner.

Needs a CUDA GPU (and bitsandbytes for QLoRA); downloads nothing. Builds the bundled E2B (or E4B) text
config with random bf16 weights, saves it once as a local model folder (about 9 GB for E2B), then for each
mode loads it through gemmatune's own loading + LoRA code, runs `--steps` optimizer steps on random tokens
(batch x seq-len, bf16 autocast as the Trainer does) and prints tokens/s, peak GPU memory
(torch.cuda.max_memory_allocated) and the planner's estimate for the same settings, side by side.

Then (`--pipeline`, on by default) the tutorial's whole path on the same checkpoint through gemmatune's own
calls: QLoRA `train` with an eval split and a test file (so the evaluation after training runs on CUDA), then
`merge` into a bf16 base; it prints the eval report, the merged dtype and the wall times.

    python benchmarks/gpu_smoke.py [--model e2b|e4b] [--steps 20] [--batch 4] [--seq-len 512] [--rank 16]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

GIB = 1024**3


def build_random_checkpoint(model: str, folder: Path) -> Path:
    """A local HF folder with the real architecture and random bf16 weights, plus a byte-level tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM

    from gemmatune.models import bundled_config_file

    data = json.loads(bundled_config_file(f"google/gemma-3n-{model.upper()}-it").read_text())
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    with torch.device("cuda"):
        net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    net.save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)
    del net
    torch.cuda.empty_cache()
    return folder


def _byte_tokenizer():
    # The tokenizer only has to load; the benchmark feeds random ids from the model's full vocabulary.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=specials[4:])


def run_mode(folder: Path, quantized: bool, args) -> dict:
    from gemmatune.config import load_config
    from gemmatune.loading import load_model
    from gemmatune.lora import attach_lora
    from gemmatune.plan import make_plan
    from gemmatune.train import disable_cache

    cfg = load_config(None, [
        f"model.name={folder}", f"model.quantization={'4bit' if quantized else 'none'}", f"lora.r={args.rank}",
        f"train.per_device_train_batch_size={args.batch}", f"data.max_length={args.seq_len}", "train.precision=bf16",
    ])
    plan = make_plan(cfg, device="cuda", seq_len=args.seq_len)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    loaded = load_model(cfg.model, "bf16")
    disable_cache(loaded.model, loaded.family)
    # A 4-bit model is already placed on the GPU by load_model (device_map); bitsandbytes models refuse .to()
    base = loaded.model if quantized else loaded.model.to("cuda")
    model, report = attach_lora(base, cfg.lora, loaded.family, quantized=quantized)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    losses, times = [], []
    for _ in range(args.steps):
        ids = torch.randint(3, vocab, (args.batch, args.seq_len), device="cuda", generator=gen)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated()
    steady = sorted(times[2:] or times)
    result = {
        "mode": "QLoRA nf4" if quantized else "LoRA bf16",
        "trainable": report.trainable,
        "planned_trainable": plan.shape.lora_params,
        "tokens_per_s_median": round(args.batch * args.seq_len / steady[len(steady) // 2], 1),
        "peak_gib": round(peak / GIB, 2),
        "planned_gib": round((plan.estimate.total - plan.path.overhead_bytes) / GIB, 2),
        "planned_parts_gib": {k: round(v / GIB, 2) for k, v in plan.estimate.parts.items()},
        "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
        "finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
    }
    del model, loaded, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def run_pipeline(folder: Path, workdir: Path, args) -> dict:
    """QLoRA train (eval split + test file) -> evaluation after training -> merge, as `gemmatune` runs them."""
    from safetensors import safe_open

    from gemmatune.config import load_config
    from gemmatune.export import merge
    from gemmatune.train import train

    rows = [{"instruction": f"Route ticket {i}", "input": f"my parcel {i} is late", "output": f"shipping {i % 3}"}
            for i in range(64)]
    data = workdir / "pipeline-data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:56]))
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[56:]))
    cfg = load_config(None, [
        f"model.name={folder}", "model.quantization=4bit", f"lora.r={args.rank}",
        f"data.train_file={data / 'train.jsonl'}", f"data.test_file={data / 'test.jsonl'}", "data.eval_ratio=0.1",
        "data.template=alpaca-en",
        f"train.output_dir={workdir / 'runs'}", "train.run_name=pipeline", "train.max_steps=10", "train.save_steps=5",
        "train.warmup_steps=0", "train.precision=bf16", "train.logging_steps=1",
    ])
    started = time.perf_counter()
    result = train(cfg, overwrite=True)
    trained_s = time.perf_counter() - started
    report = json.loads((result.run_dir / "eval.json").read_text())
    del result
    gc.collect()
    torch.cuda.empty_cache()
    started = time.perf_counter()
    out = merge(str(workdir / "runs" / "pipeline"), workdir / "merged", overwrite=True)
    merged_s = time.perf_counter() - started
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        dtypes = sorted({f.get_slice(k).get_dtype() for k in f.keys()})
    return {"mode": "pipeline: QLoRA train + eval after training + merge", "train_and_eval_s": round(trained_s, 1),
            "merge_s": round(merged_s, 1), "merged_dtypes": dtypes,
            "eval": {v["name"]: {"response_loss": round(v["response_loss"], 4), "stopped": v["stopped"]}
                     for v in report["variants"]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["e2b", "e4b"], default="e2b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", default="/tmp/gemmatune-gpu-smoke")
    parser.add_argument("--modes", default="qlora,lora", help="comma-separated: qlora, lora")
    parser.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True,
                        help="also run QLoRA train -> evaluation after training -> merge through gemmatune")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke.py needs a CUDA GPU: torch.cuda.is_available() is False here (CPU-only torch or no GPU)",
              file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "qlora" in modes:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            print("QLoRA needs bitsandbytes: pip install 'gemmatune[qlora]' (or use --modes lora)", file=sys.stderr)
            return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    folder = build_random_checkpoint(args.model, Path(args.workdir) / f"gemma3n-{args.model}-random")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; Gemma 3n {args.model.upper()} random weights, "
          f"batch {args.batch} x {args.seq_len}, r={args.rank}, {args.steps} steps")
    for mode in modes:
        result = run_mode(folder, mode == "qlora", args)
        print(json.dumps(result))
        print(f"  {result['mode']:<10} {result['tokens_per_s_median']:>9} tok/s   peak {result['peak_gib']:6.2f} GiB   "
              f"planned {result['planned_gib']:6.2f} GiB (without the CUDA context)")
    if args.pipeline:
        print(json.dumps(run_pipeline(folder, Path(args.workdir), args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

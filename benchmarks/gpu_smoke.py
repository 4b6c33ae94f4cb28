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

`--multimodal`: the full model instead (language model + MobileNetV5 vision tower + audio conformer, random bf16
weights, a processor with the real soft-token counts: 256 per 768x768 image, 188 per clip), trained through
`gemmatune train` on generated image and audio rows with `lora.towers: [audio, vision]` (bf16 LoRA, or QLoRA with
`--qlora`), evaluated on a test file, asked with `gemmatune generate --image` and `--audio`, then merged; it prints
the peak GPU memory beside `plan`'s estimate and its per-tower figures.

    python benchmarks/gpu_smoke.py --multimodal [--model e2b|e4b] [--steps 10] [--batch 2] [--qlora]

`--family gemma4`: the same for Gemma 4 E2B or E4B (the bundled real config: vision encoder and audio conformer with
clipped linears, whose LoRA goes inside the clamps; up to 280 soft tokens per image, counted per image, and 25 per
second of audio). Gemma4Processor needs torchvision.

    python benchmarks/gpu_smoke.py --multimodal --family gemma4 --model e4b --qlora
    python benchmarks/gpu_smoke.py --multimodal --cpu --model-dir DIR   # the same path on CPU, for a tiny model
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

    from gemmatune.models.registry import bundled_config_file

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
    from gemmatune.models.loading import load_model
    from gemmatune.models.lora import attach_lora
    from gemmatune.plan.memory import make_plan
    from gemmatune.train.recipe import disable_cache

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
    from gemmatune.export.merge import merge
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


MEDIA_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
                "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>"}


GEMMA4_MEDIA_TOKENS = {"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                       "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"}

def build_random_multimodal_checkpoint(model: str, folder: Path, family: str = "gemma3n") -> Path:
    """The full model with random bf16 weights and a processor whose tokenizer puts the six media tokens at the
    model's ids (fillers elsewhere). Gemma 3n: the bundled text config + the default E2B/E4B towers. Gemma 4: the
    bundled E2B/E4B config, towers included (clipped linears in both)."""
    if (folder / "config.json").is_file():
        return folder
    import transformers
    from transformers import AutoConfig

    from gemmatune.models.registry import bundled_config_file

    if family == "gemma4":
        data = json.loads(bundled_config_file(f"google/gemma-4-{model.upper()}-it").read_text())
        config = AutoConfig.for_model(data.pop("model_type"), **data)
        config.architectures = ["Gemma4ForConditionalGeneration"]
    else:
        data = json.loads(bundled_config_file(f"google/gemma-3n-{model.upper()}-it").read_text())
        text = AutoConfig.for_model(data.pop("model_type"), **data)
        config = AutoConfig.for_model("gemma3n", text_config=text.to_dict())
        config.architectures = ["Gemma3nForConditionalGeneration"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        net = getattr(transformers, config.architectures[0])._from_config(config, dtype=torch.bfloat16)
    net.save_pretrained(folder)
    (_gemma4_processor if family == "gemma4" else _media_processor)(config, folder)
    del net
    torch.cuda.empty_cache()
    return folder


def _media_tokenizer(folder: Path, specials: list[str], names: dict, at: dict, chat_template: str):
    """A byte-level tokenizer with `specials` first and the media tokens `names` (attribute -> token) at the ids
    `at` (id -> token), saved in `folder` and read back with the tokens named, as a processor reads them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    while len(vocab) <= max(at):
        vocab[at.get(len(vocab), f"<unused{len(vocab)}>")] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=specials[4:] + list(names.values()))
    tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, **names)


def _media_processor(config, folder: Path):
    from transformers import Gemma3nAudioFeatureExtractor, Gemma3nProcessor, SiglipImageProcessor

    from gemmatune.models.gemma3 import CHAT_TEMPLATE

    ids = {"boi_token": config.boi_token_id, "eoi_token": config.eoi_token_id, "image_token": config.image_token_id,
           "boa_token": config.boa_token_id, "eoa_token": config.eoa_token_id, "audio_token": config.audio_token_id}
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = _media_tokenizer(folder, specials, MEDIA_TOKENS, {ids[k]: MEDIA_TOKENS[k] for k in ids}, CHAT_TEMPLATE)
    image = SiglipImageProcessor(size={"height": 768, "width": 768}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Gemma3nProcessor(Gemma3nAudioFeatureExtractor(), image, tok, chat_template=CHAT_TEMPLATE,
                                 audio_seq_length=config.audio_soft_tokens_per_image,
                                 image_seq_length=config.vision_soft_tokens_per_image)
    processor.save_pretrained(folder)
    return processor


def _gemma4_processor(config, folder: Path):
    """Gemma4Processor with its default image budget (280 soft tokens, 16-pixel patches pooled 3x3), 128 mel bins
    and up to 750 soft tokens per clip (30 s), as the real checkpoints; the processor adds `<|video|>` after them."""
    from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil, Gemma4Processor, Gemma4VideoProcessor

    from gemmatune.models.gemma4 import CHAT_TEMPLATE

    ids = {"boi_token": config.boi_token_id, "eoi_token": config.eoi_token_id, "image_token": config.image_token_id,
           "boa_token": config.boa_token_id, "eoa_token": config.eoa_token_index, "audio_token": config.audio_token_id}
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
    names = GEMMA4_MEDIA_TOKENS
    tok = _media_tokenizer(folder, specials, names, {ids[k]: names[k] for k in ids}, CHAT_TEMPLATE)
    processor = Gemma4Processor(Gemma4AudioFeatureExtractor(), Gemma4ImageProcessorPil(), tok, Gemma4VideoProcessor(),
                                chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    return processor


def media_data(folder: Path, n: int) -> list[dict]:
    """`n` chat rows, alternately an image (one colour) and a 1 s tone (the tests' tiny audio tower covers 1.2 s),
    each reply naming the colour or pitch."""
    import numpy as np
    from PIL import Image

    from gemmatune.data.media import SAMPLE_RATE, write_wav

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            colour = ("red", "blue")[i // 2 % 2]
            rgb = {"red": (220, 20, 20), "blue": (20, 20, 220)}[colour]
            Image.new("RGB", (640, 480), rgb).save(folder / f"img{i}.png")
            part, reply = {"type": "image", "path": f"img{i}.png"}, f"The picture is {colour}."
        else:
            pitch = ("low", "high")[i // 2 % 2]
            t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
            write_wav(folder / f"tone{i}.wav", 0.5 * np.sin(2 * np.pi * (220 if pitch == "low" else 1760) * t))
            part, reply = {"type": "audio", "path": f"tone{i}.wav"}, f"The tone is {pitch}."
        rows.append({"messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]},
                                  {"role": "assistant", "content": reply}]})
    return rows


def run_multimodal(folder: Path, workdir: Path, args, device: str) -> dict:
    """train (towers opted in) -> evaluation of a test file -> generate --image / --audio -> merge, through
    gemmatune's own calls; peak GPU memory of the training beside plan's estimate."""
    from transformers import AutoConfig

    from gemmatune.cli import main as cli
    from gemmatune.config import load_config
    from gemmatune.export.merge import merge
    from gemmatune.plan.memory import make_plan
    from gemmatune.train import train

    data = workdir / "mm-data"
    rows = media_data(data, 16)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:14]))
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[14:]))
    precision = "bf16" if device == "cuda" or args.qlora else "fp32"
    cfg = load_config(None, [
        f"model.name={folder}", "model.multimodal=true", f"model.quantization={'4bit' if args.qlora else 'none'}",
        'lora.towers=["audio", "vision"]', f"lora.r={args.rank}", f"data.train_file={data / 'train.jsonl'}",
        f"data.test_file={data / 'test.jsonl'}", "data.template=chat", f"data.max_length={args.seq_len}",
        f"train.output_dir={workdir / 'runs'}", "train.run_name=multimodal", f"train.max_steps={args.steps}",
        f"train.per_device_train_batch_size={args.batch}", "train.gradient_accumulation_steps=1",
        "train.warmup_steps=0", f"train.precision={precision}", "train.logging_steps=1", "train.learning_rate=1e-3",
    ])
    plan = make_plan(cfg, device=device)
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(cfg, overwrite=True)
    trained_s = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    run = result.run_dir
    report = json.loads((run / "eval.json").read_text())
    record = result.record
    del result
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    answers = {}
    for kind, file in (("image", "img0.png"), ("audio", "tone1.wav")):
        out = workdir / f"answer-{kind}.jsonl"
        code = cli(["generate", "--adapter", str(run), "--precision", precision, "--greedy", "--max-new-tokens", "8",
                    "--prompt", "What is this?", f"--{kind}", str(data / file), "--output", str(out)])
        answers[kind] = {"exit": code, "answer": json.loads(out.read_text().splitlines()[0]) if code == 0 else None}
    started = time.perf_counter()
    merged = merge(str(run), workdir / "mm-merged", overwrite=True)
    merged_s = time.perf_counter() - started
    merged_config = AutoConfig.from_pretrained(merged)
    return {
        "mode": f"multimodal: {'QLoRA nf4' if args.qlora else 'LoRA'} with lora.towers [audio, vision], train + eval "
                "+ generate --image/--audio + merge",
        "wrapped_per_tower": record["lora"]["wrapped_per_tower"],
        "loss_first_last": [record["training"]["train_loss_first"], record["training"]["train_loss_last"]],
        "train_and_eval_s": round(trained_s, 1), "merge_s": round(merged_s, 1),
        "peak_gib": None if peak is None else round(peak / GIB, 2),
        "planned_gib": round((plan.estimate.total - plan.path.overhead_bytes) / GIB, 2),
        "planned_parts_gib": {k: round(v / GIB, 2) for k, v in plan.estimate.parts.items()},
        "planned_towers_gib_per_unit": {t.tower: round(t.per_unit / GIB, 3) for t in plan.settings.towers},
        "eval": {v["name"]: round(v["response_loss"], 4) for v in report["variants"]},
        "generate": answers,
        "merged": {"class": merged_config.architectures, "towers": [k for k in ("vision_config", "audio_config")
                                                                    if getattr(merged_config, k, None) is not None]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["e2b", "e4b"], default="e2b")
    parser.add_argument("--family", choices=["gemma3n", "gemma4"], default="gemma3n",
                        help="--multimodal: Gemma 3n or Gemma 4 (E2B/E4B, --model)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", default="/tmp/gemmatune-gpu-smoke")
    parser.add_argument("--modes", default="qlora,lora", help="comma-separated: qlora, lora")
    parser.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True,
                        help="also run QLoRA train -> evaluation after training -> merge through gemmatune")
    parser.add_argument("--multimodal", action="store_true",
                        help="the full model with both towers: train (towers opted in), eval, generate, merge")
    parser.add_argument("--qlora", action="store_true", help="--multimodal with 4-bit weights")
    parser.add_argument("--model-dir", help="--multimodal: an existing multimodal checkpoint instead of a random one")
    parser.add_argument("--cpu", action="store_true", help="--multimodal on the CPU (fp32): to check the script on a "
                        "tiny --model-dir")
    args = parser.parse_args(argv)
    if args.multimodal:
        return _main_multimodal(args)
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


def _main_multimodal(args) -> int:
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke.py --multimodal needs a CUDA GPU (or --cpu with a tiny --model-dir)", file=sys.stderr)
        return 2
    if device == "cpu" and not args.model_dir:
        print("--cpu needs --model-dir: a real-size random model is not built on the CPU", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    folder = Path(args.model_dir) if args.model_dir else build_random_multimodal_checkpoint(
        args.model, workdir / f"{args.family}-{args.model}-multimodal-random", args.family)
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch {torch.__version__}; {folder}, "
          f"batch {args.batch}, {args.steps} steps, r={args.rank}")
    print(json.dumps(run_multimodal(folder, workdir, args, device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

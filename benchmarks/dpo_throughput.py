"""DPO throughput and peak memory: gemmatune's DPO against TRL's DPOTrainer, same model, pairs and settings.

Variants, each in a fresh subprocess (so peak RSS is its own), run alternately (t g, then g t, ...):
  t  TRL's DPOTrainer as its docs set it up for a PEFT model: a LoRA config handed to the trainer, the reference
     = the adapter switched off at every step (ref_model=None), padded batches of chosen + rejected, TRL's own
     tokenization of the conversational pairs and its chunked LM head; gradient checkpointing off (as gemmatune's
     default)
  g  gemmatune `train.method: dpo`: packed pairs with per-sequence attention, answer-only log-probs through the LM
     head in chunks, the reference computed once before the first step (its time is reported apart and counted in
     `g_wall_with_reference`), lean RMSNorms, the precision policy

Both: the embedded Gemma 3 270M, LoRA r=16 / alpha 32 / dropout 0 on the 7 projections, AdamW lr 1e-4, beta 0.1,
sigmoid loss, 4 pairs per step, the first pairs of examples/preference/tickets_pairs_train.jsonl in the same order,
the compute precision gemmatune's `auto` picks on this machine. Tokens/s count the non-padding tokens of both
answers' sequences (prompt + answer, twice per pair), from the end of step 1 to the end of the last step.

    flock /tmp/gemmatune-heavy.lock python benchmarks/dpo_throughput.py                 # 12 steps x 2 rounds
    python benchmarks/dpo_throughput.py --steps 4 --rounds 1                            # quick

The last line printed is one JSON object with every figure (medians over rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ROOT / "examples" / "preference" / "tickets_pairs_train.jsonl"
BATCH, LR, BETA, MAX_LENGTH, SEED = 4, 1e-4, 0.1, 256, 42
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    return StepTimer()


def _rows(n: int) -> list[dict]:
    lines = PAIRS.read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def _peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child_trl(steps: int, precision: str, folder: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from gemmatune.config import ModelConfig
    from gemmatune.models.loading import resolve_source

    source = resolve_source(ModelConfig()).path  # the embedded model, converted once by gemmatune
    tokenizer = AutoTokenizer.from_pretrained(source)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in _rows(steps * BATCH)]
    args = DPOConfig(output_dir=folder, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                     max_steps=steps, learning_rate=LR, beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH,
                     lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
                     report_to="none", bf16=precision == "bf16", gradient_checkpointing=False, use_cpu=True,
                     seed=SEED, data_seed=SEED, dataloader_num_workers=0, include_num_input_tokens_seen="non_padding")
    timer = _timer()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                task_type="CAUSAL_LM"),
                         callbacks=[timer])
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    return _result("t", timer, wall, 0.0, trainer)


def child_gemmatune(steps: int, precision: str, folder: str) -> dict:
    from gemmatune.config import load_config
    from gemmatune.data.pairs import read_pairs, tokenize_pairs
    from gemmatune.models.loading import load_model
    from gemmatune.train.recipe import build_trainer, prepare_for_training

    data_file = Path(folder) / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in _rows(steps * BATCH)), encoding="utf-8")
    cfg = load_config(None, [f"data.train_file={data_file}", "data.template=chat", f"data.max_length={MAX_LENGTH}",
                             "train.method=dpo", f"train.beta={BETA}", f"train.max_steps={steps}",
                             f"train.per_device_train_batch_size={BATCH}", "train.gradient_accumulation_steps=1",
                             f"train.learning_rate={LR}", "train.lr_scheduler_type=constant", "train.warmup_steps=0",
                             "train.logging_steps=1", "train.save_steps=100000", "lora.r=16", "lora.lora_alpha=32",
                             "lora.lora_dropout=0", f"train.precision={precision}", f"train.output_dir={folder}",
                             "train.run_name=g"])
    loaded = load_model(cfg.model, precision, packing=cfg.train.packing)
    # The rows in file order: data order as TRL's (both shuffle with the same seed over the same row count).
    data = tokenize_pairs(read_pairs(cfg.data, cfg.train.seed), loaded.tokenizer, cfg.data)
    model, _ = prepare_for_training(loaded, cfg)
    started = time.perf_counter()
    trainer = build_trainer(cfg, model, loaded.tokenizer, data, Path(folder) / "g", loaded.precision)
    reference = time.perf_counter() - started
    timer = _timer()
    trainer.add_callback(timer)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    return _result("g", timer, wall, reference, trainer)


def _result(variant: str, timer, wall: float, reference: float, trainer) -> dict:
    (t0, n0), (t1, n1) = timer.marks[0], timer.marks[-1]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"variant": variant, "tokens_per_second": (n1 - n0) / (t1 - t0), "tokens": n1, "wall": wall,
            "reference_seconds": reference, "peak_rss_gib": _peak_rss() / 2**30, "loss_first": losses[0],
            "loss_last": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["t", "g"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.manual_seed(SEED)
        run = child_trl if args.child == "t" else child_gemmatune
        print("RESULT " + json.dumps(run(args.steps, args.precision, args.folder)), flush=True)
        return

    from gemmatune.hardware import resolve_precision

    precision = resolve_precision("auto")
    results: dict[str, list[dict]] = {"t": [], "g": []}
    for round_ in range(args.rounds):
        for variant in ("t", "g") if round_ % 2 == 0 else ("g", "t"):
            with tempfile.TemporaryDirectory() as folder:
                proc = subprocess.run([sys.executable, __file__, "--child", variant, "--steps", str(args.steps),
                                       "--precision", precision, "--folder", folder], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(line[len("RESULT "):])
            results[variant].append(result)
            print(f"round {round_ + 1} {variant}: {result['tokens_per_second']:.1f} tok/s, peak RSS "
                  f"{result['peak_rss_gib']:.2f} GiB, loss {result['loss_first']:.4f} -> {result['loss_last']:.4f}"
                  + (f", reference pass {result['reference_seconds']:.1f} s" if variant == "g" else ""), flush=True)
    summary: dict[str, object] = {"precision": precision, "steps": args.steps, "rounds": args.rounds,
                                  "pairs_per_step": BATCH}
    for variant, runs in results.items():
        for key in ("tokens_per_second", "peak_rss_gib", "wall", "reference_seconds", "loss_last"):
            summary[f"{variant}_{key}"] = round(statistics.median(r[key] for r in runs), 4)
    summary["g_wall_with_reference"] = round(statistics.median(r["wall"] + r["reference_seconds"]
                                                               for r in results["g"]), 1)
    summary["g_over_t_tokens_per_second"] = round(summary["g_tokens_per_second"] / summary["t_tokens_per_second"], 3)
    summary["g_over_t_peak_rss"] = round(summary["g_peak_rss_gib"] / summary["t_peak_rss_gib"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""LoRA training throughput on this machine: the usual stacks against gemmatune, same data and same math.

Variants, each in a fresh subprocess (so peak RSS is its own), run alternately (a b c, then c b a, ...):
  a  tutorial baseline: PEFT + transformers Trainer, fp32, batch padded to its longest example, full logits
  b  best plain HF stack: TRL SFTTrainer, bf16 weights + bf16 autocast, padding-free batches, completion-only
     loss (TRL's own chunked LM head); falls back to Trainer + DataCollatorWithFlattening when TRL is absent
  c  gemmatune defaults: packed rows with per-example attention, LM head only on label positions in chunks,
     train.precision auto (bf16 frozen weights under bf16 autocast, or fp32 where fp32 matmuls are faster),
     RMSNorms that keep no fp32 input copy, the leading tokens a batch's examples share computed once (the
     alpaca-en template's preamble; train.share_prefix), tcmalloc preloaded when installed, else glibc malloc
     tuned in-process (gemmatune.train.allocator.tune_malloc), oneDNN's primitive cache capped at 128, and on a
     CPU rows filled to a grid of lengths (hardware.packed_row_length), as `gemmatune train` does
     (--no-tcmalloc: c without tcmalloc; --no-mallopt: c without the malloc tuning)
  d  (--peft-dropout) c with PEFT's own nn.Dropout in place of gemmatune's LoRA dropout (lora_dropout.py)

All use the embedded Gemma 3 270M, LoRA r=16 / alpha 32 / dropout 0.1 (the config default: what users run;
--lora-dropout to change it) on the 7 projections, AdamW lr 2e-4,
4 examples per step, the same tokenized examples (gemmatune's alpaca-en template, max 512 tokens) in the
same order, and the same number of steps, so the same real (non-padding) tokens. Tokens/s are measured
from the end of step 1 to the end of the last step. Also measured here: 2048^3 bf16 and fp32 matmuls; the
roofline c's speed is compared with (`c_share_of_roofline`) is that of the dtype c computes in (FLOPs per token
from the model's shapes and the data's label share); `c_share_of_bf16_roofline` keeps the bf16 one; tokens are the
examples' tokens, and `c_share_of_roofline_computed` counts only those c computed (a shared prefix once). Then c runs
a few more steps under torch.profiler: its matmul and non-matmul CPU time per real token and the largest
non-matmul ops.

    flock /tmp/gemmatune-heavy.lock python benchmarks/train_throughput.py            # full, ~21 min here
    flock /tmp/gemmatune-heavy.lock python benchmarks/train_throughput.py --steps 8 --rows 64 --rounds 1

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_en_demo.json"
BUNDLED = ROOT / "examples" / "data" / "tickets_train.jsonl"
VARIANTS = ("a", "b", "c")
BATCH, LR, MAX_LENGTH, SEED = 4, 2e-4, 512, 42
DROPOUT = 0.1  # set from --lora-dropout in each process
# Matrix products (forward and backward) in a CPU profile; everything else is "non-matmul" time. addmm_ is the
# LoRA branch's second product, added into the base layer's output in place (kernels.lora.LoraBranch).
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul",
              "aten::_weight_int4pack_mm", "aten::mkldnn_linear"}


# ----------------------------------------------------------------------------- child: one variant


def _data_config(data_file: str):
    from gemmatune.config import DataConfig

    return DataConfig(train_file=data_file, template="alpaca-en" if data_file.endswith(".json") else "chat",
                      max_length=MAX_LENGTH)


def _examples(data_file: str, tokenizer=None):
    from gemmatune.config import ModelConfig
    from gemmatune.data.examples import prepare
    from gemmatune.models.loading import load_tokenizer, resolve_source

    tokenizer = tokenizer or load_tokenizer(resolve_source(ModelConfig()))
    return tokenizer, prepare(_data_config(data_file), tokenizer, SEED)


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=DROPOUT, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int]] = []
            self.losses: list[float] = []
            self.computed = [0, 0]  # c's row tokens, example tokens (`_counting`)

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def _common_args(out: str, steps: int, bf16: bool) -> dict:
    return dict(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                learning_rate=LR, warmup_steps=0, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                report_to="none", seed=SEED, data_seed=SEED, use_cpu=True, bf16=bf16, remove_unused_columns=False,
                include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0)


def run_variant(variant: str, data_file: str, steps: int, threads: int, profile_steps: int = 0) -> dict:
    import torch

    torch.set_num_threads(threads)
    timer = _timer()
    out = tempfile.mkdtemp(prefix=f"bench-{variant}-")
    model_dir = _model_dir()
    if variant in ("a", "b"):
        tokenizer, data = _examples(data_file)
        examples = data.train.examples
    if variant == "a":
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

        from gemmatune.data.examples import ExampleDataset

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), _lora_config())
        trainer = Trainer(model=model, args=TrainingArguments(**_common_args(out, steps, bf16=False)),
                          train_dataset=ExampleDataset(examples), callbacks=[timer],
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"))
        stack = "transformers Trainer + PEFT, fp32, padded"
    elif variant == "b":
        trainer, stack = _variant_b(tokenizer, examples, model_dir, out, steps, timer)
    else:
        from gemmatune.compat import attn_implementation
        from gemmatune.config import load_config
        from gemmatune.models.loading import load_model
        from gemmatune.train.allocator import tune_malloc

        tune_malloc()  # what `gemmatune train` does without tcmalloc; a no-op under it or GEMMATUNE_MALLOPT=0
        from gemmatune.train.recipe import build_trainer, prepare_for_training

        cfg = load_config(None, [f"data.train_file={data_file}", f"train.output_dir={out}", "train.run_name=c",
                                 f"train.max_steps={steps}", f"train.per_device_train_batch_size={BATCH}",
                                 "train.gradient_accumulation_steps=1", f"train.learning_rate={LR}",
                                 "train.warmup_steps=0", "train.lr_scheduler_type=constant", "train.logging_steps=1",
                                 "train.save_steps=100000", "lora.r=16", "lora.lora_alpha=32",
                                 f"lora.lora_dropout={DROPOUT}", f"train.num_threads={threads}"])
        loaded = load_model(cfg.model, cfg.train.precision, packing=cfg.train.packing)
        # The tokenizer loaded with the model, as `gemmatune train` uses it (a second one is ~0.3 GiB of RSS).
        tokenizer, data = _examples(data_file, loaded.tokenizer)
        model, _ = prepare_for_training(loaded, cfg)  # what `gemmatune train` does between loading and training
        if variant == "d":
            _put_back_peft_dropout(model)
        trainer = build_trainer(cfg, model, tokenizer, data, Path(out), loaded.precision)
        trainer.add_callback(timer)
        trainer.data_collator = _counting(trainer.data_collator, timer)
        stack = f"gemmatune ({loaded.precision}, {attn_implementation(loaded.model.config)}, packed, chunked loss)"
        stack += ", PEFT's dropout" if variant == "d" else ""
    if profile_steps:
        return _profile(trainer, timer, profile_steps)
    trainer.train()
    (t0, n0), (t1, n1) = timer.marks[0], timer.marks[-1]
    import resource

    tail = timer.losses[-5:]
    return {
        "variant": variant,
        "stack": stack,
        "steps": len(timer.marks),
        "real_tokens": n1 - n0,
        "tokens_per_second": (n1 - n0) / (t1 - t0),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "final_loss": sum(tail) / len(tail),
        "tcmalloc": "tcmalloc" in Path("/proc/self/maps").read_text(),
        "allocator": _allocator(),
        "compute_dtype": _compute_dtype(trainer),
        # rows computed per example token: under 1 where the examples of a batch share a prefix (train.share_prefix)
        "computed_token_share": timer.computed[0] / timer.computed[1] if timer.computed[1] else 1.0,
    }


def _counting(collate, timer):
    """`collate`, also counting the tokens of the rows it makes against those of the examples it was given."""
    def collate_and_count(batch: list[dict]) -> dict:
        out = collate(batch)
        timer.computed[0] += out["input_ids"].numel()
        timer.computed[1] += sum(len(b["input_ids"]) for b in batch)
        return out

    return collate_and_count


def _put_back_peft_dropout(model) -> None:
    import torch
    from peft.tuners.lora import LoraLayer

    from gemmatune.train.lora_dropout import LoraDropout

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter, dropout in list(module.lora_dropout.items()):
                if isinstance(dropout, LoraDropout):
                    module.lora_dropout[adapter] = torch.nn.Dropout(dropout.p)


def _profile(trainer, timer, steps: int) -> dict:
    """c's CPU time per real token, matmul and not, over `steps` steps after the first (warm-up) one."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    prof = profile(activities=[ProfilerActivity.CPU])

    class Window(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                prof.start()

        def on_train_end(self, args, state, control, **kwargs):
            prof.stop()

    trainer.args.max_steps = steps + 1
    trainer.add_callback(Window())
    trainer.train()
    tokens = timer.marks[-1][1] - timer.marks[0][1]
    ops: dict[str, float] = {}
    for e in prof.key_averages():  # microseconds
        ops[e.key] = ops.get(e.key, 0.0) + e.self_cpu_time_total
    total = sum(ops.values())
    matmul = sum(t for k, t in ops.items() if k in MATMUL_OPS)
    top = sorted(((t, k) for k, t in ops.items() if k not in MATMUL_OPS), reverse=True)[:8]
    return {"profiled_steps": steps, "profiled_tokens": tokens, "matmul_us_per_token": matmul / tokens,
            "non_matmul_us_per_token": (total - matmul) / tokens, "non_matmul_share": 1 - matmul / total,
            "top_non_matmul": [(k, round(100 * t / total, 1)) for t, k in top]}


def _allocator() -> str:
    from gemmatune.train.allocator import malloc_tuned, tcmalloc_loaded

    if tcmalloc_loaded():
        return "tcmalloc"
    return "glibc malloc tuned (mallopt)" if malloc_tuned() else "glibc malloc default"


def _compute_dtype(trainer) -> str:
    return "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32"


def _variant_b(tokenizer, examples, model_dir, out, steps, timer):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        from peft import get_peft_model
        from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

        from gemmatune.data.examples import ExampleDataset

        model.config.use_cache = False
        trainer = Trainer(model=get_peft_model(model, _lora_config()), callbacks=[timer],
                          args=TrainingArguments(**_common_args(out, steps, bf16=True)),
                          train_dataset=ExampleDataset(examples), data_collator=DataCollatorWithFlattening())
        return trainer, "transformers Trainer + DataCollatorWithFlattening, bf16, completion-only labels"
    import trl

    dataset = Dataset.from_dict({
        "input_ids": [e.input_ids for e in examples],
        "completion_mask": [[int(label != -100) for label in e.labels] for e in examples],
    })
    args = SFTConfig(**_common_args(out, steps, bf16=True), padding_free=True, completion_only_loss=True,
                     max_length=None, model_init_kwargs=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=_lora_config(), callbacks=[timer])
    return trainer, f"TRL {trl.__version__} SFTTrainer, bf16, padding-free, completion-only loss"


def _model_dir() -> str:
    from gemmatune.models.loading import embedded_model_dir

    return str(embedded_model_dir())


# ----------------------------------------------------------------------------- parent: roofline and orchestration


def matmul_gflops(threads: int, dtype: str = "bf16", size: int = 2048, repeats: int = 10) -> float:
    import torch

    torch.set_num_threads(threads)
    kind = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    a = torch.randn(size, size, dtype=kind)
    b = torch.randn(size, size, dtype=kind)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def flops_per_token(model_dir: str, label_share: float, mean_length: float) -> float:
    """Matmul FLOPs per trained token with frozen weights: forward (2 per weight) plus the input-gradient half of
    backward (2 per weight) for the body; the LM head the same, only on label tokens; attention scores and
    values (causal, sliding window capped) forward + two backward products."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    body_weights = layers * (h * q + 2 * h * kv + q * h + 3 * h * inter)
    head = cfg["vocab_size"] * h
    window = cfg.get("sliding_window") or mean_length
    context = sum(min(mean_length, window if t == "sliding_attention" else mean_length) / 2
                  for t in cfg.get("layer_types", ["full_attention"] * layers))
    attention = 2 * 2 * q * context * 3  # QK^T and PV, forward + 2 backward products
    return 4 * body_weights + 4 * head * label_share + attention


def data_file(rows: int) -> tuple[str, str]:
    """First `rows` rows of the shared Alpaca demo (or the bundled tickets) as a temporary file."""
    if ALPACA.is_file():
        data = json.loads(ALPACA.read_text(encoding="utf-8"))[:rows]
        path = Path(tempfile.mkdtemp(prefix="bench-data-")) / "alpaca_first.json"
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        return str(path), f"{ALPACA} (first {len(data)} rows)"
    lines = BUNDLED.read_text(encoding="utf-8").splitlines()[:rows]
    path = Path(tempfile.mkdtemp(prefix="bench-data-")) / "tickets_first.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path), f"{BUNDLED} (first {len(lines)} rows)"


def spawn(variant: str, data: str, steps: int, threads: int, tcmalloc: bool, mallopt: bool = True,
          profile_steps: int = 0) -> dict:
    from gemmatune.train.allocator import MALLOPT_VARIABLE, ONEDNN_CACHE_ENTRIES, ONEDNN_CACHE_VARIABLE, find_tcmalloc

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    lib = find_tcmalloc() if tcmalloc and variant == "c" else None
    if lib:  # what `gemmatune train` does for itself (gemmatune.train.allocator)
        env["LD_PRELOAD"] = lib
    if variant == "c":
        env.setdefault(ONEDNN_CACHE_VARIABLE, str(ONEDNN_CACHE_ENTRIES))
        if not mallopt:
            env[MALLOPT_VARIABLE] = "0"
    cmd = [sys.executable, __file__, "--child", variant, "--data", data, "--steps", str(steps),
           "--threads", str(threads), "--lora-dropout", str(DROPOUT), "--profile-steps", str(profile_steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    global DROPOUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=18,
                        help="optimizer steps per variant (4 examples each); 18 keeps the whole run under 20 min here")
    parser.add_argument("--rows", type=int, default=400, help="data rows to read (the first ones)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per variant, alternating order; medians kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    parser.add_argument("--no-tcmalloc", action="store_true", help="run c without tcmalloc preloaded")
    parser.add_argument("--no-mallopt", action="store_true", help="run c with glibc malloc's defaults "
                        "(when tcmalloc is not used)")
    parser.add_argument("--lora-dropout", type=float, default=DROPOUT, help="LoRA dropout of every variant "
                        "(default: the config's default)")
    parser.add_argument("--peft-dropout", action="store_true", help="add variant d: c with PEFT's own dropout")
    parser.add_argument("--profile-steps", type=int, default=4, help="steps of c profiled after the timed runs "
                        "(0: no profile)")
    parser.add_argument("--child", choices=(*VARIANTS, "d"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    DROPOUT = args.lora_dropout
    sys.path.insert(0, str(ROOT / "src"))
    from gemmatune.hardware import usable_cores

    threads = args.threads or usable_cores()
    if args.child:
        print(json.dumps(run_variant(args.child, args.data, args.steps, threads, args.profile_steps)))
        return
    variants = (*VARIANTS, "d") if args.peft_dropout else VARIANTS

    started = time.perf_counter()
    path, described = data_file(args.rows)
    tokenizer, data = _examples(path)
    report = data.train.report
    label_share = report.label_tokens / report.tokens
    print(f"data: {described}; {report.examples} examples, {report.tokens} tokens ({100 * label_share:.0f}% "
          f"labels), {args.steps} steps x {BATCH} examples, {threads} threads, LoRA dropout {DROPOUT}", flush=True)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            res = spawn(v, path, args.steps, threads, not args.no_tcmalloc, not args.no_mallopt)
            runs[v].append(res)
            print(f"  round {r + 1} {v}: {res['tokens_per_second']:7.1f} real tok/s, peak RSS "
                  f"{res['peak_rss_gib']:.2f} GiB, loss {res['final_loss']:.4f}  [{res['stack']}]", flush=True)
    gflops = {dtype: matmul_gflops(threads, dtype) for dtype in ("bf16", "fp32")}
    c_dtype = runs["c"][0].get("compute_dtype", "bf16")
    if c_dtype not in gflops:
        gflops[c_dtype] = matmul_gflops(threads, c_dtype)
    flops = flops_per_token(_model_dir(), label_share, report.tokens / report.examples)
    roofline = gflops[c_dtype] * 1e9 / flops
    bf16_roofline = gflops["bf16"] * 1e9 / flops

    def med(v: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[v])

    summary = {v: {"stack": runs[v][0]["stack"], "tokens_per_second": round(med(v, "tokens_per_second"), 1),
                   "peak_rss_gib": round(med(v, "peak_rss_gib"), 2), "final_loss": round(med(v, "final_loss"), 4),
                   "real_tokens": runs[v][0]["real_tokens"]} for v in variants}
    a, b, c = (summary[v] for v in VARIANTS)
    computed = statistics.median(x.get("computed_token_share", 1.0) for x in runs["c"])
    result = {
        "data": described, "steps": args.steps, "batch": BATCH, "rounds": args.rounds, "threads": threads,
        "variants": summary,
        "speed_c_over_a": round(c["tokens_per_second"] / a["tokens_per_second"], 2),
        "speed_c_over_b": round(c["tokens_per_second"] / b["tokens_per_second"], 2),
        "rss_c_over_a": round(c["peak_rss_gib"] / a["peak_rss_gib"], 3),
        "loss_c_vs_a_relative": round(c["final_loss"] / a["final_loss"] - 1, 4),
        "bf16_matmul_gflops": round(gflops["bf16"], 1),
        "fp32_matmul_gflops": round(gflops["fp32"], 1),
        "c_compute_dtype": c_dtype,
        "gflop_per_token": round(flops / 1e9, 3),
        "roofline_tokens_per_second": round(roofline, 1),
        "c_share_of_roofline": round(c["tokens_per_second"] / roofline, 3),
        "bf16_roofline_tokens_per_second": round(bf16_roofline, 1),
        "c_share_of_bf16_roofline": round(c["tokens_per_second"] / bf16_roofline, 3),
        # c computes fewer rows than the examples have tokens where they share a prefix: its share of the roofline
        # counted in the tokens it computed (what the matmuls ran at), beside the one in example tokens above
        "c_computed_token_share": round(computed, 3),
        "c_share_of_roofline_computed": round(c["tokens_per_second"] * computed / roofline, 3),
        "tcmalloc_in_c": runs["c"][0]["tcmalloc"],
        "allocator_in_c": runs["c"][0].get("allocator", "unknown"),
        "lora_dropout": DROPOUT,
    }
    if "d" in summary:
        result["speed_c_over_d_peft_dropout"] = round(c["tokens_per_second"] / summary["d"]["tokens_per_second"], 3)
    if args.profile_steps:
        result["c_profile"] = spawn("c", path, args.steps, threads, not args.no_tcmalloc, not args.no_mallopt,
                                    args.profile_steps)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    for v in variants:
        s = summary[v]
        print(f"{v}: {s['tokens_per_second']:7.1f} real tok/s  peak RSS {s['peak_rss_gib']:.2f} GiB  "
              f"loss {s['final_loss']:.4f}  {s['stack']}")
    print(f"c/a {result['speed_c_over_a']}x, c/b {result['speed_c_over_b']}x, RSS c/a {result['rss_c_over_a']}, "
          f"loss c vs a {100 * result['loss_c_vs_a_relative']:+.2f}%")
    print(f"matmul 2048^3: bf16 {gflops['bf16']:.0f} GFLOP/s, fp32 {gflops['fp32']:.0f} GFLOP/s; c computes in "
          f"{c_dtype}: {flops / 1e9:.2f} GFLOP per token -> roofline {roofline:.0f} tok/s; c reaches "
          f"{100 * result['c_share_of_roofline']:.0f}% of it ({100 * result['c_share_of_bf16_roofline']:.0f}% of the "
          f"bf16 one); allocator in c: {result['allocator_in_c']}")
    print(f"c computed {100 * computed:.0f}% of the examples' tokens (a shared prefix once per batch): "
          f"{100 * result['c_share_of_roofline_computed']:.0f}% of the roofline in tokens computed")
    if "d" in summary:
        print(f"c / d (gemmatune's LoRA dropout / PEFT's): {result['speed_c_over_d_peft_dropout']}x")
    if args.profile_steps:
        p = result["c_profile"]
        print(f"c profiled over {p['profiled_steps']} steps: matmul {p['matmul_us_per_token']:.0f} us/token, "
              f"non-matmul {p['non_matmul_us_per_token']:.0f} us/token ({100 * p['non_matmul_share']:.0f}%); "
              "largest non-matmul ops (% of CPU time): " + ", ".join(f"{k} {v}" for k, v in p["top_non_matmul"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Inference throughput on this machine: gemmatune's eval paths against a plain transformers + PEFT loop.

Same rows (the first --rows of the shared Alpaca demo, or the bundled tickets), the embedded Gemma 3 270M and one
LoRA adapter (r=16, alpha 32, the 7 projections, B drawn at random so the adapter changes the output). Stacks,
each in a fresh subprocess (peak RSS is its own), alternated round by round:

  plain   what a tutorial does: fp32 model + PeftModel, response loss from `model(**batch, labels=...)` on
          right-padded batches of 8 in file order; generation per row with `model.generate` (greedy), and
          batched (8 rows, left-padded, file order) for fairness
  gm      gemmatune as `gemmatune eval` runs (precision auto): `response_loss` and batched greedy generation,
          the adapter merged into fp32 base weights (a bf16 base, where auto picks bf16, runs it unmerged)
  gm-bf16 the same with precision bf16 (bf16 base weights under bf16 autocast, as training keeps them)
  qlora   the same on a 4-bit (bitsandbytes NF4) base, adapter unmerged (4-bit weights cannot hold W + BA)
  train   gemmatune training on the same rows (benchmarks/train_throughput.py variant c): the training tokens/s
          that the loss pass is compared with

Loss tokens/s count every real token of the scored rows (prompt and response, as training's tokens/s do).
gemmatune's loss pass runs twice: the first pass of the fresh process (compared with plain's single pass) and
again warm (compared with training, whose tokens/s start after its first step: `*_loss_over_train`; the first
pass's ratio is `*_first_loss_over_train`);
generation tokens/s count new tokens (the stop token included), greedy, at most --max-new-tokens.

    flock /tmp/gemmatune-heavy.lock python benchmarks/inference_throughput.py          # ~18 min here
    flock /tmp/gemmatune-heavy.lock python benchmarks/inference_throughput.py --rows 16 --rounds 1 --train-steps 4

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_throughput  # noqa: E402  (same folder: data selection and the training variant)

STACKS = ("plain", "gm", "gm-bf16", "qlora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PLAIN_BATCH = 8
TEMPLATE = "alpaca-en"


def make_adapter(folder: Path, seed: int = 0) -> Path:
    """A LoRA adapter on the embedded 270M whose B is random (std 0.01), so merged vs unmerged matters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gemmatune.models.loading import embedded_model_dir

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    peft.save_pretrained(folder)
    return folder


def read_bench_rows(data_file: str) -> list[dict]:
    from gemmatune.data.rows import read_eval_rows

    return read_eval_rows(data_file)


# ----------------------------------------------------------------------------- children: one stack each


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_plain(adapter: str, rows: list[dict], gen_rows: int, max_new_tokens: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemmatune.data.templates import prompt_ids, tokenize_row
    from gemmatune.models.loading import embedded_model_dir, family_for, stop_token_ids
    from gemmatune.models.loss import IGNORE

    model_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    stops = stop_token_ids(tokenizer, family_for(model.config.model_type))
    examples = [tokenize_row(row, TEMPLATE, tokenizer) for row in rows]
    pad = tokenizer.pad_token_id

    def loss_pass():
        total = count = 0
        for start in range(0, len(examples), PLAIN_BATCH):
            chunk = examples[start:start + PLAIN_BATCH]
            width = max(len(ex.input_ids) for ex in chunk)
            ids = torch.tensor([ex.input_ids + [pad] * (width - len(ex.input_ids)) for ex in chunk])
            labels = torch.tensor([ex.labels + [IGNORE] * (width - len(ex.labels)) for ex in chunk])
            mask = (torch.arange(width)[None, :] < torch.tensor([len(ex.input_ids) for ex in chunk])[:, None]).long()
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
            n = int((labels[:, 1:] != IGNORE).sum())
            total += out.loss.item() * n
            count += n
        return total / count

    def new_tokens(row_ids: list[int]) -> int:
        stop = next((k for k, tok in enumerate(row_ids) if tok in stops), None)
        return len(row_ids) if stop is None else stop + 1

    prompts = [prompt_ids(row, TEMPLATE, tokenizer) for row in rows[:gen_rows]]
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad,
                  temperature=None, top_p=None, top_k=None)

    def gen_per_row():
        made, texts = 0, []
        for ids in prompts:
            with torch.no_grad():
                out = model.generate(input_ids=torch.tensor([ids]), **kwargs)[0, len(ids):].tolist()
            made += new_tokens(out)
            texts.append(out)
        return made, texts

    def gen_batched():
        made = 0
        for start in range(0, len(prompts), PLAIN_BATCH):
            chunk = prompts[start:start + PLAIN_BATCH]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            mask = (ids != pad).long()
            for i, p in enumerate(chunk):  # a pad id inside a prompt must stay attended
                mask[i, width - len(p):] = 1
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:].tolist()
            made += sum(new_tokens(o) for o in out)
        return made

    loss, t_loss = _timed(loss_pass)
    (made_row, texts), t_row = _timed(gen_per_row)
    made_batch, t_batch = _timed(gen_batched)
    return {"stack": "plain", "loss": loss, "loss_tokens_per_second": sum(len(e.input_ids) for e in examples) / t_loss,
            "gen_tokens_per_second": made_row / t_row, "gen_batched_tokens_per_second": made_batch / t_batch,
            "gen_first_ids": texts[0][:8], "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_gemmatune(stack: str, adapter: str, rows: list[dict], gen_rows: int, max_new_tokens: int,
                  batch_size: int) -> dict:
    from gemmatune.data.templates import tokenize_row
    from gemmatune.infer.evaluation import Progress, response_loss
    from gemmatune.infer.load import load
    from gemmatune.infer.model import SamplingSettings, TunedModel

    if stack == "qlora":
        from peft import PeftModel

        from gemmatune.config import load_config
        from gemmatune.models.loading import load_model

        loaded = load_model(load_config(None, ["model.quantization=4bit"]).model, "bf16")
        model = PeftModel.from_pretrained(loaded.model, adapter, adapter_name="a")
        tuned = TunedModel(model, loaded.tokenizer, loaded.family, TEMPLATE, {"a": TEMPLATE}, loaded.precision)
    else:
        tuned = load([f"a={adapter}"], template=TEMPLATE, precision="bf16" if stack == "gm-bf16" else "auto")
    tokens = sum(len(tokenize_row(row, TEMPLATE, tuned.tokenizer).input_ids) for row in rows)
    quiet = open(os.devnull, "w")  # noqa: SIM115  (the progress lines are not what is measured here)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, greedy=True)
    with tuned.merged("a") as merged:
        def loss_pass():
            return response_loss(tuned, rows, "a", progress=Progress("", len(rows), quiet))

        (loss, _), t_loss = _timed(loss_pass)  # the first pass of a fresh process: what one `eval` pass costs
        _, t_again = _timed(loss_pass)  # warm, as training's tokens/s are (they start after its first step)
        progress = Progress("", gen_rows, quiet, every=1e9)
        gens, t_gen = _timed(lambda: tuned.generate(rows[:gen_rows], adapter="a", settings=settings,
                                                    batch_size=batch_size, on_batch=progress.update))
    return {"stack": stack, "precision": tuned.precision, "merged": merged, "loss": loss,
            "loss_tokens_per_second": tokens / t_loss, "loss_again_tokens_per_second": tokens / t_again,
            "gen_tokens_per_second": sum(g.new_tokens for g in gens) / t_gen, "gen_first_ids": gens[0].token_ids[:8],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# ----------------------------------------------------------------------------- parent


def spawn(stack: str, adapter: str, data: str, args) -> dict:
    from gemmatune.train.allocator import ONEDNN_CACHE_ENTRIES, ONEDNN_CACHE_VARIABLE

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    if stack != "plain":
        env.setdefault(ONEDNN_CACHE_VARIABLE, str(ONEDNN_CACHE_ENTRIES))
    cmd = [sys.executable, __file__, "--child", stack, "--adapter", adapter, "--data", data,
           "--gen-rows", str(args.gen_rows), "--max-new-tokens", str(args.max_new_tokens),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"stack {stack} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="rows scored for the loss (the first ones)")
    parser.add_argument("--gen-rows", type=int, default=8, help="rows generated for (the first ones)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="gemmatune's generation batch (eval's default)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per stack, alternating order; medians kept")
    parser.add_argument("--train-steps", type=int, default=8,
                        help="gemmatune training steps of 4 rows (8 x 4 = the 32 default rows) for training tok/s")
    parser.add_argument("--stacks", default=",".join(STACKS), help="comma-separated subset of " + ",".join(STACKS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    parser.add_argument("--child", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from gemmatune.hardware import usable_cores

    args.threads = args.threads or usable_cores()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        rows = read_bench_rows(args.data)
        if args.child == "plain":
            res = run_plain(args.adapter, rows, args.gen_rows, args.max_new_tokens)
        else:
            res = run_gemmatune(args.child, args.adapter, rows, args.gen_rows, args.max_new_tokens, args.batch_size)
        print(json.dumps(res))
        return None

    stacks = [s for s in args.stacks.split(",") if s]
    path, described = train_throughput.data_file(args.rows)
    adapter = str(make_adapter(Path(tempfile.mkdtemp(prefix="bench-adapter-")) / "a"))
    print(f"data: {described}; loss on {args.rows} rows, generation on {args.gen_rows} rows x <= "
          f"{args.max_new_tokens} new tokens, {args.threads} threads", flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in [*stacks, "train"]}
    for r in range(args.rounds):
        order = [*stacks, "train"] if r % 2 == 0 else ["train", *stacks[::-1]]
        for stack in order:
            if stack == "train":
                res = train_throughput.spawn("c", path, args.train_steps, args.threads, True)
                runs["train"].append(res)
                print(f"  round {r + 1} train: {res['tokens_per_second']:7.1f} tok/s  [{res['stack']}]", flush=True)
                continue
            res = spawn(stack, adapter, path, args)
            runs[stack].append(res)
            extra = f", batched {res['gen_batched_tokens_per_second']:.1f}" if stack == "plain" else ""
            again = f" (again {res['loss_again_tokens_per_second']:.1f})" if stack != "plain" else ""
            print(f"  round {r + 1} {stack}: loss {res['loss']:.4f} at {res['loss_tokens_per_second']:7.1f} "
                  f"tok/s{again}, "
                  f"generation {res['gen_tokens_per_second']:6.1f} tok/s{extra}, peak RSS "
                  f"{res['peak_rss_gib']:.2f} GiB", flush=True)

    def med(stack: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[stack])

    summary = {s: {k: round(med(s, k), 4 if k == "loss" else 2) for k in runs[s][0]
                   if isinstance(runs[s][0][k], float)} for s in runs}
    for s in stacks:
        summary[s]["gen_first_ids"] = runs[s][0]["gen_first_ids"]
    train = summary["train"]["tokens_per_second"]
    result: dict = {"data": described, "rows": args.rows, "gen_rows": args.gen_rows,
                    "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "threads": args.threads,
                    "stacks": summary}
    for s in (x for x in stacks if x != "plain"):
        # Warm over warm: training's tokens/s leave out its first step, so the loss's second pass is compared.
        result[f"{s}_loss_over_train"] = round(summary[s]["loss_again_tokens_per_second"] / train, 2)
        result[f"{s}_first_loss_over_train"] = round(summary[s]["loss_tokens_per_second"] / train, 2)
        if "plain" in summary:
            p = summary["plain"]
            result[f"{s}_loss_over_plain"] = round(summary[s]["loss_tokens_per_second"] / p["loss_tokens_per_second"],
                                                   2)
            result[f"{s}_gen_over_plain_per_row"] = round(summary[s]["gen_tokens_per_second"]
                                                          / p["gen_tokens_per_second"], 2)
            result[f"{s}_gen_over_plain_batched"] = round(summary[s]["gen_tokens_per_second"]
                                                          / p["gen_batched_tokens_per_second"], 2)
    if "qlora" in summary and "gm-bf16" in summary:
        q, b = summary["qlora"], summary["gm-bf16"]
        result["qlora_over_bf16"] = {k: round(q[k] / b[k], 3) for k in
                                     ("loss_tokens_per_second", "gen_tokens_per_second", "peak_rss_gib")}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

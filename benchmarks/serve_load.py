"""Throughput of `gemmatune serve` with concurrent clients against one client at a time, same server, same run.

One `gemmatune serve` subprocess on a free loopback port serves a base model (default: the embedded Gemma 3
270M) with two random LoRA adapters (r=8 on q/v/down, B not zero, so each really changes the output; made in
a temporary folder). Requests are the first instructions of the English Alpaca demo set (../shared/data/alpaca)
when present, else a fixed list, each with a model among a, b and base in turn, greedy, --max-tokens each.

  sequential   one client, --sequential requests one after the other
  concurrent   --clients clients at once, --requests each (16 x 8 by default: the issue's load), so the
               server answers them in mixed-adapter batches

Throughput is completion tokens per second of wall time (and requests per second). The ratio concurrent /
sequential is the gain from batching. A thread asks /health every 0.5 s during the concurrent phase.

    flock /tmp/gemmatune-heavy.lock python benchmarks/serve_load.py                      # embedded 270M
    python benchmarks/serve_load.py --base PATH --max-tokens 16                          # another model

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_en_demo.json"
FALLBACK = ["Give three tips for staying healthy.", "What is the capital of France?", "Describe a sunset.",
            "Explain what a LoRA adapter is.", "Write a haiku about tea.", "How do I reset my password?",
            "Translate 'good morning' into Spanish.", "Summarize the plot of Hamlet in one sentence."]


def prompts(count: int) -> list[str]:
    if ALPACA.is_file():
        rows = json.loads(ALPACA.read_text(encoding="utf-8"))
        texts = [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in rows]
    else:
        texts = FALLBACK
    return [texts[i % len(texts)] for i in range(count)]


def make_adapters(base: str, folder: Path) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gemmatune.models.loading import embedded_model_dir

    model_dir = embedded_model_dir() if base == "embedded" else Path(base)
    out = []
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # small B: a changed but still fluent model
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.01)
        peft_model.save_pretrained(folder / name)
        out.append(folder / name)
    return out


def run_phase(url: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int, key: str) -> dict:
    import openai

    per_client = [jobs[c::clients] for c in range(clients)]
    errors: list[str] = []

    def one_client(own_jobs):
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=1800)
        tokens = 0
        for prompt, model in own_jobs:
            try:
                out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
                tokens += out.usage.completion_tokens
            except openai.APIError as exc:
                errors.append(str(exc))
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one_client, per_client))
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(jobs), "errors": len(errors), "completion_tokens": tokens,
            "wall_seconds": round(wall, 2), "tokens_per_second": round(tokens / wall, 2),
            "requests_per_second": round(len(jobs) / wall, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="embedded", help="base model (default: the embedded Gemma 3 270M)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="requests per concurrent client (default 8)")
    parser.add_argument("--sequential", type=int, default=16, help="requests of the one-client phase (16)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()

    import urllib.request

    from tests.serve_process import API_KEY, ServerProcess

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp_path = Path(tmp)
        a, b = make_adapters(args.base, tmp_path)
        server = ServerProcess(["--base", args.base, "--adapter", f"a={a}", "--adapter", f"b={b}",
                                "--max-batch", str(args.max_batch), "--runs", str(tmp_path / "runs")],
                               tmp_path / "server.log")
        try:
            models = ["a", "b", "base"]
            texts = prompts(args.clients * args.requests)
            jobs = [(t, models[i % 3]) for i, t in enumerate(texts)]
            run_phase(server.url, jobs[:3], 1, 4, API_KEY)  # warm-up
            sequential = run_phase(server.url, jobs[: args.sequential], 1, args.max_tokens, API_KEY)
            print(f"sequential: {sequential}", flush=True)
            health: list[float] = []
            running = threading.Event()
            running.set()

            def watch():
                while running.is_set():
                    started = time.perf_counter()
                    req = urllib.request.Request(server.url + "/health",
                                                 headers={"Authorization": f"Bearer {API_KEY}"})
                    with urllib.request.urlopen(req, timeout=30) as response:
                        body = json.loads(response.read())
                    if response.status == 200:
                        health.append(time.perf_counter() - started)
                    time.sleep(0.5)
                    del body

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            concurrent = run_phase(server.url, jobs, args.clients, args.max_tokens, API_KEY)
            running.clear()
            watcher.join()
            print(f"concurrent: {concurrent}", flush=True)
        finally:
            server.stop()
    ratio = concurrent["tokens_per_second"] / sequential["tokens_per_second"]
    print(f"throughput concurrent / one at a time: {ratio:.2f}x ({concurrent['tokens_per_second']} vs "
          f"{sequential['tokens_per_second']} completion tokens/s); errors {concurrent['errors']}; "
          f"health answered {len(health)} times during the load, slowest {max(health, default=0):.2f} s")
    print(json.dumps({"base": args.base, "max_tokens": args.max_tokens, "sequential": sequential,
                      "concurrent": concurrent, "ratio_tokens_per_second": round(ratio, 2),
                      "health_checks": len(health), "health_slowest_seconds": round(max(health, default=0), 3)}))
    return 0 if concurrent["errors"] == 0 and sequential["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

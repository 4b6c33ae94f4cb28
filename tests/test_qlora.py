"""QLoRA (nf4 base weights, bitsandbytes' CPU backend) end to end on tiny random models of each family.

The path the tutorial takes on Gemma 3n, run here on CPU: train with an eval set -> resume -> evaluation
after training -> load and generate -> merge into a 16-bit base.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from gemmatune.config import load_config
from gemmatune.export.merge import merge
from gemmatune.infer.load import load
from gemmatune.models.loading import load_model
from gemmatune.models.lora import attach_lora
from gemmatune.models.quantization import keep_4bit_layout, quantized_layers
from gemmatune.models.registry import family_for
from gemmatune.runs.folder import read_metrics
from gemmatune.train import train
from tests.conftest import tiny_config, write_jsonl

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (in the test extra)")

CHAT_ROWS = [{"messages": [{"role": "user", "content": f"Route: my parcel {i} is late"},
                           {"role": "assistant", "content": f"team: shipping {i % 3}"}]} for i in range(24)]


def _4bit_config(model_dir, tmp_path, **train):
    train_file = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    cfg = tiny_config(model_dir, train_file, tmp_path / "runs", precision="bf16", lr_scheduler_type="constant", **train)
    cfg.model.quantization = "4bit"
    return cfg


def _packed_bytes(model) -> dict[str, torch.Tensor]:
    # Viewed as bytes: packed nf4 in a bf16 container holds NaN patterns, which never compare equal as floats.
    return {name: module.weight.data.view(torch.uint8).clone() for name, module in model.named_modules()
            if isinstance(module, bnb.nn.Linear4bit)}


def _strip(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def test_layers_that_stay_unquantized(tiny_gemma3n):
    # Gemma 3n's AltUp coefficients (clamped in place and read directly by the model), layers the CPU kernel
    # cannot repack (this tiny model's LAuReL rank 8 and per-layer width 16) and the LM head stay 16-bit.
    model = load_model(load_config(None, [f"model.name={tiny_gemma3n}", "model.quantization=4bit"]).model, "bf16").model
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    layer = "model.layers.0."
    for leaf in ("altup.prediction_coefs", "altup.correction_coefs", "altup.modality_router", "laurel.linear_left",
                 "laurel.linear_right", "per_layer_input_gate", "per_layer_projection"):
        assert kinds[layer + leaf] == "Linear", leaf
    assert kinds["lm_head"] == "Linear"
    for leaf in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert kinds[layer + leaf] == "Linear4bit", leaf
    ids = torch.randint(6, 200, (2, 12))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)  # AltUp's in-place clamp crashed here
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)  # CPU kernel repack asserted N % 32 here


def test_evaluation_between_steps_keeps_gradients_and_4bit_bytes(tiny_gemma3n_4bit):
    # bitsandbytes (0.50) repacks a Linear4bit's weight for its CPU kernel at its first eval-mode forward, for good,
    # and that kernel has no autograd: later training steps silently lost every gradient below the top layers.
    cfg = load_config(None, [f"model.name={tiny_gemma3n_4bit}", "model.quantization=4bit", "lora.lora_dropout=0"])
    loaded = load_model(cfg.model, "bf16")
    model, _ = attach_lora(loaded.model, cfg.lora, loaded.family, quantized=True, autocast=True)
    assert all(hasattr(m, "support_avx512bf16_for_cpu") for m in quantized_layers(model)), \
        "bitsandbytes renamed the switch keep_4bit_layout sets: re-check quantization.keep_4bit_layout"
    before = _packed_bytes(model)
    ids = torch.randint(6, 200, (2, 12))
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(p.grad is not None for p in lora.values()), [n for n, p in lora.items() if p.grad is None]
    after = _packed_bytes(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert keep_4bit_layout(model) == len(before)


@pytest.mark.parametrize("model_fixture", ["tiny_gemma3_4bit", "tiny_gemma3_multimodal", "tiny_gemma3n_4bit"])
def test_qlora_train_resume_evaluate_generate_merge(model_fixture, request, tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    cfg = _4bit_config(model_dir, tmp_path, max_steps=4, save_steps=2)
    cfg.data.eval_ratio = 0.25  # an eval set: the Trainer evaluates at step 0, between training steps
    cfg.data.test_file = str(write_jsonl(tmp_path / "test.jsonl", CHAT_ROWS[:3]))
    result = train(cfg)
    run = result.run_dir

    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    evals = [m["eval_loss"] for m in read_metrics(run) if "eval_loss" in m]
    assert losses[-1] < losses[0] and evals[-1] < evals[0]
    assert json.loads((run / "run.json").read_text())["base_model"]["class"] == \
        {"tiny_gemma3_multimodal": "Gemma3ForConditionalGeneration", "tiny_gemma3_4bit": "Gemma3ForCausalLM",
         "tiny_gemma3n_4bit": "Gemma3nForCausalLM"}[model_fixture]
    adapter = load_file(str(run / "adapter_model.safetensors"))
    assert adapter and not any("vision_tower" in k for k in adapter)

    # The 4-bit base is byte for byte a fresh 4-bit load of the same folder; every other base weight too.
    fresh = load_model(cfg.model, "bf16").model
    trained = dict(result.model.named_parameters())
    fresh_params = dict(fresh.named_parameters())
    packed = _packed_bytes(fresh)
    assert packed
    for name, param in trained.items():
        if "lora_" in name:
            continue
        key = _strip(name)
        if key.removesuffix(".weight") in packed:
            assert torch.equal(param.data.view(torch.uint8), packed[key.removesuffix(".weight")]), \
                f"{name}: 4-bit bytes changed"
        else:
            assert torch.equal(param.data.float(), fresh_params[key].data.float()), f"{name} changed"

    report = json.loads((run / "eval.json").read_text())  # written by the evaluation after training
    tuned_loss = {v["name"]: v["response_loss"] for v in report["variants"]}
    assert tuned_loss["run"] < tuned_loss["base"]

    # Resume: a run stopped at step 2 and resumed to 4 ends with the uninterrupted run's adapter.
    half = _4bit_config(model_dir, tmp_path, max_steps=2, save_steps=2, run_name="resumed")
    half.data.eval_ratio = 0.25
    train(half)
    half.train.max_steps = 4
    resumed = load_file(str(train(half, resume=True).run_dir / "adapter_model.safetensors"))
    assert resumed.keys() == adapter.keys()
    assert all(torch.allclose(resumed[k], adapter[k], atol=1e-6) for k in adapter)

    # Load the run folder for generation: a 4-bit base again, and the evaluation's loss reproduced.
    from gemmatune.infer.evaluation import evaluate

    tuned = load([str(run)])
    assert quantized_layers(tuned.model)
    again = evaluate(tuned, cfg.data.test_file, max_new_tokens=4)
    assert again.variants[1].response_loss == pytest.approx(tuned_loss["run"], abs=0.02)
    gens = tuned.generate(["Route: my parcel 7 is late"], greedy=True, max_new_tokens=6)
    assert gens[0].new_tokens > 0

    # Merge: into a bf16 copy of the original base, W + (alpha/r) B A within bf16 rounding.
    out = merge(str(run), tmp_path / "merged")
    merged = load_file(str(out / "model.safetensors"))
    original = load_file(str(model_dir / "model.safetensors"))
    scale = cfg.lora.lora_alpha / cfg.lora.r
    checked = 0
    for key, a in adapter.items():
        if not key.endswith("lora_A.weight"):
            continue
        b = adapter[key.replace("lora_A", "lora_B")]
        # Checkpoint key layouts differ by class (Gemma 3 4B saves language_model.model.layers...): match the tail.
        tail = key.replace(".lora_A.weight", ".weight")
        tail = tail[tail.index("layers."):]
        [weight] = [k for k in original if k.endswith(tail) and "vision" not in k]
        want = original[weight].float() + scale * (b.float() @ a.float())
        assert merged[weight].dtype == torch.bfloat16
        assert torch.allclose(merged[weight].float(), want, atol=1e-2, rtol=1e-2), weight
        assert not torch.equal(merged[weight].float(), original[weight].bfloat16().float()), f"{weight} unmerged"
        checked += 1
    assert checked == len(adapter) // 2


def test_qlora_through_the_cli_with_the_real_gemma_tokenizer(tmp_path):
    """A local Gemma 3n folder (tiny random weights, the embedded model's real Gemma tokenizer): train in 4 bits,
    generate, merge, each through `gemmatune`, as a user runs it."""
    from transformers import AutoTokenizer

    from gemmatune.models.loading import embedded_model_dir
    from tests.cli_subprocess import run_cli_with_peak_rss
    from tests.conftest import gemma3n_4bit_config, save_tiny

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    folder = tmp_path / "gemma3n-tiny"
    config = gemma3n_4bit_config(vocab_size=len(tokenizer))
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, 2
    save_tiny(config, folder)
    tokenizer.save_pretrained(folder)  # replaces the byte-level test tokenizer
    write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS)
    write_jsonl(tmp_path / "test.jsonl", CHAT_ROWS[:2])
    (tmp_path / "qlora.yaml").write_text(
        "model: {name: gemma3n-tiny, quantization: 4bit}\n"
        "lora: {r: 8, lora_alpha: 16, lora_dropout: 0.0}\n"
        "data: {train_file: train.jsonl, template: chat, max_length: 64}\n"
        "train: {max_steps: 3, per_device_train_batch_size: 4, gradient_accumulation_steps: 1, warmup_steps: 0,\n"
        "        learning_rate: 0.005, logging_steps: 1, num_threads: 2, output_dir: runs}\n", encoding="utf-8")

    def gemmatune(*args) -> tuple[str, int]:
        """Run the CLI as a user does; returns its output and its own peak RSS in bytes."""
        proc, peak = run_cli_with_peak_rss(list(args), cwd=tmp_path, timeout=1800)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return proc.stdout + proc.stderr, peak

    log, peak = gemmatune("train", "qlora.yaml", "--no-tcmalloc")
    assert "(weights 4-bit nf4 in " in log
    # `gemmatune plan` models 4-bit on CPU: its estimate for this training run against its measured peak RSS.
    from gemmatune.plan.memory import make_plan

    plan = make_plan(load_config(tmp_path / "qlora.yaml"))
    assert plan.settings.device == "cpu" and plan.settings.weights == "nf4"
    # 0.99 GiB planned, 0.94 GiB measured here; the process baseline (torch, transformers) dominates a tiny run.
    assert abs(plan.estimate.total / peak - 1) < 0.15, (plan.estimate.total, peak)
    run = tmp_path / "runs" / "qlora"
    record = json.loads((run / "run.json").read_text())
    assert record["base_model"]["quantization"] == "4bit"
    gemmatune("eval", "test.jsonl", "--adapter", str(run), "--max-new-tokens", "4")
    report = json.loads((run / "eval.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["base", "qlora"]
    out, _ = gemmatune("generate", "--adapter", str(run), "--greedy", "--max-new-tokens", "4", "--prompt", "hello")
    assert out.strip()
    gemmatune("merge", str(run), "--out", str(tmp_path / "merged"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}


def test_4bit_runs_where_bitsandbytes_does(monkeypatch, tiny_gemma3):
    # CPU with bitsandbytes >= 0.49 runs 4-bit; an older bitsandbytes is one clear line.
    from gemmatune.errors import GemmatuneError

    cfg = load_config(None, [f"model.name={tiny_gemma3}", "model.quantization=4bit"]).model
    assert family_for("gemma3_text").name == "gemma3"
    loaded = load_model(cfg, "bf16")  # the installed bitsandbytes (>= 0.49): 4-bit layers on this CPU
    assert quantized_layers(loaded.model) and all(p.device.type == "cpu" for p in loaded.model.parameters())
    monkeypatch.setattr(bnb, "__version__", "0.48.2")
    with pytest.raises(GemmatuneError, match=r"4bit on CPU needs bitsandbytes >= 0.49 \(installed: 0.48.2\)"):
        load_model(cfg, "bf16")


@pytest.mark.parametrize("kind", ["e", "moe"])
def test_qlora_on_tiny_gemma4_keeps_4bit_bytes_and_the_router_and_merges(kind, tmp_path):
    """E2B/E4B-style (PLE, KV sharing) and 26B-A4B-style (experts beside a shared MLP, LoRA on the experts too) in
    4 bits: the packed bytes never change, the router stays a 16-bit Linear, the loss falls, the merge is W + BA."""
    from tests.conftest import gemma4_config, make_gemma4_tokenizer, save_tiny

    # Widths the CPU kernel repacks (outputs x32, inputs x64); PLE's 64-wide per-layer input so its gate and
    # projection are 4-bit too. The MoE's experts are 3-D parameters: 16-bit whatever the quantization.
    config = gemma4_config(kind, **({"hidden_size_per_layer_input": 64} if kind == "e" else {"num_experts": 32}))
    model_dir = save_tiny(config, tmp_path / "base", tokenizer=make_gemma4_tokenizer())
    cfg = _4bit_config(model_dir, tmp_path, max_steps=6)
    cfg.lora.experts = kind == "moe"
    fresh = load_model(cfg.model, "bf16").model
    packed = _packed_bytes(fresh)
    layer = "model.layers.0."
    assert {layer + "self_attn.q_proj", layer + "mlp.down_proj"} <= packed.keys()
    if kind == "e":
        assert layer + "per_layer_input_gate" in packed
    else:  # 64 -> 32 scores would fit the kernel: kept 16-bit on purpose (its top-k choice picks the experts)
        router = fresh.get_submodule(layer + "router.proj")
        assert type(router) is torch.nn.Linear and router.weight.dtype == torch.bfloat16

    result = train(cfg)
    losses = [m["loss"] for m in read_metrics(result.run_dir) if "loss" in m]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    trained = {_strip(n): m for n, m in result.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert trained.keys() == packed.keys()
    assert all(torch.equal(m.weight.data.view(torch.uint8), packed[n]) for n, m in trained.items()), \
        "4-bit bytes changed"
    if kind == "moe":
        router = result.model.get_submodule("base_model.model." + layer + "router.proj")
        assert type(router) is torch.nn.Linear and router.weight.dtype == torch.bfloat16

    adapter = load_file(str(result.run_dir / "adapter_model.safetensors"))
    assert any(".experts." in k for k in adapter) == (kind == "moe")
    out = merge(str(result.run_dir), tmp_path / "merged")
    merged = load_file(str(out / "model.safetensors"))
    original = load_file(str(model_dir / "model.safetensors"))
    scale = cfg.lora.lora_alpha / cfg.lora.r
    checked = 0
    for key, a in adapter.items():
        if not key.endswith("lora_A.weight") or ".experts." in key:
            continue
        weight = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        want = original[weight].float() + scale * (adapter[key.replace("lora_A", "lora_B")].float() @ a.float())
        assert merged[weight].dtype == torch.bfloat16
        assert torch.allclose(merged[weight].float(), want, atol=1e-2, rtol=1e-2), weight
        checked += 1
    assert checked >= 20
    if kind == "moe":  # the experts' LoRA merged into their 3-D weights
        key = "model.layers.0.experts.down_proj"
        assert not torch.equal(merged[key].float(), original[key].bfloat16().float())

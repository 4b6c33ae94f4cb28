"""Gemma 4 on tiny random configs: family data, chat format and stopping, thinking out of the loss, experts only when
asked, train -> resume -> eval -> generate -> merge, towers, 4-bit, and plan / export for real ids."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from gemmatune.config import load_config
from gemmatune.data.templates import tokenize_row
from gemmatune.errors import GemmatuneError
from gemmatune.models.gemma4 import FAMILY
from gemmatune.models.loading import choose_model_class, load_model, resolve_source
from gemmatune.models.lora import attach_lora, trainable_report, wrapped_module_names
from gemmatune.models.loss import IGNORE
from gemmatune.models.registry import bundled_config_file, family_for
from gemmatune.runs.folder import read_metrics
from gemmatune.train import train
from tests.conftest import gemma4_config, make_gemma4_tokenizer, tiny_config, write_jsonl

SHORT_ROWS = [{"messages": [{"role": "user", "content": f"Ticket {i}: where is my parcel?"},
                            {"role": "assistant", "content": "ok"}]} for i in range(16)]


def _model_cfg(*sets):
    return load_config(None, list(sets)).model


def test_family_data():
    for model_type in ("gemma4", "gemma4_text"):
        assert family_for(model_type) is FAMILY
    assert choose_model_class(_model_cfg(), "gemma4", FAMILY, "x").__name__ == "Gemma4ForCausalLM"
    assert choose_model_class(_model_cfg(), "gemma4_text", FAMILY, "x").__name__ == "AutoModelForCausalLM"
    with pytest.raises(GemmatuneError, match=r"did you mean google/gemma-4-E4B-it\?"):
        resolve_source(_model_cfg("model.name=google/gemma-4-e4b-it"))
    with pytest.raises(GemmatuneError, match=r"did you mean google/gemma-4-26B-A4B-it\?"):
        resolve_source(_model_cfg("model.name=google/gemma-4-26b-a4b-it"))


def test_fp16_is_refused_before_loading(tiny_gemma4):
    with pytest.raises(GemmatuneError, match="fp16"):
        load_model(_model_cfg(f"model.name={tiny_gemma4}"), "fp16")


def test_chat_format_learns_end_of_turn_and_keeps_thinking_out_of_the_loss():
    tok = make_gemma4_tokenizer()
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello", "reasoning": "greet back"}]}
    text = tok.apply_chat_template(row["messages"], tokenize=False)
    assert text == ("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
                    "<|channel>thought\ngreet back\n<channel|>Hello<turn|>\n")
    channel, close, end = (tok.convert_tokens_to_ids(t) for t in ("<|channel>", "<channel|>", "<turn|>"))
    masked = tokenize_row(row, "chat", tok, thinking=(channel, close))
    trained = [i for i, label in zip(masked.input_ids, masked.labels, strict=True) if label != IGNORE]
    assert tok.decode(trained) == "Hello<turn|>\n" and end in trained
    every = tokenize_row(row, "chat", tok)  # data.train_on_thinking: true
    assert tok.decode([i for i, lab in zip(every.input_ids, every.labels, strict=True) if lab != IGNORE]) == \
        "<|channel>thought\ngreet back\n<channel|>Hello<turn|>\n"


def test_thinking_rows_train_with_the_thoughts_masked_unless_asked(tiny_gemma4, tmp_path):
    from gemmatune.data.examples import tokenize_data
    from gemmatune.data.rows import read_data

    rows = [{"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4", "reasoning": "two and two"}]}]
    cfg = tiny_config(tiny_gemma4, write_jsonl(tmp_path / "t.jsonl", rows), tmp_path / "runs")
    tok = make_gemma4_tokenizer()
    counts = {}
    for asked in (False, True):
        cfg.data.train_on_thinking = asked
        data = tokenize_data(read_data(cfg.data, 0), tok, cfg.data, None, FAMILY.thinking_markers)
        counts[asked] = data.train.report.label_tokens
    assert counts[False] == len(tok("4<turn|>\n", add_special_tokens=False)["input_ids"])
    assert counts[True] > counts[False]


def test_default_targets_are_the_language_projections_and_k_v_only_where_they_exist(tiny_gemma4):
    model = load_model(_model_cfg(f"model.name={tiny_gemma4}"), "fp32").model
    peft_model, report = attach_lora(model, load_config().lora, FAMILY)
    expected = set()
    for i in range(4):  # layers 2 and 3 reuse the keys/values of 0 and 1: no k/v projections there
        names = ["q_proj", "o_proj"] + (["k_proj", "v_proj"] if i < 2 else [])
        expected |= {f"base_model.model.model.layers.{i}.self_attn.{p}" for p in names}
        expected |= {f"base_model.model.model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(wrapped_module_names(peft_model)) == expected
    assert report.moe == {}  # no experts: nothing to report


def _expert_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}


@pytest.mark.parametrize("experts", [False, True])
def test_experts_get_lora_only_when_asked(experts, tiny_gemma4_moe, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", SHORT_ROWS)
    cfg = tiny_config(tiny_gemma4_moe, rows, tmp_path / "runs", max_steps=3)
    cfg.lora.experts = experts
    result = train(cfg)
    base = load_file(str(tiny_gemma4_moe / "model.safetensors"))
    trained = dict(result.model.named_parameters())
    for name, tensor in trained.items():  # the base weights never change, experts included
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(tensor.detach(), base[key]), name
    expert_lora = {n: p for n, p in trained.items() if ".experts." in n and "lora_" in n}
    assert bool(expert_lora) == experts
    if experts:
        assert all(p.requires_grad for p in expert_lora.values())
        assert any(p.detach().abs().sum() > 0 for n, p in expert_lora.items() if "lora_B" in n)  # B moved off 0
    moe = result.record["lora"]
    report = trainable_report(result.model, FAMILY)
    assert report.moe == {"experts": 8 if experts else 0, "router": 0, "shared MLP": 12}  # 4 layers
    assert ("experts frozen (lora.experts: false)" in report.line()) != experts
    assert moe["wrapped_modules"] == report.wrapped_modules


def test_experts_on_a_dense_model_or_with_dropout_is_an_error(tiny_gemma4, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", SHORT_ROWS)
    cfg = tiny_config(tiny_gemma4, rows, tmp_path / "runs", max_steps=1)
    cfg.lora.experts = True
    with pytest.raises(GemmatuneError, match="lora.experts: this model has no experts"):
        train(cfg)
    with pytest.raises(GemmatuneError, match="lora.experts: needs lora.lora_dropout: 0"):
        load_config(None, ["lora.experts=true", "lora.lora_dropout=0.1"])
    with pytest.raises(GemmatuneError, match="lora.experts: the gemma3 family has no mixture-of-experts"):
        attach_lora(torch.nn.Linear(2, 2), load_config(None, ["lora.experts=true", "lora.lora_dropout=0"]).lora,
                    family_for("gemma3_text"))


@pytest.mark.parametrize("fixture", ["tiny_gemma4", "tiny_gemma4_moe", "tiny_gemma4_unified"])
def test_train_resume_eval_generate_stops_merge(fixture, request, tmp_path):
    from gemmatune.export.merge import merge
    from gemmatune.infer.load import load

    model_dir = request.getfixturevalue(fixture)
    rows = write_jsonl(tmp_path / "rows.jsonl", SHORT_ROWS)
    cfg = tiny_config(model_dir, rows, tmp_path / "runs", max_steps=12)
    cfg.data.eval_ratio = 0.25
    cfg.train.save_steps = 6
    cfg.lora.experts = fixture == "tiny_gemma4_moe"
    train(cfg)
    cfg.train.max_steps = 24
    result = train(cfg, resume=True)
    metrics = read_metrics(result.run_dir)
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 25))
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert losses[-1] < losses[0] * 0.5 and evals[-1] < evals[0]
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["base_model"]["family"] == ("gemma4_unified" if fixture == "tiny_gemma4_unified" else "gemma4")

    tuned = load([str(result.run_dir)], precision="fp32")
    assert 5 in tuned.stop_ids  # <turn|>
    answer = tuned.generate("Ticket 99: where is my parcel?", greedy=True, max_new_tokens=20)[0]
    assert answer.stopped and answer.text == "ok"

    out = merge(str(result.run_dir), tmp_path / "merged")
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(model_dir / "model.safetensors"))
    adapter = load_file(str(result.run_dir / "adapter_model.safetensors"))
    scale = cfg.lora.lora_alpha / cfg.lora.r
    checked = 0
    for key in adapter:
        if not key.endswith("lora_A.weight") or ".experts." in key:
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        delta = scale * adapter[key.replace("lora_A", "lora_B")] @ adapter[key]
        assert torch.allclose(merged[module + ".weight"], base[module + ".weight"] + delta, atol=1e-6), module
        checked += 1
    assert checked >= 20
    if cfg.lora.experts:  # the experts' own weights changed by the merge as well
        assert not torch.equal(merged["model.layers.0.experts.down_proj"], base["model.layers.0.experts.down_proj"])
    ids = torch.tensor([tuned.prompt_ids("Ticket 7: where is my parcel?")])
    with torch.no_grad(), tuned.adapter_context([result.run_dir.name]):
        want = tuned.model(input_ids=ids).logits
    plain = load(base=str(out), precision="fp32")
    with torch.no_grad():
        got = plain.model(input_ids=ids).logits
    # float32 rounding of W + BA against x W + x A B through 4 layers, relative to the logits' size (the weights
    # themselves were compared to 1e-6 above); seen up to 2.1e-5 of it
    assert (got - want).abs().max().item() < 5e-5 * want.abs().max().item()


@pytest.mark.parametrize("unified", [False, True])
def test_text_data_loads_the_language_model_alone_from_a_multimodal_checkpoint(unified, tmp_path):
    import transformers

    from tests.conftest import gemma4_multimodal_config, gemma4_unified_config, save_tiny

    config = gemma4_unified_config(multimodal=True) if unified else gemma4_multimodal_config()
    folder = save_tiny(config, tmp_path / "mm", tokenizer=make_gemma4_tokenizer())
    loaded = load_model(_model_cfg(f"model.name={folder}"), "fp32")
    assert type(loaded.model).__name__ == ("Gemma4UnifiedForCausalLM" if unified else "Gemma4ForCausalLM")
    full = getattr(transformers, config.architectures[0]).from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([[2, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        assert torch.allclose(loaded.model.eval()(input_ids=ids).logits, full(input_ids=ids).logits, atol=1e-5)


def test_the_unified_models_media_rows_are_refused_in_one_line(tmp_path):
    from tests.conftest import gemma4_unified_config, save_tiny

    folder = save_tiny(gemma4_unified_config(multimodal=True), tmp_path / "mm", tokenizer=make_gemma4_tokenizer())
    with pytest.raises(GemmatuneError, match=r"model.multimodal: .* \(gemma4_unified\) gemmatune does not train its "
                                             r"image and audio inputs yet; set model.multimodal: false$"):
        load_model(_model_cfg(f"model.name={folder}", "model.multimodal=true"), "fp32")


def _tower_inputs():
    torch.manual_seed(5)
    pixels = torch.rand(1, 16, 48)  # 16 patches of 4x4x3, on a 4x4 grid
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), -1).reshape(1, 16, 2)
    return pixels, grid, torch.randn(1, 40, 8), torch.tensor([[2, 40, 50, 60, 70, 80]])


def _lora_with_towers(towers: list[str], config=None):
    from transformers import Gemma4ForConditionalGeneration

    from tests.conftest import gemma4_multimodal_config

    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(config or gemma4_multimodal_config())
    cfg = load_config(None, ["model.multimodal=true"])
    cfg.lora.towers = towers
    return attach_lora(model, cfg.lora, FAMILY)


@pytest.mark.parametrize("towers", [[], ["vision"], ["audio"], ["audio", "vision"]])
def test_towers_get_lora_inside_the_clippable_linears_and_train_only_when_asked(towers):
    from peft.tuners.lora import LoraLayer

    peft_model, report = _lora_with_towers(towers)
    names = wrapped_module_names(peft_model)
    assert {t for t in ("audio", "vision") if report.per_tower[t]} == set(towers)
    for name in names:
        if "_tower." in name:  # inside a tower: the nn.Linear of a Gemma4ClippableLinear, never the clamping wrapper
            assert name.endswith(".linear")
            parent = peft_model.get_submodule(name.rsplit(".", 1)[0])
            assert type(parent).__name__ == "Gemma4ClippableLinear"
    inner = peft_model.base_model.model.model
    pixels, grid, audio, ids = _tower_inputs()
    loss = (peft_model(input_ids=ids).logits.square().mean()
            + inner.embed_vision(inner.vision_tower(pixel_values=pixels, pixel_position_ids=grid)
                                 .last_hidden_state[None]).square().mean()
            + inner.embed_audio(inner.audio_tower(input_features=audio, attention_mask=torch.ones(1, 40, dtype=bool))
                                .last_hidden_state).square().mean())
    loss.backward()
    moved = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all("lora_" in n for n in moved)  # nothing of the base model trains
    parts = {("vision" if "vision" in n else "audio" if "audio" in n else "language model") for n in moved}
    assert parts == {"language model", *towers}
    if "vision" in towers:  # the clamps still act around the adapted layer
        clip = inner.vision_tower.encoder.layers[0].self_attn.q_proj
        assert isinstance(clip.linear, LoraLayer)
        clip.output_max.fill_(0.01)
        clip.input_min.fill_(-0.5)
        x = torch.randn(3, 32) * 10
        with torch.no_grad():
            out = clip(x)
            assert out.max() <= 0.01
            assert torch.equal(out, torch.clamp(clip.linear(torch.clamp(x, min=-0.5)), max=0.01))


def test_a_tower_asked_for_but_absent_or_unmatched_is_an_error():
    import dataclasses

    from transformers import Gemma4ForConditionalGeneration

    from tests.conftest import gemma4_multimodal_config

    # Present, but the family's targets match none of its modules (a renamed layer in a new transformers)
    renamed = dataclasses.replace(FAMILY, towers=tuple((name, parts, r"^nothing$") for name, parts, _ in FAMILY.towers))
    cfg = load_config(None, ["model.multimodal=true"])
    cfg.lora.towers = ["vision"]
    with pytest.raises(GemmatuneError, match="lora.towers: vision asked for, but no module of that tower matched"):
        attach_lora(Gemma4ForConditionalGeneration(gemma4_multimodal_config()), cfg.lora, renamed)
    with pytest.raises(GemmatuneError, match="lora.towers: this model has no vision tower; the gemma4 towers it has: "
                                             "audio$"):
        _lora_with_towers(["vision"], gemma4_multimodal_config(vision=False))


def test_cli_run_on_a_local_gemma4_folder_completes_learns_and_stops(tiny_gemma4, tmp_path):
    from tests.cli_subprocess import run_cli

    rows = write_jsonl(tmp_path / "rows.jsonl", SHORT_ROWS)
    sets = [f"model.name={tiny_gemma4}", f"data.train_file={rows}", f"train.output_dir={tmp_path / 'runs'}",
            "train.run_name=g4", "train.precision=fp32", "train.max_steps=20", "train.save_steps=10",
            "train.logging_steps=1", "train.per_device_train_batch_size=4", "train.learning_rate=5e-3",
            "train.warmup_steps=0", "lora.lora_dropout=0", "train.num_threads=2"]
    proc = run_cli(["train", *[a for s in sets for a in ("--set", s)]], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "runs" / "g4"
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "run.json", "metrics.jsonl",
                 "loss.png", "tokenizer.json"):
        assert (run / name).is_file(), name
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert losses[-1] < losses[0] * 0.5
    out = tmp_path / "answers.jsonl"
    proc = run_cli(["generate", "--adapter", str(run), "--prompt", "Ticket 42: where is my parcel?", "--greedy",
                    "--max-new-tokens", "20", "--output", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads(out.read_text().splitlines()[0])
    assert answer["stopped"] and answer["generation"] == "ok"


# What each released name promises, in billions: E2B/E4B count without the per-layer embedding table ("effective"),
# 26B-A4B totals about 26B with about 4B active per token (shared parts + top-k of the experts), 31B is 31B. A bundled
# config with a wrong width, depth or expert count lands outside its range.
NAMED_SIZES = {"E2B": ("effective", 2.0, 2.5), "E4B": ("effective", 4.0, 5.0), "26B-A4B": ("total", 25.0, 26.5),
               "31B": ("total", 30.5, 31.5), "12B": ("total", 11.5, 12.5)}


@pytest.mark.parametrize("size", list(NAMED_SIZES))
def test_plan_for_each_real_gemma4_id_works_offline_and_counts_what_the_name_says(size, monkeypatch):
    from gemmatune.plan.shape import measure

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model_id in (f"google/gemma-4-{size}", f"google/gemma-4-{size}-it"):
        shape = measure(load_config(None, [f"model.name={model_id}"]))
        assert shape.model_class in ("Gemma4ForCausalLM", "Gemma4UnifiedForCausalLM")
        assert "bundled config" in shape.source
    text = AutoConfig.for_model(**json.loads(bundled_config_file(model_id).read_text())).text_config
    kind, low, high = NAMED_SIZES[size]
    params = shape.total_params
    if kind == "effective":
        params -= text.vocab_size_per_layer_input * text.num_hidden_layers * text.hidden_size_per_layer_input
    assert low <= params / 1e9 <= high, (size, params)
    if text.enable_moe_block:
        expert = 3 * text.hidden_size * text.moe_intermediate_size  # gate, up and down of one expert
        experts = text.num_hidden_layers * text.num_experts * expert
        active = shape.total_params - experts + experts * text.top_k_experts // text.num_experts
        assert 3.5 <= active / 1e9 <= 4.5, active
    # KV-shared layers (E2B 20 of 35, E4B 18 of 42) and attention_k_eq_v full layers (no v_proj) get no k/v adapters
    counts = {leaf: sum(n.endswith("." + leaf) for n in shape.wrapped) for leaf in ("q_proj", "k_proj", "v_proj")}
    shared = text.num_kv_shared_layers
    full_k_eq_v = sum(t == "full_attention" for t in text.layer_types) if text.attention_k_eq_v else 0
    assert counts == {"q_proj": text.num_hidden_layers, "k_proj": text.num_hidden_layers - shared,
                      "v_proj": text.num_hidden_layers - shared - full_k_eq_v}


def test_plan_for_a_known_id_without_a_bundled_config_says_so_in_one_line(monkeypatch):
    from gemmatune.models.meta import load_architecture

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GemmatuneError, match="bundles no config for google/gemma-3-4b-it") as err:
        load_architecture(load_config(None, ["model.name=google/gemma-3-4b-it"]))
    assert "\n" not in str(err.value)


def test_plan_of_a_local_moe_folder_counts_what_peft_trains(tiny_gemma4_moe):
    from gemmatune.plan.shape import measure

    for experts in (False, True):
        cfg = load_config(None, [f"model.name={tiny_gemma4_moe}", "lora.lora_dropout=0"])
        cfg.lora.experts = experts
        shape = measure(cfg)
        model = load_model(cfg.model, "fp32").model
        _, report = attach_lora(model, cfg.lora, FAMILY)
        assert shape.lora_params == report.trainable
        assert any(".experts" in n for n in shape.wrapped) == experts


def test_qlora_keeps_the_router_unquantized():
    from transformers import Gemma4ForCausalLM

    from gemmatune.models.loading import build_on_meta
    from gemmatune.models.quantization import modules_to_keep_unquantized

    keep = modules_to_keep_unquantized(build_on_meta(Gemma4ForCausalLM, gemma4_config("moe", num_experts=32)), FAMILY)
    assert {f"model.layers.{i}.router.proj" for i in range(4)} <= set(keep)  # 64 -> 32 would fit the kernel
    assert "model.layers.0.mlp.gate_proj" not in keep


def test_gguf_export_of_a_gemma4_run_is_refused_in_one_line(tiny_gemma4, tmp_path):
    from tests.cli_subprocess import run_cli

    cfg = tiny_config(tiny_gemma4, write_jsonl(tmp_path / "rows.jsonl", SHORT_ROWS), tmp_path / "runs", max_steps=1)
    run = train(cfg).run_dir
    proc = run_cli(["export", str(run), "--out", str(tmp_path / "x.gguf")], timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "GGUF export writes the gemma3, gemma3n families (text); this model is a gemma4 model" in errors[0]
    assert "merged" not in proc.stderr  # refused from the run record, before minutes of merging
    assert not (tmp_path / "x.gguf").exists()


def test_plan_measures_both_towers_on_the_meta_device_as_on_real_tensors():
    """`plan`'s tower figures for Gemma 4 (patches with positions, a mask True on real frames), measured on the meta
    device, against the same measurement with real tensors on the CPU."""
    from peft import get_peft_model
    from transformers import Gemma4ForConditionalGeneration

    from gemmatune.models.loading import build_on_meta
    from gemmatune.models.lora import peft_lora_config
    from gemmatune.plan.towers import measure_towers
    from tests.conftest import gemma4_multimodal_config

    lora = load_config(None, ["model.multimodal=true", 'lora.towers=["vision"]']).lora
    figures = {}
    for device in ("meta", "cpu"):
        torch.manual_seed(0)
        if device == "meta":
            model = build_on_meta(Gemma4ForConditionalGeneration, gemma4_multimodal_config())
        else:
            model = Gemma4ForConditionalGeneration(gemma4_multimodal_config())
        for param in model.parameters():
            param.requires_grad_(False)
        peft_model = get_peft_model(model, peft_lora_config(lora, FAMILY))
        figures[device] = {t.tower: t for t in measure_towers(peft_model, ["vision"], dtype_bytes=4, family=FAMILY,
                                                               soft_tokens=70, mel_bins=8)}
    meta, cpu = figures["meta"], figures["cpu"]
    assert meta["vision"].unit == "image 64x64" and meta["audio"].unit == "30 s clip"
    # 64 soft tokens an image (16x16 patches pooled 2x2), 750 a 30 s clip, each 64 wide in fp32
    assert meta["vision"].output_bytes == cpu["vision"].output_bytes == 64 * 64 * 4
    assert meta["audio"].output_bytes == cpu["audio"].output_bytes == 750 * 64 * 4
    assert meta["audio"].saved_bytes == cpu["audio"].saved_bytes == 0  # no LoRA there: nothing kept for backward
    assert cpu["vision"].saved_bytes > 0
    assert abs(meta["vision"].saved_bytes / cpu["vision"].saved_bytes - 1) < 0.15

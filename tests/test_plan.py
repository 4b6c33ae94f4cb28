import importlib.util

import pytest

from gemmatune.cli import main
from gemmatune.config import load_config
from gemmatune.errors import GemmatuneError
from gemmatune.plan.memory import GIB, NF4_BYTES, estimate, make_plan, parse_size
from tests.cli_subprocess import PEAK_RSS_DRIVER, run_cli
from tests.conftest import EXAMPLES_DIR, record_lm_head_calls

E4B_EXAMPLE = str(EXAMPLES_DIR / "gemma3n-e4b-qlora.yaml")


def _lora_params_gemma3n(r, layers, kv_layers, hidden=2048, q=2048, kv=512, inter=16384):
    """r x sum(in + out) over q/k/v/o/gate/up/down, k/v only in layers that do not share KV."""
    base = (hidden + q) + (q + hidden) + 3 * (hidden + inter)
    return r * (layers * base + kv_layers * 2 * (hidden + kv))


def test_plan_counts_match_a_real_peft_model_on_the_tiny_gemma3n(tiny_gemma3n):
    from gemmatune.models.loading import load_model
    from gemmatune.models.lora import attach_lora, wrapped_module_names

    cfg = load_config(None, [f"model.name={tiny_gemma3n}", "train.precision=fp32"])
    plan = make_plan(cfg)
    model, report = attach_lora(load_model(cfg.model, "fp32").model, cfg.lora, plan.shape.family)
    assert plan.shape.lora_params == report.trainable
    assert plan.shape.total_params == report.total - report.trainable
    assert plan.shape.wrapped == wrapped_module_names(model)
    assert plan.estimate.parts["LoRA parameters"] == 4 * report.trainable


def test_plan_e4b_example_offline(capsys):
    assert main(["plan", E4B_EXAMPLE, "--device-memory", "16GiB"]) == 0
    out = capsys.readouterr().out
    assert f"{_lora_params_gemma3n(16, 35, 20):,} trainable" in out  # 37,191,680
    assert "Gemma3nForCausalLM" in out and "6,835,235,568 parameters" in out
    assert "q_proj 35, k_proj 20, v_proj 20, o_proj 35, gate_proj 35, up_proj 35, down_proj 35" in out
    assert "weights nf4" in out and "fits 16 GiB: no" in out and "suggested: --set" in out


@pytest.fixture(scope="module")
def e2b_plan():
    cfg = load_config(E4B_EXAMPLE, ["model.name=google/gemma-3n-E2B-it"])
    return cfg, make_plan(cfg, device_memory=12 * GIB)


def test_plan_e2b_and_world_size(e2b_plan):
    cfg, plan = e2b_plan
    assert plan.shape.layers == 30 and plan.shape.total_params == 4_435_182_688
    assert plan.shape.lora_params == _lora_params_gemma3n(16, 30, 20, inter=8192)  # 20,316,160
    # weights are replicated under data parallelism: per-device memory does not shrink with more devices
    # (it grows: multi-process runs use the model's own full-logits loss, not the chunked one)
    wide = make_plan(cfg, world_size=8)
    assert wide.estimate.parts["weights"] == plan.estimate.parts["weights"]
    assert wide.estimate.total > plan.estimate.total and "full logits" in wide.path.name
    assert "world size 8: 128 sequences per optimizer step" in "\n".join(wide.lines())


def test_nf4_weights_and_suggestion_fit(e2b_plan):
    from dataclasses import replace

    _, small = e2b_plan
    shape = small.shape
    expected = shape.quantizable_params * NF4_BYTES + (shape.total_params - shape.quantizable_params) * 2
    assert small.estimate.parts["weights"] == pytest.approx(expected)
    bf16 = estimate(shape, replace(small.settings, weights="bf16"), small.path)
    assert bf16.parts["weights"] == shape.total_params * 2
    sets, est = small.suggestion
    assert est.total <= 12 * GIB and any("per_device_train_batch_size" in s for s in sets)
    assert estimate(shape, small.settings, small.path).total > 12 * GIB


@pytest.mark.parametrize("typo,meant", [("google/gemma-3n-4b-it", "google/gemma-3n-E4B-it"),
                                        ("google/gemma-3n-e2b-it", "google/gemma-3n-E2B-it"),
                                        ("google/gemma-3-270M-it", "google/gemma-3-270m-it")])
def test_near_miss_id_says_did_you_mean(typo, meant):
    from gemmatune.models.loading import resolve_source

    cfg = load_config(None, [f"model.name={typo}"])
    with pytest.raises(GemmatuneError, match=f"did you mean {meant}\\?"):
        resolve_source(cfg.model)


def test_near_miss_id_fails_plan_too():
    cfg = load_config(None, ["model.name=google/gemma-3n-4b-it"])
    with pytest.raises(GemmatuneError, match="did you mean google/gemma-3n-E4B-it"):
        make_plan(cfg)


def test_fp16_refused_for_gemma3n_on_gpu_plans():
    cfg = load_config(E4B_EXAMPLE, ["train.precision=fp16"])
    with pytest.raises(GemmatuneError, match="fp16 overflows"):
        make_plan(cfg, device="cuda")


@pytest.mark.parametrize("text,size", [("16GiB", 16 * GIB), ("24GB", 24 * GIB), ("8192MiB", 8 * GIB), ("16", 16 * GIB)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_refuses_garbage():
    with pytest.raises(GemmatuneError, match="--device-memory"):
        parse_size("lots")


# The full-logits path is the one a multi-process run takes; a single process takes it here by having the
# trainer's path say so (the child process only), so that one process's peak RSS can be measured.
FULL_LOGITS_DRIVER = PEAK_RSS_DRIVER.replace("from gemmatune.cli import main", """
from dataclasses import replace
from gemmatune.train import trainer
single_process_path = trainer.training_path
trainer.training_path = lambda packing, processes: replace(single_process_path(packing, processes), chunked_loss=False)
from gemmatune.cli import main""")


@pytest.mark.slow
def test_quickstart_full_logits_estimate_is_within_25_percent_of_its_measured_peak_rss(tmp_path):
    """`gemmatune train examples/quickstart.yaml` for 6 steps (batch 8) on the full-logits path (padded batches,
    fp32 frozen weights under bf16 autocast), its own peak RSS measured here, against plan's estimate for it."""
    from gemmatune.plan.memory import CPU_FULL_LOGITS

    measured_run = ["train.precision=bf16", "train.packing=false", "model.dtype=fp32", "train.max_steps=6",
                    "train.save_steps=100", "data.test_file=null", f"train.output_dir={tmp_path}"]
    plan = make_plan(load_config(EXAMPLES_DIR / "quickstart.yaml", measured_run), device="cpu")
    assert "the longest training example" in plan.seq_note
    full_logits = estimate(plan.shape, plan.settings, CPU_FULL_LOGITS)
    args = ["train", str(EXAMPLES_DIR / "quickstart.yaml"), *(a for s in measured_run for a in ("--set", s))]
    proc = run_cli(args, driver=FULL_LOGITS_DRIVER, timeout=1800)
    assert proc.returncode == 0 and "full logits" in proc.stderr, proc.stderr[-3000:]
    peak = int(next(line for line in reversed(proc.stderr.splitlines())
                    if line.startswith("peak_rss_bytes=")).split("=", 1)[1])
    assert abs(full_logits.total / peak - 1) < 0.25, (full_logits.total, peak)


def test_plan_without_packing_takes_the_path_the_trainer_takes(tiny_gemma3, alpaca_file, tmp_path, monkeypatch):
    """train.packing=false on one process: padded batches, and still the label-only chunked loss."""
    from transformers import TrainingArguments

    from gemmatune.data.examples import ExampleDataset, PadCollator, prepare
    from gemmatune.models.loading import load_model
    from gemmatune.train.recipe import prepare_for_training
    from gemmatune.train.trainer import GemmatuneTrainer, TrainingPath
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_gemma3, alpaca_file, tmp_path / "runs", packing=False)
    plan = make_plan(cfg, device="cpu")
    assert plan.training_path == TrainingPath(packed=False, chunked_loss=True)
    assert plan.path.chunk_logits and plan.path.name == "cpu, padded batches, label-only chunked loss"

    loaded = load_model(cfg.model, "fp32", packing=False)
    model, _ = prepare_for_training(loaded, cfg)
    data = prepare(cfg.data, loaded.tokenizer, cfg.train.seed)
    examples = data.train.examples[:4]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=len(examples),
                             max_steps=1, report_to="none", use_cpu=True, remove_unused_columns=False,
                             save_strategy="no")
    collator, dataset = PadCollator(loaded.tokenizer.pad_token_id), ExampleDataset(examples)
    trainer = GemmatuneTrainer(model=model, args=args, train_dataset=dataset,
                               data_collator=collator, run_dir=tmp_path, packing=cfg.train.packing)
    assert trainer.path == plan.training_path
    rows_seen = record_lm_head_calls(monkeypatch)
    module_calls = []  # the head module's own forward: a full-logits pass would show up here
    model.get_output_embeddings().register_forward_hook(lambda *a: module_calls.append(1))
    trainer.train()
    labels = collator([dataset[i] for i in range(len(dataset))])["labels"]
    assert [r[0] for r in rows_seen] == [int((labels[:, 1:] != -100).sum())]
    assert rows_seen[0][0] < labels.numel() and module_calls == []  # no full logits


def test_plan_of_a_multimodal_checkpoint_plans_the_language_model(tmp_path):
    from transformers import Gemma3nConfig

    from tests.conftest import gemma3n_config

    Gemma3nConfig(text_config=gemma3n_config().to_dict()).save_pretrained(tmp_path)
    plan = make_plan(load_config(None, [f"model.name={tmp_path}", "train.precision=fp32"]), device="cpu")
    assert plan.shape.model_class == "Gemma3nForCausalLM"
    assert len(plan.shape.wrapped) == 5 * 10 + 2 * 5  # q/o/gate/up/down x 10 layers, k/v x 5
    multimodal = load_config(None, [f"model.name={tmp_path}", "model.multimodal=true", "train.precision=fp32"])
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(GemmatuneError, match="model.multimodal: the full gemma3n model needs timm"):
            make_plan(multimodal, device="cpu")
    else:
        full = make_plan(multimodal, device="cpu")
        assert full.shape.model_class == "Gemma3nForConditionalGeneration" and full.shape.wrapped == [
            n.replace(".model.layers.", ".model.language_model.layers.") for n in plan.shape.wrapped]

"""Gemma 3n fine-tuned on image and audio parts, with nothing silently untrained.

Data checks and labels run everywhere (the processor's PIL and numpy parts). Tests marked `multimodal` build the
full tiny Gemma 3n, whose vision tower is timm's MobileNetV5: timm needs a torchvision built for the installed
torch, so CI runs them in a second environment (.ci/run) and the main one skips them.
"""

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from gemmatune.config import load_config
from gemmatune.data.examples import PackCollator, tokenize_data
from gemmatune.data.media import MediaCollator, write_wav
from gemmatune.data.rows import read_data
from gemmatune.errors import GemmatuneError
from gemmatune.models.loss import IGNORE
from gemmatune.train.preflight import check_inputs
from tests.conftest import (
    AUDIO,
    BOA,
    BOI,
    EOA,
    EOI,
    IMAGE,
    TINY_AUDIO_TOKENS,
    TINY_IMAGE_SIZE,
    TINY_IMAGE_TOKENS,
    make_multimodal_processor,
    media_rows,
    needs_multimodal,
    tiny_config,
    write_jsonl,
)

MEDIA_IDS = {BOI, EOI, IMAGE, BOA, EOA, AUDIO}


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return make_multimodal_processor(tmp_path_factory.mktemp("processor"))


@pytest.fixture
def media_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", media_rows(tmp_path))


def _data_cfg(train_file, *sets):
    return load_config(None, [f"data.train_file={train_file}", "data.template=chat", *sets]).data


def _row_with(tmp_path, part, role="user"):
    rows = media_rows(tmp_path, 2)
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    rows[2]["messages"][0 if role == "user" else 1]["content"] = [part, {"type": "text", "text": "and?"}]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def _bad_wav(path, rate=16_000, seconds=0.5):
    return write_wav(path, np.zeros(int(rate * seconds)), rate)


@pytest.mark.parametrize("make_part, message", [
    (lambda d: {"type": "image", "path": "nowhere.png"}, r"image file .*nowhere.png not found"),
    (lambda d: {"type": "image", "path": (d / "x.png").write_text("not a picture") and "x.png"},
     r"x.png is not a readable image"),
    (lambda d: {"type": "audio", "path": "img0.png"}, r"img0.png is not a PCM WAV file"),
    (lambda d: {"type": "audio", "path": _bad_wav(d / "cd.wav", rate=44_100).name}, r"cd.wav is sampled at 44100 Hz"),
    (lambda d: {"type": "audio", "path": _bad_wav(d / "long.wav", seconds=31).name}, r"long.wav lasts 31.0 s"),
    (lambda d: {"type": "video", "path": "img0.png"}, r"needs a type of text, image, audio"),
    (lambda d: {"type": "image"}, r"field 'messages\[0\].content\[0\].path' is missing"),
])
def test_bad_media_parts_are_refused_before_the_model_loads_naming_file_and_line(tmp_path, make_part, message):
    train_file = _row_with(tmp_path, make_part(tmp_path))
    with pytest.raises(GemmatuneError, match=rf"^train.jsonl line 3.*{message}"):
        read_data(_data_cfg(train_file), seed=0)


def test_an_image_in_a_reply_is_refused(tmp_path):
    train_file = _row_with(tmp_path, {"type": "image", "path": "img0.png"}, role="assistant")
    with pytest.raises(GemmatuneError, match=r"train.jsonl line 3: messages\[1\].content\[0\] is an image part in an "
                                             r"assistant turn"):
        read_data(_data_cfg(train_file), seed=0)


def test_media_rows_need_the_multimodal_model_before_it_loads(media_file, tiny_gemma3n, tmp_path):
    cfg = tiny_config(tiny_gemma3n, media_file, tmp_path / "runs")
    with pytest.raises(GemmatuneError, match=r"train.jsonl line 1: has image/audio parts.*model.multimodal: true"):
        check_inputs(cfg)


def test_paths_are_relative_to_the_data_file(media_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # not the data file's folder
    rows = read_data(_data_cfg(media_file), seed=0).train
    assert rows[0].data["messages"][0]["content"][0] == {"type": "image", "path": str(tmp_path / "img0.png")}


def test_soft_tokens_are_never_labels_and_only_the_reply_trains(media_file, processor):
    for train_on_prompt in (False, True):
        cfg = _data_cfg(media_file, f"data.train_on_prompt={train_on_prompt}")
        data = tokenize_data(read_data(cfg, seed=0), processor.tokenizer, cfg, processor)
        for ex, row in zip(data.train.examples, data.train.rows, strict=True):
            kind = row.data["messages"][0]["content"][0]["type"]
            soft, n = (IMAGE, TINY_IMAGE_TOKENS) if kind == "image" else (AUDIO, TINY_AUDIO_TOKENS)
            assert ex.input_ids.count(soft) == n and [p.kind for p in ex.media] == [kind]
            assert not any(label in MEDIA_IDS for label in ex.labels)
            assert all(label == IGNORE for i, label in zip(ex.input_ids, ex.labels, strict=True) if i in MEDIA_IDS)
            trained = processor.tokenizer.decode([t for t in ex.labels if t != IGNORE])
            reply = row.data["messages"][1]["content"]
            assert trained.startswith(reply) if not train_on_prompt else reply in trained


def test_an_overlong_media_example_is_dropped_not_cut_inside_its_soft_tokens(media_file, processor):
    cfg = _data_cfg(media_file, "data.max_length=20")  # the soft tokens end past 20 tokens in every row
    with pytest.raises(GemmatuneError, match="all 8 examples are longer than data.max_length=20"):
        tokenize_data(read_data(cfg, seed=0), processor.tokenizer, cfg, processor)


def test_the_collator_gives_each_part_its_processor_tensors_in_order(media_file, processor):
    cfg = _data_cfg(media_file)
    data = tokenize_data(read_data(cfg, seed=0), processor.tokenizer, cfg, processor)
    examples = [{"input_ids": e.input_ids, "labels": e.labels, "media": e.media} for e in data.train.examples[:4]]
    batch = MediaCollator(PackCollator(), processor)(examples)
    assert batch["pixel_values"].shape == (2, 3, 64, 64)  # rows 1 and 3 are images
    assert batch["input_features"].shape[0] == 2 and batch["input_features_mask"].shape[0] == 2
    red, blue = batch["pixel_values"][0], batch["pixel_values"][1]
    assert red[0].mean() > red[2].mean() and blue[2].mean() > blue[0].mean()  # the images in example order
    with wave.open(str(data.train.rows[1].data["messages"][0]["content"][0]["path"])) as w:
        frames = w.getnframes()
    assert int(batch["input_features_mask"][0].sum()) == frames // 160 - 3  # 10 ms hops of 32 ms frames


# --- the full tiny multimodal model (timm vision tower)

def _train_cfg(model_dir, train_file, out, *sets, **train):
    cfg = tiny_config(model_dir, train_file, out, **{"max_steps": 3, "per_device_train_batch_size": 4, **train})
    cfg.model.multimodal = True
    for item in sets:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, json.loads(value))
    return cfg


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter_model.safetensors")


@pytest.mark.multimodal
def test_image_and_audio_rows_train_with_towers_off_then_on(tiny_gemma3n_multimodal, media_file, tmp_path, caplog):
    from gemmatune.train import train

    needs_multimodal()
    caplog.set_level("INFO", logger="gemmatune")
    off = train(_train_cfg(tiny_gemma3n_multimodal, media_file, tmp_path / "off"))
    assert off.record["training"]["train_loss_last"] < off.record["training"]["train_loss_first"]
    per_tower = off.record["lora"]["wrapped_per_tower"]
    assert per_tower["audio"] == 0 and per_tower["vision"] == 0 and per_tower["language model"] == 60
    assert not any("tower" in k or "embed_" in k for k in _adapter(off.run_dir))
    from transformers import Gemma3nForConditionalGeneration

    base = Gemma3nForConditionalGeneration.from_pretrained(tiny_gemma3n_multimodal)
    trained = {n.removeprefix("base_model.model."): p for n, p in off.model.named_parameters()}
    towers = [n for n, _ in base.named_parameters() if "tower" in n or "embed_audio" in n or "embed_vision" in n]
    assert towers and all(torch.equal(trained[n], dict(base.named_parameters())[n]) for n in towers)

    # One step is enough to see the towers' adapters move.
    on = train(_train_cfg(tiny_gemma3n_multimodal, media_file, tmp_path / "on", 'lora.towers=["audio", "vision"]',
                          max_steps=1))
    per_tower = on.record["lora"]["wrapped_per_tower"]
    # The reference, counted by module class: per conformer block q, k, v, post, 2 x 2 feed-forward and the light
    # conv's start/end; per multi-query attention block its query, key, value and output; the fusion adapter's FFN
    # (2); and each embedder's projection (1).
    from timm.layers import MultiQueryAttention2d
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioConformerBlock

    blocks = sum(isinstance(m, Gemma3nAudioConformerBlock) for m in base.modules())
    attentions = sum(isinstance(m, MultiQueryAttention2d) for m in base.modules())
    assert (blocks, attentions) == (2, 33)
    expected = {"language model": 60, "audio": blocks * 10 + 1, "vision": attentions * 4 + 2 + 1}
    assert per_tower == expected
    assert "language model: 60, audio: {audio}, vision: {vision}".format(**expected) in caplog.text
    # The towers' adapters trained: their B matrices (initialised to zero) moved.
    weights = _adapter(on.run_dir)
    for tower in ("audio_tower", "vision_tower", "embed_audio", "embed_vision"):
        moved = [k for k, v in weights.items() if tower in k and "lora_B" in k and v.abs().max() > 0]
        assert moved, tower


def test_a_tower_with_no_matching_module_is_refused(tiny_gemma3n, tiny_gemma3):
    from gemmatune.config import LoraConfig, ModelConfig
    from gemmatune.models.loading import load_model
    from gemmatune.models.lora import attach_lora

    # The language model alone (Gemma3nForCausalLM) has no vision tower: asking to train it must not pass silently.
    # (The config refuses lora.towers without model.multimodal; this is the check behind it, for any cause.)
    loaded = load_model(ModelConfig(name=str(tiny_gemma3n)), "fp32")
    with pytest.raises(GemmatuneError, match=r"lora.towers: this model has no vision tower; the gemma3n towers it "
                                             r"has: none"):
        attach_lora(loaded.model, LoraConfig(towers=["vision"]), loaded.family)
    # A family without towers
    loaded = load_model(ModelConfig(name=str(tiny_gemma3)), "fp32")
    with pytest.raises(GemmatuneError, match=r"lora.towers: the gemma3 family has no audio tower"):
        attach_lora(loaded.model, LoraConfig(towers=["audio"]), loaded.family)
    with pytest.raises(GemmatuneError, match=r"lora.towers: needs model.multimodal: true"):
        load_config(None, ['lora.towers=["audio"]'])


@pytest.mark.multimodal
@pytest.mark.parametrize("chunked", [True, False])
def test_a_packed_multimodal_batch_equals_its_examples_run_alone(tiny_gemma3n_multimodal, media_file, chunked):
    from gemmatune.config import ModelConfig
    from gemmatune.models.loading import load_model
    from gemmatune.models.loss import causal_lm_loss, causal_lm_parts
    from gemmatune.models.packing import sequence_bounds

    needs_multimodal()
    loaded = load_model(ModelConfig(name=str(tiny_gemma3n_multimodal), multimodal=True), "fp32", packing=True)
    model, processor = loaded.model.eval(), loaded.processor
    cfg = _data_cfg(media_file)
    data = tokenize_data(read_data(cfg, seed=0), loaded.tokenizer, cfg, processor)
    examples = [{"input_ids": e.input_ids, "labels": e.labels, "media": e.media} for e in data.train.examples]
    collate = MediaCollator(PackCollator(), processor)
    packed = collate(examples)
    parts = causal_lm_parts(model)
    with torch.no_grad():
        if chunked:  # the training path: body + label-only loss; per example sums compared through the loss
            total = causal_lm_loss(model, packed, num_items_in_batch=1, parts=parts)
            alone = sum(causal_lm_loss(model, collate([e]), num_items_in_batch=1, parts=parts) for e in examples)
            assert torch.allclose(total, alone, rtol=1e-5), (total, alone)
        else:  # the model's own forward: every position's logits
            body = {k: v for k, v in packed.items() if k != "labels"}
            logits = model(**body, use_cache=False).logits[0]
            bounds = sequence_bounds(packed["position_ids"])
            for (start, end), ex in zip(bounds, examples, strict=True):
                single = {k: v for k, v in collate([ex]).items() if k != "labels"}
                assert torch.allclose(logits[start:end], model(**single, use_cache=False).logits[0], atol=1e-4)


@pytest.mark.multimodal
def test_cli_trains_on_image_and_audio_rows_then_generates_and_evaluates_them(tiny_gemma3n_multimodal, tmp_path,
                                                                              capsys):
    """The user's path: a config pointing at a local multimodal folder and rows with parts; train, then generate
    (--image, --audio, and rows with parts) and eval the same rows."""
    from gemmatune.cli import main
    from gemmatune.data.media import media_features
    from gemmatune.infer.load import load

    needs_multimodal()
    rows = media_rows(tmp_path, 8)
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:2])
    (tmp_path / "mm.yaml").write_text(
        f"model: {{name: {tiny_gemma3n_multimodal}, multimodal: true}}\n"
        "lora: {towers: [audio, vision], lora_dropout: 0.0}\n"
        "data: {train_file: train.jsonl, test_file: test.jsonl, max_length: 128}\n"
        f"train: {{output_dir: {tmp_path / 'runs'}, max_steps: 3, per_device_train_batch_size: 4, "
        "gradient_accumulation_steps: 1, learning_rate: 5.0e-3, warmup_steps: 0, logging_steps: 1, precision: fp32, "
        "num_threads: 2}\n", encoding="utf-8")
    assert main(["train", str(tmp_path / "mm.yaml")]) == 0
    run = tmp_path / "runs" / "mm"
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "run.json", "metrics.jsonl",
                 "loss.png", "eval.json", "eval.md"):
        assert (run / name).is_file(), name
    record = json.loads((run / "run.json").read_text())
    assert record["training"]["train_loss_last"] < record["training"]["train_loss_first"]
    assert record["lora"]["wrapped_per_tower"]["vision"] > 0 and record["lora"]["wrapped_per_tower"]["audio"] > 0
    capsys.readouterr()

    common = ["--adapter", str(run), "--precision", "fp32", "--greedy", "--max-new-tokens", "4"]
    assert main(["generate", *common, "--prompt", "What is this?", "--image", str(tmp_path / "img0.png")]) == 0
    printed = capsys.readouterr().out.strip()
    # The reference: the adapter's model given the same ids and the processor's pixels by hand.
    tuned = load([str(run)], precision="fp32")
    row = {"messages": [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "img0.png")},
                                                     {"type": "text", "text": "What is this?"}]}]}
    ids = torch.tensor([tuned.prompt_ids(row)])
    assert ids[0].tolist().count(IMAGE) == TINY_IMAGE_TOKENS
    pixels = media_features(tuned.media_inputs_parts(row), tuned.processor)
    with torch.no_grad():
        out = tuned.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                   do_sample=False, eos_token_id=tuned.stop_ids, **pixels)
    new = out[0, ids.shape[1]:].tolist()
    stop = next((k for k, t in enumerate(new) if t in tuned.stop_ids), len(new))
    expected = tuned.tokenizer.decode(new[:stop], skip_special_tokens=True)
    assert printed == (expected if stop < len(new) else expected + "  [max_new_tokens reached]")

    assert main(["generate", *common, "--prompt", "And this?", "--audio", str(tmp_path / "tone1.wav")]) == 0
    assert main(["generate", *common, "--input", str(tmp_path / "test.jsonl"), "--output",
                 str(tmp_path / "answers.jsonl")]) == 0
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 2
    assert main(["eval", str(tmp_path / "test.jsonl"), "--adapter", str(run), "--precision", "fp32",
                 "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["rows"] == 2
    assert main(["generate", *common, "--prompt", "x", "--image", str(tmp_path / "nowhere.png")]) == 2
    assert "nowhere.png not found" in capsys.readouterr().err

    # merge keeps the towers, with their trained adapters folded in, and the processor
    from transformers import AutoProcessor, Gemma3nForConditionalGeneration

    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = Gemma3nForConditionalGeneration.from_pretrained(tmp_path / "merged")
    base = Gemma3nForConditionalGeneration.from_pretrained(tiny_gemma3n_multimodal)
    name = next(n for n, _ in merged.named_parameters() if "vision_tower" in n and n.endswith("attn.query.proj.weight"))
    assert not torch.equal(dict(merged.named_parameters())[name], dict(base.named_parameters())[name])
    assert AutoProcessor.from_pretrained(tmp_path / "merged").image_seq_length == TINY_IMAGE_TOKENS


@pytest.mark.multimodal
def test_plan_counts_wrapped_modules_per_tower(tiny_gemma3n_multimodal):
    from gemmatune.plan.memory import make_plan

    needs_multimodal()
    sets = [f"model.name={tiny_gemma3n_multimodal}", "model.multimodal=true", "train.precision=fp32"]
    plan = make_plan(load_config(None, [*sets, 'lora.towers=["audio", "vision"]']), device="cpu")
    assert plan.shape.per_tower == {"language model": 60, "audio": 21, "vision": 135}  # as trained (test above)
    assert "per tower: language model 60, audio 21, vision 135" in "\n".join(plan.lines())
    assert make_plan(load_config(None, sets), device="cpu").shape.per_tower == {"language model": 60, "audio": 0,
                                                                                "vision": 0}


@pytest.fixture(scope="module")
def mm_run(tiny_gemma3n_multimodal, tmp_path_factory):
    """A one-step multimodal run (chat template), and the folder of its image/audio rows."""
    from gemmatune.train import train

    needs_multimodal()
    folder = tmp_path_factory.mktemp("mm-run")
    train_file = write_jsonl(folder / "train.jsonl", media_rows(folder, 4))
    return train(_train_cfg(tiny_gemma3n_multimodal, train_file, folder / "runs", max_steps=1,
                            precision="fp32")).run_dir, folder


def _ask(kind: str, path) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": kind, "path": str(path)},
                                                      {"type": "text", "text": "What is this?"}]}]}


@pytest.mark.multimodal
def test_chat_attaches_images_and_audio_to_the_next_message(mm_run):
    import io

    from gemmatune.infer.chat import chat_loop
    from gemmatune.infer.load import load
    from gemmatune.infer.model import SamplingSettings

    run, folder = mm_run
    tuned = load([str(run)], precision="fp32")
    settings = SamplingSettings(greedy=True, max_new_tokens=4)
    lines = iter([f"/image {folder / 'img0.png'}", "What is this?", f"/audio {folder / 'nowhere.wav'}",
                  f"/audio {folder / 'img0.png'}", "/exit"])
    out = io.StringIO()
    assert chat_loop(tuned, tuned.default_adapter, settings, read=lambda _: next(lines), out=out) == 0
    expected = tuned.generate(_ask("image", folder / "img0.png"), settings=settings)[0].text
    text = out.getvalue()
    assert f"model> {expected}" in text, text
    assert "nowhere.wav not found" in text and "is not a PCM WAV file" in text, text


@pytest.mark.multimodal
def test_serve_answers_openai_image_and_audio_parts_as_generate_does(mm_run, tmp_path):
    import base64
    import tempfile

    import openai

    from gemmatune.infer.load import load
    from tests.serve_process import API_KEY, ServerProcess

    run, folder = mm_run
    tuned = load([str(run)], precision="fp32")
    image = base64.b64encode((folder / "img0.png").read_bytes()).decode()
    audio = base64.b64encode((folder / "tone1.wav").read_bytes()).decode()
    parts = {"image": {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
             "audio": {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}}
    before = {p.name for p in Path(tempfile.gettempdir()).glob("gemmatune-serve-*")}
    server = ServerProcess(["--adapter", f"mm={run}", "--precision", "fp32", "--max-body-bytes", str(1 << 20)],
                           tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        for kind, file in (("image", "img0.png"), ("audio", "tone1.wav")):
            for stream in (False, True):
                messages = [{"role": "user", "content": [parts[kind], {"type": "text", "text": "What is this?"}]}]
                expected = tuned.generate(_ask(kind, folder / file), greedy=True, max_new_tokens=4)[0].text
                if stream:
                    chunks = client.chat.completions.create(model="mm", messages=messages, temperature=0,
                                                            max_tokens=4, stream=True)
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                else:
                    text = client.chat.completions.create(model="mm", messages=messages, temperature=0,
                                                          max_tokens=4).choices[0].message.content
                assert text == expected, (kind, stream, text, expected)
        bad = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
               {"type": "input_audio", "input_audio": {"data": image, "format": "wav"}}]
        for part in bad:
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(model="mm", max_tokens=4, messages=[
                    {"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}])
            assert "messages[0].content[0]" in str(err.value), str(err.value)
        assert client.models.list().data  # still serving
    finally:
        server.stop()
    left = {p.name for p in Path(tempfile.gettempdir()).glob("gemmatune-serve-*")} - before
    assert not left, f"request media left behind: {left}"


def _held_after(forward) -> tuple[int, torch.Tensor]:
    """(bytes the allocator still holds after `forward()` returns, its result), from the profiler's memory events:
    what autograd keeps for backward plus the result itself."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = forward()
    return sum(e.self_cpu_memory_usage for e in prof.events()), result


@pytest.mark.multimodal
@pytest.mark.parametrize("towers", [["audio", "vision"], []])
def test_plan_tower_activations_match_what_a_real_tower_forward_holds(tiny_gemma3n_multimodal, tmp_path, towers):
    """plan's per-image and per-clip figures (meta device, no weights) against the memory a real forward of the
    loaded model holds until backward, measured by the allocator (profiler); a frozen tower holds its output only."""
    from gemmatune.data.media import MAX_AUDIO_SECONDS, SAMPLE_RATE, Part, media_features
    from gemmatune.models.loading import load_model
    from gemmatune.models.lora import attach_lora
    from gemmatune.plan.memory import make_plan
    from gemmatune.plan.towers import clip_frames

    needs_multimodal()
    cfg = load_config(None, [f"model.name={tiny_gemma3n_multimodal}", "model.multimodal=true", "train.precision=fp32",
                             f"lora.towers={json.dumps(towers)}"])
    plan = make_plan(cfg, device="cpu")
    planned = {t.tower: t for t in plan.settings.towers}
    assert planned["vision"].unit == f"image {TINY_IMAGE_SIZE}x{TINY_IMAGE_SIZE}"  # the checkpoint's processor
    assert planned["audio"].unit == "30 s clip"
    # Without a local data file: one image and one clip per example, every example of the batch.
    assert plan.estimate.parts["tower activations"] == plan.settings.batch * sum(t.per_unit for t in planned.values())
    lines = "\n".join(plan.lines())
    for t in planned.values():
        assert f"tower activations, {t.tower}: {t.per_unit / 2**30:.3f} GiB per {t.unit}" in lines

    loaded = load_model(cfg.model, "fp32")
    model, _ = attach_lora(loaded.model, cfg.lora, loaded.family)
    model.train()
    rows = media_rows(tmp_path, 1)  # writes img0.png
    clip = write_wav(tmp_path / "long.wav", 0.3 * np.sin(np.arange(int(MAX_AUDIO_SECONDS * SAMPLE_RATE)) / 7.0))
    inputs = media_features([Part("image", str(tmp_path / "img0.png")), Part("audio", str(clip))], loaded.processor)
    assert rows and inputs["input_features"].shape[1] == clip_frames()  # the clip plan assumes: a full 30 s
    inner = model.get_base_model().model
    forwards = {
        "vision": lambda: inner.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output,
        "audio": lambda: inner.get_audio_features(inputs["input_features"], ~inputs["input_features_mask"],
                                                  return_dict=True).pooler_output,
    }
    for tower, forward in forwards.items():
        held, output = _held_after(forward)
        assert planned[tower].trained == (tower in towers)
        assert planned[tower].output_bytes == output.nbytes
        if towers:
            assert planned[tower].saved_bytes > 100 * output.nbytes  # the tower's activations dominate
            # Both count the same tensors; what is left is the allocator's rounding (well under 1%).
            assert abs(planned[tower].per_unit / held - 1) < 0.02, (tower, planned[tower], held)
        else:
            assert output.grad_fn is None and planned[tower].saved_bytes == 0 and held == output.nbytes
        del output


@pytest.mark.multimodal
def test_qlora_trains_the_towers_adapters_and_leaves_4bit_bytes_alone(tiny_gemma3n_multimodal, media_file, tmp_path):
    """4-bit (bitsandbytes nf4 on CPU) with lora.towers: the towers' Linear layers that fit the kernel are 4-bit too,
    LoRA wraps them (and the vision tower's 1x1 convolutions, which stay 16-bit), every tower's adapters train, the
    packed 4-bit bytes and every other base weight stay as loaded, and the run folder is complete."""
    from gemmatune.config import ModelConfig
    from gemmatune.models.loading import load_model
    from gemmatune.models.lora import tower_of
    from gemmatune.models.registry import family_for
    from gemmatune.train import train
    from tests.conftest import require

    needs_multimodal()
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    require(bnb is not None, "bitsandbytes (pip install 'gemmatune[qlora]')")
    rows = media_rows(tmp_path, 8)
    cfg = _train_cfg(tiny_gemma3n_multimodal, media_file, tmp_path / "runs", 'lora.towers=["audio", "vision"]',
                     'model.quantization="4bit"', "data.eval_ratio=0.25", max_steps=3, precision="bf16")
    cfg.data.test_file = str(write_jsonl(tmp_path / "test.jsonl", rows[:2]))
    result = train(cfg)
    run, family = result.run_dir, family_for("gemma3n")
    quantized = {n: m for n, m in result.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    towers_4bit = {tower_of(n, family) for n in quantized}
    assert {"language model", "audio", "vision"} <= towers_4bit, towers_4bit
    assert result.record["lora"]["wrapped_per_tower"] == {"language model": 60, "audio": 21, "vision": 135}
    assert result.record["base_model"]["quantization"] == "4bit"
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "run.json", "metrics.jsonl",
                 "loss.png", "eval.json", "eval.md"):
        assert (run / name).is_file(), name
    assert json.loads((run / "eval.json").read_text())["rows"] == 2

    weights = _adapter(run)
    for tower in ("audio_tower", "vision_tower", "embed_audio", "embed_vision"):
        moved = [k for k, v in weights.items() if tower in k and "lora_B" in k and v.abs().max() > 0]
        assert moved, tower
    # LoRA over 4-bit tower layers trained too (bitsandbytes' Linear4bit as PEFT's base layer).
    over_4bit = [n for n in quantized if tower_of(n, family) != "language model" and n.endswith(".base_layer")]
    assert over_4bit
    for name in over_4bit:
        key = name.removeprefix("base_model.model.").removesuffix(".base_layer") + ".lora_B.weight"
        assert weights["base_model.model." + key].abs().max() > 0, key

    # The base: 4-bit bytes as a fresh 4-bit load of the same folder, every other weight unchanged.
    fresh = load_model(ModelConfig(name=str(tiny_gemma3n_multimodal), multimodal=True, quantization="4bit"),
                       "bf16").model
    packed = {n: m.weight.data.view(torch.uint8) for n, m in fresh.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    fresh_params = dict(fresh.named_parameters())
    checked = 0
    for name, param in result.model.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        if key.removesuffix(".weight") in packed:
            assert torch.equal(param.data.view(torch.uint8), packed[key.removesuffix(".weight")]), name
        else:
            assert torch.equal(param.data.float(), fresh_params[key].data.float()), name
        checked += 1
    assert checked == len(fresh_params)

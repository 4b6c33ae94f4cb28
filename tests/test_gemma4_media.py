"""Gemma 4 fine-tuned on image and audio rows (`model.multimodal: true`), through the same media path as Gemma 3n: the
processor's own soft-token counts (per image size and clip length in Gemma 4), its tensors per batch, soft tokens never
labels, towers trained only when asked.

Gemma4Processor needs torchvision (its video processor), which does not import beside the main environment's CPU
torch: these tests are marked `multimodal` and run in CI's second environment (.ci/run).
"""

import json

import pytest
import torch

from gemmatune.config import load_config
from gemmatune.data.examples import PackCollator, tokenize_data
from gemmatune.data.media import MediaCollator, read_audio
from gemmatune.data.rows import read_data
from gemmatune.errors import GemmatuneError
from gemmatune.models.loss import IGNORE
from tests.conftest import (
    GEMMA4_MEDIA_TOKENS,
    gemma4_multimodal_config,
    make_gemma4_processor,
    make_gemma4_tokenizer,
    media_rows,
    needs_gemma4_processor,
    save_tiny,
    tiny_config,
    write_jsonl,
)

pytestmark = pytest.mark.multimodal
IMAGE, AUDIO = 265, 266  # gemma4_multimodal_config's image_token_id and audio_token_id
MEDIA_IDS = torch.arange(265, 271)  # soft tokens and begin/end markers of both kinds
TOWER_PARTS = ("audio_tower", "vision_tower", "embed_audio", "embed_vision")

@pytest.fixture(scope="module")
def tiny_gemma4_multimodal(tmp_path_factory):
    needs_gemma4_processor()
    folder = tmp_path_factory.mktemp("tiny-gemma4-multimodal")
    save_tiny(gemma4_multimodal_config(), folder, tokenizer=make_gemma4_tokenizer())
    make_gemma4_processor(folder)  # the tokenizer with the media tokens replaces the plain one
    return folder

@pytest.fixture
def media_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", media_rows(tmp_path))

def test_each_part_gets_the_processors_count_and_the_batch_never_labels_a_soft_token(tiny_gemma4_multimodal,
                                                                                     media_file):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_gemma4_multimodal)  # as loading.load_processor reads it
    assert processor.tokenizer.image_token == GEMMA4_MEDIA_TOKENS["image_token"]
    cfg = load_config(None, [f"data.train_file={media_file}", "data.template=chat", "data.train_on_prompt=true"]).data
    data = tokenize_data(read_data(cfg, seed=0), processor.tokenizer, cfg, processor)
    for ex in data.train.examples:
        (part,) = ex.media
        if part.kind == "image":  # 64x64 pixels: 16x16 patches of 4, pooled 2x2
            assert ex.input_ids.count(IMAGE) == 64 and AUDIO not in ex.input_ids
        else:  # the processor's own arithmetic for a clip of this length (what vLLM relies on), not the mask path
            want = processor._compute_audio_num_tokens(read_audio(part.path), 16_000)
            assert 10 <= want <= 20 and ex.input_ids.count(AUDIO) == want and IMAGE not in ex.input_ids

    examples = [{"input_ids": e.input_ids, "labels": e.labels, "media": e.media} for e in data.train.examples[:4]]
    batch = MediaCollator(PackCollator(), processor)(examples)
    ids, labels = batch["input_ids"], batch["labels"]
    media = torch.isin(ids, MEDIA_IDS)
    assert media.sum() > 100 and (labels[media] == IGNORE).all()  # train_on_prompt, yet no soft token is a target
    assert not torch.isin(labels, MEDIA_IDS).any()
    assert (labels != IGNORE).any()
    # The vision tower's inputs: patches and each patch's position (the per-image counts are the text's, not inputs).
    pixels = batch["pixel_values"]
    assert pixels.shape[0] == 2 and batch["image_position_ids"].shape[:2] == pixels.shape[:2]
    assert "num_soft_tokens_per_image" not in batch
    assert batch["input_features"].shape[0] == 2 and batch["input_features"].shape[2] == 8
    types = batch["mm_token_type_ids"]  # bidirectional attention over an image's soft tokens reads these
    assert torch.equal(types == 1, ids == IMAGE) and torch.equal(types == 3, ids == AUDIO)

def _train_cfg(model_dir, train_file, out, towers=(), **train):
    cfg = tiny_config(model_dir, train_file, out, **{"max_steps": 6, "per_device_train_batch_size": 4, **train})
    cfg.model.multimodal = True
    cfg.lora.towers = list(towers)
    return cfg

def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter_model.safetensors")

def test_image_and_audio_rows_train_with_towers_off_then_on(tiny_gemma4_multimodal, media_file, tmp_path):
    from transformers import Gemma4ForConditionalGeneration

    from gemmatune.train import train

    base = dict(Gemma4ForConditionalGeneration.from_pretrained(tiny_gemma4_multimodal).named_parameters())
    towers = [n for n in base if any(t in n for t in TOWER_PARTS)]
    assert len(towers) > 20

    off = train(_train_cfg(tiny_gemma4_multimodal, media_file, tmp_path / "off"))
    training = off.record["training"]
    assert torch.isfinite(torch.tensor(training["train_loss_last"]))
    assert training["train_loss_last"] < training["train_loss_first"]
    per_tower = off.record["lora"]["wrapped_per_tower"]
    assert per_tower["audio"] == 0 and per_tower["vision"] == 0 and per_tower["language model"] > 0
    assert not any(t in k for k in _adapter(off.run_dir) for t in TOWER_PARTS)
    trained = {n.removeprefix("base_model.model."): p for n, p in off.model.named_parameters()}
    assert all(torch.equal(trained[n], base[n]) for n in towers)
    _generates_with_the_parts_marked(off.run_dir, media_file)

    # One step is enough to see the towers' adapters move; the towers' own weights still do not.
    on = train(_train_cfg(tiny_gemma4_multimodal, media_file, tmp_path / "on", ["audio", "vision"], max_steps=1))
    per_tower = on.record["lora"]["wrapped_per_tower"]
    assert per_tower["audio"] > 0 and per_tower["vision"] > 0
    weights = _adapter(on.run_dir)
    for tower in TOWER_PARTS:
        moved = [k for k, v in weights.items() if tower in k and "lora_B" in k and v.abs().max() > 0]
        assert moved, tower
    trained = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
               for n, p in on.model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(trained[n], base[n]) for n in towers)


def _generates_with_the_parts_marked(run_dir, media_file):
    """The tuned model answers an image row and an audio row, its prefill given the soft tokens' types as training."""
    from gemmatune.infer.load import load

    tuned = load([str(run_dir)], precision="fp32")
    seen = []
    generate = tuned.model.generate

    def spy(**kwargs):
        seen.append(kwargs)
        return generate(**kwargs)

    tuned.model.generate = spy
    rows = [json.loads(line) for line in media_file.read_text().splitlines()[:2]]  # an image row, an audio row
    for row in rows:
        row["messages"] = row["messages"][:1]
        part = row["messages"][0]["content"][0]
        part["path"] = str(media_file.parent / part["path"])  # as `generate --image` passes it
    answers = tuned.generate(rows, greedy=True, max_new_tokens=3)
    assert [a.new_tokens > 0 for a in answers] == [True, True]
    ids, types = seen[0]["input_ids"], seen[0]["mm_token_type_ids"]
    assert torch.equal(types == 1, ids == IMAGE) and torch.equal(types == 3, ids == AUDIO) and (types == 1).any()


@pytest.mark.parametrize("size, towers", [("E2B", ["audio", "vision"]), ("E4B", ["audio", "vision"]),
                                          ("26B-A4B", ["vision"]), ("31B", ["vision"])])
def test_plan_of_each_real_gemma4_id_with_its_towers_counts_each_part_offline(size, towers, monkeypatch):
    from gemmatune.plan.memory import make_plan
    from gemmatune.plan.shape import measure

    needs_gemma4_processor()  # the full model is offered where its processor can be built
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_id = f"google/gemma-4-{size}-it"
    text = measure(load_config(None, [f"model.name={model_id}"]))
    full = measure(load_config(None, [f"model.name={model_id}", "model.multimodal=true", f"lora.towers={towers}"]))
    assert full.model_class == "Gemma4ForConditionalGeneration"
    assert full.per_tower["language model"] == len(text.wrapped)  # the towers change nothing in the language model
    assert all(full.per_tower[t] > 0 for t in towers)
    assert full.total_params > text.total_params
    plan = make_plan(load_config(None, [f"model.name={model_id}", "model.multimodal=true", f"lora.towers={towers}"]),
                     device_memory=24 * 2**30, device="cuda")
    # both towers' activations where the model has both; the large models have vision only
    assert {t.tower for t in plan.settings.towers} == ({"vision", "audio"} if size.startswith("E") else {"vision"})
    assert plan.estimate.total > 0 and "\n".join(plan.lines())
    if towers == ["vision"]:  # the large models have no audio tower: asking for it is refused in one line
        with pytest.raises(GemmatuneError, match="this model has no audio tower"):
            measure(load_config(None, [f"model.name={model_id}", "model.multimodal=true", "lora.towers=[audio]"]))

"""The fast inference paths against the plain ones: merged LoRA, batched generation with progress, state after."""

import io

import pytest
import torch

from gemmatune.infer.evaluation import Progress, evaluate, response_loss
from gemmatune.infer.load import load
from gemmatune.infer.model import BASE
from tests.conftest import ALPACA_ROWS, write_jsonl

PROMPTS = [{"instruction": r["instruction"], "input": r["input"] * (i % 3 + 1)} for i, r in enumerate(ALPACA_ROWS[:6])]


def _rows(tuned):
    answers = tuned.generate(PROMPTS, adapter=BASE, greedy=True, max_new_tokens=5)
    return [dict(p, output=g.text or "x") for p, g in zip(PROMPTS, answers, strict=True)]


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_merged_adapter_scores_and_generates_as_unmerged(tiny_gemma3, two_adapters):
    a, b = two_adapters
    tuned = load([str(a), f"b={b}"], precision="fp32")
    rows = _rows(tuned)
    before = _base_weights(tuned.model)
    for name in ("a", "b"):
        plain_loss, plain_count = response_loss(tuned, rows, name, batch_size=2)
        plain_gen = tuned.generate(rows, adapter=name, greedy=True, max_new_tokens=8, batch_size=3)
        with tuned.merged(name) as merged:
            assert merged and tuned.merged_adapter == name
            # merged: the adapter's layers run as plain linears on W + BA
            assert any(getattr(m, "merged", False) for m in tuned.model.modules())
            fast_loss, fast_count = response_loss(tuned, rows, name, batch_size=2)
            fast_gen = tuned.generate(rows, adapter=name, greedy=True, max_new_tokens=8, batch_size=3)
        assert fast_count == plain_count
        assert fast_loss == pytest.approx(plain_loss, rel=1e-4)
        assert [g.token_ids for g in fast_gen] == [g.token_ids for g in plain_gen]
    # unmerged afterwards: base weights back to within fp32 rounding, no layer left merged, LoRA still trainable
    after = _base_weights(tuned.model)
    assert all(torch.allclose(before[n], after[n], rtol=0, atol=1e-6) for n in before)
    assert not any(getattr(m, "merged", False) for m in tuned.model.modules())
    assert tuned.merged_adapter is None
    tuned.model.set_adapter("a")
    assert any(p.requires_grad for n, p in tuned.model.named_parameters() if "lora_" in n and ".a." in n)


def test_merged_adapter_refuses_other_variants_and_base_never_merges(tiny_gemma3, two_adapters):
    a, b = two_adapters
    tuned = load([str(a), f"b={b}"], precision="fp32")
    rows = _rows(tuned)
    base_loss, _ = response_loss(tuned, rows, BASE)
    with tuned.merged(BASE) as merged:
        assert not merged
    with tuned.merged("a"), pytest.raises(Exception, match="merged into the weights"):
        response_loss(tuned, rows, BASE)
    assert response_loss(tuned, rows, BASE)[0] == pytest.approx(base_loss, rel=1e-6)


def test_4bit_base_is_not_merged(tiny_gemma3_4bit):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from gemmatune.config import load_config
    from gemmatune.infer.model import TunedModel
    from gemmatune.models.loading import load_model
    from gemmatune.models.quantization import quantized_layers

    loaded = load_model(load_config(None, [f"model.name={tiny_gemma3_4bit}", "model.quantization=4bit"]).model,
                        "bf16")
    assert quantized_layers(loaded.model)
    model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="q")
    tuned = TunedModel(model, loaded.tokenizer, loaded.family, "alpaca-en", {"q": None}, "bf16")
    assert not tuned.can_merge("q")
    with tuned.merged("q") as merged:
        assert not merged
        assert tuned.generate("hi", adapter="q", greedy=True, max_new_tokens=2)[0].new_tokens == 2


def test_eval_merges_and_reports_the_same_scores_with_progress(tiny_gemma3, two_adapters, tmp_path):
    a, _ = two_adapters
    tuned = load([str(a)], precision="fp32")
    file = write_jsonl(tmp_path / "test.jsonl", _rows(tuned))
    rows = [dict(r) for r in _rows(tuned)]
    want = {name: response_loss(tuned, rows, name)[0] for name in (BASE, "a")}
    want_gen = tuned.generate(rows, adapter="a", greedy=True, max_new_tokens=6, batch_size=4)
    stream = io.StringIO()  # not a terminal: plain lines
    report = evaluate(tuned, file, max_new_tokens=6, batch_size=4, progress_stream=stream)
    got = {v.name: v.response_loss for v in report.variants}
    assert got[BASE] == pytest.approx(want[BASE], rel=1e-5)
    assert got["a"] == pytest.approx(want["a"], rel=1e-4)
    assert report.samples[0]["a"] == want_gen[0].text
    lines = stream.getvalue().splitlines()
    for label in ("eval base loss", "eval base generate", "eval a loss", "eval a generate"):
        assert any(line.startswith(f"{label}: {len(rows)}/{len(rows)} rows,") and "tok/s" in line for line in lines)
    assert tuned.merged_adapter is None and not any(getattr(m, "merged", False) for m in tuned.model.modules())


def test_progress_plain_lines_and_tty_bar():
    stream = io.StringIO()
    progress = Progress("eval x loss", 10, stream, every=0.0)
    progress.update(4, 100)
    progress.update(6, 150)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("eval x loss: 4/10 rows,") and "ETA" in lines[0]
    assert lines[-1].startswith("eval x loss: 10/10 rows,") and "ETA 0 s" in lines[-1]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = Progress("eval y generate", 3, tty)
    bar.update(3, 30)
    bar.close()
    assert "eval y generate" in tty.getvalue() and "3/3" in tty.getvalue() and "tok/s" in tty.getvalue()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_linear_layer_gets_a_contiguous_input_and_the_same_generation(tiny_gemma3, precision):
    # A strided bf16 input takes a slow CPU kernel (the prefill's [:, -1:, :] slice before the LM head: 5.2 s vs
    # 0.025 s for 8 rows of the 270M), and bf16 weights meet their inputs without autocast's copy in between.
    tuned = load(base=str(tiny_gemma3), precision=precision)
    linears = [m for m in tuned.model.modules() if isinstance(m, torch.nn.Linear)]
    assert tuned.model.get_output_embeddings() in linears
    seen = []
    handles = [m.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
               for m in linears]
    got = tuned.generate(PROMPTS[:4], greedy=True, max_new_tokens=4, batch_size=4)
    for handle in handles:
        handle.remove()
    assert len(seen) > len(linears) and all(seen)  # hooks registered later run later: after ours
    if precision == "fp32":  # the copies change no value (in bf16 a padded batch and one row round differently)
        _assert_generates_as_plain_transformers(tuned, tiny_gemma3, got)


def _assert_generates_as_plain_transformers(tuned, model_dir, got) -> None:
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, gen in zip(PROMPTS[:4], got, strict=True):
        ids = tuned.prompt_ids(prompt)
        with torch.no_grad():
            out = plain.generate(input_ids=torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                                 eos_token_id=tuned.stop_ids, pad_token_id=0)[0, len(ids):].tolist()
        stop = next((k for k, t in enumerate(out) if t in tuned.stop_ids), None)
        assert gen.token_ids == (out if stop is None else out[:stop])


def test_lora_on_a_tied_lm_head_is_not_merged(tiny_gemma3, tmp_path):
    from tests.conftest import make_adapter

    adapter = make_adapter(tiny_gemma3, tmp_path / "head", seed=5, targets=("q_proj", "lm_head"))
    tuned = load([str(adapter)], precision="fp32")
    # merging W + BA into a head that shares its weight with the input embedding would change the embedding
    assert tuned.model.get_output_embeddings().get_base_layer().weight is tuned.model.get_input_embeddings().weight
    assert not tuned.can_merge("head")


def test_a_linear_layer_inside_the_body_gets_a_contiguous_input_too():
    # Not only the head: any model may hand a linear layer a strided input (here a transposed one).
    from gemmatune.infer.model import contiguous_linear_inputs

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.inner(x.transpose(0, 1))

    body = Body()
    assert contiguous_linear_inputs(body) == 1 and contiguous_linear_inputs(body) == 0  # hooked once
    seen = []
    body.inner.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    x = torch.randn(8, 3)
    out = body(x)
    assert seen == [True] and torch.allclose(out, x.t() @ body.inner.weight.t(), atol=1e-6)

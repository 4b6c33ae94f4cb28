"""A base model with its adapters, generating (`TunedModel`; load.py makes one).

Generation is batched with left padding, shortest prompts first (`generation_order`), stops on EOS and the
family's end-of-turn token, and decodes only the new token ids. Several adapters answer in one batch, each row
with its own; an adapter runs merged into the base weights where that is exact.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from gemmatune.data.examples import pad_rows
from gemmatune.data.templates import prompt_ids
from gemmatune.errors import GemmatuneError
from gemmatune.hardware import autocast_dtype
from gemmatune.models.loading import stop_token_ids
from gemmatune.models.lora import skip_input_casts

log = logging.getLogger(__name__)

BASE = "base"  # the adapter name that means "no adapter"
PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in mixed-batch inference


@dataclass
class Generation:
    text: str  # the new text only, decoded from the new token ids
    stopped: bool  # ended on EOS / end-of-turn before max_new_tokens
    new_tokens: int  # generated tokens, the stop token included
    adapter: str
    token_ids: list[int]  # the new token ids, without the stop token


@dataclass
class SamplingSettings:
    max_new_tokens: int = 200
    greedy: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GemmatuneError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise GemmatuneError("sampling needs temperature > 0, top_p in (0, 1] and top_k >= 0; or use greedy")


def generation_order(lengths: Sequence[int]) -> list[int]:
    """The order `TunedModel.generate` runs its rows in: shortest prompt first (similar lengths together, less
    padding), ties in the given order. The serve batcher streams by row position, so it orders its jobs by this."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def _contiguous_first_input(module: torch.nn.Module, args: tuple):
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def contiguous_linear_inputs(model: torch.nn.Module) -> int:
    """Give every linear layer of `model` on a CPU, the LM head included, a contiguous input (a forward pre-hook;
    the values are the same). Returns how many layers were hooked (hooked ones are skipped).

    On a CPU (torch 2.13) a bf16 product with a strided input takes a slow kernel: generation's prefill hands the
    LM head the slice `hidden[:, -1:, :]`, and for Gemma's 262k x 640 head and 8 rows that took 5.2 s against
    0.025 s for the contiguous copy (Xeon, 2 cores). Every linear layer is hooked, not only the head, because any
    model may hand one a strided input; checking costs microseconds per call.
    """
    hooked = 0
    for module in model.modules():
        if (isinstance(module, torch.nn.Linear) and not getattr(module, "_gemmatune_contiguous_input", False)
                and module.weight.device.type == "cpu"):
            module.register_forward_pre_hook(_contiguous_first_input)
            module._gemmatune_contiguous_input = True
            hooked += 1
    return hooked


class TunedModel:
    """A base model with its adapters; `generate` picks one adapter per call or one per row."""

    def __init__(self, model, tokenizer, family, template: str, adapters: dict[str, str | None], precision: str,
                 checkpoint_dtype: torch.dtype | None = None, processor=None):
        self.model = model
        self.processor = processor  # multimodal models: turns a prompt's image/audio parts into model inputs
        self.tokenizer = tokenizer
        self.family = family
        self.template = template  # for the base model and for adapters that do not name their own
        self.adapters = adapters  # name -> template it was trained with (None: unknown)
        self.precision = precision
        self.checkpoint_dtype = checkpoint_dtype  # the base checkpoint's own dtype, for `merge --dtype auto`
        self.stop_ids = stop_token_ids(tokenizer, family)
        self.merged_adapter: str | None = None  # set while `merged` holds an adapter in the base weights
        self.model.eval()
        # The inference side of the precision policy (hardware.weight_dtype): base weights as training keeps them,
        # and no PEFT input casts under autocast, as in training.
        if autocast_dtype(precision) is not None and adapters:
            skip_input_casts(self.model)
        contiguous_linear_inputs(self.model)

    @property
    def default_adapter(self) -> str:
        return next(iter(self.adapters), BASE)

    def template_for(self, adapter: str) -> str:
        return self.adapters.get(adapter) or self.template

    def check_adapter(self, adapter: str | None) -> str:
        name = adapter or self.default_adapter
        if name != BASE and name not in self.adapters:
            known = ", ".join([BASE, *self.adapters])
            raise GemmatuneError(f"adapter '{name}' is not loaded; loaded: {known}")
        return name

    def prompt_ids(self, row: dict | str, adapter: str | None = None) -> list[int]:
        """Token ids of a prompt (text, Alpaca row or chat row) in the adapter's template, as in training."""
        if isinstance(row, str):
            row = {"instruction": row, "input": ""}
        template = self.template_for(self.check_adapter(adapter))
        if "messages" in row and template != "chat":
            raise GemmatuneError(f"a chat row (messages) needs the chat template, but the template is {template}")
        return prompt_ids(row, template, self.tokenizer, self.media_tokens_for(row))

    def media_tokens_for(self, row: dict):
        """How image/audio parts are written into the prompt (None for a text model), or a clear error for a row
        with parts that this model cannot take."""
        from gemmatune.data.templates import text_messages

        if self.processor is None:
            if "messages" in row:
                text_messages(row["messages"])  # raises for image/audio parts: they need the multimodal model
            return None
        from gemmatune.data.media import media_tokens

        return media_tokens(self.processor)

    def media_inputs_parts(self, row: dict | str) -> tuple:
        """The image/audio parts (media.Part) of a chat row, in the order their soft tokens appear."""
        from gemmatune.data.templates import text_messages

        if self.processor is None or not isinstance(row, dict) or "messages" not in row:
            return ()
        return text_messages(row["messages"], self.media_tokens_for(row))[1]

    def media_inputs(self, rows: Sequence[dict | str]) -> dict:
        """The image/audio tensors for `rows` (chat rows with parts), in the order their soft tokens appear."""
        from gemmatune.data.media import media_features

        parts = [p for row in rows for p in self.media_inputs_parts(row)]
        return media_features(parts, self.processor) if parts else {}

    def generate(
        self,
        prompts: Sequence[dict | str] | dict | str,
        adapter: str | None | Sequence[str | None] = None,
        settings: SamplingSettings | None = None,
        batch_size: int = 8,
        streamer=None,
        stopping_criteria=None,
        logits_processor=None,
        prompt_ids: Sequence[list[int]] | None = None,
        on_batch: Callable[[int, int], None] | None = None,
        **sampling,
    ) -> list[Generation]:
        """Generate for one prompt or many; `adapter` is one name for all rows, or one per row.

        A prompt is text (treated as an instruction), an Alpaca row or a chat row. `adapter=None` uses the
        first loaded adapter; `"base"` the base model alone. Sampling keywords (max_new_tokens, greedy,
        temperature, top_p, top_k, seed) override `settings`. `streamer`, `stopping_criteria` and `logits_processor`
        go to transformers' generate as they are (gemmatune serve uses them to end rows on its own rules and to
        sample each row with its own generator). `prompt_ids`: the prompts already tokenized (by `prompt_ids`).
        `on_batch(rows, new_tokens)` is called after each batch (evaluation's progress). Rows run in
        `generation_order`, `batch_size` at a time.
        """
        rows = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        names = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(rows)
        if len(names) != len(rows):
            raise GemmatuneError(f"got {len(names)} adapter names for {len(rows)} prompts; give one per prompt")
        names = [self.check_adapter(n) for n in names]
        ids = list(prompt_ids) if prompt_ids is not None else [
            self.prompt_ids(row, name) for row, name in zip(rows, names, strict=True)]
        settings = SamplingSettings(**{**vars(settings or SamplingSettings()), **sampling})
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        order = generation_order([len(x) for x in ids])  # results go back in the caller's order
        results: list[Generation | None] = [None] * len(rows)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            media = self.media_inputs([rows[i] for i in chunk])
            out = self._generate_batch([ids[i] for i in chunk], [names[i] for i in chunk], settings, streamer, media,
                                       stopping_criteria, logits_processor)
            for i, gen in zip(chunk, out, strict=True):
                results[i] = gen
            if on_batch is not None:
                on_batch(len(chunk), sum(g.new_tokens for g in out))
        return results  # type: ignore[return-value]

    def _generate_batch(self, batch: list[list[int]], names: list[str], settings: SamplingSettings,
                        streamer, media: dict | None = None, stopping_criteria=None,
                        logits_processor=None) -> list[Generation]:
        pad = self.tokenizer.pad_token_id
        input_ids, mask = pad_rows(batch, pad, left=True)
        width = input_ids.shape[1]
        # Sampling is drawn by infer.sampling (the same distribution as transformers', from the candidate tokens
        # only) and handed to generate's greedy pick.
        kwargs = {"max_new_tokens": settings.max_new_tokens, "eos_token_id": self.stop_ids, "pad_token_id": pad,
                  "use_cache": True, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        processors = list(logits_processor or [])
        if not settings.greedy:
            from gemmatune.infer.sampling import SampleRows

            row = (settings.temperature, settings.top_p, settings.top_k, None)
            processors.append(SampleRows(lambda i, device: row))
        if processors:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(processors)
        if streamer is not None:
            kwargs["streamer"] = streamer
        if stopping_criteria is not None:
            kwargs["stopping_criteria"] = stopping_criteria
        device = self.device
        if media:  # the prompt's soft tokens, marked as in training (Gemma 4's prefill attends within an image)
            from gemmatune.data.media import token_types

            media = {**media, **token_types(input_ids, self.processor)}
        kwargs.update({k: v.to(device) for k, v in (media or {}).items()})
        with self.adapter_context(names) as extra, torch.no_grad(), self.autocast():
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                      **kwargs, **extra)
        results = []
        for row, name in zip(out[:, width:].tolist(), names, strict=True):
            stop = next((k for k, tok in enumerate(row) if tok in self.stop_ids), None)
            new = row if stop is None else row[:stop]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            results.append(Generation(text, stop is not None, len(new) + (stop is not None), name, new))
        return results

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self):
        """The autocast of training (hardware.autocast_dtype), on CPU and GPU alike: LoRA weights are fp32 and
        base weights in the compute dtype (hardware.weight_dtype); autocast makes them meet."""
        dtype = autocast_dtype(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    @contextlib.contextmanager
    def adapter_context(self, names: Sequence[str]) -> Iterator[dict]:
        """Run with one adapter, with none (the base), or one per row (PEFT mixed-batch: adapter_names=)."""
        distinct = set(names)
        if self.merged_adapter is not None and distinct != {self.merged_adapter}:
            raise GemmatuneError(f"adapter '{self.merged_adapter}' is merged into the weights; it alone can run now")
        if not self.adapters or self.merged_adapter is not None:
            yield {}
        elif len(distinct) > 1:
            yield {"adapter_names": [PEFT_BASE if n == BASE else n for n in names]}
        elif BASE in distinct:
            with self.model.disable_adapter():
                yield {}
        else:
            self.model.set_adapter(names[0])
            yield {}


    def can_merge(self, adapter: str) -> bool:
        """Whether `adapter` can be folded into the base weights exactly enough to score with it.

        Only fp32 base weights: W + BA rounds like the LoRA path does (~1e-7 relative) and unmerging gets W
        back to that rounding. 4-bit weights cannot hold W + BA; bf16/fp16 weights would round it to 8/11 bits
        and keep a trace of it after unmerging, so those run the adapter unmerged.
        """
        if adapter == BASE or adapter not in self.adapters or self.merged_adapter is not None:
            return False
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
        embedding = self.model.get_input_embeddings()
        tied = getattr(embedding, "weight", None)  # a head tied to it: merging would change the embedding too
        return bool(layers) and all(m.get_base_layer().weight is not tied and
            isinstance(m.get_base_layer(), torch.nn.Linear) and m.get_base_layer().weight.dtype == torch.float32
            and not m.merged for m in layers)

    @contextlib.contextmanager
    def merged(self, adapter: str) -> Iterator[bool]:
        """Run every pass in this block with `adapter` merged into the base weights, if it can be (yields
        whether it was): one matmul per projection instead of three, the same result within fp32 rounding.
        The adapter is unmerged on the way out, the model as trainable and switchable as before."""
        if not self.can_merge(adapter):
            yield False
            return
        self.model.set_adapter(adapter)
        self.model.merge_adapter([adapter])
        self.merged_adapter = adapter
        try:
            yield True
        finally:
            from peft.tuners.lora import LoraLayer

            for module in self.model.modules():  # only the layers merged above (PEFT warns for the others)
                if isinstance(module, LoraLayer) and module.merged:
                    module.unmerge()
            self.merged_adapter = None




START = "start"  # the adapter a run continued (model.adapter), loaded beside the trained one for the evaluation


def just_trained(peft_model, tokenizer, family, template: str, precision: str, run_dir, start_adapter=None,
                 processor=None) -> tuple[TunedModel, dict[str, str]]:
    """The model a run just trained, for the end-of-run evaluation, and the labels its report uses: the base (adapter
    off), the adapter the run continued (`model.adapter`: loaded again beside the trained one, so the report shows
    what this run changed, not only base vs the end) and the run's own adapter, named after the run folder."""
    from pathlib import Path

    adapters: dict[str, str | None] = {"default": template}
    labels = {"default": Path(run_dir).name}
    if start_adapter:
        from gemmatune.runs.adapter_folder import read_adapter_folder

        folder = read_adapter_folder(start_adapter, "config key model.adapter:")
        peft_model.load_adapter(str(folder.path), adapter_name=START)
        adapters = {START: template, "default": template}
        labels[START] = f"{folder.path.name} (start)"
    return TunedModel(peft_model, tokenizer, family, template, adapters, precision, processor=processor), labels

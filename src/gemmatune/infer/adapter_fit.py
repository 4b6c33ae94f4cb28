"""Does this adapter belong on this base model? Refuse loudly what PEFT would only warn about.

PEFT loads an adapter whose module names are absent from the model with a warning and then runs the plain
base model (e.g. a Gemma 3n adapter saved from `Gemma3nForCausalLM` onto `Gemma3nForConditionalGeneration`,
where the language model lives under another prefix). `check_adapter_fits` compares, before loading:
the base class recorded in run.json, the adapted module names, and each adapted module's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gemmatune.errors import GemmatuneError
from gemmatune.runs.adapter_folder import AdapterFolder, read_adapter_folder
from gemmatune.runs.folder import ADAPTER_WEIGHTS

_PEFT_PREFIX = "base_model.model."
# Parameter names PEFT stores per adapted module: <module path>.<marker>.weight (or without .weight).
_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")


@dataclass(frozen=True)
class AdapterFit:
    modules: int
    """How many adapted modules were checked against the model."""
    recorded_class: str | None
    """The base class run.json names (None for a bare PEFT folder)."""


def adapted_modules(adapter_dir: str | Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Module path (as in the base model's `named_modules`) -> {marker: tensor shape} from the safetensors."""
    from safetensors import safe_open

    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            path = key.removeprefix(_PEFT_PREFIX)
            for marker in _MARKERS:
                if marker in path:
                    module, _, _ = path.partition(marker)
                    # Parameter LoRA (lora.experts) nests one PEFT wrapper per adapted parameter of a module:
                    # the second parameter's weights sit under <module>.base_layer.
                    while module.endswith(".base_layer"):
                        module = module.removesuffix(".base_layer")
                    modules.setdefault(module, {})[marker.strip(".")] = tuple(fh.get_slice(key).get_shape())
                    break
    return modules


def check_adapter_fits(adapter: str | Path | AdapterFolder, model) -> AdapterFit:
    """Raise GemmatuneError unless the adapter (a run folder or a PEFT adapter folder) fits `model` (the base
    model, or a PeftModel around it): same class as recorded, every adapted module present, and every adapted
    Linear of matching in/out features."""
    folder = adapter if isinstance(adapter, AdapterFolder) else read_adapter_folder(adapter)
    adapter_dir = folder.path
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    actual = type(base).__name__
    recorded_class = folder.base_class
    if recorded_class and recorded_class != actual:
        raise GemmatuneError(
            f"{adapter_dir}: the adapter was trained on {recorded_class} ({folder.base.name}) "
            f"but the model is {actual}; load the base model with the class in run.json "
            "(model.multimodal must match the training run)"
        )
    adapted = adapted_modules(adapter_dir)
    if not adapted:
        raise GemmatuneError(f"{adapter_dir}/{ADAPTER_WEIGHTS} holds no LoRA weights; is it a LoRA adapter?")
    modules = dict(base.named_modules())
    missing = sorted(m for m in adapted if m not in modules)
    if missing:
        raise GemmatuneError(
            f"{adapter_dir}: {len(missing)} of {len(adapted)} adapted modules do not exist in {actual} (first: "
            f"{missing[0]}); the adapter was made for another model class or architecture"
        )
    for name, shapes in sorted(adapted.items()):
        _check_shapes(adapter_dir, name, shapes, modules[name], actual)
    return AdapterFit(len(adapted), recorded_class)


def _check_shapes(adapter_dir: Path, name: str, shapes: dict[str, tuple[int, ...]], module, actual: str) -> None:
    layer = getattr(module, "base_layer", module)  # a PeftModel wraps the original Linear
    in_features, out_features = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
    if in_features is None or out_features is None:
        return  # not a Linear (e.g. an embedding): names are all we can compare cheaply
    lora_a, lora_b = shapes.get("lora_A"), shapes.get("lora_B")
    got = (lora_a[-1] if lora_a else in_features, lora_b[0] if lora_b else out_features)
    if got != (in_features, out_features):
        raise GemmatuneError(
            f"{adapter_dir}: module {name} is {in_features}->{out_features} in {actual} but the adapter expects "
            f"{got[0]}->{got[1]}; the adapter was made for another model size or architecture"
        )

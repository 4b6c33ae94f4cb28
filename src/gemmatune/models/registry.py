"""The families gemmatune knows, and the one lookup from a `config.model_type` (or a recorded family name)."""

from __future__ import annotations

from gemmatune.models import ModelFamily, gemma3, gemma3n, gemma4, gemma4_unified, generic


def bundled_config_file(model_id: str):
    """The bundled config (a Path) for a known hub id, or None."""
    from importlib.resources import files

    for family in _families():
        for hub_id, filename in family.bundled_configs:
            if hub_id == model_id:
                return files("gemmatune.models").joinpath(filename)
    return None


def _families() -> tuple[ModelFamily, ...]:
    return (gemma3.FAMILY, gemma3n.FAMILY, gemma4.FAMILY, gemma4_unified.FAMILY)


def gguf_families() -> tuple[ModelFamily, ...]:
    """The families a GGUF export writes."""
    return tuple(f for f in _families() if f.gguf is not None)


def family_for(model_type: str) -> ModelFamily:
    """The family of a `config.model_type`; the generic family for anything we have no notes on."""
    for family in _families():
        if model_type in family.model_types:
            return family
    return generic.FAMILY


def family_named(name: str) -> ModelFamily | None:
    """The family a run record names (run.json base_model.family), or None."""
    return next((f for f in (*_families(), generic.FAMILY) if f.name == name), None)


def all_known_ids() -> tuple[str, ...]:
    return tuple(i for family in _families() for i in family.known_ids)

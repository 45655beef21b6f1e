"""Model families statekv serves, found by the checkpoint's config.model_type."""

from __future__ import annotations

from statekv.errors import ModelError
from statekv.models.base import VideoAdapter
from statekv.models.internvl import InternVLAdapter
from statekv.models.llava_onevision import LlavaOnevisionAdapter
from statekv.models.qwen2_5_vl import Qwen2_5_VLAdapter
from statekv.models.qwen3_vl import Qwen3VLAdapter
from statekv.models.smolvlm import SmolVLMAdapter

ADAPTERS: tuple[type[VideoAdapter], ...] = (InternVLAdapter, SmolVLMAdapter, LlavaOnevisionAdapter,
                                              Qwen2_5_VLAdapter, Qwen3VLAdapter)

# Families the method cannot serve as they are, with the reason (checked before loading).
REFUSED: dict[str, str] = {
    "gemma3": "Gemma3 mixes sliding-window layers with bidirectional attention over image tokens",
    "qwen3_next": "its linear-attention layers keep no per-token keys to select from",
}


def adapter_for(model_type: str) -> type[VideoAdapter]:
    """The adapter class for a config.model_type, or a ModelError naming what is supported."""
    if model_type in REFUSED:
        raise ModelError(f"statekv cannot run '{model_type}' models: {REFUSED[model_type]}")
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    known = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise ModelError(f"unsupported model family '{model_type}'; statekv supports: {known}")


def families() -> list[str]:
    return [a.family for a in ADAPTERS]

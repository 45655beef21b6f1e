"""One rotary base per video: length-dependent RoPE fixed for the planned sequence.

transformers' `dynamic_rope_update` recomputes a length-dependent rotary embedding on every
forward call from that call's largest position: dynamic NTK grows its base once a call goes
past `max_position_embeddings` (and resets it for a short call), LongRoPE switches from its
short to its long factors past `original_max_position_embeddings`. One plain forward over a
whole sequence rotates every token with the frequencies for that length; a chunked prefill
calls forward once per chunk, so without a fix the early chunks' keys (kept in the caches)
would be rotated with other frequencies than the later chunks and the question.

`fixed_rotary` computes the frequencies one forward over the planned sequence (prefix, every
frame and the answer room) would use, with transformers' own `ROPE_INIT_FUNCTIONS`, holds them
for every chunk and answer, and restores the module afterwards, so a model shared by several
videos is unchanged. Static rope types (default, linear, yarn, llama3, proportional, M-RoPE) do
not depend on the length and are left alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn

_STATE = ("inv_freq", "attention_scaling", "rope_type", "max_seq_len_cached", "original_inv_freq",
          "long_inv_freq")
_MISSING = object()


def length_dependent(rope_type: Any) -> bool:
    """Whether transformers recomputes this rope type's frequencies from each call's length."""
    return isinstance(rope_type, str) and ("dynamic" in rope_type or rope_type == "longrope")


def rotary_modules(language_model: nn.Module) -> list[nn.Module]:
    """The language model's rotary embedding modules (transformers' `*RotaryEmbedding`)."""
    return [m for m in language_model.modules()
            if hasattr(m, "inv_freq") and hasattr(m, "rope_type") and hasattr(m, "config")]


def rope_types(language_model: nn.Module) -> list[str]:
    """The rope type of each rotary module, as transformers read it from the config."""
    return [str(m.rope_type) for m in rotary_modules(language_model)]


@contextmanager
def fixed_rotary(language_model: nn.Module, length: int) -> Iterator[None]:
    """Within the block, every forward rotates with the frequencies for a sequence whose
    largest position is `length - 1`, whatever positions the call itself holds."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    saved = []
    try:
        for module in rotary_modules(language_model):
            if not length_dependent(module.rope_type):
                continue
            saved.append((module, {name: module.__dict__.get(name, _MISSING)
                                   for name in _STATE if name != "inv_freq"},
                          module.inv_freq))
            init = ROPE_INIT_FUNCTIONS[module.rope_type]
            inv_freq, scaling = init(module.config, module.inv_freq.device, seq_len=int(length))
            module.register_buffer("inv_freq", inv_freq.to(module.inv_freq.dtype), persistent=False)
            module.attention_scaling = scaling
            # "default" makes transformers' per-call update a no-op; forward reads inv_freq only.
            module.rope_type = "default"
        yield
    finally:
        for module, attributes, inv_freq in reversed(saved):
            module.register_buffer("inv_freq", inv_freq, persistent=False)
            for name, value in attributes.items():
                if value is _MISSING:
                    module.__dict__.pop(name, None)
                else:
                    setattr(module, name, value)

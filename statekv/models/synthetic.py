"""A model family whose frames are random embeddings: drives the real engine without a vision tower.

The language model is a real transformers decoder (Qwen2, the decoder of every shipped
family) built from a preset's architecture numbers with random weights, so the benchmark
runs the same prefill loop, attention and cache as users do, at real sizes, offline.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from statekv.models.base import QUESTION_SENTINEL, ChunkInputs, PromptPieces, VideoAdapter
from statekv.video import FrameChunk

if TYPE_CHECKING:
    from statekv.presets import Architecture

PREFIX_TOKENS = 16  # synthetic text before the video (a chat template's system + user start)
EMBEDDING_POOL_FRAMES = 16  # distinct random frames, cycled: keeps input generation off the clock


def text_config(arch: Architecture, max_positions: int = 1 << 20) -> Any:
    """The transformers config of the preset's language model (Qwen2 for the shipped families)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=arch.hidden, intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads, head_dim=arch.resolved_head_dim,
        vocab_size=64,  # the benchmark feeds embeddings; a real vocabulary would only cost memory
        max_position_embeddings=max_positions, use_sliding_window=False,
        tie_word_embeddings=False,
    )


def build_language_model(arch: Architecture, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
    """The real transformers text model of `arch` with random weights, in eval mode."""
    from transformers import Qwen2Model

    from statekv.attention import ATTENTION_NAME

    torch.manual_seed(seed)
    model = Qwen2Model(text_config(arch)).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation(ATTENTION_NAME)
    return model


class SyntheticAdapter(VideoAdapter):
    """A model family whose frames are random embeddings: drives the real prefill loop."""

    family = "synthetic"
    model_types = ()

    def __init__(self, language_model: torch.nn.Module, tokens_per_frame: int,
                 prefix_tokens: int = PREFIX_TOKENS, seed: int = 0) -> None:
        self.model = language_model
        self.processor = self.tokenizer = None
        self._tokens_per_frame = tokens_per_frame
        self.prefix_tokens = prefix_tokens
        hidden = language_model.config.hidden_size
        generator = torch.Generator().manual_seed(seed)
        pool = torch.randn(EMBEDDING_POOL_FRAMES, tokens_per_frame, hidden, generator=generator)
        self._pool = pool.to(self.device, self.dtype)  # (pool frames, tokens_per_frame, hidden)
        self._text = torch.randn(1, max(1, prefix_tokens), hidden, generator=generator).to(
            self.device, self.dtype)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model

    def tokens_per_frame(self, height=None, width=None) -> int:
        return self._tokens_per_frame

    def prompt(self, system_prompt=None) -> PromptPieces:
        return PromptPieces(prefix="", suffix=QUESTION_SENTINEL)

    def start(self, frame_count, timestamps, prompt, frame_size=None, duration=None) -> int:
        return self.prefix_tokens + frame_count * self._tokens_per_frame

    def layout_tokens(self, frame_count, timestamps, prompt, frame_size=None, duration=None) -> list[int]:
        return [self.prefix_tokens] + [self._tokens_per_frame] * frame_count

    def prefix_chunk(self) -> ChunkInputs:
        return self.token_chunk([0] * self.prefix_tokens, 0)

    def video_chunk(self, frames, first: int, offset: int) -> ChunkInputs:
        index = [(first + i) % EMBEDDING_POOL_FRAMES for i in range(len(frames))]
        embeds = self._pool[index].reshape(1, -1, self._pool.shape[-1])
        ids = [0] * embeds.shape[1]
        return ChunkInputs(ids, embeds, _positions(offset, len(ids), self.device), frames=len(frames))

    def whole_video(self, frame_count: int) -> ChunkInputs:
        """The prefix and `frame_count` frames as one input, the same embeddings the chunks
        carry: what a single full forward over the whole video would be fed."""
        prefix = self.prefix_chunk()
        frames = self.video_chunk(range(frame_count), 0, self.prefix_tokens)
        embeds = torch.cat([prefix.inputs_embeds, frames.inputs_embeds], dim=1)
        ids = prefix.token_ids + frames.token_ids
        return ChunkInputs(ids, embeds, _positions(0, len(ids), self.device), frames=frame_count)

    def text_chunk(self, text: str, offset: int) -> ChunkInputs:
        return self.token_chunk([0] * max(1, len(text.split())), offset)

    def token_chunk(self, token_ids, offset) -> ChunkInputs:
        tokens = len(token_ids)
        embeds = self._text[:, :1].expand(1, tokens, -1).contiguous()
        return ChunkInputs(list(token_ids), embeds, _positions(offset, tokens, self.device))


def _positions(offset: int, length: int, device) -> torch.Tensor:
    return torch.arange(offset, offset + length, device=device).unsqueeze(0)


def synthetic_chunks(frame_count: int, chunk_frames: int) -> Iterator[FrameChunk]:
    """Placeholder 1x1 frames in chunks (the synthetic adapter only counts them)."""
    for first in range(0, frame_count, chunk_frames):
        n = min(chunk_frames, frame_count - first)
        yield FrameChunk(np.zeros((n, 1, 1, 3), np.uint8), first,
                         tuple(float(i) for i in range(first, first + n)))

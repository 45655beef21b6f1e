"""The adapter contract: what the engine needs from a model family, and nothing more.

The engine (prefill.py, answer.py) only ever sees `ChunkInputs`: embeddings, position ids
and family-specific keyword arguments for the language model, one chunk at a time. Each
family turns frames and text into those in its own file, so that 1-D positions (InternVL),
3-D M-RoPE ids computed once and sliced per chunk (Qwen), temporal patches of two frames
(Qwen), timestamp text between frames (Qwen3-VL, SmolVLM) and visual features injected into
early decoder layers (Qwen3-VL DeepStack, through `lm_kwargs`) all fit without the engine
knowing which family it runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

QUESTION_SENTINEL = "\u0000QUESTION\u0000"


@dataclass
class ChunkInputs:
    """One chunk, ready for the language model."""

    token_ids: list[int]  # the chunk's token ids, as the family's processor lays them out
    inputs_embeds: torch.Tensor  # (1, tokens, hidden)
    position_ids: torch.Tensor  # (1, tokens) or (3, 1, tokens) for M-RoPE
    frames: int = 0  # video frames in this chunk (0 for text)
    lm_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. DeepStack features

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class PromptPieces:
    """The chat template split around the video: prefix, video, then question suffix."""

    prefix: str  # everything before the video (system prompt, user turn start)
    suffix: str  # everything after the video, with QUESTION_SENTINEL where the question goes

    def question_text(self, question: str) -> str:
        return self.suffix.replace(QUESTION_SENTINEL, question)


class VideoAdapter(ABC):
    """A model family: processor, vision tower, language model, prompt layout, positions."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this adapter serves
    frames_per_unit: ClassVar[int] = 1  # frames in the smallest chunk (2 for temporal patches)

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer

    # what the engine reads ------------------------------------------------------------
    @property
    @abstractmethod
    def language_model(self) -> nn.Module:
        """The decoder stack (no LM head) that the chunks run through."""

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.language_model.parameters()).dtype

    def vision_modules(self) -> list[nn.Module]:
        """Modules whose FLOPs count as vision (tower and projector)."""
        return []

    def eos_token_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return set(ids)

    @abstractmethod
    def tokens_per_frame(self, height: int | None = None, width: int | None = None,
                         frames: int | None = None) -> int:
        """Visual tokens of one frame; Qwen families depend on the frame size and (when the
        processor budgets pixels for the whole video) on the video's frame count."""

    def decode_size(self, height: int, width: int, frames: int | None = None
                    ) -> tuple[int, int] | None:
        """(width, height) to decode frames at, close to what the processor needs."""
        return None

    def refusal(self) -> str | None:
        """Why this checkpoint cannot be served by chunked prefill, or None."""
        cfg = self.text_config
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
            return "its language model uses sliding-window attention layers"
        if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
            return "its language model uses sliding-window attention layers"
        return None

    # the per-video work --------------------------------------------------------------
    video_token: str  # the placeholder the chat template writes where the video goes

    def prompt(self, system_prompt: str | None = None) -> PromptPieces:
        """Split the family's chat template around the video (the question comes after it)."""
        messages: list[dict[str, Any]] = []
        if system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        messages.append({"role": "user", "content": [
            {"type": "video"}, {"type": "text", "text": QUESTION_SENTINEL}]})
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        prefix, _, suffix = text.partition(self.video_token)
        return PromptPieces(prefix=prefix, suffix=suffix)

    @abstractmethod
    def start(self, frame_count: int, timestamps: tuple[float, ...], prompt: PromptPieces,
              frame_size: tuple[int, int] | None = None, duration: float | None = None) -> int:
        """Prepare for one video; return the total tokens of prefix + all frames.

        frame_size: (height, width) the frames arrive at; duration: the watched span in
        seconds (SmolVLM names it in its intro sentence).
        """

    def rotary_length(self, tokens: int) -> int:
        """Largest position + 1 of a sequence of `tokens` tokens (this video's prefix and frames
        first): what a length-dependent rotary embedding sees. 1-D positions: `tokens`."""
        return tokens

    def answer_state(self) -> dict[str, Any]:
        """What `text_chunk`/`token_chunk` read after the last chunk beyond `start()`'s plan,
        as JSON-able values: saved with a prefill file so answers need no pixels."""
        return {}

    def resume(self, frame_count: int, timestamps: tuple[float, ...], prompt: PromptPieces,
               frame_size: tuple[int, int] | None = None, duration: float | None = None,
               state: dict[str, Any] | None = None) -> None:
        """Get ready to answer over a saved prefill of a video, without its pixels: the plan
        `start()` made, then `state` as `answer_state()` returned it after the last chunk."""
        self.start(frame_count, timestamps, prompt, frame_size=frame_size, duration=duration)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as the prompt uses it (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def frame_token_ids(self, index: int) -> list[int] | None:
        """The token ids frame `index` occupies in the sequence (label, delimiters and
        visual placeholders), for families whose frames have a fixed text layout; else None."""
        return None

    def layout_tokens(self, frame_count: int, timestamps: tuple[float, ...],
                      prompt: PromptPieces, frame_size: tuple[int, int] | None = None,
                      duration: float | None = None) -> list[int] | None:
        """Token counts of the prefix, then of each frame, without pixels (None if unknown).

        Lets `statekv info` predict FLOPs exactly without loading weights or decoding frames.
        """
        return None

    @abstractmethod
    def prefix_chunk(self) -> ChunkInputs:
        """The text before the video (position offset 0)."""

    @abstractmethod
    def video_chunk(self, frames: Any, first: int, offset: int) -> ChunkInputs:
        """A run of frames starting at plan position `first`, placed at token `offset`."""

    @abstractmethod
    def text_chunk(self, text: str, offset: int) -> ChunkInputs:
        """Text after the video (question, or generated tokens) at token `offset`."""

    @abstractmethod
    def token_chunk(self, token_ids: list[int], offset: int) -> ChunkInputs:
        """Already-tokenised text after the video (generated tokens) at token `offset`."""

    def join_chunks(self, chunks: list[ChunkInputs]) -> ChunkInputs | None:
        """Consecutive chunks as one language-model input (their tokens in order), for a
        grouped prefill; None when this family cannot join them (the engine then runs them
        one forward each). Families with `lm_kwargs` override this to merge theirs."""
        if any(chunk.lm_kwargs for chunk in chunks):
            return None
        return joined_inputs(chunks, {})

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        return self.model.get_input_embeddings()(ids)


def joined_inputs(chunks: list[ChunkInputs], lm_kwargs: dict[str, Any]) -> ChunkInputs:
    """Chunks' token ids, embeddings and positions laid end to end (positions' last axis is the
    token axis in every layout: (1, tokens) or (3, 1, tokens))."""
    return ChunkInputs(
        token_ids=[token for chunk in chunks for token in chunk.token_ids],
        inputs_embeds=torch.cat([chunk.inputs_embeds for chunk in chunks], dim=1),
        position_ids=torch.cat([chunk.position_ids for chunk in chunks], dim=-1),
        frames=sum(chunk.frames for chunk in chunks), lm_kwargs=lm_kwargs)

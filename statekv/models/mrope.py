"""What the Qwen families share: temporal patches of two frames and 3-D M-RoPE position ids.

Qwen's processor turns a video into temporal patches (two frames each, the last frame repeated
when the count is odd) of ``grid_h x grid_w / merge**2`` tokens, at a size its own resize rule
picks for the whole video. The language model places every token with 3-D (temporal, height,
width) position ids from ``model.model.get_rope_index``. Here the whole layout (prompt prefix
and every patch) is built once per video without pixels, its position ids computed once with
the model's own function and sliced per chunk; a question's ids come from the same function
over the layout plus the question, and generated tokens continue one by one from the
question's last position, as ``generate()`` continues them in transformers 5.23 (not from
``rope_deltas``, which only a cache-continuing ``forward`` without position ids uses).

Each family (qwen2_5_vl.py, qwen3_vl.py) says how its processor sizes frames, what text
surrounds a patch, what else ``get_rope_index`` needs and what the vision tower hands the
language model besides the patch embeddings.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from statekv.models.base import ChunkInputs, PromptPieces, VideoAdapter

VIDEO_TYPE = 2  # mm_token_type_ids: 0 text, 1 image, 2 video


@dataclass
class VideoLayout:
    """Token ids and 3-D position ids of the prompt prefix and every temporal patch of a video."""

    frame_size: tuple[int, int]  # (height, width) of the frames as decoded
    grid: tuple[int, int, int]  # (temporal patches, patch rows, patch columns) of the whole video
    ids: list[int]  # prefix + every patch, as the processor lays them out
    patch_starts: list[int]  # token offset of each temporal patch
    positions: torch.Tensor  # (3, 1, len(ids)), on the model's device


class MRopeVideoAdapter(VideoAdapter):
    """A Qwen-style family: chunks of whole temporal patches, M-RoPE positions sliced per chunk."""

    frames_per_unit = 2

    def __init__(self, model, processor) -> None:
        super().__init__(model, processor)
        video = processor.video_processor
        self.patch = int(video.patch_size)
        self.merge = int(video.merge_size)
        if int(video.temporal_patch_size) != self.frames_per_unit:
            raise ValueError(f"expected temporal patches of {self.frames_per_unit} frames, "
                             f"got {video.temporal_patch_size}")
        self.video_token = processor.video_token
        self.video_id = int(model.config.video_token_id)
        self._prompt: PromptPieces | None = None
        self._prefix_ids: list[int] = []
        self._frame_count = 0
        self._timestamps: tuple[float, ...] = ()
        self._size_hint: tuple[int, int] | None = None
        self._layout: VideoLayout | None = None
        self._text_shift = 0  # position - token index for text after the question

    @property
    def language_model(self):
        return self.model.model.language_model

    def vision_modules(self):
        return [self.model.model.visual]

    # what each family says ---------------------------------------------------------------
    @abstractmethod
    def resized(self, height: int, width: int, frames: int) -> tuple[int, int]:
        """(height, width) the processor resizes frames to, in a video of `frames` frames."""

    def patch_ids(self, index: int, tokens: int) -> list[int]:
        """Token ids of temporal patch `index` (its `tokens` video tokens and any text around)."""
        return [self.video_id] * tokens

    def rope_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of the model's get_rope_index for this video."""
        return {}

    def vision_kwargs(self, features: Any, video_mask: torch.Tensor) -> dict[str, Any]:
        """Extra language-model keyword arguments of a chunk, from the vision tower's output."""
        return {}

    # sizes -----------------------------------------------------------------------------
    def tokens_per_frame(self, height=None, width=None, frames: int | None = None) -> int:
        """Visual tokens per frame (a temporal patch's tokens over its 2 frames, rounded up).

        Depends on the frame size and, when the processor budgets pixels for the whole video,
        on the video's frame count (`frames`; a 2-frame clip when not given).
        """
        if height is None or width is None:
            if self._size_hint is None:
                raise ValueError("Qwen's tokens per frame depend on the frame size: pass it")
            height, width = self._size_hint
        # The engine asks this for the size it will decode frames at, just before prefill.
        self._size_hint = (int(height), int(width))
        unit = self._unit_tokens(self.resized(height, width, frames or self.frames_per_unit))
        return math.ceil(unit / self.frames_per_unit)

    def decode_size(self, height: int, width: int, frames: int | None = None) -> tuple[int, int]:
        """(width, height): the processor's size for a video of `frames` frames."""
        resized_height, resized_width = self.resized(height, width, frames or self.frames_per_unit)
        return resized_width, resized_height

    def _unit_tokens(self, size: tuple[int, int]) -> int:
        return (size[0] // self.patch) * (size[1] // self.patch) // (self.merge * self.merge)

    # layout ----------------------------------------------------------------------------
    def start(self, frame_count, timestamps, prompt, frame_size=None, duration=None) -> int:
        if frame_size is not None:
            self._size_hint = (int(frame_size[0]), int(frame_size[1]))
        self._prompt = prompt
        self._prefix_ids = self.tokenize(prompt.prefix)
        self._frame_count = frame_count
        self._timestamps = tuple(float(t) for t in timestamps)
        self._layout = None
        self._text_shift = 0
        if self._size_hint is None:  # size unknown until the first chunk: reserve the prefix
            return len(self._prefix_ids)
        self._layout = self._plan(*self._size_hint)
        return len(self._layout.ids)

    def rotary_length(self, tokens: int) -> int:
        """M-RoPE positions grow slower than tokens over the video (a patch shares its temporal
        position); text after it advances one position per token on every axis."""
        layout = self._layout
        if layout is None or tokens < len(layout.ids):
            return tokens  # an upper bound: positions never run ahead of token indices
        return int(layout.positions.max()) + 1 + tokens - len(layout.ids)

    def answer_state(self) -> dict[str, Any]:
        # The question's positions come from the whole layout, planned from the decoded size.
        return {"frame_size": list(self._layout.frame_size) if self._layout else None}

    def resume(self, frame_count, timestamps, prompt, frame_size=None, duration=None,
               state=None) -> None:
        planned = (state or {}).get("frame_size")
        super().resume(frame_count, timestamps, prompt, tuple(planned) if planned else frame_size,
                       duration, state)
        if planned and self._layout is None:
            self._layout_for(int(planned[0]), int(planned[1]), 0)

    def layout_tokens(self, frame_count, timestamps, prompt, frame_size=None, duration=None) -> list[int] | None:
        """Prefix, then each frame's share of its temporal patch (a patch's tokens split over
        its two frames), from the frame size alone: no pixels, no weights."""
        if frame_size is None:
            return None
        self._timestamps = tuple(float(t) for t in timestamps)
        resized = self.resized(*frame_size, frame_count)
        unit = self._unit_tokens(resized)
        counts = [len(self.tokenize(prompt.prefix))]
        for index in range(math.ceil(frame_count / self.frames_per_unit)):
            tokens = len(self.patch_ids(index, unit))
            frames = min(self.frames_per_unit, frame_count - index * self.frames_per_unit)
            counts += [tokens - tokens // 2, tokens // 2][:frames] if frames > 1 else [tokens]
        return counts

    def _plan(self, height: int, width: int) -> VideoLayout:
        """The whole video's token layout and position ids, from the frame size alone."""
        resized = self.resized(height, width, self._frame_count)
        grid = (math.ceil(self._frame_count / self.frames_per_unit),
                resized[0] // self.patch, resized[1] // self.patch)
        unit = self._unit_tokens(resized)
        ids, starts = list(self._prefix_ids), []
        for index in range(grid[0]):
            starts.append(len(ids))
            ids.extend(self.patch_ids(index, unit))
        positions, _ = self._rope_index(ids, grid)
        return VideoLayout((height, width), grid, ids, starts, positions.to(self.device))

    def _rope_index(self, ids: list[int], grid: tuple[int, int, int]) -> tuple[torch.Tensor, Any]:
        """The model's own M-RoPE ids (3, 1, len(ids)) of a layout holding one video."""
        input_ids = torch.tensor([ids], dtype=torch.long)
        types = (input_ids == self.video_id).long() * VIDEO_TYPE
        with torch.inference_mode():
            return self.model.model.get_rope_index(
                input_ids, mm_token_type_ids=types, video_grid_thw=torch.tensor([grid]),
                **self.rope_kwargs())

    # chunks ----------------------------------------------------------------------------
    def prefix_chunk(self) -> ChunkInputs:
        self._text_shift = 0  # text before any vision: position == token index
        return self.token_chunk(self._prefix_ids, 0)

    def text_chunk(self, text: str, offset: int) -> ChunkInputs:
        ids = self.tokenize(text)
        layout = self._layout
        if layout is None or offset != len(layout.ids):
            return self.token_chunk(ids, offset)
        # Right after the video (the question): the model's rules over the whole sequence.
        positions = self._rope_index(layout.ids + ids, layout.grid)[0][..., offset:]
        self._text_shift = int(positions[0, 0, -1]) + 1 - (offset + len(ids))
        return ChunkInputs(ids, self.embed(ids), positions.to(self.device))

    def token_chunk(self, token_ids, offset) -> ChunkInputs:
        token_ids = list(token_ids)
        # Each next token one position after the last, on all three axes (what generate() does).
        start = offset + self._text_shift
        positions = torch.arange(start, start + len(token_ids), device=self.device)
        positions = positions.view(1, 1, -1).expand(3, 1, -1)  # (3, 1, tokens)
        return ChunkInputs(token_ids, self.embed(token_ids), positions)

    def video_chunk(self, frames: np.ndarray, first: int, offset: int) -> ChunkInputs:
        layout = self._layout_for(frames.shape[1], frames.shape[2], first)
        if first % self.frames_per_unit:
            raise ValueError(f"chunks must start at a temporal patch (an even frame), got {first}")
        patch = first // self.frames_per_unit
        end = patch + math.ceil(len(frames) / self.frames_per_unit)
        if offset != layout.patch_starts[patch]:
            raise ValueError(
                f"frame {first} starts at token {layout.patch_starts[patch]}, not {offset}")
        stop = layout.patch_starts[end] if end < len(layout.patch_starts) else len(layout.ids)
        ids = layout.ids[offset:stop]
        embeds = self.embed(ids)
        features = self._video_features(frames, layout)
        video = torch.tensor(ids, device=self.device) == self.video_id
        embeds[0, video] = torch.cat(list(features.pooler_output)).to(embeds.dtype)
        return ChunkInputs(ids, embeds, layout.positions[..., offset:stop],
                           frames=len(frames), lm_kwargs=self.vision_kwargs(features, video[None]))

    def _layout_for(self, height: int, width: int, first: int) -> VideoLayout:
        """The layout planned at start(), or planned now from the first chunk's frame size."""
        if self._layout is None or self._layout.frame_size != (height, width):
            if first != 0:
                raise ValueError(f"frame size changed mid-video to {height}x{width}")
            self._size_hint = (height, width)
            self._layout = self._plan(height, width)
        return self._layout

    def _video_features(self, frames: np.ndarray, layout: VideoLayout) -> Any:
        """The vision tower on this chunk's frames only, at the whole video's resized size."""
        pixels = self._pixels(frames, layout)
        return self.model.model.get_video_features(
            pixel_values_videos=pixels["pixel_values_videos"].to(self.device),
            video_grid_thw=pixels["video_grid_thw"].to(self.device),
            return_dict=True,
        )

    def _pixels(self, frames: np.ndarray, layout: VideoLayout) -> dict:
        """The processor's pixels for these frames, resized as in the whole video.

        The processor picks the size from the frames it is given; a chunk of 2 frames can get
        more pixels than the whole video would, so the frames are resized here with the
        processor's own resize to the whole video's size, then processed without resizing.
        """
        from transformers.image_utils import SizeDict

        processor = self.processor.video_processor
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)[None]
        height, width = layout.grid[1] * self.patch, layout.grid[2] * self.patch
        if processor.do_resize and tuple(video.shape[-2:]) != (height, width):
            # The last step of the processor's own resize (which picked the size from the frames).
            video = super(type(processor), processor).resize(
                video, size=SizeDict(height=height, width=width), resample=processor.resample)
        return processor(videos=[video[0]], do_resize=False, do_sample_frames=False,
                         return_tensors="pt")


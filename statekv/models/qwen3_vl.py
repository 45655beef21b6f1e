"""Qwen3-VL (Qwen/Qwen3-VL-2B/4B/8B-Instruct): timestamped temporal patches, DeepStack.

Its processor writes every temporal patch (2 frames) as ``<{t:.1f} seconds>`` +
``<|vision_start|>`` + ``<|video_pad|>`` per token + ``<|vision_end|>``, with ``t`` the mean
time of the patch's two frames in the whole video, inside the chat template's own
``<|vision_start|>...<|vision_end|>`` pair. Position ids are interleaved M-RoPE; each patch
restarts the temporal axis at the current text position (the timestamps carry time).
The vision tower also returns DeepStack features, which the text model adds to the hidden
states of its first layers at the video positions: each chunk passes its own slice. Frames
are sized by ``Qwen3VLVideoProcessor`` from a pixel budget for the whole video, so a long
video gets fewer tokens per frame.
"""

from __future__ import annotations

from typing import Any

import torch

from statekv.models.base import ChunkInputs, joined_inputs
from statekv.models.mrope import MRopeVideoAdapter


class Qwen3VLAdapter(MRopeVideoAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)

    def __init__(self, model, processor) -> None:
        super().__init__(model, processor)
        self.start_id = int(processor.vision_start_token_id)
        self.end_id = int(processor.vision_end_token_id)

    def resized(self, height: int, width: int, frames: int) -> tuple[int, int]:
        # Mirrors Qwen3VLVideoProcessor.resize (transformers 5.23): the budget is for all the
        # frames it is given, so it is the whole video's frame count that decides.
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        processor = self.processor.video_processor
        if not processor.do_resize:
            return height, width
        size, factor = processor.size, self.patch * self.merge
        frames = max(frames, self.frames_per_unit)  # the processor refuses fewer
        max_pixels = size.longest_edge
        if processor.cap_pixels_per_frame:
            frame_cap = processor.max_video_tokens * factor * factor
            per_frame = max(min(frame_cap, size.longest_edge // frames),
                            int(size.shortest_edge * 1.05))
            max_pixels = per_frame * frames
        return smart_resize(frames, height, width, temporal_factor=self.frames_per_unit,
                            factor=factor, min_pixels=size.shortest_edge, max_pixels=max_pixels)

    def patch_ids(self, index: int, tokens: int) -> list[int]:
        return (self.tokenize(f"<{self._patch_time(index):.1f} seconds>")
                + [self.start_id] + [self.video_id] * tokens + [self.end_id])

    def _patch_time(self, index: int) -> float:
        """Mean time of the patch's frames (an odd last frame is paired with itself)."""
        times = self._timestamps
        first = index * self.frames_per_unit
        last = min(first + self.frames_per_unit, len(times)) - 1
        return (times[first] + times[last]) / 2

    def vision_kwargs(self, features: Any, video_mask: torch.Tensor) -> dict[str, Any]:
        # DeepStack: one feature level per early decoder layer, for this chunk's video tokens.
        levels = [torch.cat(list(level)) for level in features.deepstack_features]
        return {"visual_pos_masks": video_mask, "deepstack_visual_embeds": levels}

    def join_chunks(self, chunks: list[ChunkInputs]) -> ChunkInputs | None:
        # The DeepStack masks run along the tokens and the features along the video tokens, in
        # order: joining them end to end is what one call on all the chunks would give.
        if not all(chunk.lm_kwargs for chunk in chunks):
            return None
        levels = len(chunks[0].lm_kwargs["deepstack_visual_embeds"])
        return joined_inputs(chunks, {
            "visual_pos_masks": torch.cat([c.lm_kwargs["visual_pos_masks"] for c in chunks], dim=-1),
            "deepstack_visual_embeds": [
                torch.cat([c.lm_kwargs["deepstack_visual_embeds"][level] for c in chunks])
                for level in range(levels)]})

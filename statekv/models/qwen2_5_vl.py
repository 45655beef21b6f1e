"""Qwen2.5-VL (Qwen/Qwen2.5-VL-3B/7B-Instruct): temporal patches of 2 frames, 3-D M-RoPE.

Its processor lays a video out as ``<|vision_start|>`` + ``<|video_pad|>`` per token of every
temporal patch + ``<|vision_end|>``, one run for the whole video (the chat template writes the
start and end tokens, so they belong to the prompt's prefix and suffix). Temporal position ids
advance by ``tokens_per_second x seconds per temporal patch`` from patch to patch, so the
video's frame rate enters the positions; frames are sized per frame by
``Qwen2VLVideoProcessor`` (and by an even share of a whole-video budget when its
``cap_pixels_per_frame`` is set).
"""

from __future__ import annotations

from typing import Any

import torch

from statekv.models.mrope import MRopeVideoAdapter


class Qwen2_5_VLAdapter(MRopeVideoAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def resized(self, height: int, width: int, frames: int) -> tuple[int, int]:
        # Mirrors Qwen2VLVideoProcessor.resize (transformers 5.23), which decides from the
        # frame size and, with cap_pixels_per_frame, from the number of frames it is given.
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

        processor = self.processor.video_processor
        if not processor.do_resize:
            return height, width
        size, factor = processor.size, self.patch * self.merge
        max_pixels = size.longest_edge
        if processor.cap_pixels_per_frame:
            total = int(processor.max_video_tokens * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, total * self.frames_per_unit // frames),
                             int(size.shortest_edge * 1.05))
        return smart_resize(height, width, factor=factor, min_pixels=size.shortest_edge,
                            max_pixels=max_pixels)

    def rope_kwargs(self) -> dict[str, Any]:
        # Seconds per temporal patch: the processor's temporal_patch_size / sampled fps.
        return {"second_per_grid_ts": torch.tensor([self.frames_per_unit * self._frame_seconds()])}

    def _frame_seconds(self) -> float:
        """Seconds between sampled frames (the mean spacing of their timestamps)."""
        times = self._timestamps
        if len(times) < 2 or times[-1] <= times[0]:
            return 1.0
        return (times[-1] - times[0]) / (len(times) - 1)

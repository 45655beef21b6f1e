"""LLaVA-OneVision (llava-hf/llava-onevision-qwen2-0.5b/7b-ov-hf): one frame per chunk, 1-D positions.

Its processor writes a video as ``<video>`` placeholders only: ``ceil(grid / 2) ** 2`` per
frame (the model bilinearly pools each frame's patch grid to half size) and ONE more for the
learned ``image_newline`` that `get_video_features` appends after the whole video, not per frame.
So the last chunk carries that token. All placeholders are special tokens, so the prompt
splits around them with no text-to-text boundary.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from statekv.models.base import ChunkInputs, PromptPieces, VideoAdapter


class LlavaOnevisionAdapter(VideoAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)

    def __init__(self, model, processor) -> None:
        super().__init__(model, processor)
        self.video_id = int(model.config.video_token_id)
        self.video_token = processor.video_token
        self._prompt: PromptPieces | None = None
        self._frame_count = 0
        self._newline_pending = False  # the video's image_newline is not in the cache yet

    @property
    def language_model(self):
        return self.model.model.language_model

    def vision_modules(self):
        return [self.model.model.vision_tower, self.model.model.multi_modal_projector]

    def tokens_per_frame(self, height=None, width=None, frames=None) -> int:
        # The processor's count: the patch grid pooled to ceil(side / 2) per side.
        pooled = math.ceil(math.isqrt(int(self.processor.num_image_tokens)) / 2)
        return pooled * pooled

    def decode_size(self, height: int, width: int, frames=None) -> tuple[int, int]:
        size = self.processor.video_processor.size
        return int(size["width"]), int(size["height"])

    # layout ----------------------------------------------------------------------------
    def start(self, frame_count, timestamps, prompt, frame_size=None, duration=None) -> int:
        self._prompt = prompt
        self._frame_count = frame_count
        self._newline_pending = False
        newline = 1 if frame_count else 0
        return len(self.tokenize(prompt.prefix)) + frame_count * self.tokens_per_frame() + newline

    def layout_tokens(self, frame_count, timestamps, prompt, frame_size=None, duration=None
                      ) -> list[int]:
        """Prefix, then each frame's pooled tokens; the last frame closes the video with the
        image_newline."""
        frames = [self.tokens_per_frame()] * frame_count
        if frames:
            frames[-1] += 1
        return [len(self.tokenize(prompt.prefix))] + frames

    def answer_state(self) -> dict:
        return {"newline_pending": self._newline_pending}

    def resume(self, frame_count, timestamps, prompt, frame_size=None, duration=None,
               state=None) -> None:
        super().resume(frame_count, timestamps, prompt, frame_size, duration, state)
        self._newline_pending = bool((state or {}).get("newline_pending", False))

    # chunks ----------------------------------------------------------------------------
    def prefix_chunk(self) -> ChunkInputs:
        return self.token_chunk(self.tokenize(self._prompt.prefix), 0)

    def text_chunk(self, text: str, offset: int) -> ChunkInputs:
        chunk = self.token_chunk(self.tokenize(text), offset)
        if not self._newline_pending:
            return chunk
        # The last planned frames failed to decode, so no chunk closed the video: the newline
        # goes right before the question, where the processor would have put it.
        newline = self.model.model.image_newline.to(self.device, self.dtype)[None, None]
        ids = [self.video_id] + chunk.token_ids
        embeds = torch.cat([newline, chunk.inputs_embeds], dim=1)
        return ChunkInputs(ids, embeds, _positions(offset, len(ids), self.device))

    def token_chunk(self, token_ids, offset) -> ChunkInputs:
        token_ids = list(token_ids)
        positions = _positions(offset, len(token_ids), self.device)
        return ChunkInputs(token_ids, self.embed(token_ids), positions)

    def video_chunk(self, frames: np.ndarray, first: int, offset: int) -> ChunkInputs:
        features = self._video_features(frames)  # (frames * tokens_per_frame + 1, hidden)
        self._newline_pending = first + len(frames) < self._frame_count
        if self._newline_pending:
            features = features[:-1]  # the image_newline belongs after the last frame only
        ids = [self.video_id] * features.shape[0]
        # Every token of the chunk is a video placeholder: its embedding is the feature itself.
        embeds = features.unsqueeze(0).to(self.dtype)
        return ChunkInputs(ids, embeds, _positions(offset, len(ids), self.device), frames=len(frames))

    def _video_features(self, frames: np.ndarray) -> torch.Tensor:
        pixels = self.processor.video_processor(
            videos=[frames], do_sample_frames=False, return_tensors="pt")["pixel_values_videos"]
        cfg = self.model.config
        out = self.model.model.get_video_features(
            pixel_values_videos=pixels.to(self.device, self.model.dtype),  # (1, n, 3, H, W)
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        )
        return out.pooler_output[0]


def _positions(offset: int, length: int, device) -> torch.Tensor:
    return torch.arange(offset, offset + length, device=device).unsqueeze(0)

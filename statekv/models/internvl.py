"""InternVL (the -hf checkpoints of InternVL3-1B/2B/8B): one frame per chunk, 1-D positions.

Its processor lays a video out as ``Frame1: <img>{context * n}</img>\\nFrame2: ...`` with
the frame's index in the sampled video, inside the user turn of a ChatML template; the
vision tower encodes each frame into `image_seq_length` tokens after a pixel shuffle.
"""

from __future__ import annotations


import numpy as np
import torch

from statekv.models.base import ChunkInputs, PromptPieces, VideoAdapter


class InternVLAdapter(VideoAdapter):
    family = "internvl"
    model_types = ("internvl",)

    def __init__(self, model, processor) -> None:
        super().__init__(model, processor)
        tok = self.tokenizer
        self.context_id = int(model.config.image_token_id)
        self.start_id = int(tok.start_image_token_id)
        self.end_id = int(tok.end_image_token_id)
        self.video_token = tok.video_token
        self._prompt: PromptPieces | None = None

    @property
    def language_model(self):
        return self.model.model.language_model

    def vision_modules(self):
        return [self.model.model.vision_tower, self.model.model.multi_modal_projector]

    def tokens_per_frame(self, height=None, width=None, frames=None) -> int:
        return int(self.processor.image_seq_length)

    def decode_size(self, height: int, width: int, frames=None) -> tuple[int, int]:
        size = self.processor.video_processor.size
        return int(size["width"]), int(size["height"])

    # layout ----------------------------------------------------------------------------
    def start(self, frame_count, timestamps, prompt, frame_size=None, duration=None) -> int:
        self._prompt = prompt
        return sum(self.layout_tokens(frame_count, timestamps, prompt))

    def layout_tokens(self, frame_count, timestamps, prompt, frame_size=None, duration=None) -> list[int]:
        return [len(self.tokenize(prompt.prefix))] + [
            len(self.frame_token_ids(i)) for i in range(frame_count)]

    def frame_token_ids(self, index: int) -> list[int]:
        # The label carries the frame's index in the whole sampled video, as the processor writes it.
        label = self.tokenize(("\n" if index else "") + f"Frame{index + 1}: ")
        return label + [self.start_id] + [self.context_id] * self.tokens_per_frame() + [self.end_id]

    # chunks ----------------------------------------------------------------------------
    def prefix_chunk(self) -> ChunkInputs:
        return self.token_chunk(self.tokenize(self._prompt.prefix), 0)

    def text_chunk(self, text: str, offset: int) -> ChunkInputs:
        return self.token_chunk(self.tokenize(text), offset)

    def token_chunk(self, token_ids, offset) -> ChunkInputs:
        return ChunkInputs(token_ids, self.embed(token_ids), _positions(offset, len(token_ids), self.device))

    def video_chunk(self, frames: np.ndarray, first: int, offset: int) -> ChunkInputs:
        ids = [t for i in range(len(frames)) for t in self.frame_token_ids(first + i)]
        embeds = self.embed(ids)
        features = self._frame_features(frames)  # (frames * tokens_per_frame, hidden)
        image = torch.tensor(ids, device=self.device) == self.context_id
        embeds[0, image] = features.to(embeds.dtype)
        return ChunkInputs(ids, embeds, _positions(offset, len(ids), self.device), frames=len(frames))

    def _frame_features(self, frames: np.ndarray) -> torch.Tensor:
        pixels = self.processor.video_processor(
            videos=[frames], do_sample_frames=False, return_tensors="pt")["pixel_values_videos"][0]
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=pixels.to(self.device, self.model.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        )
        return out.pooler_output.reshape(-1, out.pooler_output.shape[-1])


def _positions(offset: int, length: int, device) -> torch.Tensor:
    return torch.arange(offset, offset + length, device=device).unsqueeze(0)

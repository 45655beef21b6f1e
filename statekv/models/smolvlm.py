"""SmolVLM2 (HuggingFaceTB/SmolVLM2-256M/500M-Video-Instruct, -2.2B-Instruct): one frame per chunk.

Its processor lays a video out as an intro sentence, then per frame a ``\\nFrame from MM:SS:``
label and one unsplit image (``<fake_token_around_image><global-img><image> * n
<fake_token_around_image>``), then a closing ``\\n\\n``. The language model is
``model.model.text_model`` (a Llama); positions are 1-D.

Where text meets text the pieces are cut from one tokenisation of the joined text, so the ids
equal the processor's whatever the tokenizer merges: the prompt prefix and the intro are
tokenised together and cut where their tokens part (the intro rides with the first frame), and
the closing line joins the question (it opens ``PromptPieces.suffix``, so each question re-reads
those 1-2 tokens). Every other frame label follows a special token, so it tokenises alone.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import torch

from statekv.models.base import ChunkInputs, PromptPieces, VideoAdapter


class SmolVLMAdapter(VideoAdapter):
    family = "smolvlm"
    model_types = ("smolvlm",)

    def __init__(self, model, processor) -> None:
        super().__init__(model, processor)
        self.image_id = int(model.config.image_token_id)
        self.video_token = processor.video_token
        # Frames of a video are never split into sub-images: one global image each.
        self._image_text = (processor.fake_image_token + processor.global_image_token
                            + processor.image_token * self.tokens_per_frame()
                            + processor.fake_image_token)
        self._prompt: PromptPieces | None = None
        self._timestamps: tuple[float, ...] = ()
        self._prefix_ids: list[int] = []
        self._first_frame_ids: list[int] = []

    @property
    def language_model(self):
        return self.model.model.text_model

    def vision_modules(self):
        return [self.model.model.vision_model, self.model.model.connector]

    def tokens_per_frame(self, height=None, width=None, frames=None) -> int:
        return int(self.processor.image_seq_len)

    def decode_size(self, height: int, width: int, frames=None) -> tuple[int, int]:
        # The video processor ends every frame as one max_image_size square.
        edge = int(self.processor.video_processor.max_image_size["longest_edge"])
        return edge, edge

    # layout ----------------------------------------------------------------------------
    def prompt(self, system_prompt: str | None = None) -> PromptPieces:
        # As for any video conversation, the processor swaps in its built-in video template;
        # the closing line it writes after a video starts the question's text.
        pieces = super().prompt(system_prompt)
        return PromptPieces(prefix=pieces.prefix, suffix=_layout().DEFAULT_MEDIA_OUTTRO + pieces.suffix)

    def start(self, frame_count, timestamps, prompt, frame_size=None,
              duration: float | None = None) -> int:
        """`duration` (seconds) of the video, when the caller knows it; else the processor's
        own fallback, the last frame's timestamp."""
        self._prompt = prompt
        self._timestamps = tuple(timestamps)
        self._prefix_ids, self._first_frame_ids = self.tokenize(prompt.prefix), []
        if frame_count:
            # The intro opens the video, so it rides with the first frame (as in the processor's
            # video text); a token merged across the prefix/intro boundary goes with the frame.
            head = prompt.prefix + self._intro(frame_count, duration)
            whole = self.tokenize(head + self._frame_text(0))
            cut = _common_prefix(whole, self._prefix_ids)
            self._prefix_ids, self._first_frame_ids = whole[:cut], whole[cut:]
        return len(self._prefix_ids) + sum(len(self.frame_token_ids(i)) for i in range(frame_count))

    def layout_tokens(self, frame_count, timestamps, prompt, frame_size=None, duration=None
                      ) -> list[int]:
        self.start(frame_count, timestamps, prompt, duration=duration)  # start() plans it anyway
        return [len(self._prefix_ids)] + [len(self.frame_token_ids(i)) for i in range(frame_count)]

    def _intro(self, frame_count: int, duration: float | None) -> str:
        from num2words import num2words  # the processor needs it too

        if duration is None:
            duration = self._timestamps[-1] if self._timestamps else 0.0
        return _layout().DEFAULT_VIDEO_INTRO.format(
            frame_count=num2words(frame_count), video_duration=str(timedelta(seconds=int(duration))))

    def _frame_text(self, index: int) -> str:
        # The frame's time in the whole sampled video, formatted as the processor does.
        second = self._timestamps[index]
        stamp = f"{int(second // 60):02d}:{int(second % 60):02d}"
        return _layout().FRAME_TIMESTAMP_MESSAGE.format(timestamp=stamp) + self._image_text

    def frame_token_ids(self, index: int) -> list[int]:
        if index == 0:
            return self._first_frame_ids
        return self.tokenize(self._frame_text(index))

    # chunks ----------------------------------------------------------------------------
    def prefix_chunk(self) -> ChunkInputs:
        return self.token_chunk(self._prefix_ids, 0)

    def text_chunk(self, text: str, offset: int) -> ChunkInputs:
        return self.token_chunk(self.tokenize(text), offset)

    def token_chunk(self, token_ids, offset) -> ChunkInputs:
        token_ids = list(token_ids)
        positions = _positions(offset, len(token_ids), self.device)
        return ChunkInputs(token_ids, self.embed(token_ids), positions)

    def video_chunk(self, frames: np.ndarray, first: int, offset: int) -> ChunkInputs:
        ids = [t for i in range(len(frames)) for t in self.frame_token_ids(first + i)]
        embeds = self.embed(ids)
        features = self._frame_features(frames)  # (frames * tokens_per_frame, hidden)
        image = torch.tensor(ids, device=self.device) == self.image_id
        embeds[0, image] = features.to(embeds.dtype)
        return ChunkInputs(ids, embeds, _positions(offset, len(ids), self.device), frames=len(frames))

    def _frame_features(self, frames: np.ndarray) -> torch.Tensor:
        pixels = self.processor.video_processor(
            videos=[frames], do_sample_frames=False, return_tensors="pt")
        out = self.model.model.get_image_features(
            pixel_values=pixels["pixel_values"].to(self.device, self.model.dtype),  # (1, n, 3, H, W)
            pixel_attention_mask=pixels["pixel_attention_mask"].to(self.device),
            return_dict=True,
        )
        return torch.cat(list(out.pooler_output), dim=0)


def _layout():
    """The processor's own layout strings (imported late: `import statekv` stays light)."""
    from transformers.models.smolvlm import processing_smolvlm

    return processing_smolvlm


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _positions(offset: int, length: int, device) -> torch.Tensor:
    return torch.arange(offset, offset + length, device=device).unsqueeze(0)

"""Answering questions over the detailed cache: one video prefill, any number of questions.

Each question is written after the video in the detailed cache, decoded greedily one token
at a time (each step appends one entry, no copy of the cache), then rewound so the next
question sees the video alone, exactly as if it were the only one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from statekv.models.base import ChunkInputs, VideoAdapter
from statekv.prefill import PrefillResult, forward_chunk
from statekv.rotary import fixed_rotary


@dataclass
class Answer:
    """One question's answer and the first answer token's log-probabilities."""

    question: str
    answer: str
    token_ids: list[int]
    first_token_logprobs: torch.Tensor | None = None  # (vocab,), float32

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer}


def _logits(adapter: VideoAdapter, hidden: torch.Tensor) -> torch.Tensor:
    return adapter.model.get_output_embeddings()(hidden).float()


def question_logits(adapter: VideoAdapter, state: PrefillResult, question: str) -> torch.Tensor:
    """Logits (question tokens, vocab) of the question text after the video; cache rewound."""
    chunk = adapter.text_chunk(state.prompt.question_text(question), state.cache.video_tokens)
    try:
        with torch.inference_mode(), fixed_rotary(adapter.language_model, state.rotary_length):
            return _logits(adapter, forward_chunk(adapter, state.cache, chunk)[0])
    finally:
        state.cache.rewind()


def answer_question(
    adapter: VideoAdapter, state: PrefillResult, question: str, max_new_tokens: int
) -> Answer:
    """Greedy answer to one question over the detailed cache; leaves the cache rewound."""
    cache = state.cache
    eos = adapter.eos_token_ids()
    chunk: ChunkInputs = adapter.text_chunk(state.prompt.question_text(question), cache.video_tokens)
    tokens: list[int] = []
    first: torch.Tensor | None = None
    try:
        with torch.inference_mode(), fixed_rotary(adapter.language_model, state.rotary_length):
            for _ in range(max_new_tokens):
                hidden = forward_chunk(adapter, cache, chunk)
                logits = _logits(adapter, hidden[0, -1])
                if first is None:
                    first = torch.log_softmax(logits, dim=-1)
                token = int(logits.argmax())
                if token in eos:
                    break
                tokens.append(token)
                chunk = adapter.token_chunk([token], cache.detailed_tokens)
    finally:
        cache.rewind()
    text = adapter.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return Answer(question, text, tokens, first)

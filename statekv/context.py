"""The trained context: the positions a checkpoint was trained for, and how many frames fit.

statekv makes the prefill linear in the video's length; it does not make positions beyond the
range the language model was trained on safe. A sequence longer than that still runs (dynamic
NTK or LongRoPE stretch the rotary frequencies, other rope types simply extrapolate) but the
answers degrade silently, so the commands and the Python API say so once, naming the
`--max-frames` value that would fit, and `--max-frames fit` samples as many frames as fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from statekv.accounting import ANSWER_ROOM
from statekv.errors import UsageError


def trained_positions(text_config: Any) -> int | None:
    """Positions the language model was trained for (`max_position_embeddings`), None if unstated."""
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def frames_that_fit(frames: int, tokens_for: Callable[[int], int], trained: int | None,
                    room: int = ANSWER_ROOM) -> int | None:
    """Most frames n <= `frames` whose prefix + frames (`tokens_for(n)`) + `room` fit in
    `trained` positions (None when the context is unknown). Binary search: more frames never
    take fewer tokens."""
    if trained is None:
        return None
    lo, hi = 0, frames
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tokens_for(mid) + room <= trained:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class Context:
    """A video's planned tokens against the model's trained context (`info --json` `context`)."""

    trained_positions: int | None
    planned_tokens: int  # prefix + every sampled frame
    answer_room: int  # positions kept for the question and its answer
    frames_that_fit: int | None  # frames at this sampling that fit with the answer room

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def over(self, question_tokens: int) -> bool:
        """Whether prefix + video + this many question/answer tokens pass the trained context."""
        return (self.trained_positions is not None
                and self.planned_tokens + question_tokens > self.trained_positions)

    def warning(self, question_tokens: int) -> str:
        """The one-line over-context warning (its words are part of the output contract)."""
        fit = self.frames_that_fit
        advice = (f"--max-frames {fit} fits (or --max-frames fit)" if fit else
                  "not even one frame fits with the answer room; use a model with a longer context")
        return (f"prefix, video and question take {self.planned_tokens + question_tokens} "
                f"positions, beyond the model's trained context of {self.trained_positions}: "
                f"answers may silently degrade; {advice}")


def context_of(trained: int | None, layout: list[int], frames: int,
               tokens_for: Callable[[int], int]) -> Context:
    """A planned video (`layout`: prefix then each of its `frames` frames) against the trained
    context; the frames that fit are searched (`tokens_for(n)`: n frames' plan) only when over."""
    planned = sum(layout)
    if trained is None:
        fit = None
    elif planned + ANSWER_ROOM <= trained:
        fit = frames
    else:
        fit = frames_that_fit(frames, tokens_for, trained)
    return Context(trained, planned, ANSWER_ROOM, fit)


def check_question(prefix_tokens: int, question_tokens: int, trained: int | None) -> None:
    """Refuse a question that cannot fit in the trained context even without any video."""
    if trained is not None and prefix_tokens + question_tokens >= trained:
        raise UsageError(
            f"the question takes {question_tokens} tokens after a {prefix_tokens}-token prompt, "
            f"more than the model's trained context of {trained} positions holds; shorten it")

"""Rich rendering of prefill events: frames, ETA, FLOPs against full, memory, tokens/s."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from typing import TYPE_CHECKING

from statekv.units import format_bytes, format_flops, format_fraction

if TYPE_CHECKING:  # the CLI starts fast: torch loads only when a command needs it
    from statekv.prefill import PrefillEvent

stderr = Console(stderr=True)


flops = format_flops  # short names for the renderers; the formatting lives in statekv.units
size = format_bytes


def live_enabled(quiet: bool, json_output: bool) -> bool:
    """Live display only for a person watching a terminal."""
    return not quiet and not json_output and sys.stderr.isatty()


@contextmanager
def prefill_display(label: str, enabled: bool, console: Console | None = None
                    ) -> Iterator[Callable[[PrefillEvent], None] | None]:
    """A callback that renders prefill events live on stderr, or None when disabled."""
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[frames]}"), TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console or stderr, transient=False, refresh_per_second=8)
    with progress:
        task = progress.add_task(label, total=None, frames="", detail="loading frames")

        def render(event: PrefillEvent) -> None:
            detail = (f"LM {flops(event.lm_prefill_flops)} "
                      f"({format_fraction(event.lm_flops_fraction)} of full's "
                      f"{flops(event.full_lm_prefill_flops)}) | mem {size(event.memory_bytes)} "
                      f"peak +{size(event.peak_memory_bytes)} | carried {event.carried_tokens} | "
                      f"{event.tokens_per_second:,.0f} tok/s")
            progress.update(task, total=event.frames_total, completed=event.frames_done,
                            frames=f"{event.frames_done}/{event.frames_total} frames", detail=detail)

        yield render

"""Rich rendering of prefill events: frames, ETA, FLOPs against full, memory, tokens/s."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI starts fast: torch loads only when a command needs it
    from statekv.prefill import PrefillEvent

stderr = Console(stderr=True)


def flops(value: float) -> str:
    """FLOPs with a unit (GFLOP, TFLOP, ...)."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} FLOP"


def size(value: float) -> str:
    """Bytes with a binary unit."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


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
            saving = (event.full_lm_prefill_flops / event.lm_prefill_flops
                      if event.lm_prefill_flops else 1.0)
            tokens_per_second = event.tokens_done / max(event.elapsed_seconds, 1e-9)
            detail = (f"LM {flops(event.lm_prefill_flops)} (full {flops(event.full_lm_prefill_flops)}, "
                      f"{saving:.1f}x) | mem {size(event.memory_bytes)} peak +"
                      f"{size(event.peak_memory_bytes)} | carried {event.carried_tokens} | "
                      f"{tokens_per_second:,.0f} tok/s")
            progress.update(task, total=event.frames_total, completed=event.frames_done,
                            frames=f"{event.frames_done}/{event.frames_total} frames", detail=detail)

        yield render

"""Live prefill progress that fits the terminal: bar, frames, time, LM FLOPs vs full, memory.

The line is laid out for the width it gets: wide terminals show every field on one line
with full labels; at 80 columns the same fields (a bar or percentage, frames done/total,
elapsed and remaining time, LM FLOPs as a fraction of full attention's, memory) take two
lines with short labels; narrower still, shorter forms. Numbers are formatted by
`statekv.units`, never computed here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

from statekv.units import (format_bytes, format_count, format_flops, format_fraction,
                           format_seconds, fraction)


if TYPE_CHECKING:  # the CLI starts fast: torch loads only when a command needs it
    from statekv.prefill import PrefillEvent

stderr = Console(stderr=True)

# Kept for the commands that import them by these names.
flops = format_flops
size = format_bytes

flops = format_flops  # short names for the renderers; the formatting lives in statekv.units
size = format_bytes
BAR = object()  # where the bar goes in a layout: it takes the width the text leaves
SEP = " · "  # between fields after the frames


def live_enabled(quiet: bool, json_output: bool) -> bool:
    """Live display only for a person watching a terminal."""
    return not quiet and not json_output and sys.stderr.isatty()


@dataclass
class Fields:
    """Every piece of one progress line, each in its long, medium and short form."""

    label: str
    fraction: float | None = None  # of the frames, for the bar
    percent: str = ""
    frames: tuple[str, str, str] = ("", "", "")
    elapsed: tuple[str, str, str] = ("", "", "")
    remaining: tuple[str, str, str] = ("", "", "")
    lm: tuple[str, str, str] = ("", "", "")
    memory: tuple[str, str, str] = ("", "", "")
    extra: str = ""  # wide terminals only
    status: str = ""  # before the first chunk: what is happening

    @classmethod
    def of(cls, label: str, event: PrefillEvent | None, status: str = "loading frames") -> "Fields":
        if event is None:
            return cls(label, status=status)
        done, total = event.frames_done, event.frames_total
        elapsed = format_seconds(event.elapsed_seconds)
        left = format_seconds(event.remaining_seconds)
        share = format_fraction(event.fraction_of_full)
        lm, full = format_flops(event.lm_prefill_flops), format_flops(event.full_lm_prefill_flops)
        mem, peak = format_bytes(event.memory_bytes), format_bytes(event.peak_memory_bytes)
        rate, progress = event.tokens_per_second, fraction(done, total)
        return cls(
            label, fraction=progress, percent=format_fraction(progress),
            frames=(f"{done}/{total} frames", f"{done}/{total} fr", f"{done}/{total}"),
            elapsed=(f"elapsed {elapsed}", f"elapsed {elapsed}", f"{elapsed}"),
            remaining=(f"remaining {left}", f"left {left}", f"left {left}"),
            lm=(f"LM {lm} = {share} of full's {full}", f"LM {share} of full", f"LM {share}"),
            memory=(f"memory {mem} (peak +{peak})", f"mem {mem}", f"mem {mem}"),
            extra=(f"carried {event.carried_tokens} tokens | "
                   f"{'-' if rate is None else format_count(rate)} tokens/s"))

    def one_line(self) -> list[tuple[list[Any], int]]:
        """Single-line layouts, widest first: (parts, the bar's least width)."""
        if self.status:
            return [([self.label, self.status], 0)]
        f, e, r, lm, m = self.frames, self.elapsed, self.remaining, self.lm, self.memory
        head = [self.label, BAR, self.percent, f[0], e[0], r[0]]
        return [(head + [lm[0], m[0], self.extra], 20), (head + [lm[0], m[0]], 12),
                (head + [lm[1], m[0]], 12),
                ([self.label, BAR, self.percent, f[1], e[1], r[1], lm[1], m[1]], 10)]

    def two_lines(self) -> tuple[list[tuple[list[Any], int]], list[tuple[list[Any], int]]]:
        """Layouts of the first line (progress, time) and of the second (cost), widest first."""
        f, e, r, lm, m = self.frames, self.elapsed, self.remaining, self.lm, self.memory
        first = [([self.label, BAR, self.percent, f[i], e[i], r[i]], least)
                 for i, least in ((0, 10), (1, 10), (1, 6))]
        first += [([self.label, self.percent, f[1], e[i], r[i]], 0) for i in (1, 2)]
        first += [([self.label, self.percent, f[2], r[2]], 0)]
        second = [(["  " + lm[i], m[j]], 0) for i, j in ((0, 0), (1, 0), (1, 1), (2, 2))]
        return first, second


def layout(fields: Fields, width: int) -> list[Text]:
    """The lines of `fields` at `width` columns: one line when it fits, else two; each line
    takes the widest form that fits, and the bar fills what the text leaves."""
    for parts, least_bar in fields.one_line():
        line = _line(parts, width, least_bar, fields.fraction)
        if line is not None:
            return [line]
    if fields.status:
        return [_truncated(fields.one_line()[-1][0], width)]
    lines = []
    for candidates in fields.two_lines():
        for parts, least_bar in candidates:
            line = _line(parts, width, least_bar, fields.fraction)
            if line is not None:
                break
        else:
            line = _truncated(candidates[-1][0], width)
        lines.append(line)
    return lines


def _truncated(parts: list[Any], width: int) -> Text:
    text = Text(SEP.join(p for p in parts if p is not BAR and p))
    text.truncate(width, overflow="ellipsis")
    return text


def _line(parts: list[Any], width: int, least_bar: int, fraction: float | None) -> Text | None:
    """One line of parts, the bar widened to fill; None if it cannot fit in `width`."""
    words = [p for p in parts if p is BAR or p]
    # A space inside "label bar 42%" and after the bar; " · " between the fields after.
    follows = isinstance(words[0], str) and words[0].startswith("  ")  # a second line
    seps = ["" if i == 0 else SEP if follows else " " if i == 1 or words[i] is BAR
            or words[i - 1] is BAR else SEP for i in range(len(words))]
    fixed = sum(len(p) for p in words if p is not BAR) + sum(len(s) for s in seps)
    room = width - fixed
    if room < (least_bar if BAR in words else 0):
        return None
    text = Text()
    for i, part in enumerate(words):
        text.append(seps[i])
        if part is BAR:
            filled = round(room * (fraction or 0.0))
            text.append("━" * filled, style="bold magenta")
            text.append("━" * (room - filled), style="grey23")
        elif i == 0 and not part.startswith(" "):
            text.append(part, style="bold")
        else:
            text.append(part)
    return text


class PrefillView:
    """A renderable whose lines are laid out for the width of the console that draws it."""

    def __init__(self, label: str) -> None:
        self.fields = Fields.of(label, None)
        self.header: str | None = None  # e.g. summarize's "video 3/10: path"

    def update(self, event: PrefillEvent | None, status: str = "loading frames") -> None:
        self.fields = Fields.of(self.fields.label, event, status)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(20, options.max_width - 1)  # one column spare: terminals wrap at the edge
        if self.header:
            header = Text(self.header)
            header.truncate(width, overflow="ellipsis")
            yield header
        yield from layout(self.fields, width)


@contextmanager
def prefill_display(label: str, enabled: bool, console: Console | None = None
                    ) -> Iterator[Callable[[PrefillEvent], None] | None]:
    """A callback that renders prefill events live on stderr, or None when disabled."""
    if not enabled:
        yield None
        return
    view = PrefillView(label)
    with Live(view, console=console or stderr, transient=False, refresh_per_second=8,
              redirect_stdout=False, redirect_stderr=False) as live:

        def render(event: PrefillEvent) -> None:
            view.update(event)
            live.refresh()

        yield render


class BatchView:
    """`summarize`'s display: a line over the videos (bar, done/total, elapsed, remaining,
    the current file), then the current video's prefill as `PrefillView` lays it out."""

    def __init__(self, total: int) -> None:
        import time

        self.total, self.done, self.path = total, 0, "loading model"
        self.started = time.perf_counter()
        self.prefill: PrefillView | None = None

    def _fields(self) -> Fields:
        import time

        from statekv.units import remaining

        elapsed = time.perf_counter() - self.started
        left = format_seconds(remaining(elapsed, self.done, self.total))
        share = fraction(self.done, self.total)
        count = f"{self.done}/{self.total}"
        return Fields("videos", fraction=share, percent=format_fraction(share),
                      frames=(f"{count} videos", f"{count} videos", count),
                      elapsed=(f"elapsed {format_seconds(elapsed)}",) * 2 + (format_seconds(elapsed),),
                      remaining=(f"remaining {left}", f"left {left}", f"left {left}"))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(20, options.max_width - 1)
        fields = self._fields()
        head = [fields.label, BAR, fields.percent, fields.frames[0], fields.elapsed[0],
                fields.remaining[0], self.path]
        for parts, least in ((head, 10), (head[:-1], 10), (head[:2] + [fields.percent,
                             fields.frames[1], fields.elapsed[1], fields.remaining[1]], 6)):
            line = _line(parts, width, least, fields.fraction)
            if line is not None:
                break
        else:
            line = _truncated([fields.label, fields.frames[2], fields.remaining[2]], width)
        yield line
        if self.prefill is not None:
            if line.plain.find(self.path) < 0 and self.path:
                path = Text("  " + self.path)
                path.truncate(width, overflow="ellipsis")
                yield path
            yield from self.prefill.__rich_console__(console, options)

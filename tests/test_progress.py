"""The live prefill display at the widths terminals have: what must show, and nothing wraps."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from statekv.prefill import PrefillEvent
from statekv.units import format_bytes, format_seconds
from statekv_cli.progress import BatchView, PrefillView

EVENT = PrefillEvent(frames_done=42, frames_total=132, tokens_done=4200,
                     lm_prefill_flops=1_230_000_000_000, full_lm_prefill_flops=3_900_000_000_000,
                     carried_tokens=4096, elapsed_seconds=12.3, memory_bytes=3 * 2**30 // 2,
                     peak_memory_bytes=300 * 2**20, remaining_seconds=26.7)


def render(renderable, width: int) -> list[str]:
    console = Console(width=width, record=True, force_terminal=True, color_system=None)
    console.print(renderable)
    return console.export_text().splitlines()


def view(event=EVENT):
    v = PrefillView("statekv")
    v.update(event)
    return v


@pytest.mark.parametrize("width", [60, 80, 120, 200])
def test_every_line_fits_and_shows_progress(width):
    lines = render(view(), width)
    assert all(len(line) < width for line in lines), lines
    text = " ".join(lines)
    assert "━" in text or "32%" in text  # a bar or the percentage
    assert "42/132" in text
    assert format_seconds(26.7) in text and format_bytes(EVENT.memory_bytes) in text
    assert re.search(r"LM .*32%", text)  # LM FLOPs as a fraction of full attention's


@pytest.mark.parametrize("width", [80, 120, 200])
def test_labelled_at_80_columns_and_wider(width):
    text = " ".join(render(view(), width))
    assert "━" in text and "32%" in text
    assert re.search(r"42/132 (frames|fr)", text)
    assert f"elapsed {format_seconds(12.3)}" in text
    assert re.search(rf"(remaining|left) {re.escape(format_seconds(26.7))}", text)
    assert "of full" in text and "mem" in text


def test_wider_terminals_add_detail():
    narrow, wide = " ".join(render(view(), 80)), " ".join(render(view(), 200))
    assert len(render(view(), 200)) == 1  # one line when there is room
    assert "tokens/s" in wide and "carried 4096" in wide and "tokens/s" not in narrow
    assert "TFLOP" in wide


def test_before_the_first_chunk_and_unknown_remaining_time():
    assert "loading frames" in " ".join(render(PrefillView("full"), 80))
    first = PrefillEvent(**{**EVENT.__dict__, "frames_done": 0, "remaining_seconds": None})
    text = " ".join(render(view(first), 80))
    assert "0/132" in text and "remaining -" in text


@pytest.mark.parametrize("width", [60, 80, 120, 200])
def test_summarize_view_fits(width):
    batch = BatchView(10)
    batch.done, batch.path = 3, "videos/some/long/path/to/a/file/name.mp4"
    batch.prefill = view()
    lines = render(batch, width)
    assert all(len(line) < width for line in lines), lines
    assert "3/10" in lines[0] and "42/132" in " ".join(lines)


def test_compare_table_header_does_not_wrap_at_100_columns():
    from statekv_cli.app import _compare_table

    row = dict(answer="a person walks into the kitchen and opens the fridge", agrees_with_full=True,
               first_token_kl_vs_full=0.0123, lm_prefill_flops=1_230_000_000_000,
               vision_flops=12_340_000_000, lm_prefill_seconds=12.3,
               peak_memory_bytes=300 * 2**20, carried_tokens=4096, detailed_tokens=13200)
    record = {"path": "movie.mp4", "question": "what happens?", "methods": [
        dict(row, method="full", budget=None, window_frames=None),
        dict(row, method="window", budget=None, window_frames=16),
        dict(row, method="statekv", budget=4096, window_frames=None)]}
    lines = render(_compare_table(record), 100)
    header = next(i for i, line in enumerate(lines) if "method" in line)
    assert lines[header].split() == ["method", "same", "KL", "LM", "FLOPs", "vision", "prefill",
                                     "peak", "carried", "detailed"]
    assert "─" in lines[header + 1]  # the rule right below: the header took one line
    assert "…" not in "".join(lines) and all(len(line) <= 100 for line in lines)

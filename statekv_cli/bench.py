"""`statekv bench`: language-model prefill cost against the number of frames, per method.

Parses options, calls `statekv.bench` (measured: a preset's language model with random
weights on synthetic frames through the real prefill loop; `--analytic`: the architecture's
numbers only) and renders a table (stdout), or JSON with `--json`; progress goes to stderr.
Registered in the main app as `app.command("bench")(bench)`.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from statekv_cli.progress import flops, size

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}",
                                 param_hint=option) from None
    if not values:
        raise typer.BadParameter("needs at least one value", param_hint=option)
    return values


def bench(
    preset: Annotated[str, typer.Option(
        "--preset", help="Preset name or YAML file whose language model to benchmark.")] = "bench-tiny",
    frames: Annotated[str, typer.Option(
        "--frames", help="Comma-separated frame counts.")] = "32,64,128,256,512,1024",
    methods: Annotated[str, typer.Option(
        "--methods", help="Comma-separated methods: full, window, statekv, isolated.")] = "full,window,statekv",
    budget: Annotated[int | None, typer.Option(
        "--budget", help="statekv: tokens carried per layer and KV head. Default: the preset's.")] = None,
    window_frames: Annotated[int | None, typer.Option(
        "--window-frames", help="window: recent frames a chunk sees. Default: the preset's.")] = None,
    repeats: Annotated[int, typer.Option(
        "--repeats", help="Runs per cell; seconds are their median.")] = 3,
    tokens_per_frame: Annotated[int | None, typer.Option(
        "--tokens-per-frame", help="Visual tokens per frame. Default: the preset's.")] = None,
    chunk_frames: Annotated[int, typer.Option("--chunk-frames", help="Frames per chunk.")] = 1,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="torch intra-op threads (default: one per core).")] = None,
    analytic: Annotated[bool, typer.Option(
        "--analytic", help="No run: FLOPs and memory from the preset's architecture numbers "
        "(works for real checkpoints, e.g. --preset internvl3-8b --frames 512,3600).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the rows as JSON on stdout.")] = False,
    csv: Annotated[str | None, typer.Option("--csv", help="Also write the rows to this CSV file.")] = None,
    plot: Annotated[str | None, typer.Option(
        "--plot", help="Also plot FLOPs and seconds against frames to this PNG (needs matplotlib).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of errors.")] = False,
) -> None:
    """Benchmark LM prefill (FLOPs, seconds, per-chunk time, memory) against frames per method.

    Example: statekv bench --preset bench-tiny --frames 64,256,512 --repeats 3 --csv bench.csv
    """
    from statekv.commands import bench as lib
    from statekv.errors import StateKVError

    frame_counts = _ints(frames, "--frames")
    method_names = [m.strip() for m in methods.split(",") if m.strip()]
    shown = not json_output
    progress = (lambda row: err.print(_row_line(row), markup=False)) if shown else None
    try:
        if analytic:
            rows = lib.analytic_bench(preset, frame_counts, method_names, budget=budget,
                                      window_frames=window_frames,
                                      tokens_per_frame=tokens_per_frame, chunk_frames=chunk_frames)
        else:
            rows = lib.run_bench(preset, frame_counts, method_names, budget=budget,
                                 window_frames=window_frames, repeats=repeats,
                                 tokens_per_frame=tokens_per_frame, chunk_frames=chunk_frames,
                                 threads=threads, on_row=progress)
        if csv:
            lib.write_csv(rows, csv)
            err.print(f"wrote {csv}", markup=False)
        if plot:
            lib.plot(rows, plot, title=f"statekv bench: {preset}")
            err.print(f"wrote {plot}", markup=False)
    except StateKVError as exc:
        if debug:
            traceback.print_exc()
        err.print(f"statekv: error: {exc}", markup=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("statekv: interrupted")
        raise typer.Exit(130) from None
    if json_output:
        sys.stdout.write(json.dumps([r.to_dict() for r in rows]) + "\n")
        return
    out.print(_table(rows, lib.speedups(rows), analytic))


def _row_line(row) -> str:
    return (f"{row.frames} frames, {row.method}: {flops(row.lm_prefill_flops)}, "
            f"{row.lm_prefill_seconds:.3f} s")


def _fmt(value, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def _table(rows, speedups, analytic: bool) -> Table:
    table = Table(title="LM prefill" + (" (analytic)" if analytic else ""))
    for name in ("frames", "method", "LM FLOPs", "vs full"):
        table.add_column(name, justify="right")
    if analytic:
        table.add_column("last chunk FLOPs", justify="right")
    else:
        for name in ("seconds", "speedup", "chunk ms first", "chunk ms last", "flatness"):
            table.add_column(name, justify="right")
    table.add_column("peak memory" + (" (est.)" if analytic else ""), justify="right")
    for r in rows:
        cells = [str(r.frames), r.method, flops(r.lm_prefill_flops),
                 f"{r.lm_prefill_flops / max(1, r.full_lm_prefill_flops):.0%}"]
        if analytic:
            cells.append(flops(r.last_chunk_flops))
        else:
            cells += [_fmt(r.lm_prefill_seconds, "{:.3f}"),
                      _fmt(speedups.get((r.frames, r.method)), "{:.2f}x"),
                      _fmt(r.chunk_ms_first, "{:.1f}"), _fmt(r.chunk_ms_last, "{:.1f}"),
                      _fmt(r.flatness, "{:.2f}")]
        cells.append("-" if r.peak_memory_bytes is None else size(r.peak_memory_bytes))
        table.add_row(*cells)
    return table

"""`statekv summarize`: one summary per video, appended to a resumable JSONL file."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from statekv_cli.options import (
    Attention,
    Budget,
    ChunkFrames,
    Debug,
    Device,
    Dtype,
    End,
    Force,
    Fps,
    MaxFrames,
    MaxNewTokens,
    Method,
    ModelOpt,
    PinPrefix,
    Preset,
    Quiet,
    Seed,
    Start,
    Threads,
    TrustRemoteCode,
    WindowFrames,
    err,
    handle_errors,
    run_options,
)
from statekv_cli.progress import flops, live_enabled


@handle_errors
def summarize(
    paths: Annotated[list[str], typer.Argument(
        help="Video files and/or folders (searched recursively for video files).",
        show_default=False)],
    out_path: Annotated[str, typer.Option(
        "--out", "-o", help="JSONL output, one line per video, appended and resumed; '-' = "
        "stdout (no resume).")] = "summaries.jsonl",
    prompt: Annotated[str | None, typer.Option(
        "--prompt", help="The instruction for each video. Default: the preset's summary prompt.")] = None,
    glob: Annotated[str | None, typer.Option(
        "--glob", help="In folders, take files whose name matches this pattern (e.g. '*.mp4') "
        "instead of every video extension.")] = None,
    redo: Annotated[bool, typer.Option(
        "--redo", help="Redo videos already summarised in --out with the same settings.")] = False,
    shard_spec: Annotated[str | None, typer.Option(
        "--shard", help="K/N: only the videos at positions K-1, K-1+N, ... of the sorted list "
        "(K from 1), e.g. one SLURM array task each.")] = None,
    use_ray: Annotated[bool, typer.Option(
        "--ray", help="Run on Ray: one model-holding actor per GPU (or CPU); needs statekv[ray].")] = False,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Connect to this Ray cluster (implies --ray), e.g. auto or "
        "ray://head:10001.")] = None,
    preset: Preset = None, model: ModelOpt = None, method: Method = None, budget: Budget = None,
    window_frames: WindowFrames = None, max_frames: MaxFrames = None, fps: Fps = None,
    start: Start = None, end: End = None, chunk_frames: ChunkFrames = None,
    max_new_tokens: MaxNewTokens = None, device: Device = "auto", dtype: Dtype = None,
    seed: Seed = 0, quiet: Quiet = False, debug: Debug = False,
    pin_prefix: PinPrefix = False, attention: Attention = "sdpa",
    trust_remote_code: TrustRemoteCode = False, force: Force = False,
    threads: Threads = None,
) -> None:
    """Summarise many videos: one prefill each, one JSON line per video, resumable.

    Rerunning with the same --out skips videos already done with the same settings and
    retries failed ones. Exit code 1 when some videos failed.

    Example: statekv summarize videos/ --out summaries.jsonl --max-frames 128 --shard 1/4
    """
    from statekv.commands import summarize as batch

    options = run_options(
        preset=preset, model=model, method=method, budget=budget, window_frames=window_frames,
        max_frames=max_frames, fps=fps, start=start, end=end, chunk_frames=chunk_frames,
        max_new_tokens=max_new_tokens, device=device, dtype=dtype, seed=seed,
        pin_prefix=pin_prefix, attention=attention, trust_remote_code=trust_remote_code,
        force=force, threads=threads)
    options.validate()
    videos = batch.find_videos(paths, glob)
    if shard_spec:
        videos = batch.shard(videos, *batch.parse_shard(shard_spec))
    if not videos:
        if not quiet:
            err.print("statekv: no videos found", markup=False)
        return
    live = live_enabled(quiet, False)
    with _batch_display(len(videos), live, quiet) as (on_video, on_event):
        result = batch.summarize(videos, options, prompt, out_path, redo, on_video=on_video,
                                 on_event=on_event, use_ray=use_ray, ray_address=ray_address)
    if not quiet:
        err.print(_summary_table(result, out_path))
    if result.failed:
        raise typer.Exit(1)


@contextmanager
def _batch_display(total: int, live: bool, quiet: bool) -> Iterator[tuple[Any, Any]]:
    """(on_video, on_event): an overall bar over videos with the current prefill inside it,
    or, off a terminal, one line per finished video on stderr."""
    counter = {"n": 0}

    def line(kind: str, path: str, record: dict | None) -> None:
        if kind == "start":
            return
        counter["n"] += 1
        if kind == "skip":
            status = "skipped (already done)"
        elif record["status"] == "ok":
            stats = record["stats"]
            ratio = stats["lm_prefill_flops"] / max(1, stats["full_lm_prefill_flops"])
            status = f"ok, LM prefill {flops(stats['lm_prefill_flops'])} ({ratio:.0%} of full)"
        else:
            status = f"error: {record['error']['type']}: {record['error']['message']}"
        err.print(f"[{counter['n']}/{total}] {path}: {status}", markup=False)

    if quiet:
        yield None, None
        return
    if not live:
        yield line, None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"), console=err, transient=False, refresh_per_second=8)
    with progress:
        overall = progress.add_task("videos", total=total, detail="loading model")
        current = progress.add_task("prefill", total=None, detail="", visible=False)
        state = {"started": time.perf_counter()}

        def on_video(kind: str, path: str, record: dict | None) -> None:
            if kind == "start":
                state["started"] = time.perf_counter()
                progress.update(current, description="prefill", total=None, completed=0,
                                visible=True, detail=path)
                progress.update(overall, detail=path)
                return
            progress.advance(overall)
            if kind == "done" and record["status"] != "ok":
                progress.console.print(f"error: {path}: {record['error']['message']}",
                                       markup=False)

        def on_event(event: Any) -> None:
            saved = 1 - event.lm_prefill_flops / max(1, event.full_lm_prefill_flops)
            progress.update(current, total=event.frames_total, completed=event.frames_done,
                            detail=f"LM {flops(event.lm_prefill_flops)} ({saved:.0%} saved "
                                   f"vs full {flops(event.full_lm_prefill_flops)})")

        yield on_video, on_event
        progress.update(current, visible=False)
        progress.update(overall, detail="")


def _summary_table(result: Any, out_path: str) -> Table:
    table = Table(title=f"summaries -> {'stdout' if out_path == '-' else out_path}")
    for column in ("done", "skipped", "failed", "LM prefill", "saving vs full", "time"):
        table.add_column(column)
    table.add_row(str(result.done), str(result.skipped), str(result.failed),
                  flops(result.lm_prefill_flops),
                  f"{result.saving:.0%} (full: {flops(result.full_lm_prefill_flops)})",
                  f"{result.seconds:.1f} s")
    return table


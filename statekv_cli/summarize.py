"""`statekv summarize`: one summary per video, appended to a resumable JSONL file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.table import Table

from statekv.errors import UsageError
from statekv.units import format_flops, format_fraction, format_seconds
from statekv_cli.options import (
    CacheDir, Debug, Json, Quiet, emit_json, err, handle_errors, run_options_from_cli,
)
from statekv_cli.progress import live_enabled


@handle_errors
@run_options_from_cli()
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
    cache: CacheDir = None,
    json_output: Json = False, quiet: Quiet = False, debug: Debug = False, options: Any = None,
) -> None:
    """Summarise many videos: one prefill each, one JSON line per video, resumable.

    Rerunning with the same --out skips videos already done with the same settings and
    retries failed ones. Exit code 1 when some videos failed.

    While it runs, --out is locked: a second run on the same file refuses, naming the first
    one's pid, unless the two are different --shard parts of it (docs/summarize.md).

    Example: statekv summarize videos/ --out summaries.jsonl --max-frames 128 --shard 1/4
    """
    from statekv.commands import summarize as batch

    if json_output and out_path == "-":
        raise UsageError("--json prints the final record on stdout, where --out - writes the "
                         "summaries; give --out a file")
    options.cache = cache
    options.validate()
    videos = batch.find_videos(paths, glob)
    part = batch.parse_shard(shard_spec) if shard_spec else None
    if part:
        videos = batch.shard(videos, *part)
    if not videos:
        if not quiet:
            err.print("statekv: no videos found", markup=False)
        if json_output:
            emit_json(batch.BatchResult().record(out_path))
        return
    live = live_enabled(quiet, json_output)
    with _batch_display(len(videos), live, quiet) as (on_video, on_event):
        result = batch.summarize(videos, options, prompt, out_path, redo, on_video=on_video,
                                 on_event=on_event, use_ray=use_ray, ray_address=ray_address,
                                 shard=part if part and part[1] > 1 else None)
    if json_output:
        emit_json(result.record(out_path))
    elif not quiet:
        err.print(_summary_table(result, out_path))
    if result.failed:
        raise typer.Exit(1)


@contextmanager
def _batch_display(total: int, live: bool, quiet: bool) -> Iterator[tuple[Any, Any]]:
    """(on_video, on_event): an overall bar over videos with the current prefill inside it,
    or, off a terminal, one line per finished video on stderr."""
    counter = {"n": 0}
    said: set[str] = set()

    def context_warning(path: str, record: dict | None, console: Any) -> None:
        # Once per batch: each video's record holds its own (its --max-frames that fits).
        for warning in (record or {}).get("warnings") or []:
            if "trained context" in warning and "context" not in said:
                said.add("context")
                console.print(f"warning: {path}: {warning} (each record's warnings say which "
                              f"videos pass it)", markup=False)

    def line(kind: str, path: str, record: dict | None) -> None:
        if kind == "start":
            return
        context_warning(path, record, err)
        counter["n"] += 1
        if kind == "skip":
            status = "skipped (already done)"
        elif record["status"] == "ok":
            stats = record["stats"]
            status = (f"ok, LM prefill {format_flops(stats['lm_prefill_flops'])} "
                      f"({format_fraction(stats['lm_flops_fraction'])} of full)")
            if record.get("cache"):
                status += f", cache {record['cache']}"
        else:
            status = f"error: {record['error']['type']}: {record['error']['message']}"
        err.print(f"[{counter['n']}/{total}] {path}: {status}", markup=False)

    if quiet:
        yield None, None
        return
    if not live:
        yield line, None
        return
    from rich.live import Live

    from statekv_cli.progress import BatchView, PrefillView

    view = BatchView(total)
    with Live(view, console=err, transient=False, refresh_per_second=4) as display:

        def on_video(kind: str, path: str, record: dict | None) -> None:
            if kind == "start":
                view.path, view.prefill = path, PrefillView("prefill")
            else:
                view.done += 1
                context_warning(path, record, display.console)
                if kind == "done" and record["status"] != "ok":
                    display.console.print(f"error: {path}: {record['error']['message']}",
                                          markup=False)
            display.refresh()

        def on_event(event: Any) -> None:
            if view.prefill is not None:
                view.prefill.update(event)
            display.refresh()

        yield on_video, on_event
        view.prefill, view.path = None, ""
        display.refresh()


def _summary_table(result: Any, out_path: str) -> Table:
    from statekv.units import format_flops, format_fraction

    table = Table(title=f"summaries -> {'stdout' if out_path == '-' else out_path}")
    for column in ("done", "skipped", "failed", "LM prefill", "of full attention's", "time"):
        table.add_column(column)
    share = result.fraction_of_full
    if share is None:  # nothing was prefilled this run (all skipped or all failed)
        cost, versus = "none this run", "-"
    else:
        cost = format_flops(result.lm_prefill_flops)
        versus = f"{format_fraction(share)} of {format_flops(result.full_lm_prefill_flops)}"
    table.add_row(str(result.done), str(result.skipped), str(result.failed), cost, versus,
                  format_seconds(result.seconds))
    return table

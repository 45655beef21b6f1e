"""`statekv prefill`: prefill a video once and save it, to ask about it any day after."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from statekv.units import format_bytes, format_flops, format_seconds
from statekv_cli.options import (
    Debug,
    Json,
    Quiet,
    emit_json,
    err,
    handle_errors,
    out,
    run_options_from_cli,
)
from statekv_cli.progress import live_enabled, prefill_display


@handle_errors
@run_options_from_cli()
def prefill(
    video: Annotated[str, typer.Argument(help="The video file.", show_default=False)],
    out_path: Annotated[str | None, typer.Option(
        "--out", "-o", help="The prefill file to write (.skv). Default: the video's name with "
        ".skv.")] = None,
    json_output: Json = False, quiet: Quiet = False, debug: Debug = False, options: Any = None,
) -> None:
    """Prefill a video once and save its detailed cache, to answer questions later without
    the video, the vision tower or a prefill (the model is still loaded to answer).

    Example: statekv prefill movie.mp4 -o movie.skv --max-frames 256, then
    statekv ask movie.skv "who enters the room?"
    """
    from statekv.commands import prefill as library

    with prefill_display("prefill", live_enabled(quiet, json_output)) as on_event:
        record = library.prefill_file(video, out_path, options, on_event=on_event)
    if json_output:
        emit_json(record)
    else:
        stats = record["stats"]
        out.print(f"{record['out']}: {format_bytes(record['bytes'])}, {stats['frames']} frames, "
                  f"{stats['detailed_tokens']} tokens (LM prefill "
                  f"{format_flops(stats['lm_prefill_flops'])} in "
                  f"{format_seconds(stats['lm_prefill_seconds'])})", markup=False)
    if not (quiet or json_output):
        for warning in record["warnings"]:
            err.print(f"warning: {warning}", markup=False)

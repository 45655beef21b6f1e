"""`statekv prefill`: prefill a video once and save it, to ask about it any day after."""

from __future__ import annotations

from typing import Annotated

import typer

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
    Json,
    MaxFrames,
    MaxNewTokens,
    Method,
    ModelOpt,
    PinPrefix,
    Preset,
    Quiet,
    Seed,
    Start,
    TrustRemoteCode,
    WindowFrames,
    emit_json,
    err,
    handle_errors,
    out,
    run_options,
)
from statekv_cli.progress import flops, live_enabled, prefill_display, size


@handle_errors
def prefill(
    video: Annotated[str, typer.Argument(help="The video file.", show_default=False)],
    out_path: Annotated[str | None, typer.Option(
        "--out", "-o", help="The prefill file to write (.skv). Default: the video's name with "
        ".skv.")] = None,
    preset: Preset = None, model: ModelOpt = None, method: Method = None, budget: Budget = None,
    window_frames: WindowFrames = None, max_frames: MaxFrames = None, fps: Fps = None,
    start: Start = None, end: End = None, chunk_frames: ChunkFrames = None,
    max_new_tokens: MaxNewTokens = None, device: Device = "auto", dtype: Dtype = None,
    seed: Seed = 0, json_output: Json = False, quiet: Quiet = False, debug: Debug = False,
    pin_prefix: PinPrefix = False, attention: Attention = "sdpa",
    trust_remote_code: TrustRemoteCode = False, force: Force = False,
) -> None:
    """Prefill a video once and save its detailed cache, to answer questions later without
    the video, the vision tower or a prefill (the model is still loaded to answer).

    Example: statekv prefill movie.mp4 -o movie.skv --max-frames 256, then
    statekv ask movie.skv "who enters the room?"
    """
    from statekv.commands import prefill as library

    options = run_options(
        preset=preset, model=model, method=method, budget=budget, window_frames=window_frames,
        max_frames=max_frames, fps=fps, start=start, end=end, chunk_frames=chunk_frames,
        max_new_tokens=max_new_tokens, device=device, dtype=dtype, seed=seed,
        pin_prefix=pin_prefix, attention=attention, trust_remote_code=trust_remote_code,
        force=force)
    with prefill_display("prefill", live_enabled(quiet, json_output)) as on_event:
        record = library.prefill_file(video, out_path, options, on_event=on_event)
    if json_output:
        emit_json(record)
    else:
        stats = record["stats"]
        out.print(f"{record['out']}: {size(record['bytes'])}, {stats['frames']} frames, "
                  f"{stats['detailed_tokens']} tokens (LM prefill "
                  f"{flops(stats['lm_prefill_flops'])} in {stats['lm_prefill_seconds']:.1f}s)",
                  markup=False)
    if not (quiet or json_output):
        for warning in record["warnings"]:
            err.print(f"warning: {warning}", markup=False)

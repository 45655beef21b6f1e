"""statekv: ask questions about long videos with video VLMs, in linear time (StateKV).

Each command parses its options, calls one function of the `statekv` library and renders
the result: human output on stdout, progress and messages on stderr, `--json` for machines.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
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
from statekv_cli.bench import bench
from statekv_cli.demo import demo, eval_
from statekv_cli.recall import recall
from statekv_cli.summarize import summarize

app = typer.Typer(
    name="statekv",
    help=("Ask questions about long local videos with video VLMs, prefilling the video in "
          "linear time (StateKV: each chunk attends to a fixed budget of the most-attended "
          "past tokens, while every frame stays available for answering).\n\n"
          "Examples:\n\n"
          "  statekv ask movie.mp4 \"who enters the room?\"\n\n"
          "  statekv compare movie.mp4 \"what happens?\" --methods full,window,statekv\n\n"
          "  statekv info movie.mp4 --max-frames 512\n\n"
          "Exit codes: 0 ok, 1 some videos of a batch failed, 2 usage, 3 bad input file, "
          "4 model unavailable, 5 out of memory, 130 interrupted."),
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
)
presets_app = typer.Typer(help="List the shipped model presets, or show one.",
                          invoke_without_command=True, rich_markup_mode=None)
app.add_typer(presets_app, name="presets")
app.command("summarize")(summarize)
app.command("bench")(bench)
app.command("demo")(demo)
app.command("eval")(eval_)
app.command("recall")(recall)


def _print_warnings(warnings: list[str], quiet: bool) -> None:
    if not quiet:
        for warning in warnings:
            err.print(f"warning: {warning}", markup=False)


def _stats_line(stats: dict) -> str:
    ratio = stats["lm_prefill_flops"] / max(1, stats["full_lm_prefill_flops"])
    return (f"{stats['frames']} frames x {stats['tokens_per_frame']} tokens | LM prefill "
            f"{flops(stats['lm_prefill_flops'])} ({ratio:.0%} of full attention's "
            f"{flops(stats['full_lm_prefill_flops'])}) in "
            f"{stats['lm_prefill_seconds']:.1f}s | vision {flops(stats['vision_flops'])} in "
            f"{stats['vision_seconds']:.1f}s | peak memory +{size(stats['peak_memory_bytes'])} | "
            f"carried {stats['carried_tokens']} / detailed {stats['detailed_tokens']} tokens")


@app.command()
@handle_errors
def ask(
    video: Annotated[str, typer.Argument(help="The video file.", show_default=False)],
    questions: Annotated[list[str] | None, typer.Argument(
        help="One or more questions (each answered from the same prefill).", show_default=False)] = None,
    questions_file: Annotated[str | None, typer.Option(
        "--questions", help="A file of questions: .txt one per line, .yaml a list of strings.")] = None,
    preset: Preset = None, model: ModelOpt = None, method: Method = None, budget: Budget = None,
    window_frames: WindowFrames = None, max_frames: MaxFrames = None, fps: Fps = None,
    start: Start = None, end: End = None, chunk_frames: ChunkFrames = None,
    max_new_tokens: MaxNewTokens = None, device: Device = "auto", dtype: Dtype = None,
    seed: Seed = 0, json_output: Json = False, quiet: Quiet = False, debug: Debug = False,
    pin_prefix: PinPrefix = False, attention: Attention = "sdpa",
    trust_remote_code: TrustRemoteCode = False, force: Force = False,
) -> None:
    """Answer questions about a video: one prefill, then every question.

    Example: statekv ask movie.mp4 "who enters the room?" "what is on the table?" --max-frames 256
    """
    from statekv.commands import ask as library, plan

    options = run_options(
        preset=preset, model=model, method=method, budget=budget, window_frames=window_frames,
        max_frames=max_frames, fps=fps, start=start, end=end, chunk_frames=chunk_frames,
        max_new_tokens=max_new_tokens, device=device, dtype=dtype, seed=seed,
        pin_prefix=pin_prefix, attention=attention, trust_remote_code=trust_remote_code,
        force=force)
    all_questions = list(questions or []) + (plan.read_questions(questions_file) if questions_file else [])
    with prefill_display("prefill", live_enabled(quiet, json_output)) as on_event:
        record = library.ask(video, all_questions, options, on_event=on_event)
    if json_output:
        emit_json(record)
    else:
        for answer in record["answers"]:
            out.print(f"Q: {answer['question']}\nA: {answer['answer']}\n", markup=False)
        if not quiet:
            err.print(_stats_line(record["stats"]), markup=False)
    _print_warnings(record["warnings"], quiet or json_output)


@app.command()
@handle_errors
def compare(
    video: Annotated[str, typer.Argument(help="The video file.", show_default=False)],
    question: Annotated[str, typer.Argument(help="The question every method answers.", show_default=False)],
    methods: Annotated[str, typer.Option(
        "--methods", help="Comma-separated methods to run on the same frames (full always runs "
        "as the reference): full, window, statekv, isolated.")] = "full,window,statekv",
    preset: Preset = None, model: ModelOpt = None, budget: Budget = None,
    window_frames: WindowFrames = None, max_frames: MaxFrames = None, fps: Fps = None,
    start: Start = None, end: End = None, chunk_frames: ChunkFrames = None,
    max_new_tokens: MaxNewTokens = None, device: Device = "auto", dtype: Dtype = None,
    seed: Seed = 0, json_output: Json = False, quiet: Quiet = False, debug: Debug = False,
    pin_prefix: PinPrefix = False, attention: Attention = "sdpa",
    trust_remote_code: TrustRemoteCode = False, force: Force = False,
) -> None:
    """Run several methods on the same frames and compare answers, FLOPs, time and memory.

    Example: statekv compare movie.mp4 "what happens?" --methods full,window,statekv --budget 4096
    """
    from statekv.commands import ask as library, plan

    options = run_options(
        preset=preset, model=model, budget=budget, window_frames=window_frames,
        max_frames=max_frames, fps=fps, start=start, end=end, chunk_frames=chunk_frames,
        max_new_tokens=max_new_tokens, device=device, dtype=dtype, seed=seed,
        pin_prefix=pin_prefix, attention=attention, trust_remote_code=trust_remote_code,
        force=force)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    live = live_enabled(quiet, json_output)
    displays: list[Any] = []

    def on_method(method: str):
        display = prefill_display(method, live)
        displays.append(display)
        return display.__enter__()

    try:
        record = library.compare(video, question, names, options, on_method=on_method)
    finally:
        for display in displays:
            display.__exit__(None, None, None)
    if json_output:
        emit_json(record)
        return
    out.print(_compare_table(record))
    for row in record["methods"]:
        _print_warnings([f"{row['method']}: {w}" for w in row["warnings"]], quiet)


def _compare_table(record: dict) -> Table:
    table = Table(title=f"{record['path']}: {record['question']}")
    for column in ("method", "answer", "agrees", "KL vs full", "LM FLOPs", "vision FLOPs",
                   "prefill s", "peak mem", "carried", "detailed"):
        table.add_column(column, overflow="fold")
    for row in record["methods"]:
        setting = {"statekv": f" B={row['budget']}", "window": f" {row['window_frames']} fr"}
        table.add_row(row["method"] + setting.get(row["method"], ""), row["answer"],
                      "yes" if row["agrees_with_full"] else "no",
                      f"{row['first_token_kl_vs_full']:.4f}", flops(row["lm_prefill_flops"]),
                      flops(row["vision_flops"]), f"{row['lm_prefill_seconds']:.2f}",
                      size(row["peak_memory_bytes"]), str(row["carried_tokens"]),
                      str(row["detailed_tokens"]))
    return table


@app.command()
@handle_errors
def info(
    video: Annotated[str, typer.Argument(help="The video file.", show_default=False)],
    preset: Preset = None, model: ModelOpt = None, budget: Budget = None,
    window_frames: WindowFrames = None, max_frames: MaxFrames = None, fps: Fps = None,
    start: Start = None, end: End = None, chunk_frames: ChunkFrames = None,
    device: Device = "auto", dtype: Dtype = None, json_output: Json = False,
    debug: Debug = False, pin_prefix: PinPrefix = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Probe a video and predict the cost of each method, without loading model weights.

    Example: statekv info movie.mp4 --preset internvl3-8b --max-frames 512
    """
    from statekv.commands import ask as library, plan

    options = run_options(
        preset=preset, model=model, budget=budget, window_frames=window_frames,
        max_frames=max_frames, fps=fps, start=start, end=end, chunk_frames=chunk_frames,
        device=device, dtype=dtype, pin_prefix=pin_prefix, trust_remote_code=trust_remote_code)
    record = library.info(video, options)
    if json_output:
        emit_json(record)
        return
    table = Table(title=record["path"], show_header=False)
    predicted = record["predicted"]
    rows = [
        ("duration", f"{record['duration_seconds']:.1f} s"), ("fps", f"{record['fps']:.2f}"),
        ("frames", str(record["frame_count"])),
        ("resolution", f"{record['width']}x{record['height']}"), ("codec", str(record["codec"])),
        ("model", f"{record['model']} (preset {record['preset']})"),
        ("sampled frames", str(record["sampled_frames"])),
        ("tokens per frame", str(record["tokens_per_frame"])),
        *[(f"LM prefill, {name}", flops(m["lm_prefill_flops"]))
          for name, m in predicted["methods"].items()],
        ("detailed cache", size(predicted["detailed_cache_bytes"])),
        ("weights", size(predicted["weights_bytes"])),
        ("peak memory (estimate)", size(predicted["peak_memory_bytes"])),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    if not predicted["exact_layout"]:
        err.print("note: the checkpoint is not available locally; token counts come from the "
                  "preset's numbers (approximate)")


@presets_app.callback()
def presets_list(ctx: typer.Context, json_output: Json = False) -> None:
    """List shipped presets: name, model, family, parameters, tokens per frame, budget."""
    if ctx.invoked_subcommand is not None:
        return
    from statekv.presets import list_presets

    presets = list_presets()
    if json_output:
        emit_json([p.to_dict() for p in presets])
        return
    table = Table()
    for column in ("name", "model", "family", "params", "tokens/frame", "budget", "license"):
        table.add_column(column)
    for p in presets:
        table.add_row(p.name, p.model, p.family, f"{p.parameters / 1e9:.2f} B",
                      str(p.architecture.tokens_per_frame), str(p.budget), p.license)
    out.print(table)


@presets_app.command("show")
@handle_errors
def presets_show(
    name: Annotated[str, typer.Argument(help="Preset name or YAML file.", show_default=False)],
    json_output: Json = False, debug: Debug = False,
) -> None:
    """Print one preset in full."""
    import yaml

    from statekv.presets import load_preset

    preset = load_preset(name)
    if json_output:
        emit_json(preset.to_dict())
    else:
        out.print(yaml.safe_dump(preset.to_dict(), sort_keys=False).rstrip(), markup=False)


def main() -> None:
    """Console-script entry point."""
    app()

if __name__ == "__main__":
    main()

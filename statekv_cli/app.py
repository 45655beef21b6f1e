"""statekv: ask questions about long videos with video VLMs, in linear time (StateKV).

Each command parses its options, calls one function of the `statekv` library and renders
the result: human output on stdout, progress and messages on stderr, `--json` for machines.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from statekv.units import format_bytes, format_flops, format_fraction, format_seconds

from statekv_cli.options import (
    CacheDir,
    Debug,
    Json,
    Quiet,
    emit_json,
    err,
    handle_errors,
    out,
    method_names,
    run_options_from_cli,
)
from statekv_cli.options import ALL_RUN_OPTIONS
from statekv_cli.progress import live_enabled, prefill_display
from statekv_cli.bench import bench
from statekv_cli.demo import demo, eval_
from statekv_cli.recall import recall
from statekv_cli.summarize import summarize
from statekv_cli.prefill import prefill
from statekv_cli.cache import cache_app

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


def _print_warnings(warnings: list[str], quiet: bool) -> None:
    if not quiet:
        for warning in warnings:
            err.print(f"warning: {warning}", markup=False)


def _stats_line(stats: dict) -> str:
    if stats["prefills"] == 0:
        return (f"{stats['frames']} frames x {stats['tokens_per_frame']} tokens from a saved "
                f"prefill: no decoding, vision or LM prefill | answers in "
                f"{format_seconds(stats['answer_seconds'])} | detailed "
                f"{stats['detailed_tokens']} tokens ({format_bytes(stats['detailed_cache_bytes'])})")
    return (f"{stats['frames']} frames x {stats['tokens_per_frame']} tokens | LM prefill "
            f"{format_flops(stats['lm_prefill_flops'])} "
            f"({format_fraction(stats['lm_flops_fraction'])} of full attention's "
            f"{format_flops(stats['full_lm_prefill_flops'])}) in "
            f"{format_seconds(stats['lm_prefill_seconds'])} | vision "
            f"{format_flops(stats['vision_flops'])} in {format_seconds(stats['vision_seconds'])} | "
            f"peak memory +{format_bytes(stats['peak_memory_bytes'])} | "
            f"carried {stats['carried_tokens']} / detailed {stats['detailed_tokens']} tokens")


@app.command()
@handle_errors
@run_options_from_cli()
def ask(
    video: Annotated[str, typer.Argument(
        help="The video file, or a prefill file (.skv) written by `statekv prefill`.",
        show_default=False)],
    questions: Annotated[list[str] | None, typer.Argument(
        help="One or more questions (each answered from the same prefill).", show_default=False)] = None,
    questions_file: Annotated[str | None, typer.Option(
        "--questions", help="A file of questions: .txt one per line, .yaml a list of strings.")] = None,
    cache: CacheDir = None,
    json_output: Json = False, quiet: Quiet = False, debug: Debug = False, options: Any = None,
) -> None:
    """Answer questions about a video: one prefill, then every question.

    Example: statekv ask movie.mp4 "who enters the room?" "what is on the table?" --max-frames 256

    From a saved prefill (no video decoding, no vision tower, no prefill):
    statekv ask movie.skv "who enters the room?"
    """
    from statekv.commands import ask as library, plan

    options.cache = cache

    all_questions = list(questions or []) + (plan.read_questions(questions_file) if questions_file else [])
    library.check_questions(all_questions)  # option errors answer before any display or load
    options.validate()
    with prefill_display("prefill", live_enabled(quiet, json_output)) as on_event:
        record = library.ask(video, all_questions, options, on_event=on_event)
    if json_output:
        emit_json(record)
    else:
        for answer in record["answers"]:
            out.print(f"Q: {answer['question']}\nA: {answer['answer']}\n", markup=False)
        if not quiet:
            err.print(_stats_line(record["stats"]), markup=False)
            _print_source(record)
    _print_warnings(record["warnings"], quiet or json_output)


def _print_source(record: dict) -> None:
    if record.get("cache") == "hit":
        err.print(f"cache hit: answered from {record.get('source')} (no prefill)", markup=False)
    elif record.get("cache") == "miss":
        err.print("cache miss: prefilled and saved for next time", markup=False)
    elif record.get("source"):
        err.print(f"answered from {record['source']} (no prefill)", markup=False)


@app.command()
@handle_errors
@run_options_from_cli(*(name for name in ALL_RUN_OPTIONS if name != "method"))
def compare(
    video: Annotated[str, typer.Argument(help="The video file.", show_default=False)],
    question: Annotated[str, typer.Argument(help="The question every method answers.", show_default=False)],
    methods: Annotated[str, typer.Option(
        "--methods", help="Comma-separated methods to run on the same frames (full always runs "
        f"as the reference), from: {method_names()}.")] = "full,window,statekv",
    cache: CacheDir = None,
    json_output: Json = False, quiet: Quiet = False, debug: Debug = False, options: Any = None,
) -> None:
    """Run several methods on the same frames and compare answers, FLOPs, time and memory.

    Example: statekv compare movie.mp4 "what happens?" --methods full,window,statekv --budget 4096
    """
    from statekv.commands import ask as library

    options.cache = cache

    names = [m.strip() for m in methods.split(",") if m.strip()]
    library.check_compare(names, options)  # option errors answer before any display or load
    live = live_enabled(quiet, json_output)
    displays: list[Any] = []

    def on_method(method: str):
        while displays:  # the previous method's line stays as it ended; one live at a time
            displays.pop().__exit__(None, None, None)
        display = prefill_display(method, live)
        displays.append(display)
        return display.__enter__()

    try:
        record = library.compare(video, question, names, options, on_method=on_method)
    finally:
        while displays:
            displays.pop().__exit__(None, None, None)
    if json_output:
        emit_json(record)
        return
    out.print(_compare_table(record))
    out.print(_compare_answers(record), markup=False)
    _print_warnings(record.get("warnings", []), quiet)
    for row in record["methods"]:
        if row.get("cache") and not quiet:
            err.print(f"{row['method']}: cache {row['cache']}", markup=False)
    for row in record["methods"]:
        _print_warnings([f"{row['method']}: {w}" for w in row["warnings"]], quiet)


def _context_rows(context: dict | None) -> list[tuple[str, str]]:
    if not context:
        return []
    trained = context["trained_positions"]
    fit = context["frames_that_fit"]
    return [("trained context", "not stated" if trained is None else f"{trained} positions"),
            ("planned tokens", f"{context['planned_tokens']} + {context['answer_room']} answer room"),
            ("frames that fit", "unknown" if fit is None else str(fit))]


def _compare_table(record: dict) -> Table:
    from rich import box

    from statekv.units import format_seconds

    # Numbers only, narrow headers, no column borders: the header stays on one line at 100
    # columns (tested); the answers follow the table, one line per method.
    table = Table(title=f"{record['path']}: {record['question']}", box=box.SIMPLE_HEAD,
                  padding=(0, 1, 0, 0), pad_edge=False, caption_justify="left",
                  caption="same: the same answer as full; KL: first-token KL divergence from "
                          "full (nats); peak: memory above the level before the first method")
    for column in ("method", "same", "KL", "LM FLOPs", "vision", "prefill", "peak", "carried",
                   "detailed"):
        table.add_column(column, no_wrap=True)
    for row in record["methods"]:
        table.add_row(_method_name(row), "yes" if row["agrees_with_full"] else "no",
                      f"{row['first_token_kl_vs_full']:.4f}", format_flops(row["lm_prefill_flops"]),
                      format_flops(row["vision_flops"]), format_seconds(row["lm_prefill_seconds"]),
                      format_bytes(row["peak_memory_bytes"]), str(row["carried_tokens"]),
                      str(row["detailed_tokens"]))
    return table


def _method_name(row: dict) -> str:
    window = f" {row['window_frames']} fr"
    if row.get("window_tokens") is not None:
        window += f" ({row['window_tokens']} tok)"
    setting = {"statekv": f" B={row['budget']}", "window": window}
    return row["method"] + setting.get(row["method"], "")


def _compare_answers(record: dict) -> str:
    return "\n".join(f"{_method_name(row)}: {row['answer']}" for row in record["methods"])


@app.command()
@handle_errors
@run_options_from_cli("preset", "model", "budget", "window_frames", "max_frames", "fps", "start",
                      "end", "chunk_frames", "device", "dtype", "pin_prefix", "trust_remote_code")
def info(
    video: Annotated[str, typer.Argument(help="The video file.", show_default=False)],
    json_output: Json = False, debug: Debug = False, options: Any = None,
) -> None:
    """Probe a video and predict the cost of each method, without loading model weights.

    Example: statekv info movie.mp4 --preset internvl3-8b --max-frames 512
    """
    from statekv.commands import ask as library

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
        ("model", record["model"] if record["model_from"] == "--model"
         else f"{record['model']} (preset {record['preset']})"),
        ("sampled frames", str(record["sampled_frames"])),
        ("tokens per frame", str(record["tokens_per_frame"])),
        *[(f"LM prefill, {name}", format_flops(m["lm_prefill_flops"]))
          for name, m in predicted["methods"].items()],
        ("detailed cache", format_bytes(predicted["detailed_cache_bytes"])),
        ("prefill file (statekv prefill)", format_bytes(predicted["prefill_file_bytes"])),
        ("weights", f"{format_bytes(predicted['weights_bytes'])} ({record['dtype']} on "
                    f"{record['device']})"),
        ("peak memory (estimate)", format_bytes(predicted["peak_memory_bytes"])),
        *_context_rows(record.get("context")),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    if not predicted["exact_layout"]:
        err.print("note: the checkpoint is not here; token counts are estimated from the preset")


@presets_app.callback()
def presets_list(ctx: typer.Context, json_output: Json = False) -> None:
    """List shipped presets: name, model, family, parameters, tokens per frame, budget."""
    if ctx.invoked_subcommand is not None:
        return
    from statekv.presets import DEFAULT_PRESET, list_presets
    from statekv.units import format_count

    presets = list_presets()
    if json_output:
        emit_json([{**p.to_dict(), "parameters": p.parameters, "default": p.name == DEFAULT_PRESET}
                   for p in presets])
        return
    from rich import box

    # Names stay whole (they are what --preset takes); the rest folds on narrow terminals.
    table = Table(caption=f"* the default preset (used without --preset): {DEFAULT_PRESET}",
                  box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False,
                  caption_justify="left")
    # Below 130 columns: family and license go (`presets show NAME` has them), model last.
    wide = (out.width or 200) >= 130
    columns = (("name", "model", "family", "params", "tokens/frame", "budget", "license") if wide
               else ("name", "params", "tokens/frame", "budget", "model"))
    for column in columns:
        table.add_column(column, no_wrap=column != "model", overflow="fold")
    for p in presets:
        cells = {"name": p.name + (" *" if p.name == DEFAULT_PRESET else ""), "model": p.model,
                 "family": p.family, "params": format_count(p.parameters),
                 "tokens/frame": str(p.architecture.tokens_per_frame), "budget": str(p.budget),
                 "license": p.license}
        table.add_row(*(cells[c] for c in columns))
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


# The commands defined in their own modules, listed after ask/compare/info in --help.
app.command("summarize")(summarize)
app.command("prefill")(prefill)
app.add_typer(cache_app, name="cache")
app.add_typer(presets_app, name="presets")
app.command("demo")(demo)
app.command("eval")(eval_)
app.command("recall")(recall)
app.command("bench")(bench)


def main() -> None:
    """Console-script entry point."""
    app()

if __name__ == "__main__":
    main()

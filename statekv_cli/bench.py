"""`statekv bench`: language-model prefill cost against the number of frames, per method.

Parses options, calls `statekv.bench` (measured: a preset's language model with random
weights on synthetic frames through the real prefill loop; `--analytic`: the architecture's
numbers only) and renders a table (stdout), or JSON with `--json`; progress goes to stderr.
Registered in the main app as `app.command("bench")(bench)`.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from statekv.units import format_bytes as size, format_flops as flops, format_seconds
from statekv_cli.options import Debug, emit_json, err, handle_errors, method_names, out
from statekv_cli.options import Threads


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}",
                                 param_hint=option) from None
    if not values:
        raise typer.BadParameter("needs at least one value", param_hint=option)
    return values


@handle_errors
def bench(
    preset: Annotated[str, typer.Option(
        "--preset", help="Preset name or YAML file whose language model to benchmark.")] = "bench-tiny",
    frames: Annotated[str | None, typer.Option(
        "--frames", help="Comma-separated frame counts. Default: 32,64,128,256,512,1024 "
        "(--e2e: 16).")] = None,
    methods: Annotated[str, typer.Option(
        "--methods", help=f"Comma-separated methods, from: {method_names()}; and transformers: "
        "one plain transformers forward over the same tokens, with each method's speed-up "
        "over it against their FLOP ratio (its limit).")] = "full,window,statekv",
    budget: Annotated[int | None, typer.Option(
        "--budget", help="statekv: tokens carried per layer and KV head. Default: the preset's.")] = None,
    window_frames: Annotated[int | None, typer.Option(
        "--window-frames", help="window: recent frames a chunk sees. Default: the preset's.")] = None,
    repeats: Annotated[int, typer.Option(
        "--repeats", help="Runs per cell; seconds are their median.")] = 3,
    tokens_per_frame: Annotated[int | None, typer.Option(
        "--tokens-per-frame", help="Visual tokens per frame. Default: the preset's.")] = None,
    chunk_frames: Annotated[int, typer.Option("--chunk-frames", help="Frames per chunk.")] = 1,
    threads: Threads = None,
    under_load: Annotated[int | None, typer.Option(
        "--under-load", help="Run every method and one plain transformers forward over the same "
        "tokens quiet, then with K busy processes competing for the cores (started and stopped "
        "here), side by side, and report each one's slowdown. Example: --under-load 2 "
        "--preset smolvlm2-256m --frames 16 --methods statekv")] = None,
    analytic: Annotated[bool, typer.Option(
        "--analytic", help="No run: FLOPs and memory from the preset's architecture numbers "
        "(works for real checkpoints, e.g. --preset internvl3-8b --frames 512,3600).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the rows as JSON on stdout.")] = False,
    csv: Annotated[str | None, typer.Option("--csv", help="Also write the rows to this CSV file.")] = None,
    plot: Annotated[str | None, typer.Option(
        "--plot", help="Also plot FLOPs and seconds against frames to this PNG (needs matplotlib).")] = None,
    e2e: Annotated[bool, typer.Option(
        "--e2e", help="End to end on a real video: the whole model (the preset's architecture "
        "with random weights, or --model) for transformers generate and statekv's full, window, "
        "statekv on the same frames. Example: statekv bench --e2e --preset smolvlm2-256m "
        "--video clip.mp4 --frames 16,64 --json")] = False,
    video: Annotated[str | None, typer.Option("--video", help="--e2e: the video file.")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="--e2e: a checkpoint directory or cached hub id instead of random "
        "weights (default: the preset's checkpoint if it is in the local cache).")] = None,
    runners: Annotated[str, typer.Option(
        "--runners", help="--e2e: comma-separated runners: transformers, full, window, "
        "statekv.")] = "transformers,full,window,statekv",
    dtype: Annotated[str, typer.Option(
        "--dtype", help="--e2e: auto, float32 or bfloat16 (all runners alike), or several, "
        "comma-separated, run side by side on the same frames. Example: --dtype float32,auto "
        "times bfloat16 against the float32 peer in one run.")] = "float32",
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", help="--e2e: tokens each runner generates (greedy).")] = 8,
    debug: Debug = False,
) -> None:
    """Benchmark LM prefill (FLOPs, seconds, per-chunk time, memory) against frames per method.

    Example: statekv bench --preset bench-tiny --frames 64,256,512 --repeats 3 --csv bench.csv
    """
    from statekv.commands import bench as lib

    if e2e:
        _e2e(preset, _ints(frames or "16", "--frames"), video, model, runners, repeats, dtype,
             threads, budget, window_frames, max_new_tokens, json_output, csv, plot, debug)
        return
    frame_counts = _ints(frames or "32,64,128,256,512,1024", "--frames")
    method_names = [m.strip() for m in methods.split(",") if m.strip()]
    shown = not json_output
    progress = (lambda row: err.print(_row_line(row), markup=False)) if shown else None
    if under_load is not None:
        if analytic:
            raise lib.UsageError("--under-load measures seconds; it cannot be --analytic")
        _under_load(lib, preset, frame_counts, method_names, under_load, budget,
                    window_frames, repeats, tokens_per_frame, chunk_frames, threads,
                    json_output)
        return
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
    if json_output:
        emit_json([r.to_dict() for r in rows])
        return
    out.print(_table(rows, lib.speedups(rows), analytic))
    for v in lib.transformers_verdicts(rows):
        out.print(f"{v['frames']} frames, {v['method']}: {v['speedup']:.2f}x transformers' "
                  f"forward, FLOP ratio {v['flop_ratio']:.2f}x: {v['of_limit']:.0%} of the "
                  "limit", markup=False)


def _under_load(lib, preset, frames, methods, busy, budget, window_frames, repeats,
                tokens_per_frame, chunk_frames, threads, json_output) -> None:
    progress = None if json_output else (lambda row: err.print(
        f"{row.frames} frames, {row.runner}: quiet {format_seconds(row.quiet_seconds)}, with "
        f"{row.busy} busy {format_seconds(row.loaded_seconds)} ({row.slowdown:.2f}x)", markup=False))
    rows = lib.load_bench(preset, frames, methods, busy, budget=budget,
                          window_frames=window_frames, repeats=repeats,
                          tokens_per_frame=tokens_per_frame, chunk_frames=chunk_frames,
                          threads=threads, on_row=progress)
    verdicts = lib.load_verdicts(rows)
    if json_output:
        emit_json({"rows": [r.to_dict() for r in rows], "verdicts": verdicts})
        return
    table = Table(title=f"LM prefill under load: {busy} busy processes, {rows[0].threads} "
                        f"threads, OpenMP wait {rows[0].openmp_wait_policy}")
    for name in ("frames", "runner", "tokens", "quiet s", "loaded s", "slowdown"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r.frames), r.runner, str(r.tokens), format_seconds(r.quiet_seconds),
                      format_seconds(r.loaded_seconds), f"{r.slowdown:.2f}x")
    out.print(table)
    for v in verdicts:
        out.print(f"{v['frames']} frames, {v['method']}: slowdown {v['slowdown']:.2f}x against "
                  f"transformers' {v['transformers_slowdown']:.2f}x (target at most "
                  f"{v['limit']:.2f}x): {'within' if v['within'] else 'OVER'}", markup=False)


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


def _e2e(preset, frame_counts, video, model, runners, repeats, dtype, threads, budget,
         window_frames, max_new_tokens, json_output, csv, plot, debug) -> None:
    from statekv.commands import e2e as lib

    shown = not json_output
    report = lib.run_e2e(
        preset, video or "", frame_counts, [r.strip() for r in runners.split(",") if r.strip()],
        model=model, repeats=repeats,
        dtype=[d.strip() for d in dtype.split(",") if d.strip()],
        threads=threads, budget=budget, window_frames=window_frames, max_new_tokens=max_new_tokens,
        on_row=(lambda row: err.print(_e2e_line(row), markup=False)) if shown else None,
        on_model=(lambda source: err.print(f"model: {source}", markup=False)) if shown else None)
    if csv:
        lib.write_csv(report, csv)
        err.print(f"wrote {csv}", markup=False)
    if plot:
        lib.plot(report, plot)
        err.print(f"wrote {plot}", markup=False)
    if json_output:
        emit_json(report)
        return
    out.print(_e2e_table(report, lib.speedups(report)))


def _e2e_line(row) -> str:
    s = row.seconds
    return (f"{row.frames} frames, {row.runner} ({row.dtype}): total {format_seconds(s['total'])} "
            f"(vision {format_seconds(s['vision'])}, LM prefill {format_seconds(s['lm_prefill'])})")


def _e2e_table(report, speedups) -> Table:
    table = Table(title=f"end to end: {report['preset']} ({report['model']}), medians")
    names = ["frames", "runner", "dtype", "decode s", "processor s", "vision s", "LM prefill s",
             "answer s", "total s", "speed-up", "LM speed-up", "LM FLOPs", "peak memory"]
    several = len({r["dtype"] for r in report["rows"]}) > 1
    if several:  # each runner against transformers in float32, not only at its own dtype
        names.insert(10, "vs float32 transformers")
    for name in names:
        table.add_column(name, justify="right")
    for r in report["rows"]:
        s = r["seconds"]
        ratio = speedups.get((r["frames"], r["dtype"], r["runner"]), {})
        cells = [str(r["frames"]), r["runner"], r["dtype"],
                 *(f"{s[k]:.2f}" for k in ("decode", "processor", "vision", "lm_prefill", "answer",
                                           "total")),
                 _fmt(ratio.get("total"), "{:.2f}x"), _fmt(ratio.get("lm_prefill"), "{:.2f}x"),
                 flops(r["lm_prefill_flops"]), size(r["peak_memory_bytes"])]
        if several:
            cells.insert(10, _fmt(ratio.get("total_vs_float32"), "{:.2f}x"))
        table.add_row(*cells)
    return table

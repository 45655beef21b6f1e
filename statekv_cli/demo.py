"""`statekv demo` and `statekv eval`: the shipped demo model, fully offline."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer
from rich.table import Table

from statekv_cli.options import (
    Debug, Device, Json, PinPrefix, Quiet, Seed, Threads, emit_json, err, handle_errors, method_names, out,
    method_label, prefill_line, run_options_from_cli,
)
from statekv.units import format_flops as flops

DemoMethod = Annotated[str, typer.Option(
    "--method", help=f"One of {method_names()} (isolated: the floor).")]
DemoWindow = Annotated[int, typer.Option(
    "--window-frames", help="window: how many recent frames a chunk sees.")]


@handle_errors
def demo(
    frames: Annotated[int | None, typer.Option(
        "--frames", help="Length of the generated video. Default: 64 (lockers, the model's "
        "longest training length), 32 (slots, trained on 32).")] = None,
    seed: Seed = 0, method: DemoMethod = "statekv",
    budget: Annotated[int | None, typer.Option(
        "--budget", help="statekv: tokens carried per layer and KV head. Default: 1150 "
        "(lockers: a quarter of a 64-frame video's 4,601 tokens), 64 (slots: a frame is about "
        "11 tokens).")] = None,
    window_frames: DemoWindow = 16, pin_prefix: PinPrefix = False, device: Device = "cpu",
    threads: Threads = None,
    events: Annotated[bool, typer.Option("--events", help="Also list what happens in the video.")] = False,
    json_output: Json = False, quiet: Quiet = False, debug: Debug = False,
    task: Annotated[str, typer.Option(
        "--task", help="lockers (the default: 64 visual tokens a frame, questions whose "
        "evidence is 1 to 60 frames old at 64 frames, docs/demo-task.md) or slots (the first demo model: "
        "4 slots, 4 visual tokens a frame). Both models ship with statekv.")] = "lockers",
    model: Annotated[str | None, typer.Option(
        "--model", help="lockers: another checkpoint directory (from tools/train_demo.py "
        "--task lockers) instead of the shipped one.")] = None,
) -> None:
    """Answer questions about a generated video with a shipped demo model (no download).

    lockers (the default): a 4x4 grid of lockers gets painted colours, one event a frame;
    glyphs (box, cup, hat, ball, tree, sun) appear in a locker. "hat color?" asks the locker's
    colour when the hat appeared. Per answer: the evidence age (how many frames before the
    glyph the colour was shown), the truth, the method's answer and full attention's.

    slots: the same questions on four screen slots, the first demo model.

    Example: statekv demo --frames 64 --method window --json

    Example: statekv demo --task slots --frames 32 --method statekv --budget 32
    """
    from statekv.demo.evaluation import load_demo, run_demo

    if task == "lockers":
        from statekv.demo.age_eval import DEMO_BUDGET, DEMO_FRAMES
        from statekv_cli.lockers import demo_lockers

        return demo_lockers(model, device, DEMO_FRAMES if frames is None else frames, seed,
                            method, DEMO_BUDGET if budget is None else budget, window_frames,
                            pin_prefix, events, json_output, threads, quiet)
    _check_task(task)
    if model:
        from statekv.errors import UsageError

        raise UsageError("--model is for --task lockers; the slots demo uses its shipped model")
    frames = 32 if frames is None else frames
    budget = 64 if budget is None else budget

    result = run_demo(frames, seed, method, budget, window_frames, pin_prefix,
                      model=load_demo(device, threads))
    if json_output:
        emit_json(result.to_dict())
        return
    if events:
        for line in result.events:
            out.print(line, markup=False)
    table = Table(title=f"synthetic video seed {seed}, {frames} frames, "
                        f"{method_label(method, result.budget, result.window_frames)}")
    for column in ("question", "answer", "truth", ""):
        table.add_column(column)
    for a in result.answers:
        table.add_row(a.question, a.answer, a.truth, "ok" if a.correct else "WRONG")
    out.print(table)
    line = f"{sum(a.correct for a in result.answers)}/{len(result.answers)} correct"
    if result.full_correct is not None:
        line += (f" (full attention on the same video: {result.full_correct}/{len(result.answers)}; "
                 f"README's Fidelity section explains the gap)")
    out.print(line, markup=False)
    if not quiet:
        err.print(prefill_line(result.stats), markup=False)


_DEFAULT_EVAL_METHODS = "full,isolated,window,statekv,random"


def _check_task(task: str) -> None:
    if task not in ("slots", "lockers"):
        from statekv.errors import UsageError

        raise UsageError(f"unknown --task {task!r}; use slots or lockers")


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise typer.BadParameter(f"{name} is empty")
    return values


@handle_errors
@run_options_from_cli("preset", "model", "budget", "window_frames", "max_frames", "fps",
                      "chunk_frames", "dtype", "attention", "pin_prefix", "trust_remote_code",
                      "force")
def eval_(
    lengths: Annotated[str | None, typer.Option(
        "--lengths", help="Video lengths in frames, comma-separated; lockers takes one. Default: "
        "64 (lockers, the model's longest training length), 32 (slots, trained on 32).")] = None,
    budgets: Annotated[str | None, typer.Option(
        "--budgets", help="Carried tokens for window, statekv and random, comma-separated "
        "(window gets the same number of tokens). Default: 292,1150 (lockers: 4 frames of 73 "
        "tokens, and a quarter of a 64-frame video), 32,64,128 (slots: a frame is about "
        "11).")] = None,
    videos: Annotated[int | None, typer.Option(
        "--videos", help="Held-out test videos per length. Default: 16.")] = None,
    methods: Annotated[str | None, typer.Option(
        "--methods", help="slots: among full, isolated, window, statekv, random (default: all "
        "five); lockers: those and statekv-bidir, statekv-decay (default: all); with "
        "--benchmark: default full,window,statekv. full always runs.")] = None,
    pin: Annotated[str, typer.Option("--pin", help="Pin the text prefix: off, on or both.")] = "both",
    csv_path: Annotated[str | None, typer.Option("--csv", help="Write the table as CSV here.")] = None,
    plot_path: Annotated[str | None, typer.Option(
        "--plot", help="Write a PNG plot here: accuracy against LM prefill FLOPs (matplotlib).")] = None,
    benchmark: Annotated[str | None, typer.Option(
        "--benchmark", help="Run a downloaded benchmark instead of the demo: videomme or mlvu "
        "(docs/benchmarks.md gives the layouts), with --data and --out.")] = None,
    data: Annotated[str | None, typer.Option(
        "--data", help="--benchmark: the benchmark's folder as downloaded (Video-MME: the "
        "parquet and data/*.mp4; MLVU: json/ and video/).")] = None,
    out_path: Annotated[str, typer.Option(
        "--out", "-o", help="--benchmark: JSONL results, one line per (question, method), "
        "appended and resumed.")] = "results.jsonl",
    report_path: Annotated[str | None, typer.Option(
        "--report", help="Print the report of a --benchmark results file (any time, even "
        "mid-run) and exit.")] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", help="--benchmark: only the first N questions (in the benchmark's order).")] = None,
    shard_spec: Annotated[str | None, typer.Option(
        "--shard", help="--benchmark: K/N, only the videos at positions K-1, K-1+N, ... of "
        "the sorted list (K from 1), e.g. one GPU job each.")] = None,
    redo: Annotated[bool, typer.Option(
        "--redo", help="--benchmark: redo questions already in --out with the same settings.")] = False,
    use_ray: Annotated[bool, typer.Option(
        "--ray", help="--benchmark: run on Ray, one model-holding actor per GPU (statekv[ray]).")] = False,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="--benchmark: connect to this Ray cluster (implies --ray).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", help="--benchmark: tokens of generated text kept in each record "
        "(the letter is read from the first). Default: 8.")] = None,
    seed: Seed = 0, device: Annotated[str | None, typer.Option(
        "--device", help="auto, cpu, cuda, cuda:N or mps. Default: cpu for the demo, auto "
        "with --benchmark.")] = None,
    threads: Threads = None, json_output: Json = False, quiet: Quiet = False,
    debug: Debug = False, options: Any = None,
    task: Annotated[str, typer.Option(
        "--task", help="lockers (the default): accuracy by evidence age, with window+pin, "
        "compute-matched windows and statekv's scoring variants (statekv-bidir, statekv-decay), "
        "on the shipped lockers model or --model DIR; slots: the first demo model.")] = "lockers",
) -> None:
    """Benchmark prefill methods against full attention on held-out synthetic videos, or
    (with --benchmark) on Video-MME or MLVU as downloaded.

    Prints the isolated floor first: if isolated prefill (no frame sees another) scores close
    to full attention, the benchmark cannot tell methods apart, and it says so.

    Example: statekv eval --videos 32 --json --csv lockers.csv --plot lockers.png

    Example: statekv eval --task slots --lengths 16,32 --budgets 32,64,128 --videos 32 --csv eval.csv --plot eval.png

    Example: statekv eval --benchmark videomme --data Video-MME --preset internvl3-1b --max-frames 512 --fps 1 --out videomme.jsonl

    Example: statekv eval --report videomme.jsonl
    """
    if report_path:
        from statekv_cli import benchmark as rendering

        rendering.report(report_path, json_output)
        return
    if benchmark:
        from statekv_cli import benchmark as rendering

        options.max_new_tokens, options.device, options.seed = max_new_tokens, device or "auto", seed
        options.threads = threads
        rendering.run(benchmark, data, out_path, methods, limit, shard_spec, redo, use_ray,
                      ray_address, options, json_output, quiet)
        return
    from statekv.demo.evaluation import load_demo, plot_eval, run_eval, write_csv

    if task == "lockers":
        from statekv.demo.age_eval import AGE_METHODS, EVAL_BUDGETS, EVAL_FRAMES
        from statekv_cli.lockers import eval_lockers

        chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else list(AGE_METHODS)
        frames = _ints(lengths, "--lengths") if lengths else [EVAL_FRAMES]
        if len(frames) > 1:
            raise typer.BadParameter(f"--task lockers takes one length (--lengths {EVAL_FRAMES})")
        return eval_lockers(options.model, device or "cpu", frames[0],
                            _ints(budgets, "--budgets") if budgets else list(EVAL_BUDGETS),
                            16 if videos is None else videos, chosen, seed, csv_path, plot_path,
                            json_output, quiet, threads)
    _check_task(task)
    lengths, budgets = lengths or "32", budgets or "32,64,128"
    videos = 16 if videos is None else videos
    methods = methods or "full,isolated,window,statekv,random"
    progress = None if quiet or json_output else (lambda msg: err.print(msg, markup=False))
    report = run_eval(_ints(lengths, "--lengths"), _ints(budgets, "--budgets"), videos, pin,
                      [m.strip() for m in methods.split(",") if m.strip()], seed,
                      model=load_demo(device or "cpu", threads), on_progress=progress)
    if csv_path:
        write_csv(report.rows, csv_path)
    if plot_path:
        plot_eval(report, plot_path)
    if json_output:
        emit_json({"rows": [dataclasses.asdict(r) for r in report.rows], "floor": report.floor,
                   "chance": report.chance, "discriminates": report.discriminates,
                   "verdict": report.verdict, "tokens_per_frame": report.tokens_per_frame,
                   "frame_tokens": report.frame_tokens})
        return
    for frames, f in report.floor.items():
        out.print(f"isolated floor at {frames} frames: full {f['full']:.1%}, isolated "
                  f"{f['isolated']:.1%} (gap {f['gap']:+.1%}; probe questions: full "
                  f"{f['full_probe']:.1%}, isolated {f['isolated_probe']:.1%})", markup=False)
    out.print(report.verdict, markup=False)
    out.print(_table(report))
    if csv_path:
        out.print(f"wrote {csv_path}", markup=False)
    if plot_path:
        out.print(f"wrote {plot_path}", markup=False)


def _table(report) -> Table:
    table = Table(title=f"demo model, {report.tokens_per_frame} visual tokens/frame "
                        f"({report.frame_tokens} with its label); chance "
                        f"{max(report.chance.values()):.0%}")
    for column in ("frames", "method", "acc", "probe", "final", "vs full [95% CI]", "agree",
                   "KL", "LM FLOPs", "of full"):
        table.add_column(column)
    for r in report.rows:
        table.add_row(str(r.frames), r.label, f"{r.accuracy:.1%}", f"{r.accuracy_probe:.1%}",
                      f"{r.accuracy_final:.1%}",
                      f"{r.delta:+.1%} [{r.delta_low:+.1%}, {r.delta_high:+.1%}]",
                      f"{r.agreement:.1%}", f"{r.kl:.3f}", flops(r.lm_prefill_flops),
                      f"{r.flops_ratio:.0%}")
    return table

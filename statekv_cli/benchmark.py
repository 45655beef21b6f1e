"""`statekv eval --benchmark` and `statekv eval --report`: rendering only.

The work is in statekv.commands.benchmark; this module parses what `eval` was given for a
benchmark run, calls it and prints progress, the report table and the paper's numbers.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from statekv_cli.options import emit_json, err, out


def run(benchmark: str, data: str | None, out_path: str, methods: str | None,
        limit: int | None, shard_spec: str | None, redo: bool, use_ray: bool,
        ray_address: str | None, options: Any, json_output: bool, quiet: bool) -> None:
    """Read the benchmark, run it, append results, print the report."""
    from statekv.commands import benchmark as library
    from statekv.commands.summarize import parse_shard
    from statekv.errors import UsageError

    if not data:
        raise UsageError("--benchmark needs --data DIR (the benchmark's downloaded files)")
    options.validate()
    questions = library.limit_questions(library.read_benchmark(benchmark, data), limit)
    if shard_spec:
        questions = library.shard_questions(questions, *parse_shard(shard_spec))
    names = [m.strip() for m in (methods or ",".join(library.DEFAULT_METHODS)).split(",")
             if m.strip()]
    if not quiet and not json_output:
        videos = len({q.video for q in questions})
        err.print(f"{benchmark}: {len(questions)} questions on {videos} videos, methods "
                  f"{', '.join(names)} -> {out_path}", markup=False)
    progress = None if quiet else _progress_line
    result = library.run_benchmark(questions, options, names, out_path, redo,
                                   on_progress=progress, use_ray=use_ray,
                                   ray_address=ray_address)
    if not quiet and not json_output:
        err.print(f"{result.done} answered, {result.skipped} already done, {result.failed} "
                  f"errors, in {_seconds(result.seconds)}", markup=False)
    if out_path == "-":
        return
    record = library.report(library.load_results(out_path))
    if json_output:
        emit_json(record)
    else:
        render_report(record)
    if result.failed:
        raise typer.Exit(1)


def report(path: str, json_output: bool) -> None:
    """`statekv eval --report FILE`: the report of a results file, at any time."""
    from statekv.commands import benchmark as library

    record = library.report(library.load_results(path))
    if json_output:
        emit_json(record)
    else:
        render_report(record)


def _progress_line(p: Any) -> None:
    from statekv.units import format_flops, format_fraction

    ok = [r for r in p.records if r["status"] == "ok"]
    if ok:
        status = (f"{sum(bool(r['correct']) for r in ok)}/{len(ok)} correct, LM prefill "
                  f"{format_flops(ok[0]['lm_prefill_flops'])}"
                  f" ({format_fraction(ok[0]['flops_share'])} of full)")
    else:
        status = "error: " + (p.records[0]["error"] or {}).get("message", "") if p.records else ""
    left = "" if p.eta_seconds is None else f", about {_seconds(p.eta_seconds)} left"
    err.print(f"[{p.done}/{p.total} questions x methods{left}] {p.video_id} {p.method}: "
              f"{status}", markup=False)


def _seconds(value: float | None) -> str:
    from statekv.units import format_seconds

    return format_seconds(value)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def render_report(record: dict) -> None:
    from statekv.units import format_flops, format_fraction

    model = record["model"] if isinstance(record["model"], str) else ", ".join(record["model"])
    table = Table(title=f"{record['benchmark']}: {record['questions']} questions, {model} "
                        f"(accuracy %, 95% Wilson interval)")
    for column in ("method", "n", "accuracy", "95% interval", "paper", "agrees with full",
                   "task mean", "LM prefill (of full)", "errors"):
        table.add_column(column)
    for name, m in record["methods"].items():
        setting = {"statekv": f" B={m['budget']}", "window": f" {m['window_frames']} fr"}
        paper = _percent(m["paper"])
        if m["paper"] is not None and not m["paper_settings_match"]:
            paper += " (other settings)"
        share = format_fraction(m["flops_share"])
        table.add_row(name + setting.get(name, ""), str(m["n"]), _percent(m["accuracy"]),
                      f"{_percent(m['ci_low'])}-{_percent(m['ci_high'])}", paper,
                      _percent(m["agreement_with_full"]), _percent(m["task_mean"]),
                      f"{format_flops(m['lm_prefill_flops'])} ({share})", str(m["errors"]))
    out.print(table)
    for key, title in (("by_duration", "duration"), ("by_task_type", "task type"),
                       ("by_category", "category")):
        out.print(_breakdown(record, key, title))


def _breakdown(record: dict, key: str, title: str) -> Table:
    methods = record["methods"]
    groups = sorted({g for m in methods.values() for g in m[key]})
    table = Table(title=f"accuracy % by {title}")
    table.add_column(title)
    for name in methods:
        table.add_column(name)
    for group in groups:
        cells = []
        for m in methods.values():
            g = m[key].get(group)
            cells.append("-" if g is None else f"{_percent(g['accuracy'])} (n={g['n']})")
        table.add_row(group, *cells)
    return table

"""`statekv eval --task lockers` and `statekv demo --task lockers`: rendering only.

The work is `statekv.demo.age_eval` (accuracy by evidence age, paired bootstrap intervals,
compute-matched windows); this module turns its report into a table, or JSON with `--json`.
"""

from __future__ import annotations

from rich.table import Table

from statekv_cli.options import emit_json, err, method_label, out, prefill_line


def load_lockers_model(model: str | None, device: str, threads: int | str | None = None):
    """The lockers checkpoint: the shipped one, or `--model DIR` (e.g. trained by
    tools/train_demo.py --task lockers), float32, with `threads` as the command line resolves
    them."""
    from statekv import threads as cpu_threads
    from statekv.demo.age_eval import LOCKERS_MODEL
    from statekv.session import load

    return load(model or LOCKERS_MODEL, device=device, dtype="float32",
                threads=cpu_threads.resolve(threads))


def eval_lockers(model: str | None, device: str, frames: int, budgets: list[int], videos: int,
                 methods: list[str], seed: int, csv_path: str | None, plot_path: str | None,
                 json_output: bool, quiet: bool, threads: int | str | None = None) -> None:
    from statekv.demo.age_eval import LOCKERS_MODEL, plot_age, run_age_eval, write_age_csv

    progress = None if quiet or json_output else (lambda msg: err.print(msg, markup=False))
    report = run_age_eval(load_lockers_model(model, device, threads), frames=frames,
                          budgets=budgets, videos=videos, methods=methods, seed=seed,
                          model_name=model or LOCKERS_MODEL,
                          on_progress=progress)
    if csv_path:
        write_age_csv(report, csv_path)
    if plot_path:
        plot_age(report, plot_path)
    if json_output:
        emit_json(report.to_dict())
        return
    out.print(report.verdict, markup=False)
    out.print(age_table(report))
    for path in (csv_path, plot_path):
        if path:
            out.print(f"wrote {path}", markup=False)


def age_table(report) -> Table:
    buckets = [(b["age_min"], b["age_max"]) for b in report.rows[0].by_age]
    table = Table(title=f"lockers task: {report.frames} frames ({report.tokens} tokens), "
                        f"{report.videos} videos; chance {report.chance:.0%}")
    for column in ("method", "acc [95% CI]", "vs full [95% CI]",
                   *(f"age {lo}-{hi}" for lo, hi in buckets), "of full FLOPs"):
        table.add_column(column)
    for r in report.rows:
        ages = [("-" if b["accuracy"] is None else f"{b['accuracy']:.0%} ({b['n']})")
                for b in r.by_age]
        table.add_row(r.label if r.matched_to is None else f"window@{r.budget} ~ {r.matched_to} FLOPs",
                      f"{r.accuracy:.1%} [{r.ci_low:.0%}, {r.ci_high:.0%}]",
                      f"{r.delta_vs_full:+.1%} [{r.delta_low:+.0%}, {r.delta_high:+.0%}]",
                      *ages, f"{r.lm_flops_fraction:.0%}")
    return table


def demo_lockers(model: str | None, device: str, frames: int, seed: int, method: str,
                 budget: int, window_frames: int, pin_prefix: bool, events: bool,
                 json_output: bool, threads: int | str | None = None, quiet: bool = False) -> None:
    from statekv.demo.age_eval import run_lockers_demo

    result = run_lockers_demo(load_lockers_model(model, device, threads), frames, seed, method,
                              budget, window_frames, pin_prefix)
    if json_output:
        emit_json(result.to_dict())
        return
    if events:
        for line in result.events:
            out.print(line, markup=False)
    table = Table(title=f"lockers video seed {seed}, {frames} frames, "
                        f"{method_label(method, result.budget, result.window_frames)}")
    for column in ("question", "evidence age", "truth", method, "full", ""):
        table.add_column(column)
    for a in result.answers:
        age = f"{a.evidence_age} frame" + ("" if a.evidence_age == 1 else "s")
        table.add_row(a.question, age, a.truth, a.answer, a.full_answer,
                      "ok" if a.correct else "WRONG")
    out.print(table)
    line = f"{sum(a.correct for a in result.answers)}/{len(result.answers)} correct"
    if result.full_correct is not None:
        line += f" (full attention on the same video: {result.full_correct}/{len(result.answers)})"
    out.print(line, markup=False)
    if not quiet:
        err.print(prefill_line(result.stats), markup=False)

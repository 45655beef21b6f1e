"""`statekv recall`: how much of full attention's past mass each budget holds, for one video.

Parses options, calls `statekv.commands.recall.recall` and renders a table (stdout) or the
JSON record (`--json`); progress goes to stderr. Registered in the main app with one line.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from statekv.units import format_fraction
from statekv_cli.options import (
    Debug, Json, Quiet, emit_json, err, handle_errors, out, run_options_from_cli,
)


def _budgets(text: str) -> list[int]:
    from statekv.errors import UsageError

    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UsageError(f"--budgets expects comma-separated integers, got {text!r}") from None
    return values


@handle_errors
@run_options_from_cli("preset", "model", "max_frames", "fps", "start", "end", "chunk_frames",
                      "device", "dtype", "attention", "seed", "trust_remote_code", "force",
                      "threads")
def recall(
    path: Annotated[str, typer.Argument(help="The video file.")],
    budgets: Annotated[str, typer.Option(
        "--budgets", help="Budgets to measure, tokens per layer and KV head, comma-separated.")]
        = "256,1024,4096",
    max_chunks: Annotated[int, typer.Option(
        "--max-chunks", help="Measure at most this many chunks, evenly spaced (bounds memory).")]
        = 32,
    plot: Annotated[str | None, typer.Option(
        "--plot", help="Also plot recall and concentration against budget to this PNG "
        "(needs matplotlib).")] = None,
    json_output: Json = False, quiet: Quiet = False, debug: Debug = False, options: Any = None,
) -> None:
    """Measure how much of full attention's past-directed mass a carried state of B tokens
    holds (concentration: the best B tokens; weighted recall: the tokens StateKV actually
    kept) and how fast StateKV's state churns, per layer and overall; suggests the smallest
    listed budget reaching 90% weighted recall. Runs one full and one StateKV prefill per
    budget. Definitions: docs/recall.md.

    Example: statekv recall movie.mp4 --preset internvl3-1b --budgets 256,1024,4096 --plot recall.png
    """
    from statekv.commands.recall import plot_recall, recall as measure

    progress = None if quiet or json_output else (lambda msg: err.print(msg, markup=False))
    record = measure(path, options, _budgets(budgets), max_chunks, on_step=progress)
    if plot:
        plot_recall(record, plot)
    if json_output:
        emit_json(record)
        return
    table = Table(title=f"{record['model']}: {record['tokens']} tokens, "
                        f"{record['chunks_measured']} chunks measured")
    for column in ("budget", "concentration (top-B)", "statekv weighted recall", "churn/chunk"):
        table.add_column(column)
    for r in record["rows"]:
        table.add_row(str(r["budget"]), format_fraction(r["concentration"], 1),
                      format_fraction(r["weighted_recall"], 1), format_fraction(r["churn"], 1))
    out.print(table)
    suggested = record["suggested_budget"]
    out.print(f"suggested budget: {suggested}" if suggested is not None else
              "no listed budget reaches 90% weighted recall; try larger --budgets", markup=False)
    if plot:
        out.print(f"wrote {plot}", markup=False)

"""`statekv cache list|clear`: the automatic prefill cache (`--cache DIR`, $STATEKV_CACHE)."""

from __future__ import annotations

import datetime
from typing import Annotated

import typer
from rich.table import Table

from statekv_cli.options import Debug, Json, emit_json, handle_errors, out
from statekv.units import format_bytes as size

cache_app = typer.Typer(help="List or clear the prefill cache that --cache DIR (or "
                        "$STATEKV_CACHE) fills.", no_args_is_help=True, rich_markup_mode=None)

Folder = Annotated[str | None, typer.Option(
    "--cache", help="The cache folder. Default: $STATEKV_CACHE.")]


def _folder(value: str | None) -> str:
    from statekv.commands.cache import cache_dir
    from statekv.errors import UsageError

    folder = cache_dir(value)
    if folder is None:
        raise UsageError("no cache folder: pass --cache DIR or set STATEKV_CACHE")
    return folder


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


@cache_app.command("list")
@handle_errors
def list_(cache: Folder = None, json_output: Json = False, debug: Debug = False) -> None:
    """List cached prefills, most recently used first.

    Example: statekv cache list --cache ~/.cache/statekv
    """
    from statekv.commands import cache as library

    record = library.list_cache(_folder(cache))
    if json_output:
        emit_json(record)
        return
    table = Table(title=f"{record['directory']}: {len(record['entries'])} entries, "
                  f"{size(record['bytes'])}")
    for column in ("video", "model", "method", "size", "last used", "key"):
        table.add_column(column, overflow="fold")
    for row in record["entries"]:
        table.add_row(str(row["video"]), str(row["model"]), str(row["method"]),
                      size(row["bytes"]), _when(row["last_used"]), row["key"][:12])
    out.print(table)


@cache_app.command("clear")
@handle_errors
def clear(
    cache: Folder = None,
    older_than: Annotated[str | None, typer.Option(
        "--older-than", help="Only entries unused for longer than this: 7d, 12h, 30m.")] = None,
    max_size: Annotated[str | None, typer.Option(
        "--max-size", help="Evict least recently used entries until the cache is at most "
        "this big: 50G, 512M.")] = None,
    json_output: Json = False, debug: Debug = False,
) -> None:
    """Delete cached prefills: all of them, or by age and/or total size (LRU first).

    Example: statekv cache clear --older-than 7d --max-size 50G
    """
    from statekv.commands import cache as library
    from statekv.errors import UsageError
    from statekv.units import parse_duration, parse_size

    try:
        age = parse_duration(older_than) if older_than is not None else None
        limit = parse_size(max_size) if max_size is not None else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    record = library.clear(_folder(cache), older_than=age, max_size=limit)
    if json_output:
        emit_json(record)
        return
    busy = f", {len(record['busy'])} in use kept" if record["busy"] else ""
    out.print(f"removed {record['removed']} entries ({size(record['removed_bytes'])}){busy}; "
              f"{record['entries']} left ({size(record['bytes'])})", markup=False)

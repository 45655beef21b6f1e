"""What every statekv command shares: option definitions, error handling, output streams."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import traceback
import typing
from collections.abc import Callable
from typing import Annotated, Any

import click
import typer
from typer.exceptions import TyperException
from rich.console import Console

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
# On a terminal, messages wrap at word boundaries; in logs, each stays one line.
err = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


# Options shared by the commands that run a model ------------------------------------------
# One definition: `run_options_from_cli` adds them to a command's signature and hands the
# command one `RunOptions`. Defaults shown in help come from the code (the default preset's
# values), never restated by hand.
def _preset_default(field: str) -> str:
    from statekv.presets import DEFAULT_PRESET, load_preset

    try:
        value = getattr(load_preset(DEFAULT_PRESET), field)
    except Exception:  # noqa: BLE001 - help must render even with a broken install
        return "the preset's"
    return f"the preset's ({DEFAULT_PRESET}: {value})"


def _default_preset() -> str:
    from statekv.presets import DEFAULT_PRESET

    return DEFAULT_PRESET


def method_names() -> str:
    """The `--method` choices, from the registry in statekv/policies.py."""
    from statekv.policies import METHODS

    return ", ".join(METHODS)


def _max_frames(value: str | None) -> int | str | None:
    if value is None or value == "fit":
        return value
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"a number of frames or 'fit', got {value!r}") from None


# name -> (annotation, typer.Option, default)
RUN_OPTIONS: dict[str, tuple[Any, Any, Any]] = {
    "preset": (str | None, typer.Option(
        "--preset", help=f"Preset name (see `statekv presets`) or a preset YAML file. "
        f"Default: {_default_preset()}."), None),
    "model": (str | None, typer.Option(
        "--model", help="Hugging Face model id or local checkpoint directory; overrides the "
        "preset's."), None),
    "method": (str | None, typer.Option(
        "--method", help=f"One of {method_names()}: full (exact, quadratic), window (recent frames "
        f"only), statekv (top attention mass, linear), isolated (a floor for benchmarks). "
        f"Default: {_preset_default('method')}."), None),
    "budget": (int | None, typer.Option(
        "--budget", help="statekv: tokens carried per layer and KV head while prefilling. "
        f"Default: {_preset_default('budget')}."), None),
    "window_frames": (int | None, typer.Option(
        "--window-frames", help="window: how many recent frames a chunk sees. "
        f"Default: {_preset_default('window_frames')}."), None),
    "max_frames": (str | None, typer.Option(
        "--max-frames", parser=_max_frames, metavar="N|fit",
        help="Sample at most this many frames, uniformly; 'fit': as many as fit in the model's "
        f"trained context. Default: {_preset_default('max_frames')}."), None),
    "fps": (float | None, typer.Option(
        "--fps", help="Sample at most this many frames per second. "
        f"Default: {_preset_default('fps')}."), None),
    "start": (str | None, typer.Option(
        "--start", help="Start of the part to watch: seconds or HH:MM:SS."), None),
    "end": (str | None, typer.Option(
        "--end", help="End of the part to watch: seconds or HH:MM:SS."), None),
    "chunk_frames": (int | None, typer.Option(
        "--chunk-frames", help="Frames prefilled per chunk (a multiple of the model's temporal "
        "patch). Default: one frame (one temporal patch for Qwen models)."), None),
    "max_new_tokens": (int | None, typer.Option(
        "--max-new-tokens", help="Longest answer, in tokens. "
        f"Default: {_preset_default('max_new_tokens')}."), None),
    "device": (str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps."), "auto"),
    "dtype": (str | None, typer.Option(
        "--dtype", help="auto (bfloat16 on GPUs and on CPUs with native bf16 matmul, "
        "AVX512-BF16/AMX, that a timed product finds faster; else float32), float32, bfloat16 "
        "or float16. "
        f"Default: {_preset_default('dtype')}."), None),
    "seed": (int, typer.Option("--seed", help="Random seed (answers are greedy)."), 0),
    "pin_prefix": (bool, typer.Option(
        "--pin-prefix", help="Keep the text prefix visible to every chunk, outside the budget."),
        False),
    "attention": (str, typer.Option(
        "--attention", help="sdpa (fused, fast) or eager (explicit softmax, the numerical "
        "reference)."), "sdpa"),
    "trust_remote_code": (bool, typer.Option(
        "--trust-remote-code", help="Allow a checkpoint's own Python code to run (off by "
        "default)."), False),
    "force": (bool, typer.Option(
        "--force", help="Run even though the memory preflight says it will not fit."), False),
    "threads": (str | None, typer.Option(
        "--threads", metavar="N|auto", help="CPU threads: N, or auto = the cores this process "
        "may use (affinity, cgroup quota). Default: $STATEKV_THREADS, else $OMP_NUM_THREADS, "
        "else auto. Example: --threads 1 on a busy laptop."), None),
}
ALL_RUN_OPTIONS = tuple(RUN_OPTIONS)


def run_options_from_cli(*names: str) -> Callable[[Callable], Callable]:
    """Add the shared run options `names` (default: all) to a Typer command's signature;
    the command receives them as one `options: RunOptions` keyword argument."""
    chosen = names or ALL_RUN_OPTIONS

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)  # resolve string annotations
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in signature.parameters.values() if p.name != "options"]
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                   default=RUN_OPTIONS[name][2],
                                   annotation=Annotated[RUN_OPTIONS[name][0], RUN_OPTIONS[name][1]])
                 for name in chosen]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in chosen if name in kwargs}
            return fn(*args, options=run_options(**values), **kwargs)

        wrapper.__signature__ = signature.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in [*own, *extra]}
        return wrapper

    return decorate


# Options of the commands themselves (not run settings) ---------------------------------
_THREADS_TYPE, _THREADS_OPTION, _ = RUN_OPTIONS["threads"]
Threads = Annotated[_THREADS_TYPE, _THREADS_OPTION]  # for bench and demo, which take it alone
Json = Annotated[bool, typer.Option(
    "--json", help="Print one JSON record on stdout (formats: docs/formats.md).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback of errors.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (answers are greedy).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
PinPrefix = Annotated[bool, typer.Option(
    "--pin-prefix", help="Keep the text prefix visible to every chunk, outside the budget.")]

CacheDir = Annotated[str | None, typer.Option(
    "--cache", help="Prefill cache folder: reuse a saved prefill of the same video with the "
    "same settings, else prefill and save it (e.g. --cache ~/.cache/statekv; 'off' to disable). "
    "Default: $STATEKV_CACHE, off when unset.")]


def run_options(**kwargs: Any):
    from statekv.commands.plan import RunOptions

    if kwargs.get("start") is not None or kwargs.get("end") is not None:
        from statekv.video import parse_time  # (numpy: only when there is a time to parse)

        kwargs["start"] = parse_time(kwargs.get("start"))
        kwargs["end"] = parse_time(kwargs.get("end"))
    return RunOptions(**kwargs)


def handle_errors(fn: Callable) -> Callable:
    """Turn user-facing errors into one line on stderr and the exit codes of docs/formats.md."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False) or os.environ.get("STATEKV_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, click.ClickException, TyperException):  # Typer's usage errors: exit 2
            raise
        except KeyboardInterrupt:
            err.print("statekv: interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - every error ends in one line and an exit code
            code, message = _classify(exc)
            if debug:
                traceback.print_exc()
            err.print(f"statekv: error: {message}", markup=False)
            if code not in (2, 3, 4, 5) and not debug:
                err.print("(run again with --debug for the traceback)")
            raise typer.Exit(code) from None

    return wrapper


def _classify(exc: Exception) -> tuple[int, str]:
    from statekv.errors import StateKVError

    if isinstance(exc, StateKVError):
        return exc.exit_code, str(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return 5, ("out of memory; try fewer --max-frames, a smaller --budget, a smaller preset "
                   "or --dtype bfloat16")
    return 1, f"{type(exc).__name__}: {exc}"


def emit_json(record: Any) -> None:
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def options_markdown() -> str:
    """README's table of the shared run options, generated from their definitions."""
    rows = ["| option | meaning |", "| --- | --- |"]
    for annotation, option, default in RUN_OPTIONS.values():
        flag = option.param_decls[0] if option.param_decls else option.default  # Annotated form
        rows.append(f"| `{flag}` | {option.help} |")
    for flag, text in (("--json", "One JSON record on stdout (docs/formats.md); messages stay "
                                  "on stderr."),
                       ("--quiet, -q", "No progress or summary on stderr."),
                       ("--debug", "Show the full traceback of errors.")):
        rows.append(f"| `{flag}` | {text} |")
    return "\n".join(rows)


def method_label(method: str, budget: int | None, window_frames: int | None) -> str:
    """A demo table's method with its setting, e.g. 'statekv budget 64', 'window 16 frames'."""
    setting = {"statekv": f" budget {budget}", "window": f" {window_frames} frames"}
    return method + setting.get(method, "")


def prefill_line(stats: dict[str, Any]) -> str:
    """The demos' closing line on stderr: LM prefill FLOPs against full attention's."""
    from statekv.units import format_flops, format_fraction

    return (f"LM prefill {format_flops(stats['lm_prefill_flops'])} "
            f"({format_fraction(stats['lm_flops_fraction'])} of full attention's), carried "
            f"{stats['carried_tokens']} / detailed {stats['detailed_tokens']} tokens")

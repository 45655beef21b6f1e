"""What every statekv command shares: option definitions, error handling, output streams."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
# On a terminal, messages wrap at word boundaries; in logs, each stays one line.
err = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


# Options shared by the commands that run a model ------------------------------------------
Preset = Annotated[str | None, typer.Option(
    "--preset", help="Preset name (see `statekv presets`) or a preset YAML file. Default: qwen3-vl-2b.")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="Hugging Face model id or local checkpoint directory; overrides the preset's.")]
Method = Annotated[str | None, typer.Option(
    "--method", help="full (exact, quadratic), window (recent frames only), statekv (top attention "
    "mass, linear). Default: the preset's (statekv).")]
Budget = Annotated[int | None, typer.Option(
    "--budget", help="statekv: tokens carried per layer and KV head while prefilling. Default: preset's (4096).")]
WindowFrames = Annotated[int | None, typer.Option(
    "--window-frames", help="window: how many recent frames a chunk sees. Default: preset's (16).")]
MaxFrames = Annotated[int | None, typer.Option(
    "--max-frames", help="Sample at most this many frames, uniformly. Default: preset's (256).")]
Fps = Annotated[float | None, typer.Option(
    "--fps", help="Sample at most this many frames per second. Default: preset's (1.0).")]
Start = Annotated[str | None, typer.Option(
    "--start", help="Start of the part to watch: seconds or HH:MM:SS.")]
End = Annotated[str | None, typer.Option(
    "--end", help="End of the part to watch: seconds or HH:MM:SS.")]
ChunkFrames = Annotated[int | None, typer.Option(
    "--chunk-frames", help="Frames prefilled per chunk (a multiple of the model's temporal patch).")]
MaxNewTokens = Annotated[int | None, typer.Option(
    "--max-new-tokens", help="Longest answer, in tokens. Default: preset's (128).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[str | None, typer.Option(
    "--dtype", help="auto (bf16 on GPUs, float32 on CPU), float32, bfloat16 or float16.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (answers are greedy).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON record on stdout (CONTRACTS.md).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback of errors.")]
PinPrefix = Annotated[bool, typer.Option(
    "--pin-prefix", help="Keep the text prefix visible to every chunk, outside the budget.")]
Attention = Annotated[str, typer.Option(
    "--attention", help="sdpa (fused, fast) or eager (explicit softmax, the numerical reference).")]
TrustRemoteCode = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Allow a checkpoint's own Python code to run (off by default).")]
Force = Annotated[bool, typer.Option(
    "--force", help="Run even though the memory preflight says it will not fit.")]


def run_options(**kwargs: Any):
    from statekv.commands.plan import RunOptions

    if kwargs.get("start") is not None or kwargs.get("end") is not None:
        from statekv.video import parse_time  # (numpy: only when there is a time to parse)

        kwargs["start"] = parse_time(kwargs.get("start"))
        kwargs["end"] = parse_time(kwargs.get("end"))
    return RunOptions(**kwargs)


def handle_errors(fn: Callable) -> Callable:
    """Turn user-facing errors into one line on stderr and CONTRACTS.md's exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False) or os.environ.get("STATEKV_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
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

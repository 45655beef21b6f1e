"""The scaling benchmark: language-model prefill cost against the number of frames, per method.

Measured mode builds a preset's language model as the real transformers text class with
random weights (no download), feeds it synthetic frames (random embeddings, `tokens_per_frame`
per frame, 1-D positions) through the same engine path users run (`statekv.prefill.prefill_chunks`),
and times the language-model prefill only. Analytic mode gives the same table for real
checkpoints from the preset's architecture numbers, without weights.

    rows = run_bench("bench-tiny", frames=[64, 256], methods=["full", "statekv"])
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from statekv import accounting
from statekv.errors import UsageError
from statekv.models.synthetic import (
    PREFIX_TOKENS, SyntheticAdapter, build_language_model, synthetic_chunks, text_config,
)
from statekv.policies import Policy, make_policy
from statekv.prefill import PrefillEvent, forward_chunk, prefill_chunks
from statekv.presets import Architecture, Preset, load_preset

DEFAULT_FRAMES = (32, 64, 128, 256, 512, 1024)
DEFAULT_METHODS = ("full", "window", "statekv")
# Language-model classes by preset family: all shipped families use a Qwen2-style decoder.
TEXT_MODELS = {"internvl": "qwen2"}


@dataclass
class BenchRow:
    """One (frames, method) cell of the benchmark table; seconds are None in analytic mode."""

    frames: int
    method: str
    budget: int | None
    window_frames: int | None
    tokens: int  # prefilled tokens (prefix + frames)
    lm_prefill_flops: int
    full_lm_prefill_flops: int
    lm_prefill_seconds: float | None = None  # median over repeats
    lm_prefill_seconds_runs: list[float] = field(default_factory=list)
    chunk_ms_first: float | None = None  # median chunk time, first 10% after the state fills
    chunk_ms_last: float | None = None  # median chunk time, last 10% of chunks
    flatness: float | None = None  # chunk_ms_last / chunk_ms_first
    last_chunk_flops: int = 0  # LM FLOPs of the final chunk (per-frame cost at frame N)
    peak_memory_bytes: int | None = None  # measured (max over repeats) or estimated
    detailed_cache_bytes: int = 0
    carried_tokens: int = 0
    analytic: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CSV_FIELDS = tuple(f.name for f in fields(BenchRow) if f.name != "lm_prefill_seconds_runs")


# the synthetic model -----------------------------------------------------------------------
def resolve_architecture(preset_or_arch: str | Preset | Architecture) -> tuple[Architecture, Preset | None]:
    """An Architecture from a preset name, preset file, Preset or Architecture."""
    if isinstance(preset_or_arch, Architecture):
        return preset_or_arch, None
    preset = load_preset(preset_or_arch) if isinstance(preset_or_arch, str) else preset_or_arch
    if TEXT_MODELS.get(preset.family, "qwen2") != "qwen2":  # pragma: no cover - one class today
        raise UsageError(f"no benchmark language model for family {preset.family!r}")
    return preset.architecture, preset


# measured mode -----------------------------------------------------------------------------
@dataclass
class _Run:
    seconds: float
    chunk_seconds: list[float]  # per video chunk, wall time of one loop iteration
    lm_prefill_flops: int
    full_lm_prefill_flops: int
    last_chunk_flops: int
    peak_memory_bytes: int
    detailed_cache_bytes: int
    carried_tokens: int
    fill_chunk: int  # first video chunk whose carried state was at capacity


def _policy(method: str, budget: int, window_frames: int, tokens_per_frame: int) -> Policy:
    return make_policy(method, budget=budget, window_tokens=window_frames * tokens_per_frame)


def _run_once(adapter: SyntheticAdapter, policy: Policy, frame_count: int, chunk_frames: int,
              attention: str) -> _Run:
    events: list[PrefillEvent] = []
    gc.collect()
    memory = accounting.PeakMemory(adapter.device)
    with memory:
        result = prefill_chunks(adapter, synthetic_chunks(frame_count, chunk_frames), policy,
                         frame_count=frame_count, timestamps=(), attention=attention,
                         on_event=events.append, memory=memory)
    flops = [e.lm_prefill_flops for e in events]
    capacity = policy.capacity
    fill = next((i for i, e in enumerate(events[1:])
                 if capacity is not None and e.carried_tokens >= capacity), 0)
    run = _Run(
        seconds=result.seconds.get("lm_prefill_seconds", 0.0),
        chunk_seconds=chunk_seconds(events),
        lm_prefill_flops=result.lm_prefill_flops,
        full_lm_prefill_flops=result.full_lm_prefill_flops,
        last_chunk_flops=flops[-1] - flops[-2] if len(flops) > 1 else flops[-1],
        peak_memory_bytes=memory.peak_bytes(),
        detailed_cache_bytes=result.cache.detailed_bytes(),
        carried_tokens=result.cache.carried_tokens,
        fill_chunk=fill,
    )
    del result, events
    return run


def chunk_seconds(events: Sequence[PrefillEvent]) -> list[float]:
    """Wall seconds per video chunk from a prefill's events (events[0] is the text prefix).
    Chunks that shared one grouped forward report together at its end: each gets an equal
    share of that forward's time."""
    seconds: list[float] = []
    before, index = events[0].elapsed_seconds, 1
    while index < len(events):
        count = max(1, events[index].forward_chunks)
        last = events[min(len(events), index + count) - 1]
        share = (last.elapsed_seconds - before) / count
        seconds.extend([share] * min(count, len(events) - index))
        before, index = last.elapsed_seconds, index + count
    return seconds


def flatness(chunk_seconds: Sequence[float], fill_chunk: int) -> tuple[float, float, float] | None:
    """(first ms, last ms, last/first): median chunk time of the first 10% of chunks after the
    carried state is full against the last 10% of all chunks; None when too few chunks."""
    count = len(chunk_seconds)
    tenth = max(1, count // 10)
    if fill_chunk + tenth > count:
        return None
    first = statistics.median(chunk_seconds[fill_chunk:fill_chunk + tenth]) * 1e3
    last = statistics.median(chunk_seconds[-tenth:]) * 1e3
    return first, last, last / first if first > 0 else math.nan


def _row(frames: int, tokens: int, method: str, policy: Policy, window_frames: int,
         runs: list[_Run]) -> BenchRow:
    per_chunk = [statistics.median(times) for times in zip(*(r.chunk_seconds for r in runs))]
    flat = flatness(per_chunk, runs[0].fill_chunk)
    last = runs[-1]
    return BenchRow(
        frames=frames, method=method, budget=policy.budget,
        window_frames=window_frames if method == "window" else None,
        tokens=tokens, lm_prefill_flops=last.lm_prefill_flops,
        full_lm_prefill_flops=last.full_lm_prefill_flops,
        lm_prefill_seconds=statistics.median(r.seconds for r in runs),
        lm_prefill_seconds_runs=[round(r.seconds, 4) for r in runs],
        chunk_ms_first=flat and flat[0], chunk_ms_last=flat and flat[1],
        flatness=flat and flat[2], last_chunk_flops=last.last_chunk_flops,
        peak_memory_bytes=max(r.peak_memory_bytes for r in runs),
        detailed_cache_bytes=last.detailed_cache_bytes, carried_tokens=last.carried_tokens,
    )


def run_bench(
    preset_or_arch: str | Preset | Architecture = "bench-tiny",
    frames: Sequence[int] = DEFAULT_FRAMES,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    budget: int | None = None,
    window_frames: int | None = None,
    repeats: int = 3,
    tokens_per_frame: int | None = None,
    chunk_frames: int = 1,
    attention: str = "sdpa",
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    threads: int | str | None = None,
    warmup: bool = True,
    on_row: Callable[[BenchRow], None] | None = None,
) -> list[BenchRow]:
    """Time the LM prefill of synthetic frames for every (frames, method); one row each.

    Budget and window default to the preset's (or 4096 tokens / 16 frames for a bare
    Architecture); tokens per frame to the architecture's. `threads` sets torch's threads
    for the run: N or "auto"; None: STATEKV_THREADS, else OMP_NUM_THREADS, else auto.
    """
    from statekv import threads as cpu_threads

    previous = torch.get_num_threads()
    cpu_threads.apply(cpu_threads.resolve(threads))
    try:
        return _run_bench(preset_or_arch, frames, methods, budget, window_frames, repeats,
                          tokens_per_frame, chunk_frames, attention, dtype, device, seed,
                          warmup, on_row)
    finally:
        torch.set_num_threads(previous)


def _run_bench(preset_or_arch, frames, methods, budget, window_frames, repeats, tokens_per_frame,
               chunk_frames, attention, dtype, device, seed, warmup, on_row) -> list[BenchRow]:
    arch, preset = resolve_architecture(preset_or_arch)
    budget = budget or (preset.budget if preset else 4096)
    window_frames = window_frames or (preset.window_frames if preset else 16)
    tokens_per_frame = tokens_per_frame or arch.tokens_per_frame
    _check(frames, methods, budget, window_frames, repeats, tokens_per_frame, chunk_frames)
    model = build_language_model(arch, getattr(torch, dtype), device, seed)
    adapter = SyntheticAdapter(model, tokens_per_frame, seed=seed)
    if warmup:  # first calls allocate and pick kernels: keep that off every row's clock
        for method in methods:
            if method == TRANSFORMERS:
                transformers_forward(adapter, min(4, min(frames)))
                continue
            _run_once(adapter, _policy(method, budget, window_frames, tokens_per_frame),
                      min(4, min(frames)), chunk_frames, attention)
    rows = []
    for frame_count in frames:
        # Repeats are interleaved (every method once, then again): a machine that drifts
        # (other load, memory, clocks) then moves every method's median alike.
        policies = {m: _policy(m, budget, window_frames, tokens_per_frame)
                    for m in methods if m != TRANSFORMERS}
        runs: dict[str, list] = {m: [] for m in methods}
        for _ in range(repeats):
            for method in methods:
                if method == TRANSFORMERS:
                    runs[method].append(_transformers_run(adapter, frame_count))
                else:
                    runs[method].append(_run_once(adapter, policies[method], frame_count,
                                                  chunk_frames, attention))
        tokens = PREFIX_TOKENS + frame_count * tokens_per_frame
        for method in methods:
            if method == TRANSFORMERS:
                row = _transformers_row(adapter, frame_count, tokens, runs[method])
            else:
                row = _row(frame_count, tokens, method, policies[method], window_frames,
                           runs[method])
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _check(frames, methods, budget, window_frames, repeats, tokens_per_frame, chunk_frames,
           plain: bool = True) -> None:
    """Validate the benchmark's options; `plain`: the `transformers` runner may be listed."""
    from statekv.policies import check_method

    if not frames or min(frames) < 1:
        raise UsageError("--frames needs at least one positive frame count")
    if not methods:
        raise UsageError("--methods needs at least one method")
    for method in methods:
        if method == TRANSFORMERS and not plain:
            raise UsageError("--methods transformers is a measured run: not with --analytic "
                             "or --under-load (which runs it anyway)")
        if method != TRANSFORMERS:
            check_method(method, option="--methods")
    for name, value in (("--budget", budget), ("--window-frames", window_frames),
                        ("--repeats", repeats), ("tokens per frame", tokens_per_frame),
                        ("--chunk-frames", chunk_frames)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")


# under load: quiet against loaded, statekv against one transformers forward ------------------
# A busy process: spins until its deadline (so it ends by itself even if statekv is killed).
BUSY_LOOP = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end: pass\n"
TRANSFORMERS = "transformers"  # the runner name of the single full forward


@dataclass
class LoadRow:
    """One runner at one frame count, quiet and with `busy` competing processes, side by side.

    runner: a method run through statekv's chunked prefill, or "transformers" (one forward
    over all tokens with sdpa attention). slowdown = loaded median / quiet median."""

    frames: int
    runner: str
    tokens: int
    threads: int
    busy: int
    quiet_seconds: float
    loaded_seconds: float
    slowdown: float
    quiet_seconds_runs: list[float] = field(default_factory=list)
    loaded_seconds_runs: list[float] = field(default_factory=list)
    openmp_wait_policy: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BusyProcesses:
    """`count` CPU-bound Python processes for the length of a `with` block (at most
    `seconds`: each also stops by itself then). Always stopped on exit, Ctrl-C included."""

    def __init__(self, count: int, seconds: float = 600.0) -> None:
        self.count, self.seconds = count, seconds
        self.processes: list[Any] = []

    def __enter__(self) -> "BusyProcesses":
        import subprocess
        import sys

        try:
            for _ in range(self.count):
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-c", BUSY_LOOP, str(self.seconds)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.2)  # let them reach their loop before the clock starts
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()
        self.processes = []


def transformers_forward(adapter: SyntheticAdapter, frame_count: int) -> float:
    """Seconds of one plain transformers forward (sdpa) over the prefix and every frame at once:
    the same tokens and embeddings the chunked prefill gets, no statekv code on the path."""
    inputs = adapter.whole_video(frame_count)
    model = adapter.language_model
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            started = time.perf_counter()
            model(inputs_embeds=inputs.inputs_embeds, position_ids=inputs.position_ids,
                  use_cache=False)
            return time.perf_counter() - started
    finally:
        model.set_attn_implementation(previous)


def _transformers_run(adapter: SyntheticAdapter, frame_count: int) -> tuple[float, int]:
    """(seconds, peak memory bytes) of one plain transformers forward."""
    gc.collect()
    memory = accounting.PeakMemory(adapter.device)
    with memory:
        seconds = transformers_forward(adapter, frame_count)
    return seconds, memory.peak_bytes()


def _transformers_row(adapter: SyntheticAdapter, frame_count: int, tokens: int,
                      runs: list[tuple[float, int]]) -> BenchRow:
    """The LM benchmark's `transformers` row: one plain forward over the same tokens, per
    repeat; its FLOPs are full attention's over the whole sequence."""
    shape = accounting.LMShape.from_model(adapter.language_model, adapter.text_config)
    full = accounting.chunk_flops(shape, tokens, 0, mass=False)
    seconds = [run[0] for run in runs]
    return BenchRow(frames=frame_count, method=TRANSFORMERS, budget=None, window_frames=None,
                    tokens=tokens, lm_prefill_flops=full, full_lm_prefill_flops=full,
                    lm_prefill_seconds=statistics.median(seconds),
                    lm_prefill_seconds_runs=[round(x, 4) for x in seconds],
                    peak_memory_bytes=max(run[1] for run in runs))


def transformers_verdicts(rows: Sequence[BenchRow]) -> list[dict[str, Any]]:
    """Per (frames, method) next to a `transformers` row: the measured speed-up over the plain
    forward, the FLOP ratio (its FLOPs over the method's: the speed-up's limit) and the share
    of that limit reached (`of_limit`, speed-up / FLOP ratio)."""
    plain = {r.frames: r for r in rows if r.method == TRANSFORMERS}
    verdicts = []
    for r in rows:
        base = plain.get(r.frames)
        if r.method == TRANSFORMERS or base is None or not r.lm_prefill_seconds:
            continue
        speedup = base.lm_prefill_seconds / r.lm_prefill_seconds
        ratio = base.lm_prefill_flops / max(1, r.lm_prefill_flops)
        verdicts.append({"frames": r.frames, "method": r.method, "speedup": speedup,
                         "flop_ratio": ratio, "of_limit": speedup / ratio})
    return verdicts


def load_bench(
    preset_or_arch: str | Preset | Architecture = "bench-tiny",
    frames: Sequence[int] = (16,),
    methods: Sequence[str] = ("statekv",),
    busy: int = 2,
    *,
    budget: int | None = None,
    window_frames: int | None = None,
    repeats: int = 3,
    tokens_per_frame: int | None = None,
    chunk_frames: int = 1,
    attention: str = "sdpa",
    seed: int = 0,
    threads: int | str | None = None,
    busy_seconds: float = 600.0,
    on_row: Callable[[LoadRow], None] | None = None,
) -> list[LoadRow]:
    """statekv's LM prefill and transformers' single forward, quiet and under load.

    For every frame count, each repeat runs every runner quiet, then starts `busy` spinning
    processes and runs them all again, then stops the processes: quiet and loaded runs are
    back to back, so a machine whose background load drifts affects both alike. Seconds are
    medians over `repeats`. The busy processes live only while their runs do (each at most
    `busy_seconds`) and are killed on any exit, Ctrl-C included.
    """
    from statekv import threads as cpu_threads

    if busy < 0:
        raise UsageError(f"--under-load must be at least 0 busy processes, got {busy}")
    count = cpu_threads.resolve(threads)
    arch, preset = resolve_architecture(preset_or_arch)
    budget = budget or (preset.budget if preset else 4096)
    window_frames = window_frames or (preset.window_frames if preset else 16)
    tokens_per_frame = tokens_per_frame or arch.tokens_per_frame
    _check(frames, methods, budget, window_frames, repeats, tokens_per_frame, chunk_frames,
           plain=False)
    previous = torch.get_num_threads()
    cpu_threads.apply(count)
    try:
        model = build_language_model(arch, torch.float32, "cpu", seed)
        adapter = SyntheticAdapter(model, tokens_per_frame, seed=seed)
        runners: dict[str, Callable[[int], float]] = {
            method: _prefill_runner(adapter, _policy(method, budget, window_frames,
                                                     tokens_per_frame), chunk_frames, attention)
            for method in methods}
        runners[TRANSFORMERS] = lambda n: transformers_forward(adapter, n)
        for runner in runners.values():  # warm up: allocation and kernel choice off the clock
            runner(min(4, min(frames)))
        rows = []
        for frame_count in frames:
            quiet: dict[str, list[float]] = {name: [] for name in runners}
            loaded: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(repeats):
                for name, runner in runners.items():
                    quiet[name].append(runner(frame_count))
                with BusyProcesses(busy, busy_seconds):
                    for name, runner in runners.items():
                        loaded[name].append(runner(frame_count))
            for name in runners:
                row = _load_row(frame_count, name, PREFIX_TOKENS + frame_count * tokens_per_frame,
                                count, busy, quiet[name], loaded[name])
                rows.append(row)
                if on_row is not None:
                    on_row(row)
        return rows
    finally:
        torch.set_num_threads(previous)


def _prefill_runner(adapter, policy, chunk_frames, attention) -> Callable[[int], float]:
    def run(frame_count: int) -> float:
        gc.collect()
        result = prefill_chunks(adapter, synthetic_chunks(frame_count, chunk_frames), policy,
                                frame_count=frame_count, timestamps=(), attention=attention)
        return result.seconds.get("lm_prefill_seconds", 0.0)
    return run


def _load_row(frames, runner, tokens, threads, busy, quiet, loaded) -> LoadRow:
    from statekv import threads as cpu_threads

    quiet_median, loaded_median = statistics.median(quiet), statistics.median(loaded)
    return LoadRow(frames=frames, runner=runner, tokens=tokens, threads=threads, busy=busy,
                   quiet_seconds=quiet_median, loaded_seconds=loaded_median,
                   slowdown=loaded_median / quiet_median if quiet_median > 0 else math.nan,
                   quiet_seconds_runs=[round(t, 4) for t in quiet],
                   loaded_seconds_runs=[round(t, 4) for t in loaded],
                   openmp_wait_policy=cpu_threads.openmp_wait_policy())


def load_verdicts(rows: Sequence[LoadRow], allowance: float = 1.5) -> list[dict[str, Any]]:
    """Per (frames, method): statekv's slowdown against transformers' at the same frame count,
    and whether it stays within `allowance` x transformers' (the issue's target: +50%)."""
    reference = {r.frames: r.slowdown for r in rows if r.runner == TRANSFORMERS}
    verdicts = []
    for r in rows:
        if r.runner == TRANSFORMERS or r.frames not in reference:
            continue
        limit = reference[r.frames] * allowance
        verdicts.append({"frames": r.frames, "method": r.runner, "slowdown": r.slowdown,
                         "transformers_slowdown": reference[r.frames], "limit": limit,
                         "within": r.slowdown <= limit})
    return verdicts


# analytic mode -----------------------------------------------------------------------------
def analytic_bench(
    preset_or_arch: str | Preset | Architecture = "internvl3-1b",
    frames: Sequence[int] = (512, 3600),
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    budget: int | None = None,
    window_frames: int | None = None,
    tokens_per_frame: int | None = None,
    chunk_frames: int = 1,
    element_size: int = 2,
    on_row: Callable[[BenchRow], None] | None = None,
) -> list[BenchRow]:
    """The benchmark table from the architecture numbers alone: FLOPs and memory, no seconds.

    Uses the engine's own per-chunk accounting (the loop's formula, the same carried-state
    sizes), so a measured run of the same shape reports the same FLOPs. Memory is weights +
    detailed cache + the largest chunk's activations, at `element_size` bytes (2 = bf16).
    """
    arch, preset = resolve_architecture(preset_or_arch)
    budget = budget or (preset.budget if preset else 4096)
    window_frames = window_frames or (preset.window_frames if preset else 16)
    tokens_per_frame = tokens_per_frame or arch.tokens_per_frame
    _check(frames, methods, budget, window_frames, 1, tokens_per_frame, chunk_frames,
           plain=False)
    shape = accounting.LMShape.from_config(text_config(arch))
    parameters = preset.parameters if preset else 0
    rows = []
    for frame_count in frames:
        chunks = [PREFIX_TOKENS] + [
            tokens_per_frame * min(chunk_frames, frame_count - first)
            for first in range(0, frame_count, chunk_frames)]
        for method in methods:
            policy = _policy(method, budget, window_frames, tokens_per_frame)
            row = _analytic_row(shape, arch, parameters, element_size, chunks, policy,
                                frame_count, method, window_frames)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _analytic_row(shape, arch, parameters, element_size, chunks, policy, frame_count, method,
                  window_frames) -> BenchRow:
    per_chunk = accounting.policy_chunk_flops(shape, chunks, policy)
    full = accounting.policy_chunk_flops(shape, chunks, make_policy("full"))
    total = sum(chunks)
    carried = total if policy.capacity is None else min(policy.capacity, total)
    detailed = total * shape.kv_bytes_per_token(element_size)
    memory = accounting.estimate_memory(
        shape, parameters, element_size, total, max(chunks[1:]), carried,
        arch.hidden, arch.intermediate, mass=policy.needs_mass).peak_memory_bytes
    return BenchRow(
        frames=frame_count, method=method, budget=policy.budget,
        window_frames=window_frames if method == "window" else None, tokens=total,
        lm_prefill_flops=sum(per_chunk), full_lm_prefill_flops=sum(full),
        last_chunk_flops=per_chunk[-1], peak_memory_bytes=memory,
        detailed_cache_bytes=detailed, carried_tokens=carried, analytic=True,
    )


# decode rate -------------------------------------------------------------------------------
def decode_rates(
    preset_or_arch: str | Preset | Architecture = "bench-tiny",
    frames: int = 64,
    questions: int = 8,
    new_tokens: int = 32,
    question_tokens: int = 16,
    method: str = "statekv",
    *,
    budget: int | None = None,
    window_frames: int | None = None,
    seed: int = 0,
) -> list[float]:
    """Decode tokens/s of each of `questions` successive questions on one prefilled session.

    Each question is prefilled after the video, then `new_tokens` tokens are decoded one at a
    time over the detailed cache, then the cache is rewound: the rate must not fall with the
    number of questions already asked.
    """
    arch, preset = resolve_architecture(preset_or_arch)
    budget = budget or (preset.budget if preset else 4096)
    window_frames = window_frames or (preset.window_frames if preset else 16)
    model = build_language_model(arch, seed=seed)
    adapter = SyntheticAdapter(model, arch.tokens_per_frame, seed=seed)
    policy = _policy(method, budget, window_frames, arch.tokens_per_frame)
    with torch.inference_mode():
        result = prefill_chunks(adapter, synthetic_chunks(frames, 1), policy, frame_count=frames,
                         timestamps=())
        cache = result.cache
        rates = []
        for _ in range(questions):
            forward_chunk(adapter, cache, adapter.token_chunk([0] * question_tokens,
                                                              cache.detailed_tokens))
            started = time.perf_counter()
            for _ in range(new_tokens):
                forward_chunk(adapter, cache, adapter.token_chunk([0], cache.detailed_tokens))
            rates.append(new_tokens / (time.perf_counter() - started))
            cache.rewind()
    return rates


# output ------------------------------------------------------------------------------------
def write_csv(rows: Sequence[BenchRow], path: str) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row.to_dict())


def speedups(rows: Sequence[BenchRow]) -> dict[tuple[int, str], float]:
    """Measured seconds of `full` over each method's, per (frames, method)."""
    full = {r.frames: r.lm_prefill_seconds for r in rows if r.method == "full"}
    return {(r.frames, r.method): full[r.frames] / r.lm_prefill_seconds
            for r in rows if r.frames in full and r.lm_prefill_seconds and full[r.frames]}


def plot(rows: Sequence[BenchRow], path: str, title: str = "") -> None:
    """FLOPs and seconds against frames, one line per method (matplotlib: the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'statekv[plot]'") from None
    measured = any(r.lm_prefill_seconds is not None for r in rows)
    panels = 2 if measured else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    for method in dict.fromkeys(r.method for r in rows):
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.frames)
        xs = [r.frames for r in mine]
        axes[0][0].plot(xs, [r.lm_prefill_flops for r in mine], marker="o", label=method)
        if measured:
            axes[0][1].plot(xs, [r.lm_prefill_seconds for r in mine], marker="o", label=method)
    labels = ["LM prefill FLOPs", "LM prefill seconds (median)"]
    for ax, label in zip(axes[0], labels):
        ax.set_xlabel("frames")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

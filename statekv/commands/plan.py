"""Options, planning and the memory preflight shared by every command that runs a model.

`RunOptions` is what the command line (or a script) asks for; `resolve` fills in the
preset's defaults; `plan_run` probes the video and predicts FLOPs and memory before any
weights load, so a bad file or an oversized run fails in a second, not after the load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from statekv import accounting, threads as cpu_threads
from statekv.context import Context, check_question, context_of, frames_that_fit, trained_positions
from statekv.units import format_bytes
from statekv.errors import UsageError
from statekv.policies import check_method, make_policy
from statekv.presets import DEFAULT_PRESET, Preset, load_preset
from statekv.loading import ELEMENT_SIZES

if TYPE_CHECKING:  # torch and transformers load only when a model runs: options, plans and
    # `info` from a preset's numbers answer in well under a second (numpy: with the video)
    from statekv import video
    from statekv.prefill import PrefillEvent
    from statekv.session import Model, Session


@dataclass
class RunOptions:
    """Options shared by the commands that run a model; None means "the preset's default"."""

    preset: str | None = None
    model: str | None = None
    method: str | None = None
    budget: int | None = None
    window_frames: int | None = None
    max_frames: int | str | None = None  # or "fit": as many as fit in the trained context
    fps: float | None = None
    start: float | None = None
    end: float | None = None
    chunk_frames: int | None = None
    max_new_tokens: int | None = None
    device: str = "auto"
    dtype: str | None = None
    seed: int = 0
    attention: str = "sdpa"
    pin_prefix: bool = False
    trust_remote_code: bool = False
    backend: str = "auto"
    force: bool = False  # run even if the memory preflight says it will not fit
    cache: str | None = None  # prefill cache folder (commands/cache.py); None: $STATEKV_CACHE
    threads: int | str | None = None  # N, "auto"; None: STATEKV_THREADS, OMP_NUM_THREADS, auto

    def validate(self) -> None:
        """Reject bad values before any work (budget, window, frames >= 1)."""
        if isinstance(self.max_frames, str) and self.max_frames != "fit":
            raise UsageError(f"--max-frames takes a number or 'fit', got {self.max_frames!r}")
        for name in ("budget", "window_frames", "max_frames", "chunk_frames", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and value < 1:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be at least 1, got {value}")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise UsageError(f"--fps must be a positive number, got {self.fps}")
        if self.start is not None and self.start < 0:
            raise UsageError(f"--start must not be negative, got {self.start}")
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise UsageError(f"--start ({self.start}s) must be before --end ({self.end}s)")
        if self.method is not None:
            check_method(self.method)
        if self.attention not in ("sdpa", "eager"):
            raise UsageError(f"unknown attention {self.attention!r}; use sdpa or eager")
        cpu_threads.check(self.threads)


@dataclass
class Resolved:
    """Options with the preset's defaults filled in."""

    preset: Preset
    model: str
    method: str
    budget: int
    window_frames: int
    max_frames: int | str  # "fit" until plan_run knows the video and the model's context
    fps: float | None
    chunk_frames: int | None
    max_new_tokens: int
    dtype: str


def resolve(options: RunOptions) -> Resolved:
    options.validate()
    preset = load_preset(options.preset or DEFAULT_PRESET)
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return Resolved(
        preset=preset,
        model=options.model or preset.model,
        method=pick(options.method, preset.method),
        budget=pick(options.budget, preset.budget),
        window_frames=pick(options.window_frames, preset.window_frames),
        max_frames=pick(options.max_frames, preset.max_frames),
        fps=pick(options.fps, preset.fps),
        chunk_frames=pick(options.chunk_frames, preset.chunk_frames),
        max_new_tokens=pick(options.max_new_tokens, preset.max_new_tokens),
        dtype=pick(options.dtype, preset.dtype),
    )


def load_model(options: RunOptions, resolved: Resolved | None = None) -> tuple[Model, Resolved]:
    """Resolve the options (unless already resolved) and load the model once; reuse it."""
    resolved = resolved or resolve(options)
    from statekv.session import load

    model = load(resolved.model, device=options.device, dtype=resolved.dtype,
                 revision=resolved.preset.revision if not options.model else None,
                 trust_remote_code=options.trust_remote_code,
                 threads=cpu_threads.resolve(options.threads))
    return model, resolved


def prefill_video(model: Model, resolved: Resolved, options: RunOptions, path: str, method: str,
            on_event: Callable[[PrefillEvent], None] | None = None) -> Session:
    """Prefill one video with `method` and the resolved options, through the prefill cache
    when one is on (`options.cache` or $STATEKV_CACHE; then `session.cache` is hit/miss)."""
    from statekv.commands.cache import cache_dir, cached_prefill

    directory = cache_dir(options.cache)
    run = lambda: _prefill(model, resolved, options, path, method, on_event)  # noqa: E731
    if directory is None:
        return run()
    return cached_prefill(model, resolved, options, path, method, directory, run)


def _prefill(model: Model, resolved: Resolved, options: RunOptions, path: str, method: str,
             on_event: Callable[[PrefillEvent], None] | None = None) -> Session:
    return model.prefill(
        path, max_frames=resolved.max_frames, fps=resolved.fps, start=options.start,
        end=options.end, backend=options.backend, method=method, budget=resolved.budget,
        window_frames=resolved.window_frames, chunk_frames=resolved.chunk_frames,
        system_prompt=resolved.preset.system_prompt, pin_prefix=options.pin_prefix,
        attention=options.attention, max_new_tokens=resolved.max_new_tokens,
        seed=options.seed, on_event=on_event)


# info and the memory preflight: predictions without weights ----------------------------
@dataclass
class RunPlan:
    """What a run will sample and cost, known before any weights load."""

    probe: video.VideoInfo
    frames: video.FramePlan
    resolved: Resolved
    layout: "Layout"
    chunks: list[int]
    flops: dict[str, int]
    memory: accounting.MemoryEstimate
    device: str  # "cpu", "cuda", "cuda:N" or "mps", as `--device auto` resolves here
    dtype: str  # what the weights would be loaded in: float32, bfloat16 or float16
    warnings: list[str] = field(default_factory=list)
    context: Context | None = None


def plan_run(path: str, options: RunOptions) -> RunPlan:
    """Probe the video, plan its frames and predict FLOPs per method and memory."""
    from statekv import video
    from statekv.loading import device_type, dtype_name

    resolved = resolve(options)
    probe = video.probe(path)
    timestamps = video.frame_timestamps(path)
    layout_of = _layout_maker(resolved, options, probe)

    def plan_of(frames: int) -> video.FramePlan:
        return video.plan_frames(probe, frames, fps=resolved.fps, start=options.start,
                                 end=options.end, timestamps=timestamps)

    def tokens_for(frames: int) -> int:
        return sum(layout_of(plan_of(frames)).tokens) if frames else 0

    if resolved.max_frames == "fit":
        resolved.max_frames = _fit(len(plan_of(max(1, probe.frame_count)).indices), tokens_for,
                                   layout_of(plan_of(1)).trained_positions, resolved.preset)
    plan = plan_of(resolved.max_frames)
    kind = device_type(options.device)
    device = kind if options.device in ("auto", "cpu") else options.device
    dtype = dtype_name(resolved.dtype, options.device)
    layout = layout_of(plan)
    context = context_of(layout.trained_positions, layout.tokens, len(plan.indices), tokens_for)
    chunks = accounting.chunk_sizes(layout.tokens, resolved.chunk_frames or layout.frames_per_unit)
    flops = {}
    for method in ("full", "window", "statekv"):
        policy = make_policy(method, budget=resolved.budget,
                             window_tokens=resolved.window_frames * layout.tokens_per_frame,
                             window_frames=resolved.window_frames, layout=layout.tokens)
        flops[method] = accounting.predict_lm_flops(layout.shape, chunks, policy, options.pin_prefix)
    total = sum(chunks)
    statekv = resolved.method == "statekv"
    memory = accounting.estimate_memory(
        layout.shape, layout.parameters, ELEMENT_SIZES[dtype], total,
        max(chunks[1:], default=0), min(resolved.budget, total) if statekv else 0,
        layout.hidden, layout.intermediate, mass=statekv)
    warning = demo_warning(resolved.model, probe)
    return RunPlan(probe, plan, resolved, layout, chunks, flops, memory, device, dtype,
                   [warning] if warning else [], context)


def demo_warning(model: str, probe: Any) -> str | None:
    """A one-line warning when a shipped demo model is pointed at a video that is not one of
    its synthetic ones (square, of its task's frame size): its answer means nothing."""
    from statekv.demo import lockers, synthetic

    size = {"statekv/demo": synthetic.FRAME_SIZE,  # the bundled models (statekv.loading.BUNDLED)
            "statekv/demo-lockers": lockers.FRAME_SIZE}.get(model)
    if size is None or (probe.width, probe.height) == (size, size):
        return None
    return (f"the demo model {model} only understands statekv's synthetic {size}x{size} "
            f"videos (see `statekv demo`); on this {probe.width}x{probe.height} video its answers "
            f"are noise; use a real model, e.g. --preset {DEFAULT_PRESET}")


def _fit(frames: int, tokens_for: Callable[[int], int], trained: int | None, preset: Preset) -> int:
    """`--max-frames fit`: the most frames that fit with the answer room (the preset's
    --max-frames when the checkpoint states no trained context)."""
    fit = frames_that_fit(frames, tokens_for, trained)
    if fit is None:
        return min(frames, preset.max_frames)
    if fit == 0:
        raise UsageError(f"--max-frames fit: not even one frame fits in the model's trained "
                         f"context of {trained} positions with the answer room")
    return fit


def refuse_unfit_questions(run: RunPlan, questions: list[str]) -> None:
    """Before any weights load: refuse a question that cannot fit in the trained context at
    all (known when the checkpoint's processor is at hand; else the session checks it)."""
    adapter = run.layout.adapter
    if adapter is None or run.context is None:
        return
    prompt = adapter.prompt(run.resolved.preset.system_prompt)
    for question in questions:
        check_question(run.layout.tokens[0], len(adapter.tokenize(prompt.question_text(question))),
                       run.context.trained_positions)


def preflight(plan: RunPlan, force: bool) -> None:
    """Refuse a run that will not fit in free memory (RAM, or the GPU's), unless forced."""
    from statekv.errors import ResourceError
    
    need, free = plan.memory.peak_memory_bytes, accounting.available_memory(plan.device)
    if force or need <= free:
        return
    where = "GPU memory" if plan.device.startswith("cuda") else "free RAM"
    raise ResourceError(
        f"this run needs about {format_bytes(need)} (weights {format_bytes(plan.memory.weights_bytes)}, "
        f"detailed cache {format_bytes(plan.memory.detailed_cache_bytes)}) but only "
        f"{format_bytes(free)} of {where} is available; use fewer --max-frames, a lower --fps, "
        f"a smaller preset or --dtype bfloat16, or --force to try anyway")


@dataclass
class Layout:
    """What a prediction needs: token counts (prefix, then per frame) and the model's shape."""

    tokens: list[int]
    shape: accounting.LMShape
    parameters: int
    hidden: int
    intermediate: int
    tokens_per_frame: int
    frames_per_unit: int = 1
    exact: bool = False
    trained_positions: int | None = None  # the language model's trained context
    adapter: Any = None  # the weightless adapter that laid the tokens out (exact layouts)


def _layout_maker(resolved: Resolved, options: RunOptions, probe) -> Callable[[Any], Layout]:
    """Plan -> token layout: exact from the checkpoint's processor when it is at hand (one
    weightless adapter for every plan asked about), else the preset's estimate."""
    checkpoint = _local_checkpoint(resolved.model)
    meta = _meta_adapter(checkpoint, options) if checkpoint is not None else None
    watched = min(options.end or probe.duration_seconds, probe.duration_seconds) - (options.start or 0.0)
    arch = resolved.preset.architecture

    def estimate(plan) -> Layout:
        shape = accounting.LMShape.from_config(_ArchConfig(arch))
        # Without the processor: the preset's visual tokens plus a few for each frame's label.
        tokens = [32] + [arch.tokens_per_frame + 8] * len(plan.indices)
        return Layout(tokens, shape, resolved.preset.parameters, arch.hidden, arch.intermediate,
                      arch.tokens_per_frame, trained_positions=resolved.preset.trained_positions)

    def layout_of(plan) -> Layout:
        exact = None if meta is None else _exact_layout(meta, resolved, probe, plan, watched)
        return exact if exact is not None else estimate(plan)

    return layout_of


def _local_checkpoint(model: str) -> str | None:
    import os

    from statekv.errors import ModelError
    from statekv.loading import BUNDLED, maybe_cached, resolve_checkpoint

    if model not in BUNDLED and Path(model).is_dir():  # ("statekv/demo" is also a source folder)
        return model
    if not maybe_cached(model):
        return None
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # info never downloads
    try:
        return resolve_checkpoint(model)
    except ModelError:
        return None
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _meta_adapter(checkpoint: str, options: RunOptions) -> Any:
    """The family adapter on a weightless (meta) model: token layouts without any weights."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import torch

    from statekv.loading import read_config
    from statekv.models import adapter_for

    config = read_config(checkpoint, options.trust_remote_code)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=options.trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForImageTextToText.from_config(config)
    return adapter_for(config.model_type)(meta, processor)


def _exact_layout(adapter: Any, resolved: Resolved, probe, plan, watched: float | None
                  ) -> Layout | None:
    """Ask the weightless adapter for the token layout of `plan`."""
    prompt = adapter.prompt(resolved.preset.system_prompt)
    hw = _decoded_hw(adapter, probe, plan)
    tokens = adapter.layout_tokens(len(plan.indices), tuple(plan.timestamps), prompt,
                                   frame_size=hw, duration=watched)
    if tokens is None:
        return None
    text = adapter.text_config
    return Layout(tokens, accounting.LMShape.from_model(adapter.language_model, text),
                  sum(p.numel() for p in adapter.model.parameters()), text.hidden_size,
                  text.intermediate_size, adapter.tokens_per_frame(*hw, frames=len(plan.indices)),
                  adapter.frames_per_unit, exact=True,
                  trained_positions=trained_positions(text), adapter=adapter)


def _decoded_hw(adapter, probe, plan) -> tuple[int, int]:
    size = adapter.decode_size(probe.height, probe.width, frames=len(plan.indices))
    return (probe.height, probe.width) if size is None else (size[1], size[0])


@dataclass(frozen=True)
class _ArchConfig:
    """A preset's architecture seen through the config attribute names LMShape reads."""

    arch: Any

    def __getattr__(self, name: str) -> Any:
        a = self.arch
        mapping = {"hidden_size": a.hidden, "num_attention_heads": a.heads,
                   "num_key_value_heads": a.kv_heads, "head_dim": a.resolved_head_dim,
                   "num_hidden_layers": a.layers, "intermediate_size": a.intermediate}
        if name in mapping:
            return mapping[name]
        raise AttributeError(name)


def read_questions(path: str) -> list[str]:
    """`--questions FILE`: .txt one per line, .yaml/.yml a list of strings."""
    import yaml

    from statekv.errors import InputError

    file = Path(path)
    if not file.is_file():
        raise InputError(f"questions file not found: {path}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read questions file {path}: {exc}") from None
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            raise InputError(f"questions file {path} is not valid YAML") from None
        if not isinstance(data, list) or not all(isinstance(q, str) for q in data):
            raise InputError(f"questions file {path} must hold a YAML list of strings")
        questions = [q.strip() for q in data if q.strip()]
    else:
        questions = [line.strip() for line in text.splitlines() if line.strip()]
    if not questions:
        raise InputError(f"questions file {path} holds no questions")
    return questions

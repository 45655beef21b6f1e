"""What the commands do, as library functions: resolve options, run, return records.

Each function returns the JSON record CONTRACTS.md fixes for its command, so the CLI only
parses, calls one of these and renders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from statekv import accounting, predict, video
from statekv.errors import UsageError
from statekv.policies import METHODS, make_policy
from statekv.presets import DEFAULT_PRESET, Preset, load_preset
from statekv.prefill import PrefillEvent
from statekv.session import Model, Session, load


@dataclass
class RunOptions:
    """Options shared by the commands that run a model; None means "the preset's default"."""

    preset: str | None = None
    model: str | None = None
    method: str | None = None
    budget: int | None = None
    window_frames: int | None = None
    max_frames: int | None = None
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

    def validate(self) -> None:
        """Reject bad values before any work (CONTRACTS.md: budget, window, frames >= 1)."""
        for name in ("budget", "window_frames", "max_frames", "chunk_frames", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be at least 1, got {value}")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise UsageError(f"--fps must be a positive number, got {self.fps}")
        if self.start is not None and self.start < 0:
            raise UsageError(f"--start must not be negative, got {self.start}")
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise UsageError(f"--start ({self.start}s) must be before --end ({self.end}s)")
        if self.method is not None and self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.attention not in ("sdpa", "eager"):
            raise UsageError(f"unknown attention {self.attention!r}; use sdpa or eager")


@dataclass
class Resolved:
    """Options with the preset's defaults filled in."""

    preset: Preset
    model: str
    method: str
    budget: int
    window_frames: int
    max_frames: int
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
    model = load(resolved.model, device=options.device, dtype=resolved.dtype,
                 revision=resolved.preset.revision if not options.model else None,
                 trust_remote_code=options.trust_remote_code)
    return model, resolved


def prefill(model: Model, resolved: Resolved, options: RunOptions, path: str, method: str,
            on_event: Callable[[PrefillEvent], None] | None = None) -> Session:
    """Prefill one video with `method` and the resolved options."""
    return model.prefill(
        path, max_frames=resolved.max_frames, fps=resolved.fps, start=options.start,
        end=options.end, backend=options.backend, method=method, budget=resolved.budget,
        window_frames=resolved.window_frames, chunk_frames=resolved.chunk_frames,
        system_prompt=resolved.preset.system_prompt, pin_prefix=options.pin_prefix,
        attention=options.attention, max_new_tokens=resolved.max_new_tokens,
        seed=options.seed, on_event=on_event)


def ask(path: str, questions: list[str], options: RunOptions, model: Model | None = None,
        on_event: Callable[[PrefillEvent], None] | None = None) -> dict[str, Any]:
    """`statekv ask`: one prefill, every answer; the CONTRACTS.md record."""
    if not questions:
        raise UsageError("give at least one question (or --questions FILE)")
    run = plan_run(path, options)  # a bad file or option fails before the model loads
    resolved = run.resolved
    if model is None:
        preflight(run, options.force)
        model, _ = load_model(options, resolved)
    session = prefill(model, resolved, options, path, resolved.method, on_event)
    answers = session.ask(questions, resolved.max_new_tokens)
    return {"path": path, "settings": session.settings.to_dict(),
            "answers": [a.to_dict() for a in answers], "stats": session.stats.to_dict(),
            "warnings": session.warnings}


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(reference || other) of two log-probability vectors, in nats."""
    return float(torch.sum(reference.exp() * (reference - other)).clamp_min(0.0))


FLATTENED = ("lm_prefill_flops", "vision_flops", "lm_prefill_seconds", "peak_memory_bytes",
             "carried_tokens", "detailed_tokens")


def compare(path: str, question: str, methods: list[str], options: RunOptions,
            model: Model | None = None,
            on_method: Callable[[str], Callable[[PrefillEvent], None] | None] | None = None,
            ) -> dict[str, Any]:
    """`statekv compare`: every method on the same frames; agreement with full."""
    for method in methods:
        if method not in METHODS:
            raise UsageError(f"unknown method {method!r} in --methods; choose from {', '.join(METHODS)}")
    run = plan_run(path, options)  # a bad file or option fails before the model loads
    resolved = run.resolved
    if model is None:
        preflight(run, options.force)
        model, _ = load_model(options, resolved)
    order = (["full"] if "full" not in methods else []) + list(methods)
    results: dict[str, tuple[Session, Any]] = {}
    for method in dict.fromkeys(order):  # full first: the others are compared with it
        session = prefill(model, resolved, options, path, method,
                          on_method(method) if on_method else None)
        results[method] = (session, session.ask([question], resolved.max_new_tokens)[0])
    full_answer = results["full"][1]
    rows = [_compare_row(method, *results[method], full_answer) for method in methods]
    settings = results[methods[0]][0].settings.to_dict()
    shared = {k: v for k, v in settings.items() if k not in ("method", "budget", "window_frames")}
    return {"path": path, "question": question, "settings": shared, "methods": rows}


def _compare_row(method, session, answer, full_answer) -> dict[str, Any]:
    stats = session.stats.to_dict()
    return {"method": method, "budget": session.settings.budget,
            "window_frames": session.settings.window_frames, "answer": answer.answer,
            "agrees_with_full": answer.answer == full_answer.answer,
            "first_token_kl_vs_full": kl_divergence(full_answer.first_token_logprobs,
                                                    answer.first_token_logprobs),
            **{key: stats[key] for key in FLATTENED}, "stats": stats,
            "warnings": session.warnings}


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
    device: torch.device


def plan_run(path: str, options: RunOptions) -> RunPlan:
    """Probe the video, plan its frames and predict FLOPs per method and memory."""
    from statekv.loading import resolve_device

    resolved = resolve(options)
    probe = video.probe(path)
    plan = video.plan_frames(probe, resolved.max_frames, fps=resolved.fps, start=options.start,
                             end=options.end, timestamps=video.frame_timestamps(path))
    device = resolve_device(options.device)
    layout = _layout(resolved, options, probe, plan)
    chunks = predict.chunk_sizes(layout.tokens, resolved.chunk_frames or layout.frames_per_unit)
    flops = {}
    for method in ("full", "window", "statekv"):
        policy = make_policy(method, budget=resolved.budget,
                             window_tokens=resolved.window_frames * layout.tokens_per_frame)
        flops[method] = predict.predict_lm_flops(layout.shape, chunks, policy, options.pin_prefix)
    total = sum(chunks)
    statekv = resolved.method == "statekv"
    memory = accounting.estimate_memory(
        layout.shape, layout.parameters, _element_size(resolved.dtype, device), total,
        max(chunks[1:], default=0), min(resolved.budget, total) if statekv else 0,
        layout.hidden, layout.intermediate, mass=statekv)
    return RunPlan(probe, plan, resolved, layout, chunks, flops, memory, device)


def preflight(plan: RunPlan, force: bool) -> None:
    """Refuse a run that will not fit in free memory (RAM, or the GPU's), unless forced."""
    from statekv.errors import ResourceError
    
    need, free = plan.memory.peak_memory_bytes, predict.available_memory(plan.device)
    if force or need <= free:
        return
    where = "GPU memory" if plan.device.type == "cuda" else "free RAM"
    raise ResourceError(
        f"this run needs about {predict.human_bytes(need)} (weights {predict.human_bytes(plan.memory.weights_bytes)}, "
        f"detailed cache {predict.human_bytes(plan.memory.detailed_cache_bytes)}) but only "
        f"{predict.human_bytes(free)} of {where} is available; use fewer --max-frames, a lower --fps, "
        f"a smaller preset or --dtype bfloat16, or --force to try anyway")


def info(path: str, options: RunOptions) -> dict[str, Any]:
    """`statekv info`: the probe, what would be sampled, and predicted cost per method."""
    run = plan_run(path, options)
    probe = run.probe
    return {"path": path, "duration_seconds": probe.duration_seconds, "fps": probe.fps,
            "frame_count": probe.frame_count, "width": probe.width, "height": probe.height,
            "codec": probe.codec, "sampled_frames": len(run.frames.indices),
            "frame_timestamps": list(run.frames.timestamps),
            "tokens_per_frame": run.layout.tokens_per_frame,
            "model": run.resolved.model, "preset": run.resolved.preset.name,
            "predicted": {"methods": {m: {"lm_prefill_flops": f} for m, f in run.flops.items()},
                          "detailed_cache_bytes": run.memory.detailed_cache_bytes,
                          "weights_bytes": run.memory.weights_bytes,
                          "peak_memory_bytes": run.memory.peak_memory_bytes,
                          "available_memory_bytes": predict.available_memory(run.device),
                          "exact_layout": run.layout.exact}}


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


def _element_size(dtype: str, device: torch.device) -> int:
    from statekv.loading import resolve_dtype

    return torch.empty((), dtype=resolve_dtype(dtype, device)).element_size()


def _layout(resolved: Resolved, options: RunOptions, probe, plan) -> Layout:
    """Exact token layout from the checkpoint's processor when it is at hand, else the preset's."""
    checkpoint = _local_checkpoint(resolved.model)
    if checkpoint is not None:
        exact = _exact_layout(checkpoint, resolved, probe, plan, options)
        if exact is not None:
            return exact
    arch = resolved.preset.architecture
    shape = accounting.LMShape.from_config(_ArchConfig(arch))
    # Without the processor: the preset's visual tokens plus a few for each frame's label.
    tokens = [32] + [arch.tokens_per_frame + 8] * len(plan.indices)
    return Layout(tokens, shape, resolved.preset.parameters, arch.hidden, arch.intermediate,
                  arch.tokens_per_frame)


def _local_checkpoint(model: str) -> str | None:
    from statekv.loading import resolve_checkpoint
    from statekv.errors import ModelError
    import os

    if Path(model).is_dir():
        return model
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


def _exact_layout(checkpoint: str, resolved: Resolved, probe, plan, options: RunOptions):
    """Build the adapter on a weightless (meta) model and ask it for the token layout."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from statekv.loading import read_config
    from statekv.models import adapter_for

    config = read_config(checkpoint, options.trust_remote_code)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=options.trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForImageTextToText.from_config(config)
    adapter = adapter_for(config.model_type)(meta, processor)
    prompt = adapter.prompt(resolved.preset.system_prompt)
    tokens = adapter.layout_tokens(len(plan.indices), tuple(plan.timestamps), prompt,
                                   frame_size=_decoded_hw(adapter, probe, plan))
    if tokens is None:
        return None
    text = adapter.text_config
    return Layout(tokens, accounting.LMShape.from_model(adapter.language_model, text),
                  sum(p.numel() for p in meta.parameters()), text.hidden_size,
                  text.intermediate_size, adapter.tokens_per_frame(*_decoded_hw(adapter, probe, plan),
                                          frames=len(plan.indices)),
                  adapter.frames_per_unit,
                  exact=True)


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


__all__ = ["RunOptions", "ask", "compare", "info", "read_questions", "load_model", "prefill",
           "resolve", "kl_divergence"]

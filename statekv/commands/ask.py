"""`statekv ask`, `compare` and `info`: one video, one model, records as docs/formats.md states.

Each function returns the JSON record of its command, so the CLI only parses, calls one of
these and renders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from statekv import accounting
from statekv.commands.plan import (RunOptions, load_model, plan_run, preflight, prefill_video,
                                   refuse_unfit_questions)
from statekv.errors import UsageError
from statekv.policies import check_method

if TYPE_CHECKING:  # torch loads with the model, after the options and the video are checked
    import torch

    from statekv.prefill import PrefillEvent
    from statekv.session import Model, Session


def ask(path: str, questions: list[str], options: RunOptions, model: Model | None = None,
        on_event: Callable[[PrefillEvent], None] | None = None) -> dict[str, Any]:
    """`statekv ask`: one prefill, every answer; the record of docs/formats.md. A prefill file
    (.skv) is answered from without a prefill (commands/prefill.py ask_saved)."""
    from statekv.commands.prefill import ask_saved, cache_fields
    from statekv.saved import is_prefill_file

    if is_prefill_file(path):
        return ask_saved(path, questions, options, model)
    check_questions(questions)
    run = plan_run(path, options)  # a bad file or option fails before the model loads
    resolved = run.resolved
    refuse_unfit_questions(run, questions)
    if model is None:
        preflight(run, options.force)
        model, _ = load_model(options, resolved)
    session = prefill_video(model, resolved, options, path, resolved.method, on_event)
    answers = session.ask(questions, resolved.max_new_tokens)
    return cache_fields(session, {
        "path": path, "settings": session.settings.to_dict(),
        "answers": [a.to_dict() for a in answers], "stats": session.stats.to_dict(),
        "warnings": run.warnings + session.warnings})


def check_questions(questions: list[str]) -> None:
    """A UsageError when there is nothing to ask (checked before anything loads)."""
    if not questions:
        raise UsageError("give at least one question (or --questions FILE)")


def check_compare(methods: list[str], options: RunOptions) -> None:
    """compare's option errors, before anything loads."""
    options.validate()
    if not methods:
        raise UsageError("give at least one method to --methods, e.g. full,window,statekv")
    for method in methods:
        check_method(method, option="--methods")


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(reference || other) of two log-probability vectors, in nats."""
    import torch

    return float(torch.sum(reference.exp() * (reference - other)).clamp_min(0.0))


FLATTENED = ("lm_prefill_flops", "vision_flops", "lm_prefill_seconds", "peak_memory_bytes",
             "carried_tokens", "detailed_tokens")


def compare(path: str, question: str, methods: list[str], options: RunOptions,
            model: Model | None = None,
            on_method: Callable[[str], Callable[[PrefillEvent], None] | None] | None = None,
            ) -> dict[str, Any]:
    """`statekv compare`: every method on the same frames; agreement with full."""
    check_compare(methods, options)
    run = plan_run(path, options)  # a bad file or option fails before the model loads
    resolved = run.resolved
    refuse_unfit_questions(run, [question])
    if model is None:
        preflight(run, options.force)
        model, _ = load_model(options, resolved)
    order = (["full"] if "full" not in methods else []) + list(methods)
    runs: dict[str, dict[str, Any]] = {}
    # Each method's peak is read above one baseline taken before the first: the previous
    # session is dropped and its memory handed back before the next starts, so no figure
    # depends on the order (tests/test_cli.py runs two orders). full runs first (when not
    # asked for, it is added as the reference).
    baseline = accounting.release_memory(model.device)
    for method in dict.fromkeys(order):
        session = prefill_video(model, resolved, options, path, method,
                                on_method(method) if on_method else None)
        runs[method] = _measured(session, session.ask([question], resolved.max_new_tokens)[0],
                                 baseline)
        del session
        accounting.release_memory(model.device)
    full_answer = runs["full"]["answer"]
    rows = [_compare_row(method, runs[method], full_answer) for method in methods]
    shared = {k: v for k, v in runs[methods[0]]["settings"].items()
              if k not in ("method", "budget", "window_frames")}
    return {"path": path, "question": question, "settings": shared,
            "memory_baseline_bytes": baseline, "methods": rows,
            "warnings": run.warnings + _shared_warnings(rows)}


def _shared_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """Warnings every method gave (the trained context: same frames, same question) are said
    once for the record, not once per method."""
    shared = [w for w in rows[0]["warnings"] if all(w in row["warnings"] for row in rows)] \
        if rows else []
    for row in rows:
        row["warnings"] = [w for w in row["warnings"] if w not in shared]
    return shared


def _measured(session: Session, answer: Any, baseline: int) -> dict[str, Any]:
    """What a compare row needs from a session, so the session itself can be freed."""
    from statekv.commands.prefill import cache_fields

    stats = session.stats.to_dict()
    stats["peak_memory_bytes"] = session.memory.peak_above(baseline)
    policy = session.state.cache.policy
    return {"answer": answer, "stats": stats, "settings": session.settings.to_dict(),
            "warnings": list(session.warnings),
            "window_tokens": policy.capacity if session.settings.method == "window" else None,
            "cache": cache_fields(session, {})}


def _compare_row(method: str, run: dict[str, Any], full_answer: Any) -> dict[str, Any]:
    answer, stats, settings = run["answer"], run["stats"], run["settings"]
    if "cache" in run["cache"]:
        stats["cache"] = run["cache"]["cache"]
    return {"method": method, "budget": settings["budget"],
            "window_frames": settings["window_frames"], "window_tokens": run["window_tokens"],
            "answer": answer.answer,
            "agrees_with_full": answer.answer == full_answer.answer,
            "first_token_kl_vs_full": kl_divergence(full_answer.first_token_logprobs,
                                                    answer.first_token_logprobs),
            **{key: stats[key] for key in FLATTENED}, "stats": stats,
            "warnings": run["warnings"], **run["cache"]}


def info(path: str, options: RunOptions) -> dict[str, Any]:
    """`statekv info`: the probe, what would be sampled, and predicted cost per method."""
    if path.lower().endswith(".skv"):
        raise UsageError(f"{path} is a prefill file; `statekv info` takes the video")
    run = plan_run(path, options)
    probe = run.probe
    file_bytes = run.memory.detailed_cache_bytes + accounting.prefill_file_header_bytes(
        run.layout.shape.layers, len(run.frames.indices))
    return {"path": path, "duration_seconds": probe.duration_seconds, "fps": probe.fps,
            "frame_count": probe.frame_count, "width": probe.width, "height": probe.height,
            "codec": probe.codec, "sampled_frames": len(run.frames.indices),
            "frame_timestamps": list(run.frames.timestamps),
            "tokens_per_frame": run.layout.tokens_per_frame,
            "model": run.resolved.model, "preset": run.resolved.preset.name,
            "model_from": "--model" if options.model else "preset",
            "device": run.device, "dtype": run.dtype,
            "context": run.context.to_dict() if run.context else None,
            "predicted": {"methods": {m: {"lm_prefill_flops": f} for m, f in run.flops.items()},
                          "detailed_cache_bytes": run.memory.detailed_cache_bytes,
                          "prefill_file_bytes": file_bytes,
                          "weights_bytes": run.memory.weights_bytes,
                          "peak_memory_bytes": run.memory.peak_memory_bytes,
                          "available_memory_bytes": accounting.available_memory(run.device),
                          "exact_layout": run.layout.exact}}

"""End to end on a real video: statekv's runners against plain transformers on the same frames.

One model (a preset's real architecture with random weights, or a checkpoint on disk / in the
local Hugging Face cache) and one decoded set of frames per frame count, then, back to back in
this process, for each runner: `transformers` (the family's processor, then `generate()`,
greedy) and statekv's `full`, `window`, `statekv` (`Model.prefill_frames`, then `Session.ask`).
Every runner sees the very same frames at the same timestamps, and the token ids transformers
is given are checked to equal the ones statekv lays out (frame parity). Seconds are split into
decode, processor (transformers' preprocessing, or statekv's own frame preparation), vision
(tower + projector forward), lm_prefill, answer and total; all are medians over `repeats`.

    report = run_e2e("smolvlm2-256m", "clip.mp4", frames=[16, 64], repeats=3)
"""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from statekv import accounting, video
from statekv.errors import ModelError, UsageError

RUNNERS = ("transformers", "full", "window", "statekv")
SECONDS = ("decode", "processor", "vision", "lm_prefill", "answer", "total")
QUESTION = "What happens in the video?"
# The vision towers of the presets' real checkpoints, by family (the preset's YAML holds the
# language model's numbers). SmolVLM2-256M/500M: SigLIP-B/16 at 512 px, pixel shuffle 4 -> 64.
VISION_SHAPES: dict[str, dict[str, Any]] = {
    "smolvlm": {"image_size": 512, "patch_size": 16, "scale_factor": 4,
                "vision": {"hidden_size": 768, "intermediate_size": 3072,
                           "num_hidden_layers": 12, "num_attention_heads": 12}},
}


@dataclass
class E2ERow:
    """One (runner, frames) cell: medians over repeats (the output contract's fields first)."""

    runner: str
    frames: int
    dtype: str
    threads: int
    seconds: dict[str, float]
    lm_prefill_flops: int | None
    vision_flops: int | None
    peak_memory_bytes: int
    answer: str
    tokens: int = 0  # tokens the language model prefilled (prompt + frames [+ question])
    seconds_runs: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# the model ---------------------------------------------------------------------------------
def random_model(preset: Any, dtype: torch.dtype, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor) of the preset's real architecture with random weights (offline)."""
    shape = VISION_SHAPES.get(preset.family)
    if shape is None:
        raise UsageError(f"--e2e builds random weights for {', '.join(VISION_SHAPES)} presets; "
                         f"for {preset.name} pass a local checkpoint with --model")
    from statekv.testing.families import smolvlm_model

    arch = preset.architecture
    text = {"hidden_size": arch.hidden, "intermediate_size": arch.intermediate,
            "num_hidden_layers": arch.layers, "num_attention_heads": arch.heads,
            "num_key_value_heads": arch.kv_heads, "head_dim": arch.resolved_head_dim,
            "max_position_embeddings": 1 << 16}
    return smolvlm_model(image_size=shape["image_size"], patch_size=shape["patch_size"],
                         scale_factor=shape["scale_factor"], text=text,
                         vision=dict(shape["vision"]), seed=seed, dtype=dtype)


def local_checkpoint(model: str) -> str | None:
    """The checkpoint directory if `model` is one on disk or already in the local cache."""
    import os

    from statekv.loading import resolve_checkpoint

    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # never download here: random weights instead
    try:
        return resolve_checkpoint(model)
    except ModelError:
        return None
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def load_e2e_model(preset: Any, model: str | None, dtype: str, seed: int = 0) -> tuple[Any, str]:
    """A statekv Model for the benchmark and where its weights came from."""
    import statekv
    from statekv.loading import resolve_dtype
    from statekv.models import adapter_for
    from statekv.session import Model

    checkpoint = local_checkpoint(model or preset.model)
    if checkpoint is not None:
        return statekv.load(checkpoint, device="cpu", dtype=dtype), checkpoint
    if model is not None:
        raise ModelError(f"model {model} is neither a checkpoint directory nor in the local cache")
    import statekv.attention  # noqa: F401  (registers statekv's attention)

    hf_model, processor = random_model(preset, resolve_dtype(dtype, torch.device("cpu")), seed)
    adapter = adapter_for(hf_model.config.model_type)(hf_model, processor)
    return Model(adapter, f"random-weights:{preset.name}"), "random weights"


# timing helpers ----------------------------------------------------------------------------
class ModuleClock:
    """Wall seconds of every forward of some modules (pre/post hooks), outermost calls only."""

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.calls: list[float] = []
        self._depth = 0
        self._started = 0.0
        self._handles = []
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit))

    def _enter(self, *args) -> None:
        if self._depth == 0:
            self._started = time.perf_counter()
        self._depth += 1

    def _exit(self, *args) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.calls.append(time.perf_counter() - self._started)

    @property
    def seconds(self) -> float:
        return sum(self.calls)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> ModuleClock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_frames(path: str, count: int, size: tuple[int, int] | None
                  ) -> tuple[np.ndarray, tuple[float, ...], float]:
    """`count` frames sampled uniformly over the whole video, their timestamps, seconds taken."""
    info = video.probe(path)
    plan = video.plan_frames(info, count, fps=None, timestamps=video.frame_timestamps(path))
    started = time.perf_counter()
    chunks = list(video.iter_chunks(path, plan, chunk_frames=len(plan.indices), size=size))
    seconds = time.perf_counter() - started
    frames = np.concatenate([c.frames for c in chunks])
    return frames, tuple(t for c in chunks for t in c.timestamps), seconds


def layout_ids(adapter: Any, timestamps: Sequence[float], question: str) -> list[int] | None:
    """The token ids statekv feeds for these frames and question (None if not fixed text)."""
    prompt = adapter.prompt(None)
    adapter.start(len(timestamps), tuple(timestamps), prompt)
    ids = list(adapter.prefix_chunk().token_ids)
    for index in range(len(timestamps)):
        frame = adapter.frame_token_ids(index)
        if frame is None:
            return None
        ids += frame
    return ids + adapter.tokenize(prompt.question_text(question))


# the runners -------------------------------------------------------------------------------
def _transformers_run(model: Any, frames: np.ndarray, timestamps: tuple[float, ...],
                      question: str, max_new_tokens: int) -> dict[str, Any]:
    """The peer: the family's processor on the frames, then generate() (sdpa attention)."""
    adapter = model.adapter
    hf, processor = adapter.model, adapter.processor
    hf.set_attn_implementation({"text_config": "sdpa"})
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    memory = accounting.PeakMemory("cpu")
    with memory, torch.inference_mode(), ModuleClock(adapter.vision_modules()) as vision, \
            ModuleClock([adapter.language_model]) as lm:
        started = time.perf_counter()
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # Timestamps reach the processor as frame indices at 1 fps: exactly statekv's times.
        inputs = processor(text=text, videos=[frames], do_sample_frames=False, return_tensors="pt",
                           video_metadata=[{"total_num_frames": len(frames), "fps": 1.0,
                                            "duration": None, "frames_indices": list(timestamps)}])
        prepared = time.perf_counter()
        inputs = {k: (v.to(adapter.dtype) if torch.is_floating_point(v) else v)
                  for k, v in inputs.items()}
        generated = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        ended = time.perf_counter()
    ids = inputs["input_ids"][0].tolist()
    new = generated[0, len(ids):].tolist()
    prefill = lm.calls[0] if lm.calls else 0.0
    seconds = {"processor": prepared - started, "vision": vision.seconds, "lm_prefill": prefill,
               "answer": (ended - prepared) - vision.seconds - prefill}
    return {"seconds": seconds, "wall": ended - started, "ids": ids, "new_tokens": new,
            "answer": adapter.tokenizer.decode(new, skip_special_tokens=True).strip(),
            "peak": memory.peak_bytes()}


def _statekv_run(model: Any, runner: str, frames: np.ndarray, timestamps: tuple[float, ...],
                 question: str, max_new_tokens: int, budget: int, window_frames: int
                 ) -> dict[str, Any]:
    adapter = model.adapter
    memory = accounting.PeakMemory("cpu")
    with memory, ModuleClock(adapter.vision_modules()) as vision:
        started = time.perf_counter()
        session = model.prefill_frames(frames, timestamps, method=runner, budget=budget,
                                       window_frames=window_frames)
        answer = session.ask([question], max_new_tokens=max_new_tokens)[0]
        ended = time.perf_counter()
    stats = session.stats
    seconds = {"processor": max(0.0, stats.vision_seconds - vision.seconds),
               "vision": vision.seconds, "lm_prefill": stats.lm_prefill_seconds,
               "answer": stats.answer_seconds}
    return {"seconds": seconds, "wall": ended - started, "stats": stats, "answer": answer.answer,
            "timestamps": stats.frame_timestamps, "peak": memory.peak_bytes()}


def _check_parity(expected: list[int] | None, ids: list[int], statekv_times: list[float],
                  timestamps: tuple[float, ...]) -> None:
    if [round(t, 6) for t in timestamps] != list(statekv_times):
        raise ModelError("frame parity failed: statekv prefilled other timestamps than given")
    if expected is not None and expected != ids:
        raise ModelError(f"frame parity failed: transformers' processor laid out {len(ids)} "
                         f"tokens, statekv {len(expected)}; the runners would not see the same input")


def run_e2e(
    preset: str = "smolvlm2-256m",
    video_path: str = "",
    frames: Sequence[int] = (16,),
    runners: Sequence[str] = RUNNERS,
    *,
    model: str | None = None,
    repeats: int = 3,
    dtype: str | Sequence[str] = "float32",
    threads: int | str | None = None,
    budget: int | None = None,
    window_frames: int | None = None,
    question: str = QUESTION,
    max_new_tokens: int = 8,
    warmup: bool = True,
    seed: int = 0,
    on_row: Callable[[E2ERow], None] | None = None,
    on_model: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """{video, preset, model, rows}: every runner on the same decoded frames, per frame count.

    `dtype` may list several dtypes ("float32", "auto", ...): one model is loaded per dtype and
    every repeat runs them all back to back on the same frames, so a bfloat16 row and the
    float32 peer are measured side by side.
    """
    from statekv.loading import dtype_name
    from statekv.presets import load_preset

    if not video_path:
        raise UsageError("--e2e needs a video: --video clip.mp4")
    bad = [r for r in runners if r not in RUNNERS]
    if bad or not runners:
        raise UsageError(f"unknown runner(s) {', '.join(bad) or '(none)'}; choose from "
                         f"{', '.join(RUNNERS)}")
    if repeats < 1 or not frames or min(frames) < 1:
        raise UsageError("--repeats and every --frames value must be at least 1")
    dtypes = [dtype] if isinstance(dtype, str) else list(dtype)
    names = [dtype_name(d, "cpu") for d in dtypes]  # UsageError for an unknown one
    if not dtypes or len(set(names)) != len(names):
        raise UsageError(f"--dtype {','.join(dtypes) or '(none)'}: give each dtype once "
                         f"(here they mean {', '.join(names) or 'nothing'})")
    preset_obj = load_preset(preset)
    from statekv import threads as cpu_threads

    previous = torch.get_num_threads()
    cpu_threads.apply(cpu_threads.resolve(threads))  # N, "auto", or the environment's
    try:
        models = []
        for each in dtypes:  # the same seed: the same random weights in every dtype
            loaded, source = load_e2e_model(preset_obj, model, each, seed)
            models.append(loaded)
        if on_model is not None:
            on_model(source)
        budget = budget or preset_obj.budget
        window_frames = window_frames or preset_obj.window_frames
        info = video.probe(video_path)
        rows: list[E2ERow] = []
        if warmup:  # first calls allocate and pick kernels: keep that off every row's clock
            _cell(models, video_path, info, 2, runners, 1, question, 2, budget, window_frames)
        for count in frames:
            for row in _cell(models, video_path, info, count, runners, repeats, question,
                             max_new_tokens, budget, window_frames):
                rows.append(row)
                if on_row is not None:
                    on_row(row)
        return {"video": str(video_path), "preset": preset_obj.name, "model": source,
                "question": question, "max_new_tokens": max_new_tokens,
                "rows": [r.to_dict() for r in rows]}
    finally:
        torch.set_num_threads(previous)


def _cell(models, video_path, info, count, runners, repeats, question, max_new_tokens, budget,
          window_frames) -> list[E2ERow]:
    size = models[0].adapter.decode_size(info.height, info.width, frames=count)
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {
        (m, r): [] for m in range(len(models)) for r in runners}
    expected = None
    for _ in range(repeats):
        decoded, timestamps, decode_seconds = decode_frames(video_path, count, size)
        if expected is None:
            expected = layout_ids(models[0].adapter, timestamps, question)
        for m, model in enumerate(models):  # back to back, on the same frames
            for runner in runners:
                if runner == "transformers":
                    run = _transformers_run(model, decoded, timestamps, question, max_new_tokens)
                    _check_parity(expected, run["ids"], [round(t, 6) for t in timestamps],
                                  timestamps)
                else:
                    run = _statekv_run(model, runner, decoded, timestamps, question,
                                       max_new_tokens, budget, window_frames)
                    _check_parity(None, [], run["timestamps"], timestamps)
                run["seconds"]["decode"] = decode_seconds
                run["seconds"]["total"] = decode_seconds + run["wall"]
                run["frames"] = len(decoded)
                runs[(m, runner)].append(run)
    vision_flops = next((runs[(m, r)][-1]["stats"].vision_flops for m in range(len(models))
                         for r in runners if r != "transformers"), None)
    rows = []
    for m, model in enumerate(models):
        adapter = model.adapter
        shape = accounting.LMShape.from_model(adapter.language_model, adapter.text_config)
        for runner in runners:
            mine = runs[(m, runner)]
            last = mine[-1]
            if runner == "transformers":
                tokens = len(last["ids"])
                lm_flops = accounting.chunk_flops(shape, tokens, 0, mass=False)
            else:
                tokens = last["stats"].detailed_tokens
                lm_flops = last["stats"].lm_prefill_flops
            seconds = {key: round(statistics.median(r["seconds"][key] for r in mine), 4)
                       for key in SECONDS}
            rows.append(E2ERow(
                runner=runner, frames=last["frames"],
                dtype=str(adapter.dtype).removeprefix("torch."),
                threads=torch.get_num_threads(), seconds=seconds, lm_prefill_flops=lm_flops,
                vision_flops=vision_flops,
                peak_memory_bytes=int(statistics.median(r["peak"] for r in mine)),
                answer=last["answer"], tokens=tokens,
                seconds_runs=[{k: round(r["seconds"][k], 4) for k in SECONDS} for r in mine]))
    return rows


# outputs -----------------------------------------------------------------------------------
CSV_FIELDS = ("runner", "frames", "dtype", "threads", *(f"{k}_seconds" for k in SECONDS),
              "lm_prefill_flops", "vision_flops", "peak_memory_bytes", "tokens", "answer")


def write_csv(report: dict[str, Any], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in report["rows"]:
            flat = {k: row[k] for k in CSV_FIELDS if k in row}
            flat.update({f"{k}_seconds": row["seconds"][k] for k in SECONDS})
            writer.writerow(flat)


def speedups(report: dict[str, Any]) -> dict[tuple[int, str, str], dict[str, float]]:
    """Per (frames, dtype, runner): transformers' seconds at the same dtype over the runner's
    (total, LM prefill), the FLOP ratios that bound them (vision included for the total), and,
    where a float32 transformers row ran, `total_vs_float32`: its total over the runner's
    (transformers' own rows in other dtypes included)."""
    rows = report["rows"]
    base = {(r["frames"], r["dtype"]): r for r in rows if r["runner"] == "transformers"}
    out = {}
    for r in rows:
        key = (r["frames"], r["dtype"], r["runner"])
        fp32 = base.get((r["frames"], "float32"))
        if fp32 is not None and fp32 is not r:
            out.setdefault(key, {})["total_vs_float32"] = (
                fp32["seconds"]["total"] / max(1e-9, r["seconds"]["total"]))
        peer = base.get((r["frames"], r["dtype"]))
        if peer is None or r["runner"] == "transformers":
            continue
        vision = r["vision_flops"] or 0
        out.setdefault(key, {}).update({
            "total": peer["seconds"]["total"] / max(1e-9, r["seconds"]["total"]),
            "lm_prefill": peer["seconds"]["lm_prefill"] / max(1e-9, r["seconds"]["lm_prefill"]),
            "lm_flop_ratio": peer["lm_prefill_flops"] / max(1, r["lm_prefill_flops"]),
            "e2e_flop_ratio": (peer["lm_prefill_flops"] + vision)
                              / max(1, r["lm_prefill_flops"] + vision),
        })
    return out


def plot(report: dict[str, Any], path: str) -> None:
    """Stacked seconds (processor, vision, LM prefill, answer) per runner and frame count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'statekv[plot]'") from None
    rows = report["rows"]
    several = len({r["dtype"] for r in rows}) > 1
    labels = [f"{r['runner']}\n{r['frames']} fr" + (f"\n{r['dtype']}" if several else "")
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows)), 4))
    bottom = np.zeros(len(rows))
    for key in ("decode", "processor", "vision", "lm_prefill", "answer"):
        values = np.array([r["seconds"][key] for r in rows])
        ax.bar(labels, values, bottom=bottom, label=key)
        bottom += values
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"statekv bench --e2e: {report['preset']} ({report['model']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

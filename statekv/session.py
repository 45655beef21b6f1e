"""The public Python API: load a model once, prefill a video once, ask many questions.

    model = statekv.load("OpenGVLab/InternVL3-1B-hf")            # or a local directory
    session = model.prefill("movie.mp4", method="statekv", budget=4096, max_frames=256)
    answers = session.ask(["who enters the room?", "what colour is the car?"])
    session.stats                                                 # FLOPs, seconds, memory
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from statekv import accounting, threads as cpu_threads, video
from statekv.answer import Answer, answer_question, question_logits
from statekv.context import Context, check_question, context_of, frames_that_fit, trained_positions
from statekv.errors import UsageError
from statekv.loading import load_weights, resolve_checkpoint, resolve_device, resolve_dtype
from statekv.models import adapter_for
from statekv.models.base import VideoAdapter
from statekv.policies import BENCHMARK_METHODS, VARIANTS, Policy, check_method, make_policy
from statekv.prefill import PrefillEvent, PrefillResult, prefill_chunks
from statekv.presets import DEFAULTS
from statekv.units import fraction

DEFAULT_METHOD = DEFAULTS.method


@dataclass
class Settings:
    """Everything that decides a result (the `settings` record of docs/formats.md)."""

    model: str
    model_revision: str | None
    family: str
    method: str
    budget: int | None
    window_frames: int | None
    max_frames: int
    fps: float | None
    start: float | None
    end: float | None
    chunk_frames: int
    dtype: str
    device: str
    max_new_tokens: int
    seed: int
    threads: int = 0  # torch CPU threads the prefill ran with (statekv.threads)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Stats:
    """Measurements of one prefill and its answers (the `stats` record of docs/formats.md)."""

    frames: int = 0
    frame_timestamps: list[float] = field(default_factory=list)
    tokens_per_frame: int = 0
    detailed_tokens: int = 0
    carried_tokens: int = 0
    prefills: int = 0
    decode_seconds: float = 0.0
    vision_seconds: float = 0.0
    lm_prefill_seconds: float = 0.0
    answer_seconds: float = 0.0
    vision_flops: int = 0
    lm_prefill_flops: int = 0
    full_lm_prefill_flops: int = 0
    peak_memory_bytes: int = 0
    detailed_cache_bytes: int = 0
    carried_cache_bytes: int = 0

    @property
    def lm_flops_fraction(self) -> float | None:
        """LM prefill FLOPs as a fraction of full attention's on the same frames."""
        return fraction(self.lm_prefill_flops, self.full_lm_prefill_flops)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lm_flops_fraction": self.lm_flops_fraction}


class Session:
    """One prefilled video: answer any number of questions from its detailed cache."""

    def __init__(self, model: "Model", state: PrefillResult, settings: Settings,
                 memory: accounting.PeakMemory, tokens_per_frame: int,
                 context: Context | None = None, options: dict[str, Any] | None = None,
                 prefills: int = 1, source: str | None = None) -> None:
        self.model = model
        self.state = state
        self.settings = settings
        self.memory = memory
        self.warnings: list[str] = list(state.warnings)
        self.context = context  # the video against the model's trained context
        self._answer_seconds = 0.0
        self._tokens_per_frame = tokens_per_frame
        # How the prefill ran beyond `settings` (system_prompt, pin_prefix, attention, backend).
        self.options: dict[str, Any] = dict(options or {})
        self.prefills = prefills  # 0 for a session opened from a prefill file
        self.source = source  # the prefill file it was opened from, if any
        self.video: dict[str, Any] | None = None  # the video's identity (saved.video_identity)
        self.cache: str | None = None  # "hit" or "miss" when it came through a prefill cache

    def save(self, path: str) -> int:
        """Write this prefill to `path` (a .skv file, see docs/prefill-files.md), atomically;
        returns the file's size in bytes. `Model.open(path)` answers from it later."""
        from statekv import saved

        return saved.save(self, path)

    def check_questions(self, questions: Sequence[str], max_new_tokens: int) -> None:
        """Refuse a question that cannot fit in the trained context at all (UsageError); warn
        once, in `warnings`, when the video and a question (with its answer) pass it."""
        if self.context is None:
            return
        adapter, trained = self.model.adapter, self.context.trained_positions
        lengths = [len(adapter.tokenize(self.state.prompt.question_text(q))) for q in questions]
        for length in lengths:
            check_question(self.state.chunk_tokens[0], length, trained)
        longest = max(lengths, default=0) + max_new_tokens
        warned = any("trained context" in w for w in self.warnings)
        if self.context.over(longest) and not warned:
            self.warnings.append(self.context.warning(longest))

    def ask(self, questions: str | Sequence[str], max_new_tokens: int | None = None) -> list[Answer]:
        """Greedy answers to each question, all over the same prefilled video."""
        questions = [questions] if isinstance(questions, str) else list(questions)
        limit = max_new_tokens or self.settings.max_new_tokens
        self.check_questions(questions, limit)
        answers = []
        with self.memory:
            started = time.perf_counter()
            for question in questions:
                answers.append(answer_question(self.model.adapter, self.state, question, limit))
            accounting.synchronize(self.model.device)
            self._answer_seconds += time.perf_counter() - started
        return answers

    def question_logits(self, question: str) -> torch.Tensor:
        """Logits (question tokens, vocab) after the video, e.g. to compare methods."""
        self.check_questions([question], 0)
        return question_logits(self.model.adapter, self.state, question)

    @property
    def stats(self) -> Stats:
        state, cache = self.state, self.state.cache
        seconds = state.seconds
        return Stats(
            frames=state.frames,
            frame_timestamps=[round(t, 6) for t in state.frame_timestamps],
            tokens_per_frame=self._tokens_per_frame,
            detailed_tokens=cache.detailed_tokens,
            carried_tokens=cache.carried_tokens,
            prefills=self.prefills,
            decode_seconds=seconds.get("decode_seconds", 0.0),
            vision_seconds=seconds.get("vision_seconds", 0.0),
            lm_prefill_seconds=seconds.get("lm_prefill_seconds", 0.0),
            answer_seconds=self._answer_seconds,
            vision_flops=state.vision_flops,
            lm_prefill_flops=state.lm_prefill_flops,
            full_lm_prefill_flops=state.full_lm_prefill_flops,
            peak_memory_bytes=self.memory.peak_bytes(),
            detailed_cache_bytes=cache.detailed_bytes(),
            carried_cache_bytes=cache.carried_tokens * cache.carried_bytes_per_token(),
        )


@dataclass(frozen=True)
class _VideoShape:
    """What the adapter is told about a video before its first chunk."""

    frames: int
    timestamps: tuple[float, ...]
    frame_size: tuple[int, int]  # (height, width) frames arrive at
    duration: float | None  # seconds watched, when known
    tokens_per_frame: int


class Model:
    """A loaded checkpoint and its family adapter; reuse it for every video."""

    def __init__(self, adapter: VideoAdapter, name: str, revision: str | None = None,
                 checkpoint: str | None = None, threads: int | None = None) -> None:
        self.adapter = adapter
        self.name = name
        self.revision = revision
        self.checkpoint = checkpoint  # the local directory the weights came from, if any
        self.threads = threads  # CPU threads for every prefill (None: as torch is set)
        self._weights_hash: str | None = None

    @property
    def weights_hash(self) -> str:
        """A fast fingerprint of the weights (loading.weights_hash), computed once."""
        if self._weights_hash is None:
            from statekv.loading import parameters_hash, weights_hash

            self._weights_hash = (weights_hash(self.checkpoint) if self.checkpoint
                                  else parameters_hash(self.adapter.model))
        return self._weights_hash

    @property
    def dtype(self) -> str:
        return str(self.adapter.dtype).removeprefix("torch.")

    def open(self, path: str) -> Session:
        """A session answering from a prefill file written by `Session.save` (no video, no
        vision tower, no prefill). A file from another model, revision, family or dtype is
        refused (UsageError); a truncated, corrupted or newer-format file too (InputError)."""
        from statekv import saved

        state, meta = saved.read_state(self, path)
        settings = Settings(**{**meta["settings"], "device": str(self.device)})
        session = Session(self, state, settings, accounting.PeakMemory(self.device),
                          meta["tokens_per_frame"], options=meta.get("options"), prefills=0,
                          source=str(path))
        session.video = meta.get("video")
        return session

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @property
    def family(self) -> str:
        return self.adapter.family

    def prefill(
        self,
        path: str,
        method: str | Policy = DEFAULT_METHOD,
        *,
        budget: int | None = None,
        window_frames: int | None = None,
        max_frames: int | str = DEFAULTS.max_frames,
        fps: float | None = DEFAULTS.fps,
        start: float | None = None,
        end: float | None = None,
        chunk_frames: int | None = None,
        system_prompt: str | None = None,
        pin_prefix: bool = False,
        attention: str = "sdpa",
        max_new_tokens: int = DEFAULTS.max_new_tokens,
        seed: int = 0,
        backend: str = "auto",
        on_event: Callable[[PrefillEvent], None] | None = None,
        on_carried: Callable[[int, int, torch.Tensor], None] | None = None,
        on_mass: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> Session:
        """Sample frames from a video file and prefill them.

        method: a name ("full", "window", "statekv", "isolated") or any `Policy` object,
        including one defined outside statekv. budget: statekv's carried tokens per layer
        and KV head (default 4096). window_frames: how many whole recent frames `window`
        keeps (default 16). Sampling: at most `max_frames` frames and `fps` frames per
        second (the command line's defaults), between `start` and `end` seconds;
        `max_frames="fit"` samples as many as fit in the model's trained context.
        on_carried / on_mass: observers of the carried state and of each chunk's attention
        mass (see `statekv.prefill.prefill_chunks`); off by default.
        """
        from statekv.saved import video_identity

        info = video.probe(path)
        identity = video_identity(path)  # before decoding: the file as it was read
        timestamps = video.frame_timestamps(path)
        watched = min(end or info.duration_seconds, info.duration_seconds) - (start or 0.0)

        def shape_of(frames: int) -> _VideoShape:
            plan = video.plan_frames(info, frames, fps=fps, start=start, end=end,
                                     timestamps=timestamps)
            return self._shape(info, plan, watched)

        def tokens_for(frames: int) -> int:
            return sum(self.layout(shape_of(frames), system_prompt) or [0]) if frames else 0

        if isinstance(max_frames, str) and max_frames != "fit":
            raise UsageError(f"max_frames takes a number or 'fit', got {max_frames!r}")
        if max_frames == "fit":
            max_frames = self.frames_that_fit(len(shape_of(max(1, info.frame_count)).timestamps),
                                              tokens_for)
        plan = video.plan_frames(info, max_frames, fps=fps, start=start, end=end,
                                 timestamps=timestamps)
        shape = self._shape(info, plan, watched)
        chunk_frames = self._chunk_frames(chunk_frames)
        size = self.adapter.decode_size(info.height, info.width, frames=shape.frames)
        # Decoded a chunk ahead in a background thread while the model works on the last one.
        chunks = video.prefetch(video.iter_chunks(path, plan, chunk_frames, size=size,
                                                  backend=backend))
        sampling = dict(max_frames=max_frames, fps=fps, start=start, end=end)
        session = self._run(chunks, shape, sampling, _Run(
            method, budget, window_frames, chunk_frames, system_prompt, pin_prefix, attention,
            max_new_tokens, seed, on_event, on_carried, on_mass), tokens_for)
        session.options["backend"] = backend
        session.video = {"path": str(path), **identity}
        return session

    def _shape(self, info: Any, plan: Any, watched: float | None) -> _VideoShape:
        count = len(plan.indices)
        frame_size = _hw(self.adapter.decode_size(info.height, info.width, frames=count), info)
        return _VideoShape(count, tuple(plan.timestamps), frame_size, watched,
                           self.adapter.tokens_per_frame(*frame_size, frames=count))

    @property
    def trained_positions(self) -> int | None:
        """Positions the language model was trained for (None when its config states none)."""
        return trained_positions(self.adapter.text_config)

    def frames_that_fit(self, frames: int, tokens_for: Callable[[int], int]) -> int:
        """`max_frames="fit"`: the most of `frames` frames that fit with the answer room."""
        fit = frames_that_fit(frames, tokens_for, self.trained_positions)
        if fit is None:
            return frames  # the config states no trained context: nothing to fit into
        if fit == 0:
            raise UsageError(f"not even one frame fits in the model's trained context of "
                             f"{self.trained_positions} positions with the answer room")
        return fit

    def prefill_frames(
        self,
        frames: np.ndarray,
        timestamps: Sequence[float] | None = None,
        method: str | Policy = DEFAULT_METHOD,
        *,
        budget: int | None = None,
        window_frames: int | None = None,
        chunk_frames: int | None = None,
        system_prompt: str | None = None,
        pin_prefix: bool = False,
        attention: str = "sdpa",
        max_new_tokens: int = DEFAULTS.max_new_tokens,
        seed: int = 0,
        on_event: Callable[[PrefillEvent], None] | None = None,
        on_carried: Callable[[int, int, torch.Tensor], None] | None = None,
        on_mass: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> Session:
        """Prefill in-memory frames, uint8 (n, H, W, 3), at `timestamps` seconds (default
        0, 1, 2, ...); the other options as for `prefill`."""
        timestamps = tuple(float(t) for t in (timestamps if timestamps is not None
                                              else range(len(frames))))
        if len(timestamps) != len(frames):
            raise UsageError(f"{len(frames)} frames but {len(timestamps)} timestamps")
        chunk_frames = self._chunk_frames(chunk_frames)
        chunks = video.chunks_of(frames, timestamps, chunk_frames)
        frame_size = (int(frames.shape[1]), int(frames.shape[2]))
        shape = _VideoShape(len(frames), timestamps, frame_size, None,
                            self.adapter.tokens_per_frame(*frame_size, frames=len(frames)))
        sampling = dict(max_frames=len(frames), fps=None, start=None, end=None)

        def tokens_for(count: int) -> int:  # the first `count` frames, for the fit advice
            part = _VideoShape(count, timestamps[:count], frame_size, None,
                               self.adapter.tokens_per_frame(*frame_size, frames=count))
            return sum(self.layout(part, system_prompt) or [0]) if count else 0

        return self._run(chunks, shape, sampling, _Run(
            method, budget, window_frames, chunk_frames, system_prompt, pin_prefix, attention,
            max_new_tokens, seed, on_event, on_carried, on_mass), tokens_for)

    def _context(self, shape: _VideoShape, layout: list[int] | None,
                 tokens_for: Callable[[int], int]) -> Context | None:
        """The video against the trained context (None when the layout is unknown)."""
        if layout is None:
            return None
        return context_of(self.trained_positions, layout, shape.frames, tokens_for)

    def _chunk_frames(self, chunk_frames: int | None) -> int:
        unit = self.adapter.frames_per_unit
        chunk_frames = chunk_frames or unit
        if chunk_frames < 1 or chunk_frames % unit:
            raise UsageError(f"--chunk-frames must be a positive multiple of {unit} for "
                             f"{self.family} models, got {chunk_frames}")
        return chunk_frames

    def layout(self, shape: _VideoShape, system_prompt: str | None) -> list[int] | None:
        """Token counts of the prefix, then of each frame, as the adapter will lay them out."""
        return self.adapter.layout_tokens(
            shape.frames, shape.timestamps, self.adapter.prompt(system_prompt),
            frame_size=shape.frame_size, duration=shape.duration)

    def _run(self, chunks: Iterable[Any], shape: _VideoShape, sampling: dict[str, Any],
             run: _Run, tokens_for: Callable[[int], int]) -> Session:
        layout = self.layout(shape, run.system_prompt)
        context = self._context(shape, layout, tokens_for)
        policy, budget, window_frames = _policy(run.method, run.budget, run.window_frames,
                                                shape.tokens_per_frame, layout)
        _seed(run.seed)
        if self.threads is not None:
            cpu_threads.apply(self.threads)
        settings = Settings(
            model=self.name, model_revision=self.revision, family=self.family,
            method=policy.name, budget=budget, window_frames=window_frames,
            chunk_frames=run.chunk_frames, dtype=str(self.adapter.dtype).removeprefix("torch."),
            device=str(self.device), max_new_tokens=run.max_new_tokens, seed=run.seed,
            threads=torch.get_num_threads(), **sampling)
        memory = accounting.PeakMemory(self.device)
        with memory:
            state = prefill_chunks(
                self.adapter, chunks, policy, frame_count=shape.frames,
                timestamps=shape.timestamps, frame_size=shape.frame_size,
                duration=shape.duration, system_prompt=run.system_prompt,
                pin_prefix=run.pin_prefix, attention=run.attention, on_event=run.on_event,
                memory=memory, on_carried=run.on_carried, on_mass=run.on_mass)
        session = Session(self, state, settings, memory, shape.tokens_per_frame, context, options={
            "system_prompt": run.system_prompt, "pin_prefix": run.pin_prefix,
            "attention": run.attention, "backend": None})
        chunk_tokens = max(state.chunk_tokens[1:], default=0)
        if policy.budget is not None and policy.budget < chunk_tokens:
            session.warnings.append(
                f"budget {policy.budget} is below one chunk's {chunk_tokens} tokens: each chunk "
                f"carries less than itself forward")
        return session


@dataclass(frozen=True)
class _Run:
    """How to prefill (everything but the frames), as `Model.prefill` was called."""

    method: str | Policy
    budget: int | None
    window_frames: int | None
    chunk_frames: int
    system_prompt: str | None
    pin_prefix: bool
    attention: str
    max_new_tokens: int
    seed: int
    on_event: Callable[[PrefillEvent], None] | None
    on_carried: Callable[[int, int, torch.Tensor], None] | None = None
    on_mass: Callable[[int, int, torch.Tensor], None] | None = None


def _policy(method: str | Policy, budget: int | None, window_frames: int | None,
            tokens_per_frame: int, layout: list[int] | None = None
            ) -> tuple[Policy, int | None, int | None]:
    """The policy object, and the budget and window (frames) to record in `settings`.

    `window` keeps the last N whole frames from the adapter's real per-frame token counts
    (`layout`: prefix, then each frame); N x visual tokens only when the layout is unknown."""
    if isinstance(method, Policy):
        return method, method.budget, getattr(method, "frames", None)
    if not isinstance(method, str):
        raise UsageError(f"method must be a method name or a Policy, got {type(method).__name__}")
    check_method(method, BENCHMARK_METHODS)
    budget = (budget or DEFAULTS.budget) if method in ("statekv", "random", *VARIANTS) else None
    window_frames = (window_frames or DEFAULTS.window_frames) if method == "window" else None
    if window_frames is not None and window_frames < 1:
        raise UsageError(f"--window-frames must be at least 1, got {window_frames}")
    window_tokens = None if window_frames is None else window_frames * tokens_per_frame
    policy = make_policy(method, budget=budget, window_tokens=window_tokens,
                         window_frames=window_frames, layout=layout)
    return policy, budget, window_frames


def _hw(size: tuple[int, int] | None, info: Any) -> tuple[int, int]:
    return (info.height, info.width) if size is None else (size[1], size[0])


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load(model: str, *, device: str = "auto", dtype: str = "auto", revision: str | None = None,
         trust_remote_code: bool = False, threads: int | str | None = None) -> Model:
    """Load a checkpoint (hub id or local directory) with its family adapter.

    threads: torch CPU threads for every prefill of this model, N or "auto" (the cores this
    process may run on: affinity and cgroup quota); None: STATEKV_THREADS if set, else torch
    is left as it is (statekv.threads). `settings.threads` records what each prefill used.
    """
    count = cpu_threads.requested(threads)
    if count is not None:
        cpu_threads.apply(count)
    checkpoint = resolve_checkpoint(model, revision)
    torch_device = resolve_device(device)
    config, hf_model, processor = load_weights(
        checkpoint, torch_device, resolve_dtype(dtype, torch_device), trust_remote_code)
    adapter = adapter_for(config.model_type)(hf_model, processor)
    reason = adapter.refusal()
    if reason:
        from statekv.errors import ModelError

        raise ModelError(f"statekv cannot run {model}: {reason}")
    return Model(adapter, model, revision, checkpoint, threads=count)



"""The chunk loop: the language model prefills a video one chunk at a time (the hot path).

Per chunk: frames -> vision tower -> language-model forward over the carried state (the
cache returns [carried ; chunk] keys, the attention returns masses, the policy picks the next
carried state) -> the chunk's keys/values stay in the detailed cache -> an event reports
progress, FLOPs and memory. Nothing here grows with the history except the detailed cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from statekv import accounting
from statekv.attention import ATTENTION_NAME
from statekv.cache import StateCache
from statekv.models.base import ChunkInputs, PromptPieces, VideoAdapter
from statekv.policies import Policy
from statekv.rotary import fixed_rotary
from statekv.threads import SerialSmallOps
from statekv.units import fraction, remaining

# transformers builds no mask when handed a prepared mapping; our attention applies causality.
NO_MASK = {"full_attention": None, "sliding_attention": None}
ANSWER_ROOM = accounting.ANSWER_ROOM  # tokens reserved after the video for a question
# Full attention's result does not depend on the chunking, so `full` prefills many frames per
# vision call and language-model forward: at most this many tokens, fewer if memory is short.
FULL_FORWARD_TOKENS = 2048
# Policies that select or slide (window, statekv) update their state after every chunk, but a
# chunk's state at one layer needs only the previous chunks at that same layer. So several
# chunks can share one language-model forward (projections and MLP as one large matrix
# product) while each layer's attention takes them one by one: grouped prefill, the same
# results. At most this many tokens per forward (fewer if memory is short); 0: one per forward.
GROUP_FORWARD_TOKENS = 2048


@dataclass
class PrefillEvent:
    """Progress after one chunk (for live displays); FLOPs are cumulative."""

    frames_done: int
    frames_total: int
    tokens_done: int
    lm_prefill_flops: int
    full_lm_prefill_flops: int
    carried_tokens: int
    elapsed_seconds: float
    memory_bytes: int
    peak_memory_bytes: int
    remaining_seconds: float | None = None  # at the pace so far; None before the first chunk
    # chunks that shared this chunk's language-model forward (grouped prefill: their events
    # come together when it ends; a per-chunk time is the forward's time over this count)
    forward_chunks: int = 1

    @property
    def fraction_of_full(self) -> float | None:
        """LM prefill FLOPs so far as a fraction of what full attention would have cost."""
        return fraction(self.lm_prefill_flops, self.full_lm_prefill_flops)

    @property
    def tokens_per_second(self) -> float | None:
        return fraction(self.tokens_done, self.elapsed_seconds)

    @property
    def lm_flops_fraction(self) -> float | None:
        """LM prefill FLOPs so far as a fraction of full attention's on the same chunks."""
        return fraction(self.lm_prefill_flops, self.full_lm_prefill_flops)


@dataclass
class PrefillResult:
    """What a prefill leaves behind: the cache to answer from and its measurements."""

    cache: StateCache
    prompt: PromptPieces
    frames: int = 0
    frame_timestamps: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    lm_prefill_flops: int = 0
    full_lm_prefill_flops: int = 0
    vision_flops: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Rotary frequencies are fixed for this length (largest position + 1 of prefix, frames and
    # the answer room) for the prefill and every answer: one base per video (rotary.py).
    rotary_length: int = 0
    # What the adapter was told before the first chunk (frame_count, timestamps, frame_size,
    # duration): with `adapter_state`, what answering needs besides the cache (saved.py).
    plan: dict[str, Any] = field(default_factory=dict)
    adapter_state: dict[str, Any] = field(default_factory=dict)


def forward_chunk(adapter: VideoAdapter, cache: StateCache, chunk: ChunkInputs) -> torch.Tensor:
    """Run one chunk through the language model over the cache; returns hidden states."""
    out = adapter.language_model(
        inputs_embeds=chunk.inputs_embeds,
        position_ids=chunk.position_ids,
        past_key_values=cache,
        use_cache=True,
        attention_mask=NO_MASK,
        statekv_cache=cache,
        **chunk.lm_kwargs,
    )
    return out.last_hidden_state


def ensure_attention(adapter: VideoAdapter) -> None:
    """Route the text model's attention through statekv's function (vision keeps its own)."""
    if adapter.text_config._attn_implementation != ATTENTION_NAME:
        adapter.model.set_attn_implementation({"text_config": ATTENTION_NAME})


class _Loop:
    """State of one prefill: the cache, counters and the event callback."""

    def __init__(self, adapter, policy, frames_total, reserve, attention, on_event, memory):
        self.adapter = adapter
        self.shape = accounting.LMShape.from_model(adapter.language_model, adapter.text_config)
        self.cache = StateCache(policy, self.shape.layers, reserve + ANSWER_ROOM, attention)
        self.frames_total = frames_total
        self.on_event = on_event
        self.memory = memory
        self.watch = accounting.Stopwatch(adapter.device)
        self.started = time.perf_counter()
        self.result: PrefillResult | None = None
        self.vision_flops_per_frame: float | None = None
        self.tokens_done = 0  # running total of result.chunk_tokens (no per-chunk re-summing)
        self.serial: SerialSmallOps | None = None  # set for the chunk loop (prefill_chunks)
        self.hidden = adapter.text_config.hidden_size
        self.pending: list[ChunkInputs] = []  # encoded chunks waiting for one grouped forward
        self.pending_tokens = 0

    def run_chunk(self, chunk: ChunkInputs) -> None:
        self.run_group([chunk])

    def queue(self, chunk: ChunkInputs, group_tokens: int) -> None:
        """Add an encoded chunk to the next grouped forward, running the queue first if the
        chunk would take it past `group_tokens` (0: every chunk runs alone)."""
        if self.pending and self.pending_tokens + chunk.tokens > group_tokens:
            self.flush()
        self.pending.append(chunk)
        self.pending_tokens += chunk.tokens

    def flush(self) -> None:
        if self.pending:
            chunks, self.pending, self.pending_tokens = self.pending, [], 0
            self.run_group(chunks)

    def run_group(self, chunks: list[ChunkInputs]) -> None:
        """Chunks in order, in one language-model forward when there are several (grouped
        prefill: each layer attends them one at a time, see GROUP_FORWARD_TOKENS), else one
        forward each when the family cannot join them."""
        joined = chunks[0] if len(chunks) == 1 else self.adapter.join_chunks(chunks)
        if joined is None:
            for chunk in chunks:
                self.run_group([chunk])
            return
        cache = self.cache
        layer = cache.layers[0]
        seen = layer.seen
        costs = []  # per chunk: what it will see and whether it measures masses, before the run
        for chunk in chunks:
            carried = accounting.carried_before(cache.policy, seen, layer.pinned)
            costs.append((carried, not layer.prefixing and accounting.mass_pass(
                cache.policy, carried, layer.pinned, chunk.tokens)))
            seen += chunk.tokens
        started = time.perf_counter()
        if len(chunks) > 1:
            cache.begin_group([chunk.tokens for chunk in chunks])
        try:
            with self.serial.chunk(joined.tokens, self.hidden):
                forward_chunk(self.adapter, cache, joined)
        finally:
            cache.end_group()
        self.watch.add("lm_prefill_seconds", started)
        result = self.result
        for chunk, (carried, mass) in zip(chunks, costs):
            result.lm_prefill_flops += accounting.chunk_flops(
                self.shape, chunk.tokens, carried, mass, cache.policy.bidirectional_scores)
            result.full_lm_prefill_flops += accounting.chunk_flops(
                self.shape, chunk.tokens, self.tokens_done, mass=False)
            result.chunk_tokens.append(chunk.tokens)
            self.tokens_done += chunk.tokens
            result.frames += chunk.frames
            self._emit(len(chunks))

    def encode(self, frames, first: int) -> ChunkInputs:
        offset = self.tokens_done + self.pending_tokens  # after the chunks still queued
        started = time.perf_counter()
        if self.vision_flops_per_frame is None:
            # Vision cost per frame is the same for every frame of a video: count it once.
            chunk, flops = accounting.count_flops(self.adapter.video_chunk, frames, first, offset)
            self.vision_flops_per_frame = flops / max(1, len(frames))
        else:
            chunk = self.adapter.video_chunk(frames, first, offset)
        self.watch.add("vision_seconds", started)
        self.result.vision_flops += round(self.vision_flops_per_frame * chunk.frames)
        return chunk

    def _emit(self, forward_chunks: int = 1) -> None:
        if self.on_event is None:
            return
        r = self.result
        elapsed = time.perf_counter() - self.started
        self.on_event(PrefillEvent(
            frames_done=r.frames, frames_total=self.frames_total, tokens_done=self.tokens_done,
            lm_prefill_flops=r.lm_prefill_flops, full_lm_prefill_flops=r.full_lm_prefill_flops,
            carried_tokens=self.cache.carried_tokens,
            elapsed_seconds=elapsed,
            memory_bytes=self.memory.current() if self.memory else 0,
            peak_memory_bytes=self.memory.peak_bytes() if self.memory else 0,
            remaining_seconds=remaining(elapsed, r.frames, self.frames_total),
            forward_chunks=forward_chunks,
        ))


def prefill_chunks(
    adapter: VideoAdapter,
    chunks: Iterable[Any],
    policy: Policy,
    *,
    frame_count: int,
    timestamps: tuple[float, ...],
    frame_size: tuple[int, int] | None = None,
    duration: float | None = None,
    system_prompt: str | None = None,
    pin_prefix: bool = False,
    attention: str = "sdpa",
    on_event: Callable[[PrefillEvent], None] | None = None,
    memory: accounting.PeakMemory | None = None,
    on_carried: Callable[[int, int, torch.Tensor], None] | None = None,
    full_forward_tokens: int | None = None,
    on_mass: Callable[[int, int, torch.Tensor], None] | None = None,
    group_tokens: int | None = None,
) -> PrefillResult:
    """Prefill the prompt prefix and every chunk of frames; `chunks` yields FrameChunk-likes
    (`.frames` uint8 (n, H, W, 3), `.first`, `.timestamps`, optional `.skipped`).

    Policies that carry everything (`full`) join consecutive chunks into one vision call and
    one language-model forward of at most `full_forward_tokens` tokens (default: up to
    FULL_FORWARD_TOKENS, bounded by free memory; 0 keeps the chunks as they come): exact,
    since causal attention over all earlier keys does not depend on where chunks are cut.

    Observers (both off by default): `on_carried(layer, seen, kept_positions)` whenever a
    selecting policy keeps its carried state; `on_mass(layer, chunk_start, mass)` with every
    chunk's per-key attention mass (see `StateCache.observe_mass`); with `on_mass` set, `full`
    keeps the chunks as they come, so the masses are per chunk.

    Other policies (window, statekv) run consecutive chunks in one language-model forward of at
    most `group_tokens` tokens (default: GROUP_FORWARD_TOKENS bounded by free memory; 0: one
    forward per chunk), each layer attending them one by one against its state: the same
    results (`StateLayer.group`). Vision still runs chunk by chunk."""
    ensure_attention(adapter)
    prompt = adapter.prompt(system_prompt)
    reserve = adapter.start(frame_count, timestamps, prompt, frame_size=frame_size,
                            duration=duration)
    loop = _Loop(adapter, policy, frame_count, reserve, attention, on_event, memory)
    with torch.inference_mode():
        prefix = adapter.prefix_chunk()
    if carries_everything(policy) and on_mass is None:  # the mass observer wants every chunk
        per_frame = (reserve - len(prefix.token_ids)) / max(1, frame_count)
        if full_forward_tokens is None:
            full_forward_tokens = forward_tokens_cap(adapter, loop.shape)
        chunks = group_chunks(chunks, max(0, int(full_forward_tokens // max(1.0, per_frame))))
        group_tokens = 0  # one grouped chunk is already one causal forward
    elif group_tokens is None:
        group_tokens = min(GROUP_FORWARD_TOKENS, forward_tokens_cap(adapter, loop.shape))
    loop.result = PrefillResult(cache=loop.cache, prompt=prompt,
                                rotary_length=adapter.rotary_length(reserve + ANSWER_ROOM), plan={
        "frame_count": frame_count, "timestamps": [float(t) for t in timestamps],
        "frame_size": list(frame_size) if frame_size is not None else None,
        "duration": duration})
    loop.cache.observe(on_carried)
    loop.cache.observe_mass(on_mass)
    # On the CPU, small chunks (a frame or two) run their small ops on one thread
    # (statekv.threads.SerialSmallOps: hooks on the Linear layers, removed below); other
    # devices get no hooks.
    on_cpu = torch.device(adapter.device).type == "cpu"
    loop.serial = SerialSmallOps(adapter.language_model, None if on_cpu else 1)
    loop.cache.serial = loop.serial
    try:
        with torch.inference_mode(), \
                fixed_rotary(adapter.language_model, loop.result.rotary_length):
            pinning = pin_prefix or policy.pins_prefix
            if pinning:
                loop.cache.begin_prefix()  # a prefix to be pinned is attended to, never selected
            loop.run_chunk(prefix)
            if pinning:
                loop.cache.pin(loop.result.chunk_tokens[0])
            for frame_chunk in _timed(chunks, loop.watch):
                _note_skipped(frame_chunk, loop.result.warnings)
                loop.result.frame_timestamps.extend(frame_chunk.timestamps)
                loop.queue(loop.encode(frame_chunk.frames, frame_chunk.first), group_tokens)
            loop.flush()
    finally:
        loop.serial.close()
        loop.cache.serial = None
    loop.cache.finish_prefill()
    loop.result.adapter_state = adapter.answer_state()
    loop.result.seconds = loop.watch.seconds
    return loop.result


def carries_everything(policy: Policy) -> bool:
    """Whether every chunk sees every earlier token (so the chunking cannot change results)."""
    return policy.recency and policy.capacity is None and not policy.pins_prefix


def forward_tokens_cap(adapter: VideoAdapter, shape: accounting.LMShape,
                       memory_bytes: int | None = None) -> int:
    """Most tokens one grouped `full` forward may hold: FULL_FORWARD_TOKENS, or fewer when the
    activations of that many tokens would not fit in a quarter of `memory_bytes` (default:
    the memory free now)."""
    cfg = adapter.text_config
    if memory_bytes is None:
        memory_bytes = accounting.available_memory(adapter.device)
    element = torch.empty((), dtype=adapter.dtype).element_size()
    per_token = accounting.activation_bytes_per_token(
        cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size), element)
    return int(min(FULL_FORWARD_TOKENS, memory_bytes // 4 // max(1, per_token)))


def group_chunks(chunks: Iterable[Any], max_frames: int) -> Iterator[Any]:
    """Join consecutive FrameChunk-likes into runs of at most `max_frames` frames (a chunk is
    never split, so each run keeps the family's temporal units whole); 0 or 1: as they come."""
    if max_frames <= 1:
        yield from chunks
        return
    group: list[Any] = []
    count = 0
    for chunk in chunks:
        if group and count + len(chunk.frames) > max_frames:
            yield _joined(group)
            group, count = [], 0
        group.append(chunk)
        count += len(chunk.frames)
    if group:
        yield _joined(group)


def _joined(group: list[Any]) -> Any:
    if len(group) == 1:
        return group[0]
    from statekv.video import FrameChunk

    return FrameChunk(
        frames=np.concatenate([c.frames for c in group]), first=group[0].first,
        timestamps=tuple(t for c in group for t in c.timestamps),
        indices=tuple(i for c in group for i in getattr(c, "indices", ())),
        skipped=tuple(t for c in group for t in getattr(c, "skipped", ())))


def _timed(chunks: Iterable[Any], watch: accounting.Stopwatch) -> Iterator[Any]:
    """Yield chunks, adding the time spent decoding them to `decode_seconds`."""
    iterator = iter(chunks)
    while True:
        started = time.perf_counter()
        try:
            chunk = next(iterator)
        except StopIteration:
            return
        watch.add("decode_seconds", started)
        yield chunk


def _note_skipped(frame_chunk: Any, warnings: list[str]) -> None:
    skipped = getattr(frame_chunk, "skipped", ())
    if skipped:
        times = ", ".join(f"{t:.2f}s" for t in skipped)
        warnings.append(f"skipped {len(skipped)} corrupt frame(s) at {times}")

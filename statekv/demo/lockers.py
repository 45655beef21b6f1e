"""The lockers task: synthetic videos in a real VLM's regime, with the evidence age controlled.

A frame is 64x64 pixels: a 4x4 grid of 16 lockers, each a 16x16 block, which after InternVL's
pixel shuffle (patch 4) is exactly 2x2 of the frame's 8x8 = 64 visual tokens (raster order).
So a frame is 64 visual tokens behind a short `FrameN:` label (about 90% of every chunk is
visual), and most of them show nothing new: like a real video, the evidence is a few tokens.
Frames are events:

* paint: one locker fills with a colour (its colour changes);
* probe: a white glyph (box, cup, hat, ball, tree, sun) appears in one locker; it shows no
  colour, only *which locker it reads*;
* empty: nothing happens (sensor noise).

Questions are probe questions, one colour word each: "hat color?" asks the colour the hat's
locker had *when the hat appeared*. The evidence is the latest paint of that locker before the
probe; its **evidence age** is the number of frames between that paint and the probe. Ages are
drawn evenly from buckets (1-4, 5-16, 17-48, 49 and more frames; as many as the video allows),
so half the questions are answerable from a 16-frame window and half are not. The probed locker
is not repainted between its evidence and the probe, and is repainted (another colour) after
the probe when there is room, so at question time the latest paint of the locker is the wrong
answer: the probe's own tokens must have fetched the colour during prefill.

Pure numpy; every video is a function of (frames, seed); train/test/demo seed streams are
disjoint (`split_seed`). Described in docs/demo-task.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from statekv.demo.synthetic import COLOURS, GLYPHS, render_events

FRAME_SIZE = 64  # pixels; patch 4 -> 16x16 patches -> 8x8 visual tokens after the pixel shuffle
GRID = 4  # lockers per side
LOCKERS = GRID * GRID
BLOCK = FRAME_SIZE // GRID  # 16 pixels: 2x2 visual tokens
TOKEN_GRID = 8  # visual tokens per side
AGE_BUCKETS: tuple[tuple[int, int], ...] = ((1, 4), (5, 16), (17, 48), (49, 10_000))
WINDOW_FRAMES = 16  # the recency window the buckets are cut around
CHANCE = 1 / len(COLOURS)
_SPLIT_KEYS = {"train": 10, "test": 11, "demo": 12}


@dataclass(frozen=True)
class Question:
    """A probe question, its exact one-word answer and how old its evidence is (frames)."""

    text: str
    answer: str
    kind: str
    evidence_age: int
    probe_frame: int
    locker: int


@dataclass(frozen=True)
class Event:
    """What happens in one frame (kind "paint", "probe" or "empty")."""

    frame: int
    kind: str
    slot: int = -1  # the locker
    colour: str = ""
    glyph: str = ""


@dataclass
class LockersVideo:
    """Frames (n, 64, 64, 3) uint8 at 1 fps, events and questions."""

    frames: np.ndarray
    events: list[Event]
    questions: list[Question]
    seed: int
    timestamps: list[float] = field(default_factory=list)


def locker_tokens(locker: int) -> list[int]:
    """Indices (within a frame's 64 visual tokens, raster order) of a locker's 2x2 tokens."""
    row, col = divmod(locker, GRID)
    return [(2 * row + dy) * TOKEN_GRID + 2 * col + dx for dy in (0, 1) for dx in (0, 1)]


def token_lockers() -> list[int]:
    """The locker of each of a frame's 64 visual tokens."""
    owner = [0] * (TOKEN_GRID * TOKEN_GRID)
    for locker in range(LOCKERS):
        for token in locker_tokens(locker):
            owner[token] = locker
    return owner


def _plan_probes(frames: int, rng: np.random.Generator, probes: int):
    """(probe frame, locker, age, glyph) per probe, with their reserved frames; distinct lockers."""
    buckets = [(lo, min(hi, frames - 2)) for lo, hi in AGE_BUCKETS if lo <= frames - 2]
    lockers = [int(x) for x in rng.permutation(LOCKERS)]
    glyphs = [str(g) for g in rng.permutation(GLYPHS)]
    taken: dict[int, tuple] = {}
    plans = []
    for j in range(min(probes, len(glyphs))):
        for _ in range(50):
            lo, hi = buckets[j % len(buckets)] if j < len(buckets) else \
                buckets[int(rng.integers(len(buckets)))]
            age = int(rng.integers(lo, hi + 1))
            probe = int(rng.integers(age, frames - 1))  # room for a repaint after it
            paint = probe - age
            repaint = int(rng.integers(probe + 1, frames))
            if {paint, probe, repaint} & set(taken) or len({paint, probe, repaint}) < 3:
                continue
            locker = lockers[j]
            if any(kind == "paint" and slot == locker and paint < f < probe
                   for f, (kind, slot) in taken.items()):
                continue
            taken[paint] = ("paint", locker)
            taken[probe] = ("probe", locker)
            taken[repaint] = ("paint", locker)
            plans.append((probe, locker, age, glyphs[j]))
            break
    return plans, taken


def _events(frames: int, rng: np.random.Generator, paint_rate: float, probes: int) -> list[Event]:
    plans, taken = _plan_probes(frames, rng, probes)
    # locker -> frames where it must not be painted: a probed locker is painted exactly once
    # before its probe (the evidence), so "the colour it had" needs no notion of recency
    quiet = {}
    for probe, locker, age, _ in plans:
        quiet.setdefault(locker, set()).update(f for f in range(probe) if f != probe - age)
    glyph_at = {probe: glyph for probe, _, _, glyph in plans}
    colours: dict[int, str] = {}
    events = []
    for f in range(frames):
        kind, slot = taken.get(f, (None, -1))
        if kind is None and rng.random() < paint_rate:
            allowed = [k for k in range(LOCKERS) if f not in quiet.get(k, ())]
            kind, slot = "paint", int(rng.choice(allowed))
        if kind == "paint":
            choices = [c for c in COLOURS if c != colours.get(slot)]  # a paint always changes it
            colours[slot] = str(rng.choice(choices))
            events.append(Event(f, "paint", slot, colours[slot]))
        elif kind == "probe":
            events.append(Event(f, "probe", slot, glyph=glyph_at[f]))
        else:
            events.append(Event(f, "empty"))
    return events


def locker_colours(events: list[Event]) -> list[dict[int, str]]:
    """Per frame, every painted locker's colour after that frame's event."""
    colours: dict[int, str] = {}
    states = []
    for e in events:
        if e.kind == "paint":
            colours = {**colours, e.slot: e.colour}
        states.append(colours)
    return states


def _last_paint(events: list[Event], locker: int, before: int) -> int | None:
    for e in reversed(events[:before]):
        if e.kind == "paint" and e.slot == locker:
            return e.frame
    return None


def questions_of(events: list[Event]) -> list[Question]:
    """The probe questions of a video, answers and evidence ages replayed from its events."""
    states = locker_colours(events)
    questions = []
    for e in events:
        if e.kind != "probe" or e.slot not in states[e.frame]:
            continue
        age = e.frame - _last_paint(events, e.slot, e.frame)
        questions.append(Question(f"{e.glyph} color?", states[e.frame][e.slot], "probe", age,
                                  e.frame, e.slot))
    return questions


def render(events: list[Event], rng: np.random.Generator, noise: float = 3.0) -> np.ndarray:
    """Frames (n, 64, 64, 3) uint8 for a list of events."""
    def corner(slot: int) -> tuple[int, int]:
        row, col = divmod(slot, GRID)
        return row * BLOCK + 2, col * BLOCK + 2

    return render_events(events, rng, FRAME_SIZE, corner, noise)


def generate_video(frames: int = 128, seed: int = 0, *, paint_rate: float = 0.5,
                   probes: int = 6) -> LockersVideo:
    """One video of `frames` frames and its probe questions; the same seed, the same video."""
    if frames < 8:
        raise ValueError(f"a lockers video needs at least 8 frames, got {frames}")
    rng = np.random.default_rng(seed)
    events = _events(frames, rng, paint_rate, probes)
    return LockersVideo(render(events, rng), events, questions_of(events), seed,
                        [float(i) for i in range(frames)])


def split_seed(split: str, index: int, frames: int) -> int:
    """The seed of video `index` of a split; train, test and demo streams never overlap."""
    if split not in _SPLIT_KEYS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(_SPLIT_KEYS)}")
    seq = np.random.SeedSequence([_SPLIT_KEYS[split], frames, index])
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> 1)


def split_videos(split: str, count: int, frames: int, start: int = 0) -> list[LockersVideo]:
    """`count` videos of a split at one length (videos `start` .. `start + count - 1`)."""
    return [generate_video(frames, split_seed(split, i, frames)) for i in range(start, start + count)]


def age_bucket(age: int, buckets=AGE_BUCKETS) -> tuple[int, int]:
    """The (age_min, age_max) bucket holding `age`."""
    for lo, hi in buckets:
        if lo <= age <= hi:
            return lo, hi
    raise ValueError(f"evidence age {age} is in no bucket")

"""Synthetic videos whose questions have exact answers, for the offline demo model and benchmark.

The task is built so that a single frame is ambiguous on its own: its meaning depends on
earlier frames. The screen has four slots (its quadrants; after InternVL's pixel shuffle each
slot is exactly one visual token of a 32x32 frame). Frames are events:

* paint: one slot fills with a colour (the slot's colour changes to it);
* probe: a white glyph (box, cup, hat, ball, tree, sun) appears in one slot; it shows no
  colour, only *which slot it reads*;
* empty: nothing happens (a little sensor noise).

Questions, one answer token each (a colour word):

* ``probe`` -- "hat color?": the colour its slot had *when the glyph appeared*. The probe frame
  itself carries no colour; the slot was usually repainted after it, so the answer is the most
  recent paint of that slot *before* the probe. During a causal prefill the probe's own tokens
  can fetch it (the causal mask hides later repaints for free); at question time, with every
  frame visible, finding "the latest paint before frame t" is hard. An `isolated` prefill
  (no frame sees another) therefore loses this information: the benchmark's floor.
* ``final`` -- "top left color now?": the slot's colour at the end (its last paint). Answerable
  from the detailed cache at question time: a control that every method should keep.

Pure numpy; every video is a function of (frames, seed). Train and test seeds come from
disjoint `SeedSequence` streams, so held-out videos never occur in training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FRAME_SIZE = 32  # pixels; 32 / patch 8 = 4x4 patches -> 2x2 tokens after the pixel shuffle
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 50, 200),
    "orange": (250, 140, 20),
}
GLYPHS: tuple[str, ...] = ("box", "cup", "hat", "ball", "tree", "sun")
SLOTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
KINDS: tuple[str, ...] = ("probe", "final")
CHANCE: dict[str, float] = {"probe": 1 / len(COLOURS), "final": 1 / len(COLOURS)}
BACKGROUND = 30
_SPLIT_KEYS = {"train": 0, "test": 1, "demo": 2}


@dataclass(frozen=True)
class Question:
    """One question with its exact one-word answer."""

    text: str
    answer: str
    kind: str  # "probe" or "final"


@dataclass(frozen=True)
class Event:
    """What happens in one frame (kind "paint", "probe" or "empty")."""

    frame: int
    kind: str
    slot: int = -1
    colour: str = ""  # paint: the new colour
    glyph: str = ""  # probe: which glyph


@dataclass
class SyntheticVideo:
    """Frames (n, 32, 32, 3) uint8, one timestamp per frame (1 fps), events and questions."""

    frames: np.ndarray
    events: list[Event]
    questions: list[Question]
    seed: int
    timestamps: list[float] = field(default_factory=list)


def _glyph_mask(name: str) -> np.ndarray:
    """A 12x12 boolean glyph; each differs in every 6x6 quarter so patches can tell them apart."""
    m = np.zeros((12, 12), dtype=bool)
    if name == "box":
        m[[0, 1, 10, 11], :] = True
        m[:, [0, 1, 10, 11]] = True
    elif name == "cup":
        m[5:7, :] = True
        m[:, 5:7] = True
    elif name == "hat":
        idx = np.arange(12)
        m[idx, idx] = m[idx, 11 - idx] = True
        m[idx[:-1], idx[1:]] = m[idx[1:], idx[:-1]] = True
    elif name == "ball":
        yy, xx = np.mgrid[:12, :12]
        m = (yy - 5.5) ** 2 + (xx - 5.5) ** 2 <= 30
    elif name == "tree":
        m[::3, :] = True
    elif name == "sun":
        yy, xx = np.mgrid[:12, :12]
        m = ((yy // 3) + (xx // 3)) % 2 == 0
    else:
        raise ValueError(f"unknown glyph {name!r}")
    return m


def _events(frames: int, rng: np.random.Generator, paint_rate: float, probes: int) -> list[Event]:
    """Four opening paints (one per slot), then random paints, probes in the first 3/4, empties."""
    opening = [Event(i, "paint", int(s), str(rng.choice(list(COLOURS))))
               for i, s in enumerate(rng.permutation(len(SLOTS))[:min(4, frames)])]
    first, last = len(opening) + 2, max(len(opening) + 3, int(frames * 0.75))
    room = np.arange(first, min(last, frames))
    count = min(probes, len(GLYPHS), len(room))
    probe_frames = {int(f) for f in rng.choice(room, size=count, replace=False)} if count else set()
    glyphs = list(rng.permutation(GLYPHS)[:count])
    colours = {e.slot: e.colour for e in opening}
    events = list(opening)
    for f in range(len(opening), frames):
        if f in probe_frames:
            events.append(Event(f, "probe", int(rng.integers(len(SLOTS))), glyph=str(glyphs.pop())))
        elif rng.random() < paint_rate:
            slot = int(rng.integers(len(SLOTS)))
            choices = [c for c in COLOURS if c != colours.get(slot)]  # a paint always changes it
            colour = str(rng.choice(choices))
            colours[slot] = colour
            events.append(Event(f, "paint", slot, colour))
        else:
            events.append(Event(f, "empty"))
    return events


def slot_colours(events: list[Event]) -> list[dict[int, str]]:
    """Per frame, every painted slot's colour after that frame's event."""
    colours: dict[int, str] = {}
    states = []
    for e in events:
        if e.kind == "paint":
            colours = {**colours, e.slot: e.colour}
        states.append(colours)
    return states


def _questions(events: list[Event]) -> list[Question]:
    states = slot_colours(events)
    questions = [Question(f"{e.glyph} color?", states[i][e.slot], "probe")
                 for i, e in enumerate(events) if e.kind == "probe"]
    final = states[-1] if states else {}
    for slot in sorted(final):
        questions.append(Question(f"{SLOTS[slot]} color now?", final[slot], "final"))
    return questions


def render(events: list[Event], rng: np.random.Generator, size: int = FRAME_SIZE,
           noise: float = 3.0) -> np.ndarray:
    """Frames (n, size, size, 3) uint8 for a list of events."""
    half = size // 2
    return render_events(events, rng, size, lambda slot: ((slot // 2) * half + 2,
                                                          (slot % 2) * half + 2), noise)


def render_events(events: list[Any], rng: np.random.Generator, size: int,
                  corner: Callable[[int], tuple[int, int]], noise: float = 3.0) -> np.ndarray:
    """Frames (n, size, size, 3) uint8: each event paints its slot's 12-pixel square (whose
    top-left pixel `corner(slot)` gives, before a pixel of jitter) or draws a glyph in it."""
    frames = np.full((len(events), size, size, 3), BACKGROUND, dtype=np.float32)
    for i, e in enumerate(events):
        if e.kind == "empty":
            continue
        dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))  # a pixel of jitter
        top, left = corner(e.slot)
        region = frames[i, top + dy:top + dy + 12, left + dx:left + dx + 12]
        if e.kind == "paint":
            region[:] = COLOURS[e.colour]
        else:
            region[_glyph_mask(e.glyph)] = 255.0
    frames += rng.normal(0.0, noise, size=frames.shape)
    return np.clip(frames, 0, 255).round().astype(np.uint8)


def generate_video(frames: int = 64, seed: int = 0, *, paint_rate: float = 0.45,
                   probes: int = 6) -> SyntheticVideo:
    """One video of `frames` frames and its questions; the same seed gives the same video."""
    if frames < 8:
        raise ValueError(f"a synthetic video needs at least 8 frames, got {frames}")
    rng = np.random.default_rng(seed)
    events = _events(frames, rng, paint_rate, probes)
    pixels = render(events, rng)
    return SyntheticVideo(pixels, events, _questions(events), seed,
                          [float(i) for i in range(frames)])


def split_seed(split: str, index: int, frames: int) -> int:
    """The seed of video `index` of a split; train, test and demo streams never overlap."""
    if split not in _SPLIT_KEYS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(_SPLIT_KEYS)}")
    seq = np.random.SeedSequence([_SPLIT_KEYS[split], frames, index])
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> 1)


def split_videos(split: str, count: int, frames: int, start: int = 0) -> list[SyntheticVideo]:
    """`count` videos of a split at one length (videos `start` .. `start + count - 1`)."""
    return [generate_video(frames, split_seed(split, i, frames)) for i in range(start, start + count)]

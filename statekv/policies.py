"""Carried-state policies: which past key/value entries a chunk may attend to during prefill.

Each policy is a small frozen dataclass. The base class turns per-entry scores into the
indices to keep (top-k, original order kept), so a policy only says how it scores and how
much it keeps. `recency` policies keep a contiguous tail of the history, which lets the
cache serve them as views of the detailed cache with no gathering at all.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence

from statekv.errors import UsageError

if TYPE_CHECKING:  # names and validation need no torch (the CLI lists methods before loading it)
    import torch


@dataclass(frozen=True)
class Policy:
    """Base: keep the `capacity` entries with the highest scores, in their original order."""

    name: ClassVar[str] = "policy"
    needs_mass: ClassVar[bool] = False  # scores come from attention mass (computed only then)
    recency: ClassVar[bool] = True  # kept entries are always the most recent ones
    pins_prefix: ClassVar[bool] = False  # the text prefix stays visible outside the capacity

    @property
    def capacity(self) -> int | None:
        """Most entries carried per layer and KV head; None means unbounded."""
        return None

    def first_visible(self, seen: int) -> int | None:
        """For a chunk after `seen` tokens: the first token a contiguous recent tail starting
        there would keep (None: everything). Selecting policies keep as many, not those."""
        return None if self.capacity is None else seen - self.capacity

    def scores(self, mass: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Higher is kept first; by default the most recent entries win."""
        import torch

        return positions.to(torch.float32)

    def select(self, mass: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Indices (kv_heads, kept) of the entries to carry, sorted ascending.

        mass: (kv_heads, candidates) float32 or None; positions: (kv_heads, candidates).
        """
        candidates = positions.shape[-1]
        keep = candidates if self.capacity is None else min(self.capacity, candidates)
        if keep == candidates:
            import torch

            return torch.arange(candidates, device=positions.device).expand(positions.shape[0], -1)
        top = self.scores(mass, positions).topk(keep, dim=-1, sorted=False).indices
        return top.sort(dim=-1).values

    @property
    def budget(self) -> int | None:
        """The `--budget` this policy was given (None when it takes none)."""
        return None

    @property
    def bidirectional_scores(self) -> bool:
        """Score with every chunk query seeing every chunk key (the forward stays causal)."""
        return False

    @property
    def score_decay(self) -> float:
        """Weight of a carried entry's previous score in its running score; 0 = this chunk only."""
        return 0.0


@dataclass(frozen=True)
class Full(Policy):
    """Carry everything: ordinary causal attention, the accuracy reference (quadratic)."""

    name: ClassVar[str] = "full"


@dataclass(frozen=True)
class Window(Policy):
    """Carry the most recent `tokens` entries: the recency baseline (ReKV-style, the paper's "ReKV").

    Built with `Window.of_frames`, it carries exactly the last `frames` whole frames (labels and
    delimiters included) before each chunk, whatever each frame's token count; `tokens` is then
    the most any `frames` consecutive frames hold.
    """

    name: ClassVar[str] = "window"
    tokens: int = 4096
    frames: int | None = None
    # Token offsets: the prefix's end (= the first frame's start), then each frame's end.
    frame_bounds: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise UsageError(f"window must be at least 1 token, got {self.tokens}")

    @classmethod
    def of_frames(cls, frames: int, layout: Sequence[int]) -> "Window":
        """The last `frames` whole frames, from the token counts of the prefix then each frame."""
        if frames < 1:
            raise UsageError(f"--window-frames must be at least 1, got {frames}")
        bounds = [int(layout[0])]
        for count in layout[1:]:
            bounds.append(bounds[-1] + int(count))
        spans = [bounds[i + frames] - bounds[i] for i in range(len(bounds) - frames)]
        tokens = max(spans, default=bounds[-1])  # fewer frames than the window: all of them
        return cls(tokens=max(1, tokens), frames=frames, frame_bounds=tuple(bounds))

    @property
    def capacity(self) -> int:
        return self.tokens

    def first_visible(self, seen: int) -> int:
        if not self.frame_bounds:
            return seen - self.tokens
        whole = bisect_right(self.frame_bounds, seen) - 1  # frames that ended by `seen`
        if whole < self.frames:
            return 0  # fewer whole frames than the window so far: everything is visible
        return self.frame_bounds[whole - self.frames]


@dataclass(frozen=True)
class StateKV(Policy):
    """Carry the top-`budget` entries by attention mass per layer and KV head (arXiv 2605.31598).

    Scoring variants, off by default (the paper's rule): `bidirectional` scores the chunk's keys
    as if every chunk query saw every chunk key (the forward itself stays causal), so a chunk's
    last tokens are not starved of scorers; `decay` in [0, 1) keeps a running score per carried
    entry, score = this chunk's mass + decay x its previous score (new entries start at their mass).
    """

    name: ClassVar[str] = "statekv"
    needs_mass: ClassVar[bool] = True
    recency: ClassVar[bool] = False
    tokens: int = 4096
    bidirectional: bool = False
    decay: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise UsageError(f"--budget must be at least 1 token, got {self.tokens}")
        if not 0.0 <= self.decay < 1.0:
            raise UsageError(f"score decay must be in [0, 1), got {self.decay}")

    @property
    def bidirectional_scores(self) -> bool:
        return self.bidirectional and self.needs_mass

    @property
    def score_decay(self) -> float:
        return self.decay if self.needs_mass else 0.0

    @property
    def capacity(self) -> int:
        return self.tokens

    @property
    def budget(self) -> int:
        return self.tokens

    def scores(self, mass: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        assert mass is not None, "StateKV scores need the attention mass"
        return mass


@dataclass(frozen=True)
class Isolated(Policy):
    """Carry nothing but the text prefix: the floor for benchmarks, not for users' answers."""

    name: ClassVar[str] = "isolated"
    pins_prefix: ClassVar[bool] = True

    @property
    def capacity(self) -> int:
        return 0


@dataclass(frozen=True)
class Random(StateKV):
    """Carry `tokens` entries chosen uniformly at random each chunk: the selection baseline."""

    name: ClassVar[str] = "random"
    needs_mass: ClassVar[bool] = False
    seed: int = 0
    generator: torch.Generator = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        import torch

        super().__post_init__()

        object.__setattr__(self, "generator", torch.Generator().manual_seed(self.seed))

    def scores(self, mass: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.rand(positions.shape, generator=self.generator).to(positions.device)


# The registry: the one place method names are listed and validated. ------------------------
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (Full, Window, StateKV, Isolated, Random)
}
METHODS: tuple[str, ...] = ("full", "window", "statekv", "isolated")  # what `--method` offers
# Scoring variants of statekv, measured by `statekv eval` (never a default without evidence).
VARIANTS: dict[str, dict] = {"statekv-bidir": {"bidirectional": True},
                             "statekv-decay": {"decay": 0.5}}
# eval also runs the random baseline and the scoring variants
BENCHMARK_METHODS: tuple[str, ...] = (*METHODS, "random", *VARIANTS)


def check_method(method: str, allowed: tuple[str, ...] = METHODS, option: str = "--method") -> str:
    """`method` if it is one of `allowed`, else a UsageError naming the choices."""
    if method not in allowed:
        raise UsageError(f"unknown method {method!r} for {option}; choose one of: {', '.join(allowed)}")
    return method


def make_policy(
    method: str, *, budget: int | None = None, window_tokens: int | None = None, seed: int = 0,
    window_frames: int | None = None, layout: Sequence[int] | None = None,
) -> Policy:
    """The policy for a method name; budget and window are in tokens, or the window in whole
    frames when `layout` (token counts of the prefix, then of each frame) is known."""
    if method in VARIANTS:
        if budget is None:
            raise UsageError(f"method {method!r} needs a budget (--budget)")
        return StateKV(tokens=int(budget), **VARIANTS[method])
    cls = POLICIES.get(check_method(method, (*POLICIES, *VARIANTS)))
    if cls is Window:
        if window_frames is not None and layout:
            return Window.of_frames(int(window_frames), layout)
        if window_tokens is None:
            raise UsageError("method 'window' needs a window size (--window-frames)")
        return Window(tokens=int(window_tokens))
    if cls is StateKV or cls is Random:
        if budget is None:
            raise UsageError(f"method {method!r} needs a budget (--budget)")
        return StateKV(tokens=int(budget)) if cls is StateKV else Random(tokens=int(budget), seed=seed)
    return cls()

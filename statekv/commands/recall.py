"""`statekv recall`: how much of full attention's past-directed mass a budget can hold, and holds.

One full-attention prefill gives, per chunk and layer, the attention mass every past token
received from the chunk's queries (the engine's `on_mass` observer). From it:
- concentration(B): the share of that past mass held by the B highest-mass past tokens of each
  KV head (the best any B-token carried state could do, the paper's figure);
- weighted_recall(B): the share that lands on the carried state a StateKV prefill at budget B
  actually kept when it reached that chunk (one StateKV prefill per budget, its kept positions
  read through the `on_carried` observer);
- churn(B): the share of the StateKV carried state dropped per chunk, averaged.
Every figure is a fraction in [0, 1]; exact definitions in docs/recall.md. Nothing printed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from statekv.errors import UsageError
from statekv.policies import StateKV

DEFAULT_BUDGETS = (256, 1024, 4096)
TARGET_RECALL = 0.9  # suggested_budget: the smallest listed budget reaching this recall
DEFAULT_MAX_CHUNKS = 32  # chunks measured, evenly spaced (bounds the kept sets held in memory)


@dataclass
class RecallRow:
    """One budget's figures (overall: the mean over layers of each layer's mean over chunks)."""

    budget: int
    concentration: float
    weighted_recall: float
    churn: float


def check_budgets(budgets: Sequence[int]) -> list[int]:
    """Sorted distinct budgets, each >= 1, at least one (UsageError otherwise)."""
    budgets = sorted(set(int(b) for b in budgets))
    if not budgets:
        raise UsageError("--budgets needs at least one budget, e.g. --budgets 256,1024,4096")
    if budgets[0] < 1:
        raise UsageError(f"--budgets must all be at least 1 token, got {budgets[0]}")
    return budgets


def measured_chunks(chunks: int, max_chunks: int) -> set[int]:
    """Indices (1 = the first video chunk) of at most `max_chunks` chunks, evenly spaced."""
    if max_chunks < 1:
        raise UsageError(f"--max-chunks must be at least 1, got {max_chunks}")
    if chunks <= max_chunks:
        return set(range(1, chunks + 1))
    if max_chunks == 1:
        return {chunks}
    return {1 + round(i * (chunks - 1) / (max_chunks - 1)) for i in range(max_chunks)}


class KeptStates:
    """`on_carried` observer of one StateKV prefill: churn per layer, and the kept positions
    (kv_heads, kept) at the measured chunks, keyed by (layer, first position of that chunk)."""

    def __init__(self, measured: set[int]) -> None:
        self.measured = measured
        self.kept: dict[tuple[int, int], torch.Tensor] = {}
        self.churn: dict[int, list[float]] = {}
        self._previous: dict[int, torch.Tensor] = {}
        self._calls: dict[int, int] = {}

    def __call__(self, layer: int, seen: int, positions: torch.Tensor) -> None:
        index = self._calls.get(layer, 0)  # 0 after the text prefix, k after video chunk k
        self._calls[layer] = index + 1
        previous = self._previous.get(layer)
        if previous is not None and previous.shape[-1]:
            self.churn.setdefault(layer, []).append(_dropped_share(previous, positions, seen))
        self._previous[layer] = positions.clone()
        if index + 1 in self.measured:  # the state the next chunk attends to
            self.kept[(layer, seen)] = self._previous[layer]


def _dropped_share(previous: torch.Tensor, current: torch.Tensor, seen: int) -> float:
    """Share of the previous carried entries (all KV heads) no longer carried."""
    heads = torch.arange(previous.shape[0], device=previous.device).unsqueeze(1) * (seen + 1)
    still = torch.isin(previous + heads, current + heads)
    return 1.0 - still.float().mean().item()


@dataclass
class _Sums:
    """Per-layer lists of per-chunk fractions, one list per budget."""

    concentration: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    recall: dict[tuple[int, int], list[float]] = field(default_factory=dict)

    def add(self, table: dict, layer: int, budget: int, value: float) -> None:
        table.setdefault((layer, budget), []).append(min(1.0, max(0.0, value)))


class FullMass:
    """`on_mass` observer of the full prefill: concentration and recall at the measured chunks."""

    def __init__(self, budgets: list[int], kept: dict[int, KeptStates]) -> None:
        self.budgets = budgets
        self.kept = kept
        self.sums = _Sums()
        self.layers: set[int] = set()

    def __call__(self, layer: int, start: int, mass: torch.Tensor) -> None:
        self.layers.add(layer)
        if start == 0 or not all((layer, start) in k.kept for k in self.kept.values()):
            return
        past = mass[:, :start]  # (kv_heads, start): full's keys are positions 0..seen-1
        total = past.sum()
        if not total > 0:
            return
        ranked = past.sort(dim=-1, descending=True).values.cumsum(dim=-1)  # (kv_heads, start)
        whole = ranked[:, -1].sum()
        for budget in self.budgets:
            top = ranked[:, min(budget, start) - 1].sum()
            self.sums.add(self.sums.concentration, layer, budget, (top / whole).item())
            carried = self.kept[budget].kept[(layer, start)]
            # 1 - (mass on dropped tokens) / total: exactly 1.0 when nothing was dropped
            dropped = torch.ones_like(past).scatter_(1, carried.to(past.device), 0.0)
            missed = (past * dropped).sum() / total
            self.sums.add(self.sums.recall, layer, budget, 1.0 - missed.item())


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(budgets: list[int], full: FullMass, kept: dict[int, KeptStates]) -> dict[str, Any]:
    """rows, per_layer and suggested_budget from the observers."""
    layers = sorted(full.layers)
    per_layer = []
    for layer in layers:
        rows = [RecallRow(b, _mean(full.sums.concentration.get((layer, b), [])),
                          _mean(full.sums.recall.get((layer, b), [])),
                          _mean(kept[b].churn.get(layer, []))) for b in budgets]
        per_layer.append({"layer": layer, "rows": [asdict(r) for r in rows]})
    rows = []
    for i, budget in enumerate(budgets):
        pick = lambda key: _mean([entry["rows"][i][key] for entry in per_layer])  # noqa: E731
        rows.append(RecallRow(budget, pick("concentration"), pick("weighted_recall"), pick("churn")))
    suggested = next((r.budget for r in rows if r.weighted_recall >= TARGET_RECALL), None)
    return {"rows": [asdict(r) for r in rows], "per_layer": per_layer,
            "suggested_budget": suggested}


def measure(prefill: Callable[..., Any], chunks: int, budgets: Sequence[int],
            max_chunks: int = DEFAULT_MAX_CHUNKS,
            on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Recall figures from `prefill(policy_or_method, on_carried=, on_mass=) -> Session`.

    `chunks` is the number of video chunks the prefill will run (to space the measured ones).
    Runs one StateKV prefill per budget, then one full prefill; returns rows, per_layer,
    suggested_budget, tokens, chunks_measured.
    """
    budgets = check_budgets(budgets)
    measured = measured_chunks(chunks, max_chunks)
    kept: dict[int, KeptStates] = {}
    for budget in budgets:
        if on_step:
            on_step(f"statekv prefill at budget {budget}")
        kept[budget] = KeptStates(measured)
        prefill(StateKV(tokens=budget), on_carried=kept[budget])
    if on_step:
        on_step("full prefill, measuring attention mass")
    full = FullMass(budgets, kept)
    session = prefill("full", on_mass=full)
    record = summarize(budgets, full, kept)
    record["tokens"] = session.stats.detailed_tokens
    record["chunks_measured"] = len(next(iter(full.sums.recall.values()), []))
    return record


def recall(path: str, options: Any, budgets: Sequence[int] = DEFAULT_BUDGETS,
           max_chunks: int = DEFAULT_MAX_CHUNKS,
           on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`statekv recall VIDEO`: the JSON record {path, model, tokens, rows, per_layer,
    suggested_budget} for a video, with the preset/model of `options` (a RunOptions)."""
    from statekv import video
    from statekv.commands.plan import load_model, plan_run, preflight

    budgets = check_budgets(budgets)
    measured_chunks(1, max_chunks)  # validate before loading anything
    preflight(plan_run(path, options), options.force)  # a bad file or no memory: fail first
    model, resolved = load_model(options)
    info = video.probe(path)
    plan = video.plan_frames(info, resolved.max_frames, fps=resolved.fps, start=options.start,
                             end=options.end, timestamps=video.frame_timestamps(path))
    chunk_frames = resolved.chunk_frames or model.adapter.frames_per_unit
    chunks = -(-len(plan.indices) // chunk_frames)

    def prefill(method, on_carried=None, on_mass=None):
        return model.prefill(
            path, method, max_frames=resolved.max_frames, fps=resolved.fps, start=options.start,
            end=options.end, backend=options.backend, chunk_frames=resolved.chunk_frames,
            system_prompt=resolved.preset.system_prompt, attention=options.attention,
            seed=options.seed, on_carried=on_carried, on_mass=on_mass)

    record = measure(prefill, chunks, budgets, max_chunks, on_step)
    return {"path": path, "model": resolved.model, **record}


def plot_recall(record: dict[str, Any], path: str) -> None:
    """Concentration and weighted recall against budget (log x) to a PNG (matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'statekv[plot]' (or drop --plot)") \
            from None
    rows = record["rows"]
    budgets = [r["budget"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(budgets, [r["concentration"] for r in rows], marker="o", label="concentration (top-B)")
    ax.plot(budgets, [r["weighted_recall"] for r in rows], marker="o",
            label="statekv weighted recall")
    ax.plot(budgets, [r["churn"] for r in rows], marker=".", linestyle=":", label="churn per chunk")
    ax.axhline(TARGET_RECALL, color="grey", linewidth=0.8, linestyle="--")
    if len(set(budgets)) > 1:
        ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("budget (tokens per layer and KV head)")
    ax.set_ylabel("share of past-directed attention mass")
    ax.set_title(f"{record['model']}: {record['tokens']} tokens", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

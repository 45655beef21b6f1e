"""`statekv eval --task lockers`: accuracy by evidence age, per method, on the lockers task.

Every method prefills the same held-out videos (`statekv.demo.lockers`, test split); each
probe question is scored by its first answer token (greedy). Rows: full, isolated (the floor),
window, window with the text prefix pinned (sink + recent), random, statekv and its scoring
variants at budgets in tokens, and a window compute-matched to statekv (the window whose LM
prefill FLOPs equal statekv's at that budget). Intervals are paired bootstrap 95% intervals:
videos are resampled with replacement, the same resample for every method. Nothing printed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from statekv import accounting
from statekv.demo import lockers
from statekv.errors import UsageError
from statekv.policies import BENCHMARK_METHODS, Policy, make_policy

# The registry's methods (random and the scoring variants included), the references first.
AGE_METHODS = ("full", "isolated") + tuple(m for m in BENCHMARK_METHODS if m not in ("full", "isolated"))
TARGET_FULL_GAIN = 0.40  # full >= chance + 40 points beyond the window
TARGET_FLOOR_GAP = 0.20  # isolated >= 20 points below full beyond the window
TARGET_STATEKV_GAP = 0.02  # statekv within 2 points of full overall
TARGET_OVER_WINDOW = 0.10  # statekv >= window + 10 points beyond the window, equal budget
BOOTSTRAP_ROUNDS = 1000
# Defaults of `statekv eval` and `statekv demo` on the lockers task: 64-frame videos (the
# shipped model's longest training length; 4,601 tokens) with budgets of 4 frames (73 tokens
# each) and of a quarter of the video's tokens (the largest budget for the targets).
LOCKERS_MODEL = "statekv/demo-lockers"  # the shipped lockers model (statekv.loading.BUNDLED)
EVAL_FRAMES = 64
EVAL_BUDGETS = (292, 1150)
DEMO_FRAMES = 64
DEMO_BUDGET = 1150


@dataclass(frozen=True)
class AgeSpec:
    """One row: a method, its budget in tokens (None: full/isolated), prefix pinning."""

    method: str
    budget: int | None = None
    pinned: bool = False
    matched_to: str | None = None  # "statekv@B": a window with statekv's FLOPs at budget B

    @property
    def label(self) -> str:
        text = self.method if self.budget is None else f"{self.method}@{self.budget}"
        text += "+pin" if self.pinned else ""
        return text + (f" (FLOPs of {self.matched_to})" if self.matched_to else "")

    def policy(self, seed: int) -> Policy:
        return make_policy(self.method, budget=self.budget, window_tokens=self.budget, seed=seed)


@dataclass
class AgeRow:
    """One method over every test video; fractions in [0, 1] (the `statekv eval --json` row)."""

    method: str
    budget: int | None
    pinned: bool
    frames: int
    accuracy: float
    ci_low: float
    ci_high: float
    lm_flops_fraction: float
    by_age: list[dict[str, Any]]
    label: str = ""
    questions: int = 0
    accuracy_beyond_window: float | None = None  # evidence older than lockers.WINDOW_FRAMES
    delta_vs_full: float = 0.0  # accuracy - full's, with its paired 95% interval
    delta_low: float = 0.0
    delta_high: float = 0.0
    matched_to: str | None = None
    lm_prefill_flops: float = 0.0


@dataclass
class AgeReport:
    """The whole table: `to_dict()` is `statekv eval --json`'s record."""

    model: str
    chance: float
    rows: list[AgeRow]
    verdict: str
    frames: int
    videos: int
    tokens: int  # tokens of one video (prefix + frames)
    window_frames: int = lockers.WINDOW_FRAMES
    findings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "chance": self.chance, "rows": [asdict(r) for r in self.rows],
                "verdict": self.verdict, "frames": self.frames, "videos": self.videos,
                "tokens": self.tokens, "window_frames": self.window_frames,
                "findings": self.findings}


def age_specs(budgets: Sequence[int], methods: Sequence[str] = AGE_METHODS) -> list[AgeSpec]:
    """full first (the reference), isolated, then every budgeted method at every budget;
    window both plain and with the prefix pinned."""
    unknown = sorted(set(methods) - set(AGE_METHODS))
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)} for --methods; choose from "
                         f"{', '.join(AGE_METHODS)}")
    if not budgets or min(budgets) < 1:
        raise UsageError("--budgets needs budgets of at least 1 token, e.g. --budgets 292,1150")
    specs = [AgeSpec("full")] + ([AgeSpec("isolated")] if "isolated" in methods else [])
    for budget in budgets:
        for method in AGE_METHODS[2:]:
            if method in methods:
                specs.append(AgeSpec(method, budget))
                if method == "window":
                    specs.append(AgeSpec(method, budget, pinned=True))
    return specs


def matched_window(shape: accounting.LMShape, chunks: list[int], target_flops: int) -> int:
    """The largest window (tokens) whose LM prefill FLOPs do not exceed `target_flops`."""
    low, high = 1, max(1, sum(chunks))
    while low < high:
        middle = (low + high + 1) // 2
        if sum(accounting.policy_chunk_flops(shape, chunks, make_policy(
                "window", window_tokens=middle))) <= target_flops:
            low = middle
        else:
            high = middle - 1
    return low


def _answer_ids(model, video) -> torch.Tensor:
    tok = model.adapter.tokenizer
    return torch.tensor([tok.encode(q.answer, add_special_tokens=False)[0] for q in video.questions])


def _run(model, video, spec: AgeSpec, seed: int):
    session = model.prefill_frames(video.frames, video.timestamps, method=spec.policy(seed),
                                   chunk_frames=1, pin_prefix=spec.pinned, seed=seed)
    picked = torch.stack([session.question_logits(q.text)[-1].argmax(-1)
                          for q in video.questions])
    return picked, session


def _bootstrap(correct: list[np.ndarray], reference: list[np.ndarray], seed: int):
    """Paired 95% intervals (accuracy, accuracy - reference's) resampling videos."""
    rng = np.random.default_rng(seed)
    n = len(correct)
    hits = np.array([c.sum() for c in correct], dtype=float)
    ref = np.array([r.sum() for r in reference], dtype=float)
    counts = np.array([len(c) for c in correct], dtype=float)
    picks = rng.integers(0, n, size=(BOOTSTRAP_ROUNDS, n))
    totals = counts[picks].sum(1).clip(min=1)
    acc = hits[picks].sum(1) / totals
    delta = (hits[picks].sum(1) - ref[picks].sum(1)) / totals
    pct = lambda values: (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))  # noqa: E731
    return pct(acc), pct(delta)


def _by_age(correct: np.ndarray, ages: np.ndarray, frames: int) -> list[dict[str, Any]]:
    rows = []
    for lo, hi in lockers.AGE_BUCKETS:
        if lo > frames:
            continue
        inside = (ages >= lo) & (ages <= hi)
        rows.append({"age_min": lo, "age_max": min(hi, frames), "n": int(inside.sum()),
                     "accuracy": float(correct[inside].mean()) if inside.any() else None})
    return rows


def run_age_eval(model, *, frames: int = EVAL_FRAMES, budgets: Sequence[int] = EVAL_BUDGETS,
                 videos: int = 24, methods: Sequence[str] = AGE_METHODS,
                 compute_matched: bool = True, seed: int = 0, model_name: str = "",
                 on_progress: Callable[[str], None] | None = None) -> AgeReport:
    """Accuracy by evidence age for every method on `videos` held-out lockers videos."""
    if videos < 1 or frames < 8:
        raise UsageError("need at least 1 video (--videos) and 8 frames (--lengths)")
    specs = age_specs(budgets, methods)
    results: dict[AgeSpec, list[tuple]] = {}
    shape = accounting.LMShape.from_model(model.adapter.language_model, model.adapter.text_config)
    tokens = 0
    for index, video in enumerate(lockers.split_videos("test", videos, frames)):
        if on_progress:
            on_progress(f"{frames} frames: video {index + 1}/{videos}")
        truth = _answer_ids(model, video)
        run_specs = list(specs)
        for spec in run_specs:
            picked, session = _run(model, video, spec, seed + index)
            stats = session.stats
            results.setdefault(spec, []).append(
                ((picked == truth).numpy(), stats.lm_prefill_flops, stats.full_lm_prefill_flops))
            tokens = stats.detailed_tokens
            if compute_matched and spec.method == "statekv":
                chunks = session.state.chunk_tokens
                window = AgeSpec("window", matched_window(shape, chunks, stats.lm_prefill_flops),
                                 matched_to=spec.label)
                picked, session = _run(model, video, window, seed + index)
                key = AgeSpec("window", None, matched_to=spec.label)  # one row across videos
                results.setdefault(key, []).append(
                    ((picked == truth).numpy(), session.stats.lm_prefill_flops,
                     session.stats.full_lm_prefill_flops, window.budget))
    ages = np.concatenate([[q.evidence_age for q in v.questions]
                           for v in lockers.split_videos("test", videos, frames)])
    rows = [_row(spec, per, results[specs[0]], ages, frames, seed) for spec, per in results.items()]
    report = AgeReport(model_name, lockers.CHANCE, rows, "", frames, videos, tokens)
    report.verdict, report.findings = verdict(report)
    return report


def _row(spec: AgeSpec, per: list[tuple], full: list[tuple], ages: np.ndarray, frames: int,
         seed: int) -> AgeRow:
    correct = [r[0] for r in per]
    flat = np.concatenate(correct).astype(float)
    (low, high), (d_low, d_high) = _bootstrap(correct, [r[0] for r in full], seed)
    full_flat = np.concatenate([r[0] for r in full]).astype(float)
    beyond = ages > lockers.WINDOW_FRAMES
    flops = float(np.mean([r[1] for r in per]))
    budget = spec.budget if spec.matched_to is None else int(round(np.mean([r[3] for r in per])))
    return AgeRow(
        method=spec.method, budget=budget, pinned=spec.pinned, frames=frames,
        accuracy=float(flat.mean()), ci_low=low, ci_high=high,
        lm_flops_fraction=flops / max(1.0, float(np.mean([r[2] for r in per]))),
        by_age=_by_age(flat, ages, frames), label=spec.label, questions=len(flat),
        accuracy_beyond_window=float(flat[beyond].mean()) if beyond.any() else None,
        delta_vs_full=float(flat.mean() - full_flat.mean()), delta_low=d_low, delta_high=d_high,
        matched_to=spec.matched_to, lm_prefill_flops=flops)


def verdict(report: AgeReport) -> tuple[str, dict[str, Any]]:
    """The issue's targets, checked in order: can the benchmark tell; then does statekv win."""
    rows = {r.label: r for r in report.rows}
    full, iso = rows.get("full"), rows.get("isolated")
    chance = report.chance
    if full is None or full.accuracy_beyond_window is None:
        return "no question beyond the window: the benchmark cannot test importance", {}
    findings: dict[str, Any] = {"full_beyond_window": full.accuracy_beyond_window}
    full_ok = full.accuracy_beyond_window >= chance + TARGET_FULL_GAIN
    floor_gap = None if iso is None else full.accuracy_beyond_window - (iso.accuracy_beyond_window or 0)
    findings["floor_gap_beyond_window"] = floor_gap
    if not full_ok or floor_gap is None or floor_gap < TARGET_FLOOR_GAP:
        return (f"the benchmark CANNOT discriminate: beyond a {report.window_frames}-frame window "
                f"full attention scores {full.accuracy_beyond_window:.1%} (target >= chance "
                f"{chance:.0%} + {TARGET_FULL_GAIN:.0%}) and the isolated floor is "
                + ("unknown" if floor_gap is None else f"{floor_gap:.1%} below it")
                + f" (target {TARGET_FLOOR_GAP:.0%}); method comparisons here are not findings"), findings
    quarter = report.tokens // 4
    parts = []
    for row in report.rows:
        if row.method != "statekv" or row.budget is None or row.budget > quarter:
            continue
        window = rows.get(f"window@{row.budget}")
        gap = full.accuracy - row.accuracy
        over = None if window is None else (row.accuracy_beyond_window or 0) - (
            window.accuracy_beyond_window or 0)
        findings[f"statekv@{row.budget}"] = {"below_full": gap, "over_window_beyond": over}
        parts.append(f"statekv@{row.budget} is {gap:+.1%} below full overall (target <= "
                     f"{TARGET_STATEKV_GAP:.0%}) and "
                     + ("has no window row" if over is None else f"{over:+.1%} over the window "
                        f"beyond it (target >= {TARGET_OVER_WINDOW:.0%})"))
    head = (f"the benchmark discriminates (full {full.accuracy_beyond_window:.1%} beyond the "
            f"window, isolated {floor_gap:.1%} below)")
    return "; ".join([head] + parts), findings


def plot_age(report: AgeReport, path: str) -> None:
    """Two panels: accuracy against evidence age (one line per method), and overall accuracy
    against LM prefill FLOPs (fraction of full's). Needs matplotlib (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'statekv[plot]' (or drop --plot)") \
            from None
    fig, (by_age, cost) = plt.subplots(1, 2, figsize=(12, 4.4))
    for row in report.rows:
        points = [(b["age_min"], b["age_max"], b["accuracy"]) for b in row.by_age
                  if b["accuracy"] is not None]
        centres = [np.sqrt(lo * hi) for lo, hi, _ in points]
        style = "-" if row.method in ("full", "statekv") else "--"
        by_age.plot(centres, [a for _, _, a in points], style, marker="o", label=row.label)
        cost.scatter(row.lm_flops_fraction, row.accuracy)
        cost.annotate(row.label, (row.lm_flops_fraction, row.accuracy), fontsize=6)
    for ax in (by_age, cost):
        ax.axhline(report.chance, color="grey", linewidth=0.8, linestyle=":")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("accuracy")
    by_age.axvline(report.window_frames, color="grey", linewidth=0.8, linestyle="--")
    by_age.set_xscale("log")
    by_age.set_xlabel("evidence age (frames before the probe; bucket centres)")
    by_age.legend(fontsize=6, ncol=2)
    cost.set_xlabel("LM prefill FLOPs (fraction of full attention's)")
    fig.suptitle(f"lockers task, {report.frames} frames, {report.videos} videos "
                 f"({report.tokens} tokens each)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe(event: lockers.Event) -> str:
    """A human line for one event, e.g. 'frame 12: locker 5 turns red'."""
    if event.kind == "paint":
        return f"frame {event.frame + 1}: locker {event.slot + 1} turns {event.colour}"
    if event.kind == "probe":
        return f"frame {event.frame + 1}: a {event.glyph} appears in locker {event.slot + 1}"
    return f"frame {event.frame + 1}: nothing"


def run_lockers_demo(model, frames: int = DEMO_FRAMES, seed: int = 0, method: str = "statekv",
                     budget: int | None = DEMO_BUDGET, window_frames: int | None = 16,
                     pin_prefix: bool = False):
    """A lockers video prefilled with `method`: per question the truth, the method's answer,
    full attention's answer and the evidence age (a `DemoResult`)."""
    from statekv.demo.evaluation import DemoAnswer, DemoResult

    video = lockers.generate_video(frames, seed)
    texts = [q.text for q in video.questions]

    def answer(name: str):
        session = model.prefill_frames(video.frames, video.timestamps, method=name, budget=budget,
                                       window_frames=window_frames, pin_prefix=pin_prefix,
                                       max_new_tokens=4)
        return session, session.ask(texts)

    session, replies = answer(method)
    full = replies if method == "full" else answer("full")[1]
    answers = [DemoAnswer(q.text, q.kind, r.answer, q.answer, q.evidence_age, f.answer)
               for q, r, f in zip(video.questions, replies, full)]
    return DemoResult(seed, frames, method, session.settings.budget, session.settings.window_frames,
                      answers, [describe(e) for e in video.events if e.kind != "empty"],
                      session.stats.to_dict(), session.settings.to_dict(),
                      None if method == "full" else sum(a.full_answer == a.truth for a in answers))


def write_age_csv(report: AgeReport, path: str) -> None:
    """One line per row; by-age accuracies as `age_<min>_<max>` columns."""
    import csv

    buckets = [(b["age_min"], b["age_max"]) for b in report.rows[0].by_age]
    fields = ["label", "method", "budget", "pinned", "frames", "accuracy", "ci_low", "ci_high",
              "delta_vs_full", "delta_low", "delta_high", "accuracy_beyond_window",
              "lm_flops_fraction", "matched_to", *(f"age_{lo}_{hi}" for lo, hi in buckets)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in report.rows:
            data = {k: v for k, v in asdict(row).items() if k in fields}
            data.update({f"age_{b['age_min']}_{b['age_max']}": b["accuracy"] for b in row.by_age})
            writer.writerow(data)

"""The shipped demo model: answer questions about synthetic videos offline, and benchmark methods.

`statekv/demo/checkpoint/` holds a tiny InternVL (real transformers classes, ~0.42M parameters) trained
by `tools/train_demo.py` with full attention on `statekv.demo.synthetic` videos. `run_demo` renders a
video, prefills it and answers its questions beside the truth; `run_eval` measures how close
each prefill method stays to full attention (accuracy, agreement, KL, LM prefill FLOPs), with
the isolated floor that tells whether the benchmark can discriminate at all. Nothing here
prints: results are dataclasses (the CLI renders them).
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from statekv.demo import synthetic
from statekv.errors import UsageError
from statekv.policies import BENCHMARK_METHODS, Policy, make_policy

DEMO_MODEL = "statekv/demo"  # the preset's `model`; resolve_checkpoint maps it to the folder
FLOOR_GAP = 0.15  # full must beat isolated by this much for the benchmark to discriminate
EVAL_METHODS = BENCHMARK_METHODS  # what eval accepts (the registry's, random included)
TRAINED_FRAMES = 32  # the demo model's training length (tools/train_demo.py's curriculum ends here)


def demo_checkpoint() -> str:
    """The shipped demo checkpoint directory (inside the installed package)."""
    from statekv.loading import bundled_checkpoint

    return bundled_checkpoint(DEMO_MODEL)


def load_demo(device: str = "cpu", threads: int | str | None = None, dtype: str = "float32"):
    """The demo model, loaded like any checkpoint (float32 unless asked otherwise), with
    `threads` CPU threads as the command line resolves them (N, "auto"; None:
    STATEKV_THREADS, OMP_NUM_THREADS, auto)."""
    from statekv import threads as cpu_threads
    from statekv.session import load

    return load(DEMO_MODEL, device=device, dtype=dtype, threads=cpu_threads.resolve(threads))


# demo ---------------------------------------------------------------------------------------
@dataclass
class DemoAnswer:
    """One question of the demo video: the model's answer beside the exact one."""

    question: str
    kind: str
    answer: str
    truth: str
    evidence_age: int | None = None  # frames between the evidence and the probe (lockers task)
    full_answer: str | None = None  # full attention's answer on the same video (lockers task)

    @property
    def correct(self) -> bool:
        return self.answer == self.truth


@dataclass
class DemoResult:
    """A rendered video, the method that prefilled it, and every question answered."""

    seed: int
    frames: int
    method: str
    budget: int | None
    window_frames: int | None
    answers: list[DemoAnswer]
    events: list[str]
    stats: dict[str, Any]
    settings: dict[str, Any]
    full_correct: int | None = None  # questions full attention gets right on the same video

    @property
    def accuracy(self) -> float:
        return sum(a.correct for a in self.answers) / max(1, len(self.answers))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for item in data["answers"]:
            item["correct"] = item["answer"] == item["truth"]
            for key in ("evidence_age", "full_answer"):  # only the lockers task has them
                if item[key] is None:
                    del item[key]
        data["accuracy"] = self.accuracy
        return data


def describe(event: synthetic.Event) -> str:
    """A human line for one event, e.g. 'frame 12: top left turns red'."""
    if event.kind == "paint":
        return f"frame {event.frame + 1}: {synthetic.SLOTS[event.slot]} turns {event.colour}"
    if event.kind == "probe":
        return f"frame {event.frame + 1}: a {event.glyph} appears {synthetic.SLOTS[event.slot]}"
    return f"frame {event.frame + 1}: nothing"


def run_demo(frames: int = 32, seed: int = 0, method: str = "statekv", budget: int | None = 64,
             window_frames: int | None = 16, pin_prefix: bool = False, model=None) -> DemoResult:
    """Render a synthetic video, prefill it with `method`, answer all its questions."""
    model = model or load_demo()
    video = synthetic.generate_video(frames, seed)
    texts = [q.text for q in video.questions]

    def answer(method_name: str):
        session = model.prefill_frames(video.frames, video.timestamps, method=method_name,
                                       budget=budget, window_frames=window_frames,
                                       pin_prefix=pin_prefix, max_new_tokens=4)
        return session, session.ask(texts)

    session, replies = answer(method)
    answers = [DemoAnswer(q.text, q.kind, r.answer, q.answer) for q, r in zip(video.questions, replies)]
    full_correct = None
    if method != "full":  # the reference, so a reader can tell the method's losses from the model's
        full_correct = sum(r.answer == q.answer for q, r in zip(video.questions, answer("full")[1]))
    return DemoResult(seed, frames, method, session.settings.budget, session.settings.window_frames,
                      answers, [describe(e) for e in video.events if e.kind != "empty"],
                      session.stats.to_dict(), session.settings.to_dict(), full_correct)


# eval ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """One column of the benchmark: a method with its budget (tokens) and prefix pinning."""

    method: str
    budget: int | None = None  # carried tokens (window: same tokens as a window of frames)
    pin_prefix: bool = False

    @property
    def label(self) -> str:
        text = self.method if self.budget is None else f"{self.method}@{self.budget}"
        return text + ("+pin" if self.pin_prefix else "")

    def policy(self, tokens_per_frame: int, seed: int) -> Policy:
        # window gets the same tokens as the others' budget (a window of that many tokens)
        return make_policy(self.method, budget=self.budget, window_tokens=self.budget, seed=seed)


@dataclass
class EvalRow:
    """One method at one video length, over all test videos (accuracy as fractions)."""

    frames: int
    method: str
    budget: int | None
    window_frames: int | None
    pin_prefix: bool
    videos: int
    questions: int
    accuracy: float
    accuracy_probe: float
    accuracy_final: float
    agreement: float  # first answer token equal to full's
    kl: float  # mean KL(full || method) of the first answer token's distribution, nats
    delta: float  # accuracy - full's accuracy
    delta_low: float  # 95% paired bootstrap interval of delta (resampling videos)
    delta_high: float
    lm_prefill_flops: float  # per video, mean
    full_lm_prefill_flops: float
    flops_ratio: float

    @property
    def label(self) -> str:
        return MethodSpec(self.method, self.budget, self.pin_prefix).label


@dataclass
class EvalReport:
    """All rows, plus what the isolated floor says about the benchmark."""

    rows: list[EvalRow]
    tokens_per_frame: int
    frame_tokens: int  # tokens one frame occupies in the sequence (visual + label)
    chance: dict[str, float]
    floor: dict[int, dict[str, float]]  # frames -> {full, isolated, gap}
    discriminates: bool
    verdict: str


def default_specs(budgets: Sequence[int], pin: str = "both",
                  methods: Sequence[str] = EVAL_METHODS) -> list[MethodSpec]:
    """full and isolated once, then window/statekv/random at every budget (pinned or not)."""
    unknown = sorted(set(methods) - set(EVAL_METHODS))
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(EVAL_METHODS)}")
    if pin not in ("off", "on", "both"):
        raise UsageError(f"--pin must be off, on or both, got {pin!r}")
    pins = {"off": (False,), "on": (True,), "both": (False, True)}[pin]
    specs = [MethodSpec("full")]
    if "isolated" in methods:
        specs.append(MethodSpec("isolated"))
    for budget in budgets:
        if budget < 1:
            raise UsageError(f"budgets must be at least 1 token, got {budget}")
        for method in ("window", "statekv", "random"):
            if method in methods:
                specs.extend(MethodSpec(method, budget, p) for p in pins)
    return specs


def _first_token_logprobs(model, frames, timestamps, spec: MethodSpec, questions, seed: int):
    """(questions, vocab) log-probabilities of each question's first answer token, and FLOPs."""
    policy = spec.policy(model.adapter.tokens_per_frame(), seed)
    session = model.prefill_frames(frames, timestamps, method=policy, chunk_frames=1,
                                   pin_prefix=spec.pin_prefix, seed=seed)
    rows = [torch.log_softmax(session.question_logits(q)[-1], dim=-1) for q in questions]
    stats = session.stats
    return torch.stack(rows), stats.lm_prefill_flops, stats.full_lm_prefill_flops


def _bootstrap(per_video: np.ndarray, reference: np.ndarray, seed: int, rounds: int = 1000):
    """95% interval of mean(per_video - reference) over videos resampled with replacement."""
    diff = per_video - reference
    if len(diff) < 2:
        return float(diff.mean()), float(diff.mean())
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(rounds, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _answer_ids(model, video) -> torch.Tensor:
    tok = model.adapter.tokenizer
    return torch.tensor([tok.encode(q.answer, add_special_tokens=False)[0] for q in video.questions])


def run_eval(
    lengths: Sequence[int] = (TRAINED_FRAMES,),
    budgets: Sequence[int] = (32, 64, 128),
    videos: int = 16,
    pin: str = "both",
    methods: Sequence[str] = EVAL_METHODS,
    seed: int = 0,
    model=None,
    on_progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Benchmark the methods on held-out synthetic videos (test split) at each length."""
    if videos < 1 or any(n < 8 for n in lengths):
        raise UsageError("need at least 1 video and lengths of at least 8 frames")
    model = model or load_demo()
    specs = default_specs(budgets, pin, methods)
    rows: list[EvalRow] = []
    for frames in lengths:
        rows.extend(_eval_length(model, frames, specs, videos, seed, on_progress))
    return _report(model, rows)


def _eval_length(model, frames: int, specs, videos: int, seed: int, on_progress) -> list[EvalRow]:
    # results[label] = per video: (correct (q,), kinds, agree (q,), kl (q,), flops, full flops)
    results: dict[MethodSpec, list[tuple]] = {s: [] for s in specs}
    for index, video in enumerate(synthetic.split_videos("test", videos, frames)):
        if on_progress:
            on_progress(f"{frames} frames: video {index + 1}/{videos}")
        truth = _answer_ids(model, video)
        kinds = [q.kind for q in video.questions]
        texts = [q.text for q in video.questions]
        reference = None
        for spec in specs:
            logprobs, flops, full_flops = _first_token_logprobs(
                model, video.frames, video.timestamps, spec, texts, seed + index)
            if reference is None:  # specs[0] is full
                reference = logprobs
            picked = logprobs.argmax(-1)
            kl = (reference.exp() * (reference - logprobs)).sum(-1).clamp_min(0)
            results[spec].append(((picked == truth).numpy(), kinds,
                                  (picked == reference.argmax(-1)).numpy(), kl.numpy(),
                                  flops, full_flops))
    full = results[specs[0]]
    full_acc = np.array([r[0].mean() for r in full])
    rows = []
    for spec in specs:
        per = results[spec]
        correct = np.concatenate([r[0] for r in per])
        kinds = np.array([k for r in per for k in r[1]])
        per_video = np.array([r[0].mean() for r in per])
        low, high = _bootstrap(per_video, full_acc, seed)
        flops = float(np.mean([r[4] for r in per]))
        full_flops = float(np.mean([r[5] for r in per]))
        tpf = model.adapter.tokens_per_frame()
        rows.append(EvalRow(
            frames=frames, method=spec.method, budget=spec.budget,
            window_frames=spec.budget // tpf if spec.method == "window" and spec.budget else None,
            pin_prefix=spec.pin_prefix, videos=len(per), questions=len(correct),
            accuracy=float(correct.mean()),
            accuracy_probe=_mean(correct[kinds == "probe"]),
            accuracy_final=_mean(correct[kinds == "final"]),
            agreement=float(np.concatenate([r[2] for r in per]).mean()),
            kl=float(np.concatenate([r[3] for r in per]).mean()),
            delta=float(per_video.mean() - full_acc.mean()), delta_low=low, delta_high=high,
            lm_prefill_flops=flops, full_lm_prefill_flops=full_flops,
            flops_ratio=flops / max(1.0, full_flops)))
    return rows


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else math.nan


def _report(model, rows: list[EvalRow]) -> EvalReport:
    floor: dict[int, dict[str, float]] = {}
    for frames in sorted({r.frames for r in rows}):
        by = {r.label: r for r in rows if r.frames == frames}
        if "full" in by and "isolated" in by:
            full, iso = by["full"], by["isolated"]
            floor[frames] = {"full": full.accuracy, "isolated": iso.accuracy,
                             "gap": full.accuracy - iso.accuracy,
                             "full_probe": full.accuracy_probe, "isolated_probe": iso.accuracy_probe,
                             "gap_probe": full.accuracy_probe - iso.accuracy_probe}
    discriminates = bool(floor) and all(f["gap"] >= FLOOR_GAP for f in floor.values())
    if not floor:
        verdict = "no isolated run: the floor is unknown, so the benchmark's power is unknown"
    elif discriminates:
        verdict = (f"isolated prefill loses >= {FLOOR_GAP:.0%} accuracy at every length: the "
                   f"benchmark can tell a method that carries context from one that does not")
    else:
        worst = min(floor, key=lambda n: floor[n]["gap"])
        verdict = (f"the benchmark CANNOT discriminate at {worst} frames: isolated prefill is only "
                   f"{floor[worst]['gap']:.1%} below full attention (needs >= {FLOOR_GAP:.0%}), so "
                   f"questions there are answerable without cross-frame context")
    chance = max(synthetic.CHANCE.values())
    lost = sorted(n for n, f in floor.items() if f["full"] < chance + 0.10)
    if lost:
        verdict += (f"; at {', '.join(map(str, lost))} frames full attention itself is within 10 "
                    f"points of chance ({chance:.0%}): the demo model was trained on "
                    f"{TRAINED_FRAMES}-frame videos and does not generalise there")
    adapter = model.adapter
    frame_ids = adapter.frame_token_ids(1)
    frame_tokens = 0 if frame_ids is None else len(frame_ids)
    return EvalReport(rows, adapter.tokens_per_frame(), frame_tokens, dict(synthetic.CHANCE),
                      floor, discriminates, verdict)


CSV_FIELDS = [f for f in EvalRow.__dataclass_fields__]


def write_csv(rows: Sequence[EvalRow], path: str | Path) -> Path:
    """One line per row, the EvalRow fields as columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    return path


def plot_eval(report: EvalReport, path: str | Path) -> Path:
    """Accuracy against LM prefill FLOPs (as a fraction of full attention's), one panel per
    length, each point labelled with its budget (needs matplotlib: the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("the plot needs matplotlib: pip install 'statekv[plot]' "
                         "(or drop --plot)") from None
    lengths = sorted({r.frames for r in report.rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths) + 1.4, 3.6),
                             squeeze=False)
    for ax, frames in zip(axes[0], lengths):
        rows = [r for r in report.rows if r.frames == frames]
        for r in rows:  # full and isolated: one point each
            if r.budget is None:
                ax.scatter([r.flops_ratio], [r.accuracy], marker="*" if r.method == "full" else "x",
                           s=80, color="k" if r.method == "full" else "r", zorder=3,
                           label=f"{r.method} ({r.accuracy:.0%})")
        labels = sorted({(r.method, r.pin_prefix) for r in rows if r.budget is not None})
        # Budgets are written once per panel, beside one line (statekv's when it ran), above
        # and below its points in turn: the methods share budgets, and small budgets sit close.
        named = ("statekv", False) if ("statekv", False) in labels else (labels or [None])[0]
        for label in labels:
            line = sorted((r for r in rows if (r.method, r.pin_prefix) == label), key=lambda r: r.budget)
            ax.plot([r.flops_ratio for r in line], [r.accuracy for r in line], marker="o",
                    linestyle="--" if label[1] else "-",
                    label=label[0] + (" +pin" if label[1] else ""))
            if label != named:
                continue
            for i, r in enumerate(line):
                ax.annotate(str(r.budget), (r.flops_ratio, r.accuracy), fontsize=6,
                            textcoords="offset points", xytext=(3, 4) if i % 2 else (3, -9))
        ax.set_title(f"{frames} frames ({rows[0].videos} videos); numbers: budget", fontsize=9)
        ax.set_xlabel("LM prefill FLOPs / full attention's")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        chance = max(report.chance.values())
        ax.axhline(chance, color="gray", linewidth=0.8, linestyle=":",
                   label=f"chance ({chance:.0%})")
        ax.annotate(f"chance {chance:.0%}", (1.0, chance), xycoords=("axes fraction", "data"),
                    xytext=(-3, -8), textcoords="offset points", fontsize=6, color="gray",
                    ha="right")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # off the data
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# dtype fidelity -----------------------------------------------------------------------------
def dtype_agreement(
    dtype: str = "bfloat16",
    frames: int = TRAINED_FRAMES,
    budgets: Sequence[int] = (64,),
    videos: int = 16,
    methods: Sequence[str] = ("full", "window", "statekv"),
    seed: int = 0,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Per method label: how often the first answer token in `dtype` equals float32's
    (`agreement`), and both dtypes' accuracy on the held-out test questions.

    The same videos, questions and methods as `statekv eval`, run twice: the float32 demo
    model and the same weights loaded in `dtype`.
    """
    reference, other = load_demo(dtype="float32"), load_demo(dtype=dtype)
    specs = [s for s in default_specs(budgets, "off", methods)]
    counts: dict[str, list[int]] = {s.label: [0, 0, 0, 0] for s in specs}  # agree, ok32, ok, n
    for index, video in enumerate(synthetic.split_videos("test", videos, frames)):
        if on_progress:
            on_progress(f"{frames} frames: video {index + 1}/{videos}")
        truth = _answer_ids(reference, video)
        texts = [q.text for q in video.questions]
        for spec in specs:
            picked = [_first_token_logprobs(model, video.frames, video.timestamps, spec, texts,
                                            seed + index)[0].argmax(-1) for model in (reference, other)]
            tally = counts[spec.label]
            tally[0] += int((picked[0] == picked[1]).sum())
            tally[1] += int((picked[0] == truth).sum())
            tally[2] += int((picked[1] == truth).sum())
            tally[3] += len(texts)
    return {label: {"agreement": a / n, "accuracy_float32": r / n, f"accuracy_{dtype}": o / n,
                    "questions": n} for label, (a, r, o, n) in counts.items()}

"""Multiple-choice video benchmarks from local files: `statekv eval --benchmark`.

Reads Video-MME and MLVU (dev) as their publishers distribute them (docs/benchmarks.md
gives the layouts and where they come from), prefills every video once per method with
the same sampled frames, answers each of its questions from that prefill and appends one
JSON line per (question, method), resumable like `statekv summarize`:

    questions = read_benchmark("videomme", "data/Video-MME")
    result = run_benchmark(questions, RunOptions(preset="internvl3-1b", max_frames=512),
                           ["full", "window", "statekv"], "results.jsonl")
    report(load_results("results.jsonl"))  # accuracy per method, 95% Wilson intervals

The answer is the option letter the model gives the highest probability at the first
answer token (among the question's valid letters), with the greedy text for the record.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import time
import traceback
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from statekv.errors import InputError, StateKVError, UsageError
from statekv.units import fraction

BENCHMARKS = ("videomme", "mlvu")
DEFAULT_METHODS = ("full", "window", "statekv")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# The published numbers (accuracy, %), offline, no subtitles, 512 frames at most 1 fps,
# B = 4096, window 16 frames: StateKV, arXiv 2605.31598, main results table. Keyed by the
# statekv preset that runs the same checkpoint.
PAPER_RESULTS: dict[str, dict[str, dict[str, float]]] = {
    "internvl3-1b": {"videomme": {"full": 46.19, "window": 37.11, "statekv": 45.80},
                     "mlvu": {"full": 47.05, "window": 33.44, "statekv": 46.35}},
    "internvl3-2b": {"videomme": {"full": 55.81, "window": 31.78, "statekv": 54.15},
                     "mlvu": {"full": 56.61, "window": 5.49, "statekv": 57.31}},
    "internvl3-8b": {"videomme": {"full": 64.19, "window": 54.56, "statekv": 62.52},
                     "mlvu": {"full": 61.14, "window": 31.11, "statekv": 62.85}},
    "qwen3-vl-2b": {"videomme": {"full": 58.67, "window": 49.44, "statekv": 58.00}},
}
# The settings those numbers were measured with (a run with others shows them as "paper,
# other settings").
PAPER_SETTINGS = {"max_frames": 512, "fps": 1.0, "budget": 4096, "window_frames": 16}

# Video-MME's layout (the lmms-lab/Video-MME dataset repository): the question table and
# where its `videos_chunked_*.zip` archives unpack.
VIDEOMME_COLUMNS = ("videoID", "question_id", "duration", "domain", "sub_category",
                    "task_type", "question", "options", "answer")
VIDEOMME_TABLES = ("videomme/test-*.parquet", "*.parquet")
VIDEOMME_VIDEO_DIRS = ("data", "videos", "video", ".")
VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm")

# MLVU dev (the MLVU/MVLU dataset repository): MLVU/json/<n>_<task>.json beside
# MLVU/video/<n>_<task>/; tasks 8 (sub_scene) and 9 (summary) are open-ended, not
# multiple choice, and are left out.
MLVU_FIELDS = ("video", "duration", "question", "candidates", "answer", "question_type")
MLVU_OPEN_ENDED = ("8_sub_scene", "9_summary")

PROMPT_ID = "statekv-mcq-v1"  # part of the settings hash: change it when the prompt changes
INSTRUCTION = ("Select the best answer to the following multiple-choice question based on "
               "the video.")
ANSWER_LINE = "Answer with the option's letter from the given choices directly."
ANSWER_TOKENS = 8  # generated tokens kept for the record (the letter decides)


# Questions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    """One multiple-choice question about one video, as the benchmark states it."""

    benchmark: str
    question_id: str
    video_id: str
    video: str  # the video file's path
    question: str
    options: tuple[str, ...]  # option texts, without their letters
    answer: str  # the right letter
    duration: str | float  # Video-MME: short/medium/long; MLVU: seconds
    task_type: str
    category: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def letters(self) -> str:
        return LETTERS[:len(self.options)]

    def prompt(self) -> str:
        """The question after the video: instruction, question, lettered options, answer line."""
        lines = [INSTRUCTION, self.question.strip()]
        lines += [f"{letter}. {text}" for letter, text in zip(self.letters, self.options)]
        lines.append(ANSWER_LINE)
        return "\n".join(lines)


def read_benchmark(name: str, data: str) -> list[Question]:
    """The questions of benchmark `name` ("videomme" or "mlvu") under folder `data`."""
    if name not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)}")
    if not os.path.isdir(data):
        raise InputError(f"--data {data}: no such folder")
    return read_videomme(data) if name == "videomme" else read_mlvu(data)


_LETTERED = re.compile(r"^\s*\(?([A-Z])[.)]\s*(.*)$", re.DOTALL)


def read_videomme(data: str) -> list[Question]:
    """Video-MME: the parquet question table, videos as `{videoID}.mp4` beside it."""
    table = _find_first(data, VIDEOMME_TABLES)
    if table is None:
        raise InputError(f"no Video-MME question table in {data} (looked for "
                         f"{' and '.join(VIDEOMME_TABLES)})")
    rows = _read_parquet(table)
    if rows:
        missing = [c for c in VIDEOMME_COLUMNS if c not in rows[0]]
        if missing:
            raise InputError(f"{table}: missing column {', '.join(missing)}")
    folders = [os.path.normpath(os.path.join(data, d)) for d in VIDEOMME_VIDEO_DIRS]
    folders = [d for d in folders if os.path.isdir(d)]
    found: dict[str, str] | None = None  # every video below `data`, built only if needed
    questions = []
    for row in rows:
        qid = str(row["question_id"])
        options = row["options"]
        if isinstance(options, str):
            options = [options]
        if not isinstance(options, (list, tuple)) or not options:
            raise InputError(f"{table}: question {qid} has no options")
        texts, letters = [], []
        for index, option in enumerate(options):
            match = _LETTERED.match(str(option))
            letters.append(match.group(1) if match else LETTERS[index])
            texts.append(match.group(2).strip() if match else str(option).strip())
        if letters != list(LETTERS[:len(letters)]):
            raise InputError(f"{table}: question {qid} options are not lettered A, B, C, ...: "
                             f"{options!r}")
        answer = str(row["answer"]).strip()
        if answer not in letters:
            raise InputError(f"{table}: question {qid} answer {answer!r} is not among its "
                             f"options {', '.join(letters)}")
        video_id = str(row["videoID"])
        path = _video_path(folders, video_id, data, found)
        if not os.path.isfile(path) and found is None:
            found = _video_index(data)  # once, only when a video is not where expected
            path = _video_path(folders, video_id, data, found)
        questions.append(Question(
            "videomme", qid, video_id, path, str(row["question"]),
            tuple(texts), answer, str(row["duration"]), str(row["task_type"]),
            str(row["domain"]), {"sub_category": str(row["sub_category"])}))
    return questions


def _find_first(data: str, patterns: tuple[str, ...]) -> str | None:
    for pattern in patterns:
        found = sorted(glob.glob(os.path.join(data, pattern)))
        if found:
            return found[0]
    return None


def _read_parquet(path: str) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("reading Video-MME needs pyarrow: pip install 'statekv[eval]'") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - any unreadable table is one line
        raise InputError(f"cannot read {path}: {exc}") from None


def _video_path(folders: list[str], video_id: str, data: str,
                index: dict[str, str] | None = None) -> str:
    for folder in folders:
        for suffix in VIDEO_SUFFIXES:
            candidate = os.path.join(folder, video_id + suffix)
            if os.path.isfile(candidate):
                return candidate
    if index and video_id in index:  # wherever the archives unpacked it below `data`
        return index[video_id]
    # not there: the question still runs and its records say which file is missing
    return os.path.join(folders[0] if folders else data, video_id + ".mp4")


def _video_index(data: str) -> dict[str, str]:
    """Video files anywhere below `data`, by name without extension (first found wins)."""
    index: dict[str, str] = {}
    for folder, dirs, files in os.walk(data):
        dirs.sort()
        for name in sorted(files):
            stem, suffix = os.path.splitext(name)
            if suffix in VIDEO_SUFFIXES:
                index.setdefault(stem, os.path.join(folder, name))
    return index


def read_mlvu(data: str) -> list[Question]:
    """MLVU dev: `json/<n>_<task>.json` beside `video/<n>_<task>/` (in `data` or `data/MLVU`)."""
    root = data
    if not os.path.isdir(os.path.join(root, "json")) and os.path.isdir(os.path.join(data, "MLVU")):
        root = os.path.join(data, "MLVU")
    json_dir = os.path.join(root, "json")
    if not os.path.isdir(json_dir):
        raise InputError(f"no MLVU json folder in {data} (looked for json/ and MLVU/json/)")
    files = sorted(glob.glob(os.path.join(json_dir, "*.json")))
    files = [f for f in files if os.path.splitext(os.path.basename(f))[0] not in MLVU_OPEN_ENDED]
    if not files:
        raise InputError(f"{json_dir} holds no task files (e.g. 1_plotQA.json)")
    questions = []
    found: dict[str, str] | None = None  # every video below `root`, built only if needed
    for path in files:
        task = os.path.splitext(os.path.basename(path))[0]
        try:
            with open(path, encoding="utf-8") as file:
                items = json.load(file)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {path}: {exc}") from None
        if not isinstance(items, list):
            raise InputError(f"{path}: expected a list of questions")
        folder = _mlvu_video_dir(root, task)
        for index, item in enumerate(items):
            qid = f"{task}/{index}"
            missing = [k for k in MLVU_FIELDS if not isinstance(item, dict) or k not in item]
            if missing:
                raise InputError(f"{path}: question {index} is missing field {', '.join(missing)}")
            candidates = [str(c) for c in item["candidates"]]
            answer = str(item["answer"])
            if answer not in candidates:
                raise InputError(f"{path}: question {index} answer {answer!r} is not among its "
                                 f"candidates")
            video = str(item["video"])
            try:
                duration: str | float = float(item["duration"])
            except (TypeError, ValueError):
                duration = str(item["duration"])
            kind = str(item["question_type"])
            where = os.path.join(folder, video)
            if not os.path.isfile(where):
                found = _video_index(root) if found is None else found
                where = found.get(os.path.splitext(video)[0], where)
            questions.append(Question(
                "mlvu", qid, os.path.splitext(video)[0], where,
                str(item["question"]), tuple(candidates),
                LETTERS[candidates.index(answer)], duration, kind, kind, {"task_file": task}))
    return questions


def _mlvu_video_dir(root: str, task: str) -> str:
    """video/<n>_<task>, or video/<task> as some copies name it (else the video is looked
    for anywhere below the root)."""
    for name in (task, task.split("_", 1)[-1]):
        folder = os.path.join(root, "video", name)
        if os.path.isdir(folder):
            return folder
    return os.path.join(root, "video", task)


def limit_questions(questions: list[Question], limit: int | None) -> list[Question]:
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    return questions if limit is None else questions[:limit]


def shard_questions(questions: list[Question], k: int, n: int) -> list[Question]:
    """Shard K of N by video (a video's questions stay together: one prefill per method)."""
    from statekv.commands.summarize import shard

    keep = set(shard(sorted({q.video for q in questions}), k, n))
    return [q for q in questions if q.video in keep]


# Running -----------------------------------------------------------------------------------
@dataclass
class EvalProgress:
    """What `on_progress` is told after each (video, method): counts, cost and time left."""

    video_id: str
    method: str
    records: list[dict[str, Any]]
    done: int  # (question, method) records written this run
    skipped: int
    total: int  # (question, method) pairs to do this run (excluding skipped)
    elapsed_seconds: float
    eta_seconds: float | None
    lm_prefill_flops: dict[str, int]  # per method, this run
    full_lm_prefill_flops: dict[str, int]


@dataclass
class EvalResult:
    """What a benchmark run did: counts and this run's records."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 1


def record_key(record: dict[str, Any]) -> tuple[str, str] | None:
    """Identity of a result line: (question_id, method)."""
    qid, method = record.get("question_id"), record.get("method")
    if isinstance(qid, str) and isinstance(method, str) and "benchmark" in record:
        return qid, method
    return None


def method_settings(resolved: Any, options: Any, method: str, benchmark: str
                    ) -> tuple[dict[str, Any], str]:
    """The requested settings of one method and their hash (what decides a result)."""
    from statekv.commands.summarize import requested_settings, settings_hash

    settings = requested_settings(dataclasses.replace(resolved, method=method), options,
                                  f"{PROMPT_ID}:{benchmark}")
    settings.update(preset=resolved.preset.name, benchmark=benchmark)
    return settings, settings_hash(settings)


def run_benchmark(questions: list[Question], options: Any, methods: list[str] | None = None,
                  out: str = "results.jsonl", redo: bool = False, *,
                  on_progress: Callable[[EvalProgress], None] | None = None,
                  on_event: Callable[[Any], None] | None = None,
                  use_ray: bool = False, ray_address: str | None = None) -> EvalResult:
    """Answer every question with every method, appending one line per (question, method).

    Lines already in `out` with status ok and the same settings hash are skipped unless
    `redo`. Each video is prefilled once per method, all methods on the same frames.
    """
    from statekv.commands import plan as planning
    from statekv.commands.summarize import JsonlWriter, read_records
    from statekv.policies import check_method

    started = time.perf_counter()
    methods = list(dict.fromkeys(methods or DEFAULT_METHODS))
    for method in methods:
        check_method(method, option="--methods")
    if not questions:
        raise UsageError("no questions to run")
    benchmark = questions[0].benchmark
    resolved = planning.resolve(options)
    plans = {m: method_settings(resolved, options, m, benchmark) for m in methods}
    previous = {} if (redo or out == "-") else read_records(out, key=record_key)
    result = EvalResult()
    work: dict[str, list[tuple[str, Question]]] = {}
    for q in questions:
        for method in methods:
            old = previous.get((q.question_id, method))
            if old and old.get("status") == "ok" and old.get("settings_hash") == plans[method][1]:
                result.skipped += 1
            else:
                work.setdefault(q.video, []).append((method, q))
    total = sum(len(items) for items in work.values())
    if not work:
        result.seconds = time.perf_counter() - started
        return result
    tally = _Tally(total, result.skipped, started, on_progress)
    with JsonlWriter(out) as writer:
        def emit(video_id: str, method: str, records: list[dict[str, Any]]) -> None:
            for record in records:
                writer.write(record)
                result.records.append(record)
                if record["status"] == "ok":
                    result.done += 1
                else:
                    result.failed += 1
            tally.add(video_id, method, records)

        jobs = [(video, items) for video, items in work.items()]
        if use_ray or ray_address:
            result.workers = _run_ray(jobs, options, plans, emit, ray_address)
        else:
            _preflight([video for video, _ in jobs], options, methods)
            model, resolved = planning.load_model(options, resolved)
            for video, items in jobs:
                evaluate_video(model, resolved, options, video, items, plans, emit, on_event)
    result.seconds = time.perf_counter() - started
    return result


class _Tally:
    """Counts and the time-left estimate for progress reports."""

    def __init__(self, total: int, skipped: int, started: float, on_progress) -> None:
        self.total, self.skipped, self.started, self.on_progress = total, skipped, started, on_progress
        self.done = 0
        self.flops: dict[str, int] = defaultdict(int)
        self.full: dict[str, int] = defaultdict(int)

    def add(self, video_id: str, method: str, records: list[dict[str, Any]]) -> None:
        self.done += len(records)
        ok = [r for r in records if r["status"] == "ok"]
        if ok:  # one prefill per (video, method): count it once
            self.flops[method] += ok[0]["lm_prefill_flops"] or 0
            self.full[method] += ok[0]["full_lm_prefill_flops"] or 0
        if self.on_progress:
            elapsed = time.perf_counter() - self.started
            left = self.total - self.done
            eta = elapsed / self.done * left if self.done else None
            self.on_progress(EvalProgress(video_id, method, records, self.done, self.skipped,
                                          self.total, elapsed, eta, dict(self.flops),
                                          dict(self.full)))


PREFLIGHT_CANDIDATES = 8  # the largest files probed to find the longest video


def _preflight(videos: list[str], options: Any, methods: list[str]) -> None:
    """Check memory on the longest readable video before the model loads (`--force` skips).

    Probing a long video takes about a second, so only the largest files are probed (size
    follows length closely, and past `--max-frames` any longer video costs the same).
    statekv's prefill needs the most (its attention-mass buffers), so it decides when it runs.
    """
    from statekv import video as video_io
    from statekv.commands import plan as planning

    if options.force:
        return

    def size(path: str) -> int:
        try:
            return os.stat(path).st_size
        except OSError:
            return -1

    longest, seconds = None, -1.0
    for path in sorted(videos, key=size, reverse=True)[:PREFLIGHT_CANDIDATES]:
        try:
            duration = video_io.probe(path).duration_seconds
        except (StateKVError, OSError):
            continue  # its questions get error records later
        if duration > seconds:
            longest, seconds = path, duration
    if longest is None:
        return
    method = "statekv" if "statekv" in methods else methods[0]
    planning.preflight(planning.plan_run(longest, dataclasses.replace(options, method=method)),
                       force=False)


def evaluate_video(model: Any, resolved: Any, options: Any, path: str,
                   items: list[tuple[str, Question]], plans: dict[str, tuple[dict, str]],
                   emit: Callable[[str, str, list[dict[str, Any]]], None],
                   on_event: Callable[[Any], None] | None = None,
                   source: str | None = None) -> None:
    """Prefill one video once per method and answer its questions; failures become records.

    `source` (default `path`) is where the file is read from (a Ray worker's absolute path).
    """
    from statekv.commands import plan as planning

    source = source or path
    by_method: dict[str, list[Question]] = {}
    for method, q in items:
        by_method.setdefault(method, []).append(q)
    video_id = items[0][1].video_id
    for method in [m for m in plans if m in by_method]:
        settings, digest = plans[method]
        started = time.perf_counter()
        try:
            session = planning.prefill_video(model, resolved, options, source, method, on_event)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad video must not end the run
            _debug()
            emit(video_id, method, [error_record(q, method, settings, digest, exc)
                                    for q in by_method[method]])
            continue
        prefill_seconds = time.perf_counter() - started
        records = []
        share = prefill_seconds / len(by_method[method])
        for q in by_method[method]:
            records.append(answer_record(session, q, method, settings, digest, share,
                                         prefill_seconds, options))
        emit(video_id, method, records)
        del session


def _debug() -> None:
    if os.environ.get("STATEKV_DEBUG") == "1":
        traceback.print_exc()


def letter_token_ids(adapter: Any, letters: str) -> dict[str, list[int]]:
    """The token ids that start each option letter as an answer ("A", and " A" when that is
    one token too)."""
    ids: dict[str, list[int]] = {}
    for letter in letters:
        variants = []
        for text in (letter, " " + letter):
            tokens = adapter.tokenize(text)
            if tokens and (len(tokens) == 1 or text == letter):
                variants.append(tokens[0] if text == letter else tokens[-1])
        ids[letter] = sorted(set(variants))
    return ids


def pick_letter(logprobs: Any, adapter: Any, letters: str) -> tuple[str, dict[str, float]]:
    """The valid letter with the highest first-token log-probability, and every letter's score."""
    scores = {letter: max(float(logprobs[i]) for i in ids)
              for letter, ids in letter_token_ids(adapter, letters).items() if ids}
    if not scores:
        raise StateKVError("the tokenizer has no token for the option letters")
    best = max(scores, key=lambda letter: (scores[letter], -letters.index(letter)))
    return best, scores


def _base_record(q: Question, method: str, settings: dict[str, Any], digest: str) -> dict[str, Any]:
    return {"benchmark": q.benchmark, "question_id": q.question_id, "video_id": q.video_id,
            "video": q.video, "method": method, "settings": settings, "settings_hash": digest,
            "status": "error", "prediction": None, "answer": q.answer, "correct": None,
            "duration": q.duration, "task_type": q.task_type, "category": q.category,
            **q.extra, "options": len(q.options), "generated": None, "letter_logprobs": None,
            "frames": None, "frames_digest": None, "lm_prefill_flops": None,
            "full_lm_prefill_flops": None, "flops_share": None, "seconds": None,
            "prefill_seconds": None, "answer_seconds": None, "error": None, "warnings": []}


def error_record(q: Question, method: str, settings: dict[str, Any], digest: str,
                 exc: BaseException) -> dict[str, Any]:
    record = _base_record(q, method, settings, digest)
    lines = str(exc).strip().splitlines()
    record["error"] = {"type": type(exc).__name__,
                       "message": lines[0] if lines else type(exc).__name__}
    return record


def answer_record(session: Any, q: Question, method: str, settings: dict[str, Any], digest: str,
                  prefill_share: float, prefill_seconds: float, options: Any) -> dict[str, Any]:
    """One question answered from a prefilled session (an error record if answering fails)."""
    full_settings = dict(session.settings.to_dict(), preset=settings.get("preset"),
                         benchmark=settings.get("benchmark"), prompt=settings.get("prompt"))
    record = _base_record(q, method, full_settings, digest)
    started = time.perf_counter()
    try:
        limit = options.max_new_tokens or ANSWER_TOKENS
        answer = session.ask([q.prompt()], limit)[0]
        letter, scores = pick_letter(answer.first_token_logprobs, session.model.adapter, q.letters)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad question must not end the run
        _debug()
        return error_record(q, method, full_settings, digest, exc)
    seconds = time.perf_counter() - started
    stats = session.stats
    record.update(
        status="ok", prediction=letter, correct=letter == q.answer, generated=answer.answer,
        letter_logprobs={k: round(v, 4) for k, v in scores.items()}, frames=stats.frames,
        frames_digest=_digest(stats.frame_timestamps), lm_prefill_flops=stats.lm_prefill_flops,
        full_lm_prefill_flops=stats.full_lm_prefill_flops,
        flops_share=stats.lm_flops_fraction,
        seconds=prefill_share + seconds, prefill_seconds=prefill_seconds,
        answer_seconds=seconds, warnings=list(session.warnings))
    return record


def _digest(timestamps: list[float]) -> str:
    text = json.dumps([round(t, 4) for t in timestamps])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# Ray ---------------------------------------------------------------------------------------
class EvalWorker:
    """A Ray actor's body: loads the model once, then evaluates one video per call."""

    def __init__(self, options: Any, plans: dict[str, tuple[dict, str]]) -> None:
        from statekv.commands import plan as planning

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.options, self.plans = options, plans
        self.failure: tuple[str, str, int] | None = None
        try:
            self.model, self.resolved = planning.load_model(options)
        except Exception as exc:  # noqa: BLE001 - reported by ready()
            code = exc.exit_code if isinstance(exc, StateKVError) else 1
            self.failure = (type(exc).__name__, str(exc), code)

    def ready(self) -> tuple[str, str, int] | None:
        return self.failure

    def evaluate(self, path: str, source: str, items: list[tuple[str, Question]]
                 ) -> list[tuple[str, str, list[dict[str, Any]]]]:
        batches: list[tuple[str, str, list[dict[str, Any]]]] = []
        evaluate_video(self.model, self.resolved, self.options, path, items, self.plans,
                       lambda v, m, r: batches.append((v, m, r)), source=source)
        return batches


def _run_ray(jobs, options, plans, emit, address) -> int:
    from statekv.commands.summarize import _raise_worker_failure

    try:
        import ray
    except ImportError:
        raise UsageError("the Ray backend needs Ray: pip install 'statekv[ray]'") from None
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False} if not address else {}
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, **kwargs)
        started_here = True
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if gpus and (options.device == "auto" or options.device.startswith("cuda")):
            count, per_actor = max(1, gpus), {"num_gpus": 1, "num_cpus": 1}
        else:
            count, per_actor = max(1, int(resources.get("CPU", 1))), {"num_cpus": 1}
        count = min(count, len(jobs))
        actor_class = ray.remote(**per_actor)(EvalWorker)
        actors = [actor_class.remote(options, plans) for _ in range(count)]
        for failure in ray.get([actor.ready.remote() for actor in actors]):
            if failure is not None:
                for actor in actors:
                    ray.kill(actor)
                _raise_worker_failure(failure)
        pending = deque(jobs)
        inflight: dict[Any, tuple[Any, str, list]] = {}

        def submit(actor) -> None:
            if pending:
                path, items = pending.popleft()
                ref = actor.evaluate.remote(path, os.path.abspath(path), items)
                inflight[ref] = (actor, path, items)

        try:
            for actor in actors:
                submit(actor)
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                actor, _path, items = inflight.pop(ready[0])
                try:
                    batches = ray.get(ready[0])
                except ray.exceptions.RayError as exc:  # the worker died (killed, OOM)
                    batches = _lost(items, plans, exc)
                    if isinstance(exc, ray.exceptions.RayActorError):
                        actor = actor_class.remote(options, plans)
                        actors.append(actor)
                for video_id, method, records in batches:
                    emit(video_id, method, records)
                submit(actor)
        finally:
            for ref in inflight:
                ray.cancel(ref, force=True)
            for actor in actors:
                ray.kill(actor)
        return count
    finally:
        if started_here:
            ray.shutdown()


def _lost(items, plans, exc) -> list[tuple[str, str, list[dict[str, Any]]]]:
    by_method: dict[str, list[dict[str, Any]]] = {}
    for method, q in items:
        settings, digest = plans[method]
        by_method.setdefault(method, []).append(error_record(q, method, settings, digest, exc))
    video_id = items[0][1].video_id
    return [(video_id, method, records) for method, records in by_method.items()]


# Report ------------------------------------------------------------------------------------
def load_results(path: str) -> list[dict[str, Any]]:
    """The last line of each (question, method) in a results file."""
    from statekv.commands.summarize import read_records

    if path != "-" and not os.path.isfile(path):
        raise InputError(f"no such results file: {path}")
    return list(read_records(path, key=record_key).values())


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (0, 1 when nothing was counted)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def duration_bucket(duration: Any) -> str:
    """Video-MME's own label (short/medium/long); MLVU's seconds in bands of minutes."""
    if isinstance(duration, (int, float)) and not isinstance(duration, bool):
        minutes = duration / 60
        for limit, label in ((5, "<5 min"), (10, "5-10 min"), (20, "10-20 min"), (40, "20-40 min")):
            if minutes < limit:
                return label
        return ">=40 min"
    return str(duration)


def _groups(records: list[dict[str, Any]], key: Callable[[dict], Any]) -> dict[str, dict]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        groups[str(key(r))].append(bool(r["correct"]))
    return {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(groups.items())}


def report(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per method (overall, by duration, category and task type) with 95% Wilson
    intervals, agreement with full, and the paper's figure when the preset is one it ran.

    Accuracy counts the questions answered (status ok); `errors` counts the others.
    """
    if not records:
        raise InputError("the results file holds no benchmark records")
    benchmarks = sorted({r["benchmark"] for r in records})
    if len(benchmarks) > 1:
        raise UsageError(f"the results file mixes benchmarks ({', '.join(benchmarks)}); "
                         f"report one at a time")
    benchmark = benchmarks[0]
    models = sorted({str((r.get("settings") or {}).get("model")) for r in records})
    presets = sorted({str((r.get("settings") or {}).get("preset")) for r in records})
    full = {r["question_id"]: r["prediction"] for r in records
            if r["method"] == "full" and r["status"] == "ok"}
    methods = {}
    order = [m for m in DEFAULT_METHODS if any(r["method"] == m for r in records)]
    order += sorted({r["method"] for r in records} - set(order))
    for method in order:
        rows = [r for r in records if r["method"] == method]
        ok = [r for r in rows if r["status"] == "ok"]
        correct = sum(bool(r["correct"]) for r in ok)
        low, high = wilson_interval(correct, len(ok))
        paired = [r for r in ok if r["question_id"] in full]
        agree = (sum(r["prediction"] == full[r["question_id"]] for r in paired) / len(paired)
                 if paired else None)
        by_task = _groups(ok, lambda r: r["task_type"])
        videos = {(r["video_id"]): r for r in ok}  # one prefill per video: count it once
        lm = sum(r["lm_prefill_flops"] or 0 for r in videos.values())
        full_lm = sum(r["full_lm_prefill_flops"] or 0 for r in videos.values())
        settings = (ok or rows)[0].get("settings") or {}
        paper = _paper(settings, benchmark, method)
        methods[method] = {
            "n": len(ok), "correct": correct, "errors": len(rows) - len(ok),
            "accuracy": correct / len(ok) if ok else None, "ci_low": low, "ci_high": high,
            "agreement_with_full": agree, "agreement_n": len(paired),
            "by_duration": _groups(ok, lambda r: duration_bucket(r["duration"])),
            "by_category": _groups(ok, lambda r: r["category"]),
            "by_task_type": by_task,
            "task_mean": (sum(g["accuracy"] for g in by_task.values()) / len(by_task)
                          if by_task else None),
            "paper": paper, "paper_settings_match": _paper_settings(settings, method),
            "lm_prefill_flops": lm, "full_lm_prefill_flops": full_lm,
            "flops_share": fraction(lm, full_lm),
            "seconds": sum(r["seconds"] or 0 for r in ok),
            "budget": settings.get("budget"), "window_frames": settings.get("window_frames"),
        }
    return {"benchmark": benchmark, "model": models[0] if len(models) == 1 else models,
            "preset": presets[0] if len(presets) == 1 else presets,
            "questions": len({r["question_id"] for r in records}), "interval": "wilson-95",
            "methods": methods}


def _paper(settings: dict[str, Any], benchmark: str, method: str) -> float | None:
    """The paper's accuracy (a fraction, as `accuracy`) for this preset's checkpoint."""
    from statekv.presets import load_preset

    name = settings.get("preset")
    row = PAPER_RESULTS.get(str(name), {}).get(benchmark, {})
    if method not in row:
        return None
    try:
        if load_preset(name).model != settings.get("model"):
            return None  # --model replaced the preset's checkpoint
    except StateKVError:
        return None
    return row[method] / 100


def _paper_settings(settings: dict[str, Any], method: str) -> bool:
    wanted = {"max_frames": PAPER_SETTINGS["max_frames"], "fps": PAPER_SETTINGS["fps"]}
    if method == "statekv":
        wanted["budget"] = PAPER_SETTINGS["budget"]
    if method == "window":
        wanted["window_frames"] = PAPER_SETTINGS["window_frames"]
    return all(settings.get(k) == v for k, v in wanted.items())


__all__ = [
    "BENCHMARKS",
    "PAPER_RESULTS",
    "EvalProgress",
    "EvalResult",
    "Question",
    "duration_bucket",
    "limit_questions",
    "load_results",
    "pick_letter",
    "read_benchmark",
    "read_mlvu",
    "read_videomme",
    "report",
    "run_benchmark",
    "shard_questions",
    "wilson_interval",
]

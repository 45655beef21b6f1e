"""Batch summaries: find videos, summarise each with one prefill, append JSONL records.

The library side of `statekv summarize` (no printing). One record per video, in
the summarize record of docs/formats.md, appended to the output as soon as the video is done
(one write, flushed and fsynced), so an interrupted run leaves a valid file and the
next run with the same output resumes: a video whose last record is `ok` with the same
`settings_hash` (and the same file size and mtime) is skipped unless `redo`.

    videos = find_videos(["clips/"])
    result = summarize(shard(videos, 1, 4), RunOptions(max_frames=64), None, "out.jsonl")

A Ray backend (`use_ray=True`) runs one actor per GPU (or per CPU) holding the model and
streams results back to the single writer here; `ray` is imported only then.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from statekv.errors import InputError, StateKVError, UsageError

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mkv", ".mov", ".avi", ".webm", ".mpg", ".mpeg", ".wmv", ".flv",
    ".ts", ".mts", ".m2ts", ".3gp", ".ogv", ".vob",
})

# What decides a summary (the settings record minus device and family, plus the prompt
# and the options that change the prefill's arithmetic).
HASH_KEYS = ("model", "model_revision", "method", "budget", "window_frames", "max_frames", "fps",
             "start", "end", "chunk_frames", "dtype", "max_new_tokens", "seed", "prompt",
             "system_prompt", "pin_prefix", "attention")

# The settings keys (plus the prompt) that summarize records carry.
RECORD_KEYS = ("model", "model_revision", "family", "method", "budget", "window_frames",
               "max_frames", "fps", "start", "end", "chunk_frames", "dtype", "device",
               "max_new_tokens", "seed", "prompt")

# Stats that vary from run to run (excluded when comparing records).
TIMING_STATS = ("decode_seconds", "vision_seconds", "lm_prefill_seconds", "answer_seconds",
                "peak_memory_bytes")


# Discovery ---------------------------------------------------------------------------------
def find_videos(paths: Iterable[str], glob: str | None = None) -> list[str]:
    """Video files under `paths`, sorted: files as given, folders recursively.

    In folders, a file is taken when its extension is a video extension, or, with `glob`,
    when its name (or its path below the folder) matches the pattern instead. Symbolic
    links are followed, each real folder once, so link loops end. A path that does not
    exist is an InputError.
    """
    found: set[str] = set()
    for path in paths:
        path = str(path)
        if os.path.isfile(path):
            found.add(path)
        elif os.path.isdir(path):
            found.update(_walk(path, glob))
        else:
            raise InputError(f"no such file or folder: {path}")
    return sorted(found)


def _walk(root: str, glob: str | None) -> list[str]:
    seen: set[tuple[int, int]] = set()
    videos = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:  # a link back to a folder already walked
            dirs[:] = []
            continue
        seen.add(key)
        dirs.sort()
        for name in files:
            full = os.path.join(folder, name)
            if _wanted(name, os.path.relpath(full, root), glob) and os.path.isfile(full):
                videos.append(full)
    return videos


def _wanted(name: str, relative: str, glob: str | None) -> bool:
    if glob is not None:
        return fnmatch.fnmatch(name, glob) or fnmatch.fnmatch(relative, glob)
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` -> (K, N), K from 1."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like K/N (e.g. 1/4), got {text!r}") from None
    check_shard(k, n)
    return k, n


def check_shard(k: int, n: int) -> None:
    if n < 1 or not 1 <= k <= n:
        raise UsageError(f"--shard K/N needs 1 <= K <= N, got {k}/{n}")


def shard(videos: list[str], k: int, n: int) -> list[str]:
    """Shard K of N (K from 1): positions congruent to K-1 modulo N in the sorted list."""
    check_shard(k, n)
    return sorted(videos)[k - 1::n]


# Settings ----------------------------------------------------------------------------------
def settings_hash(settings: dict[str, Any]) -> str:
    """A stable hash of the settings that decide a result (device and timings excluded)."""
    decided = {key: settings.get(key) for key in HASH_KEYS}
    text = json.dumps(decided, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def requested_settings(resolved: Any, options: Any, prompt: str) -> dict[str, Any]:
    """The settings a run asks for, known before the model loads (what the hash covers)."""
    method = resolved.method
    return {
        "model": resolved.model,
        "model_revision": resolved.preset.revision if not options.model else None,
        "family": None,
        "method": method,
        "budget": resolved.budget if method == "statekv" else None,
        "window_frames": resolved.window_frames if method == "window" else None,
        "max_frames": resolved.max_frames, "fps": resolved.fps,
        "start": options.start, "end": options.end,
        "chunk_frames": resolved.chunk_frames, "dtype": resolved.dtype,
        "device": options.device, "max_new_tokens": resolved.max_new_tokens,
        "seed": options.seed, "prompt": prompt,
        "system_prompt": resolved.preset.system_prompt,
        "pin_prefix": options.pin_prefix, "attention": options.attention,
    }


# JSONL -------------------------------------------------------------------------------------
def _path_key(record: dict[str, Any]) -> str | None:
    return record["path"] if isinstance(record.get("path"), str) else None


def read_records(path: str, key: Callable[[dict[str, Any]], Any] = _path_key
                 ) -> dict[Any, dict[str, Any]]:
    """The last record for each video path in a JSONL file ({} when it does not exist).

    Lines that are not JSON objects with a `path` (a partial last line left by a killed
    run, or any damaged line) are dropped. `key` picks another identity (None drops the
    line): `statekv eval --benchmark` keys its records by (question, method).
    """
    records: dict[Any, dict[str, Any]] = {}
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return records
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        identity = key(record)
        if identity is not None:
            records[identity] = record
    return records


class JsonlWriter:
    """Appends one JSON line per record, each with a single write, flushed and fsynced.

    Opening cuts a partial last line (from a killed run) so the next line starts clean.
    `path="-"` writes to stdout.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stdout = path == "-"
        self._fd: int | None = None
        if not self._stdout:
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                raise InputError(f"cannot write {path}: {exc}") from None
            _cut_partial_line(path, self._fd)

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        if self._stdout:
            sys.stdout.write(line.decode("utf-8"))
            sys.stdout.flush()
            return
        assert self._fd is not None
        view = memoryview(line)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut_partial_line(path: str, fd: int) -> None:
    size = os.fstat(fd).st_size
    if size == 0:
        return
    with open(path, "rb") as file:
        # find the last newline, reading backwards in blocks
        end = size
        block = 1 << 16
        while end > 0:
            start = max(0, end - block)
            file.seek(start)
            data = file.read(end - start)
            if end == size and data.endswith(b"\n"):
                return
            index = data.rfind(b"\n")
            if index >= 0:
                os.ftruncate(fd, start + index + 1)
                return
            end = start
    os.ftruncate(fd, 0)


# Running -----------------------------------------------------------------------------------
@dataclass
class BatchResult:
    """What a batch did: counts, this run's records, total FLOPs and wall time."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    lm_prefill_flops: int = 0
    full_lm_prefill_flops: int = 0
    vision_flops: int = 0
    seconds: float = 0.0
    workers: int = 1

    @property
    def saving(self) -> float:
        """Fraction of full attention's LM prefill FLOPs saved (0 when nothing ran)."""
        if not self.full_lm_prefill_flops:
            return 0.0
        return 1.0 - self.lm_prefill_flops / self.full_lm_prefill_flops

    @property
    def lm_flops_fraction(self) -> float | None:
        """This run's LM prefill FLOPs as a fraction of full attention's (None: nothing ran)."""
        from statekv.units import fraction

        return fraction(self.lm_prefill_flops, self.full_lm_prefill_flops)

    def record(self, out: str) -> dict[str, Any]:
        """The one final record `statekv summarize --json` prints (docs/summarize.md)."""
        return {"out": out, "done": self.done, "skipped": self.skipped, "failed": self.failed,
                "lm_prefill_flops": self.lm_prefill_flops,
                "full_lm_prefill_flops": self.full_lm_prefill_flops,
                "seconds": round(self.seconds, 3)}

    @property
    def fraction_of_full(self) -> float | None:
        """The same as `lm_flops_fraction` (the progress display's name for it)."""
        return self.lm_flops_fraction

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if record["status"] == "ok":
            self.done += 1
            stats = record["stats"] or {}
            self.lm_prefill_flops += stats.get("lm_prefill_flops", 0)
            self.full_lm_prefill_flops += stats.get("full_lm_prefill_flops", 0)
            self.vision_flops += stats.get("vision_flops", 0)
        else:
            self.failed += 1


# on_video(kind, path, record): kind is "skip" (record = the earlier one), "start" (None)
# or "done" (the new record).
OnVideo = Callable[[str, str, "dict[str, Any] | None"], None]


def _file_facts(path: str) -> tuple[int | None, float | None]:
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime


def _is_current(record: dict[str, Any] | None, path: str, digest: str) -> bool:
    if not record or record.get("status") != "ok" or record.get("settings_hash") != digest:
        return False
    size, mtime = _file_facts(path)
    return record.get("size_bytes") == size and record.get("mtime") == mtime


def _record_settings(settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {key: extra.get(key, settings.get(key)) for key in RECORD_KEYS}


def _error_dict(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc) or type(exc).__name__}


def summarize_one(model: Any, resolved: Any, options: Any, path: str, prompt: str,
                  settings: dict[str, Any], digest: str,
                  on_event: Callable[[Any], None] | None = None,
                  source: str | None = None) -> dict[str, Any]:
    """One video's record: prefill once, ask the prompt; any failure becomes an error record.

    The record names the video by `path` as given; `source` (default: `path`) is where it
    is read from (a Ray worker reads the absolute path, its working folder may differ).
    """
    from statekv.commands import plan as planning

    source = source or path
    size, mtime = _file_facts(source)
    record: dict[str, Any] = {"path": path, "size_bytes": size, "mtime": mtime,
                              "settings": _record_settings(settings, family=model.family),
                              "settings_hash": digest, "status": "error", "summary": None,
                              "stats": None, "error": None, "warnings": []}
    try:
        session = planning.prefill_video(model, resolved, options, source, resolved.method, on_event)
        answer = session.ask([prompt], resolved.max_new_tokens)[0]
        record.update(settings=dict(session.settings.to_dict(), prompt=prompt), status="ok",
                      summary=answer.answer, stats=session.stats.to_dict(),
                      warnings=list(session.warnings))
        if session.cache is not None:
            record["cache"] = record["stats"]["cache"] = session.cache
        from statekv import video

        warning = planning.demo_warning(resolved.model, video.probe(source))
        record["warnings"] += [warning] if warning else []
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad video must not end the batch
        if os.environ.get("STATEKV_DEBUG") == "1":
            traceback.print_exc()
        record["error"] = _error_dict(exc)
    return record


def _refuse_output_over_input(out: str, videos: list[str]) -> None:
    """Never append records to a file that is one of the videos being summarised."""
    if out == "-" or not os.path.exists(out):
        return
    for video in videos:
        try:
            if os.path.samefile(out, video):
                raise UsageError(f"--out {out} is one of the input videos; choose another file")
        except OSError:
            continue


def summarize(videos: list[str], options: Any, prompt: str | None = None,
              out: str = "summaries.jsonl", redo: bool = False, *,
              on_video: OnVideo | None = None, on_event: Callable[[Any], None] | None = None,
              use_ray: bool = False, ray_address: str | None = None,
              shard: tuple[int, int] | None = None) -> BatchResult:
    """Summarise each video (one prefill each) and append one record per video to `out`.

    Videos already in `out` with status ok, the same settings hash and the same file size
    and mtime are skipped unless `redo` (`out="-"` writes to stdout and never resumes).
    The model is loaded once (per Ray actor with `use_ray`). KeyboardInterrupt propagates;
    every line already written stays valid. While it runs, `out` is locked (statekv.locks):
    a second run on the same `out` refuses at once naming this one's pid, unless both are
    different shards (`shard=(K, N)`, the videos already cut with `shard()`) of that file.
    """
    from statekv.locks import output_lock

    _refuse_output_over_input(out, videos)
    part = f"{shard[0]}/{shard[1]}" if shard else None
    with output_lock(out, part, what="summary file"):
        return _summarize(videos, options, prompt, out, redo, on_video, on_event, use_ray,
                          ray_address)


def _summarize(videos, options, prompt, out, redo, on_video, on_event, use_ray,
               ray_address) -> BatchResult:
    from statekv.commands import plan as planning

    started = time.perf_counter()
    resolved = planning.resolve(options)
    prompt = prompt if prompt else resolved.preset.summary_prompt
    settings = requested_settings(resolved, options, prompt)
    digest = settings_hash(settings)
    result = BatchResult()
    previous = {} if (redo or out == "-") else read_records(out)
    todo = []
    for path in videos:
        if _is_current(previous.get(path), path, digest):
            result.skipped += 1
            if on_video:
                on_video("skip", path, previous[path])
        else:
            todo.append(path)
    if todo:
        with JsonlWriter(out) as writer:
            def emit(record: dict[str, Any]) -> None:
                writer.write(record)
                result.add(record)
                if on_video:
                    on_video("done", record["path"], record)

            if use_ray or ray_address:
                result.workers = _run_ray(todo, options, prompt, settings, digest, emit,
                                          on_video, ray_address)
            else:
                _run_local(todo, options, prompt, settings, digest, emit, on_video, on_event)
    result.seconds = time.perf_counter() - started
    return result


def _run_local(todo, options, prompt, settings, digest, emit, on_video, on_event) -> None:
    from statekv.commands import plan as planning

    _preflight(todo, options)
    model, resolved = planning.load_model(options)
    for path in todo:
        if on_video:
            on_video("start", path, None)
        emit(summarize_one(model, resolved, options, path, prompt, settings, digest, on_event))


def _preflight(todo: list[str], options: Any) -> None:
    """Check memory on the first readable video before the model loads (`--force` skips).

    Unreadable videos are passed over here: each gets its own error record later.
    """
    from statekv.commands import plan as planning

    if options.force:
        return
    for path in todo:
        try:
            run = planning.plan_run(path, options)
        except StateKVError:
            continue
        planning.preflight(run, force=False)
        return


# Ray ---------------------------------------------------------------------------------------
class SummaryWorker:
    """A Ray actor's body: loads the model once, then summarises one video per call."""

    def __init__(self, options: Any, prompt: str, settings: dict[str, Any], digest: str) -> None:
        from statekv.commands import plan as planning

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.options, self.prompt, self.settings, self.digest = options, prompt, settings, digest
        self.failure: tuple[str, str, int] | None = None
        try:
            self.model, self.resolved = planning.load_model(options)
        except Exception as exc:  # noqa: BLE001 - reported by ready()
            code = exc.exit_code if isinstance(exc, StateKVError) else 1
            self.failure = (type(exc).__name__, str(exc), code)

    def ready(self) -> tuple[str, str, int] | None:
        return self.failure

    def summarize(self, path: str, source: str) -> dict[str, Any]:
        return summarize_one(self.model, self.resolved, self.options, path, self.prompt,
                             self.settings, self.digest, source=source)


def _raise_worker_failure(failure: tuple[str, str, int]) -> None:
    from statekv import errors

    name, message, code = failure
    classes = {cls.exit_code: cls for cls in (errors.UsageError, errors.InputError,
                                              errors.ModelError, errors.ResourceError)}
    raise classes.get(code, StateKVError)(f"{message}" if code in classes else f"{name}: {message}")


def _run_ray(todo, options, prompt, settings, digest, emit, on_video, address) -> int:
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
        return _dispatch(ray, todo, options, prompt, settings, digest, emit, on_video)
    finally:
        if started_here:
            ray.shutdown()


def _dispatch(ray, todo, options, prompt, settings, digest, emit, on_video) -> int:
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and (options.device == "auto" or options.device.startswith("cuda")):
        count, per_actor = max(1, gpus), {"num_gpus": 1, "num_cpus": 1}
    else:
        count, per_actor = max(1, int(resources.get("CPU", 1))), {"num_cpus": 1}
    count = min(count, len(todo))
    actor_class = ray.remote(**per_actor)(SummaryWorker)

    def new_actor():
        return actor_class.remote(options, prompt, settings, digest)

    actors = [new_actor() for _ in range(count)]
    for failure in ray.get([actor.ready.remote() for actor in actors]):
        if failure is not None:
            for actor in actors:
                ray.kill(actor)
            _raise_worker_failure(failure)
    pending = deque(todo)
    inflight: dict[Any, tuple[Any, str]] = {}
    restarts = 0

    def submit(actor) -> None:
        if pending:
            path = pending.popleft()
            if on_video:
                on_video("start", path, None)
            inflight[actor.summarize.remote(path, os.path.abspath(path))] = (actor, path)

    try:
        for actor in actors:
            submit(actor)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor, path = inflight.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:  # the worker died (e.g. killed, OOM)
                record = _lost_record(path, settings, digest, exc)
                restarts += 1
                actor = new_actor() if restarts <= len(todo) else None
                if actor is not None:
                    actors.append(actor)
            except ray.exceptions.RayError as exc:
                record = _lost_record(path, settings, digest, exc)
            emit(record)
            if actor is not None:
                submit(actor)
    finally:
        for ref in inflight:
            ray.cancel(ref, force=True)
        for actor in actors:
            ray.kill(actor)
    return count


def _lost_record(path: str, settings: dict[str, Any], digest: str, exc: BaseException):
    size, mtime = _file_facts(path)
    message = str(exc).strip().splitlines()
    return {"path": path, "size_bytes": size, "mtime": mtime,
            "settings": _record_settings(settings),
            "settings_hash": digest, "status": "error", "summary": None, "stats": None,
            "error": {"type": type(exc).__name__, "message": message[0] if message else ""},
            "warnings": []}


__all__ = [
    "VIDEO_EXTENSIONS",
    "BatchResult",
    "JsonlWriter",
    "find_videos",
    "parse_shard",
    "read_records",
    "settings_hash",
    "shard",
    "summarize",
    "summarize_one",
]

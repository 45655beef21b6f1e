"""Probe a video, plan which frames to sample, and decode them a chunk at a time.

decord is the fast path; ffmpeg (through ffmpeg-python and the ffmpeg binary) covers
platforms without decord wheels and the files decord cannot open or decode. Either
way only the planned frames are returned, `chunk_frames` at a time, so memory stays
bounded by one chunk however long (or however large) the video is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import numbers
import os
import re
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from statekv.errors import InputError, UsageError

try:
    import decord
    from decord.base import DECORDError
except ImportError:  # decord has wheels for x86_64 only; ffmpeg covers the rest
    decord = None
    DECORDError = RuntimeError
else:
    # The library never prints: silence the ffmpeg log decord forwards to stderr.
    decord.logging.set_level(decord.logging.QUIET)

# What decord raises for files it cannot open or frames it cannot decode: "Error
# reading" (RuntimeError), DECORDError, an assert on the frame count, IndexError for
# indices past its frame count, ValueError from our own shape check.
_DECORD_FAILURES = (DECORDError, RuntimeError, AssertionError, IndexError, ValueError)

try:
    import ffmpeg
except ImportError:
    ffmpeg = None

BACKENDS = ("auto", "decord", "ffmpeg")
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".avif", ".ico"}
)
# Codecs of still-image formats; ffprobe opens such files as a one-frame "video".
IMAGE_CODECS = frozenset({"png", "mjpeg", "bmp", "webp", "tiff", "jpeg2000", "gif", "jpegls"})
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*")  # "[mov,mp4,m4a @ 0x55d0] " before ffmpeg's messages
# Indices per ffmpeg process: keeps the select expression well under the 128 KiB
# limit of one command-line argument. Each process decodes from the start, so
# plans longer than this cost one extra pass over the video per batch.
_FFMPEG_BATCH = 4096
_TIME = re.compile(r"(?:(?:(\d+):)?(\d+):)?(\d+(?:\.\d*)?|\.\d+)")


@dataclass(frozen=True)
class VideoInfo:
    """What probe() learned about a video file."""

    path: str
    duration_seconds: float
    fps: float
    frame_count: int
    width: int
    height: int
    codec: str | None


@dataclass(frozen=True)
class FramePlan:
    """Which frames will be decoded: frame indices and their timestamps in seconds."""

    indices: tuple[int, ...]
    timestamps: tuple[float, ...]


@dataclass
class FrameChunk:
    """A run of frames for the prefill loop: decoded from a file, or handed in from memory."""

    frames: np.ndarray  # uint8 (n, height, width, 3), RGB
    first: int  # position of frames[0] in the sampled video (0-based)
    timestamps: tuple[float, ...]  # seconds, one per frame
    indices: tuple[int, ...] = ()  # frame numbers in the file (empty for in-memory frames)
    skipped: tuple[float, ...] = ()  # timestamps of planned frames that failed to decode


def chunks_of(frames: np.ndarray, timestamps: Sequence[float], chunk_frames: int,
              ) -> Iterator[FrameChunk]:
    """In-memory frames (n, H, W, 3) as FrameChunks of `chunk_frames` frames."""
    stamps = tuple(float(t) for t in timestamps)
    for first in range(0, len(frames), chunk_frames):
        yield FrameChunk(frames[first:first + chunk_frames], first,
                         stamps[first:first + chunk_frames])


# --------------------------------------------------------------------------- times


def parse_time(value: str | float | None) -> float | None:
    """Turn a user's time ("90", "1.5", "01:30", "1:02:03.5" or a number) into seconds."""
    if value is None:
        return None
    if isinstance(value, bool):  # bool is an int; True seconds is surely a mistake
        raise UsageError(f"invalid time {value!r}: use seconds (90, 1.5) or [h:]mm:ss")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        seconds = _parse_clock(str(value).strip())
    if not math.isfinite(seconds) or seconds < 0:
        raise UsageError(f"invalid time {value!r}: must be a non-negative number of seconds")
    return seconds


def _parse_clock(text: str) -> float:
    """Parse "[[h:]m:]s" where s may have a fraction; minutes and seconds below 60 when led."""
    match = _TIME.fullmatch(text)
    if match is None:
        raise UsageError(f"invalid time {text!r}: use seconds (90, 1.5) or [h:]mm:ss[.f]")
    hours, minutes, seconds = match.groups()
    if minutes is not None and float(seconds) >= 60:
        raise UsageError(f"invalid time {text!r}: seconds must be below 60 in mm:ss")
    if hours is not None and int(minutes) >= 60:
        raise UsageError(f"invalid time {text!r}: minutes must be below 60 in h:mm:ss")
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds)


# --------------------------------------------------------------------------- probe


def probe(path: str | os.PathLike) -> VideoInfo:
    """Learn a video's duration, frame rate, frame count and size, or say why it is unusable."""
    name = os.fspath(path)
    _check_file(name)
    return _probe_file(name, *_identity(name))


def _identity(path: str) -> tuple[int, int]:
    """(size, mtime) so memoised answers are dropped when the file changes."""
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


def clear_cache() -> None:
    """Forget memoised probes and timestamps (files are re-read on next use)."""
    _probe_file.cache_clear()
    _frame_timestamps.cache_clear()


@functools.lru_cache(maxsize=64)
def _probe_file(name: str, size: int, mtime: int) -> VideoInfo:
    # Memoised: a command probes, plans and then prefills the same file, and every decord
    # open scans the file's whole packet index.
    info = _probe_decord(name)
    if info is None:
        return _probe_ffprobe(name)
    return dataclasses.replace(info, codec=_codec_name(name))


def _codec_name(path: str) -> str | None:
    """The video codec's name from ffprobe (decord cannot tell it); None if ffprobe is absent."""
    if ffmpeg is None:
        return None
    try:
        data = ffmpeg.probe(_url(path), v="error", select_streams="v:0")
        return data.get("streams", [{}])[0].get("codec_name")
    except (ffmpeg.Error, FileNotFoundError, IndexError):
        return None


def _check_file(path: str) -> None:
    """Raise InputError for problems decord would only report as a generic "Error reading"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except PermissionError:
        raise InputError(f"cannot read {path}: permission denied") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{path} is a directory, not a video file")
    if not stat.S_ISREG(mode):  # a FIFO or device could block the decoder forever
        raise InputError(f"{path} is not a regular file")
    head = _read_head(path)
    if not head:
        raise InputError(f"{path} is empty (0 bytes)")
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS or head.startswith(_IMAGE_MAGIC):
        raise InputError(f"{path} is a still image, not a video")


def _read_head(path: str) -> bytes:
    """The first bytes of the file; reading them is also the permission check."""
    try:
        with open(path, "rb") as handle:
            return handle.read(16)
    except PermissionError:
        raise InputError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def _url(path: str) -> str:
    """The path as an ffmpeg URL: "file:" keeps "12:30 talk.mp4" from naming a protocol
    and "-clip.mp4" from reading as an option (decord and ffprobe both need this)."""
    return "file:" + path


def _probe_decord(path: str) -> VideoInfo | None:
    """VideoInfo from decord, or None when decord is missing or cannot open or decode it."""
    reader = _open_decord(path, None)
    if reader is None:
        return None
    try:
        # decord exposes no frame size; decoding frame 0 gives it (rotation applied)
        # and proves the file decodes at all.
        height, width = _as_numpy(reader[0]).shape[:2]
        times = np.asarray(reader.get_frame_timestamp(range(len(reader))), dtype=np.float64)
        nominal = float(reader.get_avg_fps())
    except _DECORD_FAILURES:
        return None
    frame_count = len(reader)
    duration = round(float(times[-1, 1] - times[0, 0]), 6)  # decord's times are float32
    if not duration > 0:
        duration = frame_count / nominal if nominal > 0 else 0.0
    if not duration > 0:
        return None
    fps = _average_fps(nominal, frame_count, duration)
    return VideoInfo(path, duration, fps, frame_count, int(width), int(height), None)


def _average_fps(nominal: float, frame_count: int, duration: float) -> float:
    """The frame rate to report and to map times to frames with.

    Variable-frame-rate files (phones, screen recordings) often report a nominal rate
    (r_frame_rate) far from the real average. Without per-frame timestamps, frame
    index = time x fps, so the average (frames / duration) is the rate that keeps
    that mapping inside the video; the nominal rate is kept when the two agree
    within 10% (it is exact for constant-rate files, where the ratio may be rounded).
    """
    measured = frame_count / duration
    if not (math.isfinite(nominal) and nominal > 0) or abs(nominal - measured) > 0.1 * measured:
        return measured
    return nominal


def _probe_ffprobe(path: str) -> VideoInfo:
    """VideoInfo from ffprobe; raises InputError naming what is wrong with the file."""
    data = _ffprobe(path, "decord could not open it")
    stream = _video_stream(path, data)
    fmt = data.get("format", {})
    fps = _ratio(stream.get("avg_frame_rate")) or _ratio(stream.get("r_frame_rate"))
    duration = _float(stream.get("duration")) or _float(fmt.get("duration"))
    frame_count = int(_float(stream.get("nb_frames")) or round(duration * fps))
    codec = stream.get("codec_name")
    if fmt.get("format_name", "").endswith("_pipe") or fmt.get("format_name") == "image2":
        raise InputError(f"{path} is a still image ({codec}), not a video")
    if codec in IMAGE_CODECS and frame_count <= 1:
        raise InputError(f"{path} is a still image ({codec}), not a video")
    if frame_count < 1 or not (duration > 0 or fps > 0):
        raise InputError(f"{path} is not a readable video (its video stream has no frames)")
    duration = duration if duration > 0 else frame_count / fps
    fps = _average_fps(fps, frame_count, duration)
    width, height = _display_size(stream)
    return VideoInfo(path, duration, fps, frame_count, width, height, codec)


def _ffprobe(path: str, why_not_decord: str) -> dict:
    """ffprobe's JSON for the file; its own error message becomes the InputError's reason."""
    if ffmpeg is None:
        raise InputError(
            f"{path} is not a readable video ({why_not_decord}; "
            "install ffmpeg-python and ffmpeg for a specific reason)"
        )
    try:
        return ffmpeg.probe(_url(path), v="error")
    except ffmpeg.Error as exc:
        reason = _ffmpeg_reason(exc.stderr, path)
        raise InputError(f"{path} is not a readable video ({reason})") from None
    except FileNotFoundError:  # the ffprobe binary itself is missing
        raise InputError(
            f"{path} is not a readable video ({why_not_decord}; install "
            "ffmpeg, e.g. apt-get install ffmpeg, for a specific reason)"
        ) from None


def _ffmpeg_reason(stderr: bytes | None, path: str) -> str:
    """The last two distinct lines of ffmpeg's error log, without "[mov @ 0x..]" and
    "file:<path>: " prefixes: e.g. "moov atom not found; Invalid data found ..."."""
    text = (stderr or b"").decode("utf-8", "replace")
    lines = [_LOG_PREFIX.sub("", line).strip() for line in text.splitlines()]
    lines = [line.replace(_url(path) + ": ", "") for line in lines if line]
    return "; ".join(list(dict.fromkeys(lines))[-2:]) or "unknown error"


def _video_stream(path: str, data: dict) -> dict:
    """The first real video stream; cover art in audio files does not count."""
    streams = data.get("streams", [])
    for stream in streams:
        cover = stream.get("disposition", {}).get("attached_pic") == 1
        if stream.get("codec_type") == "video" and not cover:
            return stream
    kinds = sorted({str(s.get("codec_type")) for s in streams}) or ["no streams"]
    raise InputError(f"{path} has no video stream (it contains: {', '.join(kinds)})")


def _display_size(stream: dict) -> tuple[int, int]:
    """(width, height) as shown: phone videos store a 90-degree rotation that both
    decord and the ffmpeg command line apply when decoding."""
    width, height = int(stream.get("width", 0)), int(stream.get("height", 0))
    rotation = _float(stream.get("tags", {}).get("rotate"))
    for side in stream.get("side_data_list", []):
        rotation = _float(side.get("rotation")) or rotation
    if round(rotation) % 180 == 90:
        return height, width
    return width, height


def _ratio(text: str | None) -> float:
    """ffprobe's "30000/1001" as a float; 0.0 for missing or "0/0"."""
    top, _, bottom = str(text or "").partition("/")
    numerator, denominator = _float(top), _float(bottom or "1")
    return numerator / denominator if numerator > 0 and denominator > 0 else 0.0


def _float(value: object) -> float:
    """A float from ffprobe's string fields; 0.0 when missing or "N/A"."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


# --------------------------------------------------------------------------- plan


def plan_frames(
    info: VideoInfo,
    max_frames: int,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    timestamps: Sequence[float] | None = None,
) -> FramePlan:
    """Choose the frames to decode: uniform over [start, end), at most max_frames and at
    most fps per second of the window.

    Sample times are the centres of `count` equal segments of the window; each maps to
    the frame on screen at that time (the last frame starting at or before it), using
    the per-frame `timestamps` when given (exact for variable frame rates), else
    index / info.fps. Frames are then kept to those starting inside the window. If no
    frame starts inside it (a window shorter than one frame), the plan is the single
    frame on screen at `start`.
    """
    window_start, window_end = _check_plan_options(info, max_frames, fps, start, end)
    times = _frame_times(info, timestamps)
    seconds = window_end - window_start
    count = max_frames if fps is None else min(max_frames, max(1, math.floor(seconds * fps)))
    centres = window_start + (np.arange(count) + 0.5) * (seconds / count)
    chosen = _on_screen(times, centres)
    first_inside = int(np.searchsorted(times, window_start - _tolerance(window_start), "left"))
    after_inside = int(np.searchsorted(times, window_end - _tolerance(window_end), "left"))
    if first_inside >= after_inside:
        chosen = _on_screen(times, np.array([window_start]))
    else:
        chosen = np.clip(chosen, first_inside, after_inside - 1)
    indices = np.unique(chosen)  # sorted; duplicates appear when count > frames in window
    # Microsecond rounding hides decord's float32 noise (0.30000001192) in JSON output.
    stamps = tuple(round(float(times[i]), 6) for i in indices)
    return FramePlan(tuple(int(i) for i in indices), stamps)


def _check_plan_options(
    info: VideoInfo, max_frames: int, fps: float | None, start: float | None, end: float | None
) -> tuple[float, float]:
    """Validate sampling options; returns the window [start, end) clipped to the video."""
    if not _is_count(max_frames) or max_frames <= 0:
        raise UsageError(f"max_frames must be a positive integer, got {max_frames!r}")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise UsageError(f"fps must be a positive number, got {fps!r}")
    window_start = 0.0 if start is None else float(start)
    duration = info.duration_seconds
    if not window_start >= 0:
        raise UsageError(f"start must be 0 or later, got {start!r}")
    if window_start >= duration:
        raise UsageError(
            f"start ({window_start:g} s) is at or beyond the end of the video "
            f"(duration {duration:g} s)"
        )
    window_end = duration if end is None else float(end)
    if not window_end > window_start:
        raise UsageError(f"start ({window_start:g} s) must be before end ({end!r} s)")
    return window_start, min(window_end, duration)


def _frame_times(info: VideoInfo, timestamps: Sequence[float] | None) -> np.ndarray:
    """Each frame's start time in seconds: the given ones, else index / fps."""
    if timestamps is None:
        if info.frame_count < 1 or not info.fps > 0:
            raise UsageError(f"{info.path}: cannot plan frames without a frame count and fps")
        return np.arange(info.frame_count, dtype=np.float64) / info.fps
    times = np.asarray(timestamps, dtype=np.float64)
    if times.ndim != 1 or times.size == 0 or np.any(np.diff(times) < 0):
        raise ValueError("timestamps must be a non-empty, non-decreasing sequence of seconds")
    return times


def _tolerance(seconds: np.ndarray | float) -> np.ndarray | float:
    """Slack for comparing times: decord's timestamps are float32 (relative error ~6e-8),
    so a frame at 0.3 s reads as 0.30000001 and would miss a boundary at exactly 0.3."""
    return 1e-6 + 1e-7 * np.abs(seconds)


def _on_screen(times: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Index of the frame on screen at each time: the last one starting at or before it."""
    found = np.searchsorted(times, at + _tolerance(at), "right") - 1
    return np.clip(found, 0, len(times) - 1)


# --------------------------------------------------------------------------- decode


def frame_timestamps(path: str | os.PathLike) -> list[float] | None:
    """Each frame's presentation time in seconds (first frame = 0), for exact planning of
    variable-frame-rate videos; None when decord is unavailable or cannot tell."""
    name = os.fspath(path)
    try:
        identity = _identity(name)
    except OSError:
        return None
    times = _frame_timestamps(name, *identity)
    return None if times is None else list(times)


@functools.lru_cache(maxsize=64)
def _frame_timestamps(name: str, size: int, mtime: int) -> tuple[float, ...] | None:
    reader = _open_decord(name, None)
    if reader is None:
        return None
    try:
        starts = np.asarray(reader.get_frame_timestamp(range(len(reader))), np.float64)[:, 0]
    except _DECORD_FAILURES:
        return None
    starts = starts - starts[0]
    if np.any(np.diff(starts) < 0):
        return None
    return tuple(round(float(t), 6) for t in starts)


def iter_chunks(
    path: str | os.PathLike,
    plan: FramePlan,
    chunk_frames: int = 1,
    size: tuple[int, int] | None = None,
    backend: str = "auto",
) -> Iterator[FrameChunk]:
    """Decode the planned frames, chunk_frames at a time, never the whole video.

    `size=(width, height)` resizes inside the decoder, so a huge video never yields
    full-resolution frames. Frames that fail to decode are left out and their
    timestamps reported in the next chunk's `skipped` (or the last chunk's); later
    frames move up so every chunk but the last has chunk_frames frames. Raises
    InputError if no planned frame decodes.
    """
    name = os.fspath(path)
    _check_decode_options(chunk_frames, size, backend)
    _check_file(name)
    if not plan.indices:
        return iter(())
    decoded = _decode(name, plan, chunk_frames, size, backend)
    return _group(decoded, plan, chunk_frames, name)


def _check_decode_options(chunk_frames: int, size: tuple[int, int] | None, backend: str) -> None:
    """Raise UsageError for bad chunking, size or backend options."""
    if not _is_count(chunk_frames) or chunk_frames < 1:
        raise UsageError(f"chunk_frames must be a positive integer, got {chunk_frames!r}")
    if size is not None and not _is_size(size):
        raise UsageError(f"size must be (width, height) in positive pixels, got {size!r}")
    if backend not in BACKENDS:
        raise UsageError(f"unknown video backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "decord" and decord is None:
        raise UsageError("backend 'decord' was requested but decord is not installed")
    if backend == "ffmpeg" and ffmpeg is None:
        raise UsageError("backend 'ffmpeg' was requested but ffmpeg-python is not installed")


def _is_size(size: object) -> bool:
    """Whether size is a (width, height) pair of positive integers."""
    pair = tuple(size) if isinstance(size, (tuple, list)) else ()
    return len(pair) == 2 and all(_is_count(v) and v > 0 for v in pair)


def _is_count(value: object) -> bool:
    """Whether value is an integer (numpy's too) and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_Decoded = Iterator[tuple[int, "np.ndarray | None"]]  # (position in plan, frame or None)


def _decode(
    path: str, plan: FramePlan, batch: int, size: tuple[int, int] | None, backend: str
) -> _Decoded:
    """Frames of the plan in order from the chosen backend; None marks a failed frame."""
    if backend == "ffmpeg":
        return _ffmpeg_frames(path, plan, size)
    reader = _open_decord(path, size)
    if reader is None and backend == "decord":
        raise InputError(f"{path} is not a readable video (decord cannot open it)")
    if reader is None:
        return _ffmpeg_frames(path, plan, size)
    frames = _decord_frames(reader, plan, batch)
    if backend == "decord":
        return frames
    return _ffmpeg_if_first_batch_fails(frames, path, plan, batch, size)


def _ffmpeg_if_first_batch_fails(
    frames: _Decoded, path: str, plan: FramePlan, batch: int, size: tuple[int, int] | None
) -> _Decoded:
    """decord's frames, or ffmpeg's if decord decodes none of the first batch.

    decord opens some files it cannot decode (MPEG-TS with B-frames, rotated phone
    videos at their native size); the ffmpeg command line decodes those.
    """
    head = list(itertools.islice(frames, batch))
    if ffmpeg is not None and all(pixels is None for _, pixels in head):
        frames.close()
        yield from _ffmpeg_frames(path, plan, size)
        return
    yield from head
    yield from frames


def _open_decord(path: str, size: tuple[int, int] | None) -> object | None:
    """A decord VideoReader decoding at `size`, or None if decord is missing or fails."""
    if decord is None:
        return None
    width, height = size if size is not None else (-1, -1)
    try:
        with _silenced_stderr():
            return decord.VideoReader(_url(path), ctx=decord.cpu(0), width=width, height=height)
    except _DECORD_FAILURES:
        return None


@contextlib.contextmanager
def _silenced_stderr() -> Iterator[None]:
    """Hide the C++ "ERROR opening ..." line decord prints even at its QUIET log level:
    a file it cannot open falls back to ffmpeg, which says what is wrong in our own words."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _decord_frames(reader: object, plan: FramePlan, batch: int) -> _Decoded:
    """Planned frames from decord, a batch per call; a failing batch is retried frame by
    frame so one corrupt frame costs only itself."""
    for first in range(0, len(plan.indices), batch):
        wanted = list(plan.indices[first : first + batch])
        try:
            frames = list(_decord_batch(reader, wanted))
        except _DECORD_FAILURES:  # a corrupt frame, or decord's EOF/rotation bugs
            frames = [_decord_one(reader, index) for index in wanted]
        yield from enumerate(frames, start=first)


def _decord_batch(reader: object, indices: list[int]) -> np.ndarray:
    """(n, H, W, 3) uint8 for the indices; raises if decord returns anything else
    (for rotated videos at native size it returns a mis-shaped array)."""
    frames = _as_numpy(reader.get_batch(indices))  # type: ignore[attr-defined]
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[3] != 3:
        raise ValueError(f"decord returned frames of shape {frames.shape}")
    return frames


def _decord_one(reader: object, index: int) -> np.ndarray | None:
    """One frame from decord, or None if it cannot be decoded."""
    try:
        return _decord_batch(reader, [index])[0]
    except _DECORD_FAILURES:
        return None


def _as_numpy(frames: object) -> np.ndarray:
    """A numpy array from decord's NDArray (or a tensor, if another module set a bridge)."""
    if hasattr(frames, "asnumpy"):
        return frames.asnumpy()  # type: ignore[no-any-return]
    return np.asarray(frames)


def _ffmpeg_frames(path: str, plan: FramePlan, size: tuple[int, int] | None) -> _Decoded:
    """Planned frames from ffmpeg, one process per batch of _FFMPEG_BATCH indices."""
    shape = size if size is not None else _ffmpeg_size(path)
    for first in range(0, len(plan.indices), _FFMPEG_BATCH):
        indices = plan.indices[first : first + _FFMPEG_BATCH]
        yield from _ffmpeg_batch(path, indices, first, size, shape)


def _ffmpeg_batch(
    path: str,
    indices: Sequence[int],
    first: int,
    size: tuple[int, int] | None,
    shape: tuple[int, int],
) -> _Decoded:
    """Frames at indices from one ffmpeg process that outputs only the selected frames.

    ffmpeg's `select` counts decoded frames (n) the way decord indexes them, so both
    return the same frames. A frame ffmpeg cannot decode shifts that count, so frames
    missing from its output are reported as the last ones.
    """
    width, height = shape
    emitted, ended = 0, False
    # stderr goes to a file, not a pipe: a chatty corrupt file could fill a pipe and
    # block ffmpeg while we block on its stdout.
    with tempfile.TemporaryFile() as errors:
        process = _start_ffmpeg(_ffmpeg_args(path, indices, size), errors)
        try:
            for data in _raw_frames(process.stdout, width * height * 3, len(indices)):
                yield first + emitted, np.frombuffer(data, np.uint8).reshape(height, width, 3)
                emitted += 1
            ended = emitted < len(indices)
        finally:
            _stop(process, ended)
        if emitted == 0 and process.returncode != 0:
            errors.seek(0)
            reason = _ffmpeg_reason(errors.read(), path)
            raise InputError(f"{path} is not a readable video (ffmpeg: {reason})")
    yield from ((first + offset, None) for offset in range(emitted, len(indices)))


def _ffmpeg_args(path: str, indices: Sequence[int], size: tuple[int, int] | None) -> list[str]:
    """ffmpeg's argument list: select the frames by index, optionally scale, raw RGB out."""
    # ffmpeg-python escapes the commas inside the expression for the filter graph.
    terms = [f"eq(n,{index})" for index in indices]
    stream = ffmpeg.input(_url(path)).video.filter("select", _balanced_sum(terms))
    if size is not None:
        stream = stream.filter("scale", size[0], size[1])
    # -vsync 0 passes selected frames through as they are (no duplicates or drops to
    # fit a frame rate); it is spelled the same in ffmpeg 4 to 7.
    output = stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", vsync="0")
    args = output.compile()
    # -nostdin: ffmpeg otherwise reads the terminal for commands and can stop the job.
    return [args[0], "-nostdin", "-hide_banner", "-v", "error", *args[1:]]


def _balanced_sum(terms: list[str], group: int = 32) -> str:
    """terms joined by "+" as a shallow tree of parenthesised groups: ffmpeg's
    expression parser rejects a flat sum of more than about 100 terms."""
    while len(terms) > 1:
        terms = ["(" + "+".join(terms[i : i + group]) + ")" for i in range(0, len(terms), group)]
    return terms[0]


def _ffmpeg_size(path: str) -> tuple[int, int]:
    """The (width, height) ffmpeg will output at native size."""
    data = _ffprobe(path, "decord is unavailable or could not open it")
    return _display_size(_video_stream(path, data))


def _start_ffmpeg(args: list[str], errors: object) -> subprocess.Popen:
    """Start ffmpeg with a list of arguments (never a shell string)."""
    try:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors
        )
    except FileNotFoundError:
        raise InputError(
            "cannot decode the video: the ffmpeg program is not installed "
            "(e.g. apt-get install ffmpeg)"
        ) from None


def _raw_frames(stream: object, frame_bytes: int, count: int) -> Iterator[bytes]:
    """Up to count frames of frame_bytes each from ffmpeg's stdout, until it ends."""
    for _ in range(count):
        data = stream.read(frame_bytes)  # type: ignore[attr-defined]  # blocks for a full frame
        if len(data) < frame_bytes:  # end of output (a partial frame is a cut-off one)
            return
        yield data


def _stop(process: subprocess.Popen, ended: bool) -> None:
    """Reap ffmpeg. Unless its output ended (it is exiting, and its exit code and log
    are wanted), kill it: it would decode on to the end of the file for nothing."""
    process.stdout.close()  # type: ignore[union-attr]
    if not ended:
        process.kill()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:  # never hang on a stuck ffmpeg
        process.kill()
        process.wait()


def _group(
    decoded: Iterable, plan: FramePlan, chunk_frames: int, path: str
) -> Iterator[FrameChunk]:
    """Pack decoded frames into chunks of chunk_frames, carrying skipped timestamps.

    One finished chunk is held back until the next is ready, so timestamps of frames
    that fail after the last decodable one can still be attached to the last chunk.
    """
    held: FrameChunk | None = None
    pending: list[tuple[int, np.ndarray]] = []
    skipped: list[float] = []
    for position, pixels in decoded:
        if pixels is None:
            skipped.append(plan.timestamps[position])
            continue
        pending.append((position, pixels))
        if len(pending) == chunk_frames:
            if held is not None:
                yield held
            held, pending, skipped = _chunk(pending, plan, skipped), [], []
    if pending:
        if held is not None:
            yield held
        held, skipped = _chunk(pending, plan, skipped), []
    if held is None:
        raise InputError(f"{path} has no decodable frames")
    held.skipped += tuple(skipped)
    yield held


def _chunk(
    frames: list[tuple[int, np.ndarray]], plan: FramePlan, skipped: list[float]
) -> FrameChunk:
    """A FrameChunk from (plan position, pixels) pairs."""
    positions = [position for position, _ in frames]
    return FrameChunk(
        frames=np.stack([pixels for _, pixels in frames]),
        indices=tuple(plan.indices[p] for p in positions),
        timestamps=tuple(plan.timestamps[p] for p in positions),
        first=positions[0],
        skipped=tuple(skipped),
    )


# --------------------------------------------------------------------------- background decode
PREFETCH_CHUNKS = 2  # decoded chunks waiting ahead of the model (bounds the extra memory)


def prefetch(chunks: Iterable[FrameChunk], depth: int = PREFETCH_CHUNKS) -> Iterator[FrameChunk]:
    """Decode the next chunks in a background thread while the caller works on this one.

    At most `depth` chunks wait in the queue. An error raised while decoding is raised here,
    at the chunk where it happened; stopping early (an error in the caller, Ctrl-C, or
    closing the generator) stops the thread, which is left after its current chunk.
    """
    import queue
    import threading

    if depth < 1:
        yield from chunks
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    iterator = iter(chunks)

    def work() -> None:
        try:
            for chunk in iterator:
                if not put((chunk, None)):
                    return
            put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((None, exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:  # a generator: let it stop its decoder (ffmpeg process)
                close()

    thread = threading.Thread(target=work, name="statekv-decode", daemon=True)
    thread.start()
    try:
        while True:
            chunk, error = items.get()
            if error is not None:
                raise error
            if chunk is done:
                return
            yield chunk
    finally:
        stop.set()
        thread.join(timeout=5.0)

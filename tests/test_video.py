"""Tests for statekv.video: probing, frame planning and chunked decoding on tiny videos."""

from __future__ import annotations

import builtins
import fractions
import math
import os
import shutil
import sys

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from statekv import video
from statekv.errors import InputError, UsageError
from statekv.video import (
    FramePlan,
    VideoInfo,
    frame_timestamps,
    iter_chunks,
    parse_time,
    plan_frames,
    probe,
)

WIDTH, HEIGHT, FPS, FRAMES = 64, 48, 10, 40
CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"
CODEC_NAME = "h264" if CODEC == "libx264" else "mpeg4"
BACKENDS = ["decord", "ffmpeg"] if video.decord is not None else ["ffmpeg"]


def _picture(i: int) -> np.ndarray:
    """Frame i: gray level 20 + 5i on top (identifies the frame), a white bar at x=i below."""
    img = np.full((HEIGHT, WIDTH, 3), 20 + 5 * i, np.uint8)
    img[HEIGHT // 2 :, i : i + 2] = 255
    return img


def _frame_number(frame: np.ndarray) -> int:
    """Which frame of _picture() this decoded frame is, from its top half's gray level."""
    return round((float(frame[: HEIGHT // 2 - 4].mean()) - 20) / 5)


def _write_video(path, fmt=None, pts_ms=None, frames=FRAMES) -> None:
    """A 64x48 video of _picture(i % 40) frames; pts_ms gives variable frame times."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(CODEC, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if pts_ms is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(_picture(i % FRAMES), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], fractions.Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _write_audio(path) -> None:
    """An audio-only file: 0.6 s of AAC silence."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for k in range(10):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, k * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


VFR_PTS_MS = [100 * i for i in range(20)] + [2000 + 400 * i for i in range(20)]


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    """Paths of the test videos and of broken inputs, built once per session."""
    root = tmp_path_factory.mktemp("videos")
    paths = {name: root / file for name, file in [
        ("clip", "clip.mp4"), ("long", "long.mp4"), ("vfr", "vfr.mp4"), ("ts", "clip.ts"),
        ("audio", "audio.m4a"), ("png", "still.png"), ("png_as_mp4", "still_png.mp4"),
        ("empty", "empty.mp4"),
        ("random", "random.mp4"), ("text", "notes.mp4"), ("truncated", "truncated.mp4"),
        ("missing", "missing.mp4"), ("directory", "folder.mp4"),
        ("unicode", "my clip – é 東京.mp4"), ("colon", "12:30 talk.mp4"),
    ]}  # fmt: skip
    _write_video(paths["clip"])
    _write_video(paths["long"], frames=400)
    _write_video(paths["vfr"], pts_ms=VFR_PTS_MS)
    _write_video(paths["ts"], fmt="mpegts")  # decord mis-decodes MPEG-TS with B-frames
    _write_audio(paths["audio"])
    Image.fromarray(_picture(3)).save(paths["png"])
    shutil.copy(paths["png"], paths["png_as_mp4"])
    paths["empty"].write_bytes(b"")
    paths["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    paths["text"].write_text("this is not a video\n")
    data = paths["clip"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["directory"].mkdir()
    shutil.copy(paths["clip"], paths["unicode"])
    if sys.platform != "win32":
        shutil.copy(paths["clip"], paths["colon"])
    return paths


def _decode(path, plan, backend, chunk_frames=3, size=None):
    """All chunks of the plan from one backend."""
    return list(iter_chunks(path, plan, chunk_frames, size=size, backend=backend))


def _joined(chunks):
    """(frames, indices, timestamps) of a list of chunks, concatenated."""
    frames = np.concatenate([c.frames for c in chunks])
    return frames, sum((c.indices for c in chunks), ()), sum((c.timestamps for c in chunks), ())


# --------------------------------------------------------------------------- probe


def test_probe_reports_duration_rate_count_size(videos):
    info = probe(videos["clip"])
    assert info.path == str(videos["clip"])
    assert info.duration_seconds == pytest.approx(4.0, abs=1e-6)
    assert info.fps == pytest.approx(10.0)
    assert (info.frame_count, info.width, info.height) == (40, 64, 48)
    assert info.codec in (None, CODEC_NAME)  # decord cannot name the codec


def test_probe_falls_back_to_ffprobe_without_decord(videos, monkeypatch):
    monkeypatch.setattr(video, "decord", None)
    info = probe(videos["clip"])
    assert info.duration_seconds == pytest.approx(4.0, abs=1e-3)
    assert info.fps == pytest.approx(10.0)
    assert (info.frame_count, info.width, info.height, info.codec) == (40, 64, 48, CODEC_NAME)


def test_probe_variable_frame_rate_reports_the_average_rate(videos):
    info = probe(videos["vfr"])
    assert info.frame_count == 40
    assert info.duration_seconds == pytest.approx(9.7, abs=0.7)
    # nominal rate is 10 fps; the true average is about 40 frames / 9.x s
    assert info.fps == pytest.approx(info.frame_count / info.duration_seconds, rel=0.1)


def test_probe_mpegts_without_a_frame_count_field(videos):
    info = probe(videos["ts"])
    assert (info.frame_count, info.width, info.height) == (40, 64, 48)
    assert info.fps == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing", "no such file: "),
        ("directory", "is a directory"),
        ("empty", "is empty"),
        ("random", "is not a readable video"),
        ("text", "is not a readable video"),
        ("truncated", "is not a readable video"),
        ("audio", "has no video stream"),
        ("png", "is a still image"),
        ("png_as_mp4", "is a still image"),
    ],
)
def test_unusable_inputs_raise_input_error(videos, name, message):
    path = videos[name]
    with pytest.raises(InputError, match=message) as caught:
        probe(path)
    assert caught.value.exit_code == 3
    assert str(path) in str(caught.value)
    plan = FramePlan((0,), (0.0,))
    with pytest.raises(InputError):
        list(iter_chunks(path, plan))


@pytest.mark.parametrize("name", ["random", "truncated", "audio", "png_as_mp4"])
def test_unusable_inputs_raise_input_error_without_decord(videos, monkeypatch, name):
    monkeypatch.setattr(video, "decord", None)
    with pytest.raises(InputError):
        probe(videos[name])


def test_unreadable_file_says_permission_denied(videos, monkeypatch):
    # CI runs as root, where chmod 000 does not stop reads: simulate the refusal.
    denied = str(videos["clip"])
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if os.fspath(file) == denied:
            raise PermissionError(13, "Permission denied", denied)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(InputError, match=r"cannot read .*clip\.mp4: permission denied"):
        probe(denied)


@pytest.mark.parametrize("name", ["unicode", "colon"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_paths_with_spaces_unicode_and_colons_work(videos, name, backend):
    if not videos[name].exists():
        pytest.skip("file names with colons are not allowed on this platform")
    info = probe(videos[name])
    assert info.frame_count == 40
    plan = plan_frames(info, 4)
    frames, indices, _ = _joined(_decode(videos[name], plan, backend))
    assert [_frame_number(f) for f in frames] == list(indices) == [5, 15, 25, 35]


# --------------------------------------------------------------------------- times


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90", 90.0), ("1.5", 1.5), (".5", 0.5), ("01:30", 90.0), ("1:02:03.5", 3723.5),
        (" 45 ", 45.0), ("0", 0.0), ("0:00:00", 0.0), (12, 12.0), (2.5, 2.5), (None, None),
    ],
)  # fmt: skip
def test_parse_time_accepts_seconds_and_clock_times(value, seconds):
    assert parse_time(value) == seconds


@pytest.mark.parametrize(
    "value",
    ["", "abc", "-5", "1:60", "1:60:00", "1::2", "1:2:3:4", "1,5", "nan", "inf", "5s",
     -1, float("nan"), float("inf"), True],
)  # fmt: skip
def test_parse_time_rejects_bad_values(value):
    with pytest.raises(UsageError) as caught:
        parse_time(value)
    assert caught.value.exit_code == 2


# --------------------------------------------------------------------------- plan


INFO = VideoInfo("synthetic.mp4", 4.0, 10.0, 40, 64, 48, "h264")


@pytest.mark.parametrize(
    ("options", "indices"),
    [
        ({"max_frames": 4}, (5, 15, 25, 35)),
        ({"max_frames": 100, "fps": 0.5}, (10, 30)),
        ({"max_frames": 100, "fps": 2}, (2, 7, 12, 17, 22, 27, 32, 37)),
        ({"max_frames": 3, "fps": 2}, (6, 20, 33)),
        ({"max_frames": 4, "start": 1, "end": 3}, (12, 17, 22, 27)),
        ({"max_frames": 4, "start": 2}, (22, 27, 32, 37)),
        ({"max_frames": 4, "end": 100}, (5, 15, 25, 35)),  # end past the video: clipped
        ({"max_frames": 100}, tuple(range(40))),  # more wanted than exist: every frame once
        ({"max_frames": 1, "start": 1.01, "end": 1.05}, (10,)),  # no frame starts inside
    ],
)
def test_plan_frames_picks_segment_centres(options, indices):
    plan = plan_frames(INFO, **options)
    assert plan.indices == indices
    assert plan.timestamps == tuple(round(i / 10, 6) for i in indices)


def test_plan_frames_uses_per_frame_timestamps():
    times = [t / 1000 for t in VFR_PTS_MS]
    info = VideoInfo("vfr.mp4", 10.0, 4.0, 40, 64, 48, "h264")
    plan = plan_frames(info, 5, timestamps=times)
    # centres 1, 3, 5, 7, 9 s; frames 20.. start every 0.4 s from 2.0 s
    assert plan.indices == (10, 22, 27, 32, 37)
    assert plan.timestamps == (1.0, 2.8, 4.8, 6.8, 8.8)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_frames": 0}, "max_frames"),
        ({"max_frames": -3}, "max_frames"),
        ({"max_frames": 2.5}, "max_frames"),
        ({"max_frames": 4, "fps": 0}, "fps"),
        ({"max_frames": 4, "fps": -1}, "fps"),
        ({"max_frames": 4, "start": -1}, "start"),
        ({"max_frames": 4, "start": 2, "end": 2}, "before end"),
        ({"max_frames": 4, "start": 3, "end": 1}, "before end"),
        ({"max_frames": 4, "start": 4}, r"duration 4 s"),
        ({"max_frames": 4, "start": 60}, r"duration 4 s"),
    ],
)
def test_plan_frames_rejects_bad_options(options, message):
    with pytest.raises(UsageError, match=message) as caught:
        plan_frames(INFO, **options)
    assert caught.value.exit_code == 2


@settings(max_examples=50, deadline=None)
@given(
    frame_count=st.integers(1, 600),
    rate=st.floats(1.0, 60.0),
    max_frames=st.integers(1, 64),
    fps=st.none() | st.floats(0.05, 30.0),
    data=st.data(),
)
def test_plan_frames_invariants(frame_count, rate, max_frames, fps, data):
    duration = frame_count / rate
    info = VideoInfo("synthetic.mp4", duration, rate, frame_count, 64, 48, "h264")
    start = data.draw(st.none() | st.floats(0.0, duration, exclude_max=True), label="start")
    low = start or 0.0
    end = data.draw(st.none() | st.floats(low, 2 * duration, exclude_min=True), label="end")
    plan = plan_frames(info, max_frames, fps=fps, start=start, end=end)

    indices = np.array(plan.indices)
    high = min(end if end is not None else duration, duration)
    assert len(indices) >= 1
    assert np.all(np.diff(indices) > 0)  # sorted and unique
    assert indices[0] >= 0 and indices[-1] < frame_count
    assert len(indices) <= max_frames
    if fps is not None:
        assert len(indices) <= max(1, math.floor((high - low) * fps))
    assert plan.timestamps == tuple(round(i / rate, 6) for i in plan.indices)
    tol = 1e-5
    if not all(low - tol <= t < high + tol for t in plan.timestamps):
        # only when no frame starts inside the window: the frame on screen at start
        starts_inside = [i for i in range(frame_count) if low + tol <= i / rate < high - tol]
        assert len(indices) == 1 and plan.timestamps[0] <= low + tol and not starts_inside


# --------------------------------------------------------------------------- decode


@pytest.mark.skipif(video.decord is None, reason="decord is not installed")
@pytest.mark.parametrize("size", [None, (32, 24)])
def test_decord_and_ffmpeg_return_the_same_frames(videos, size):
    plan = plan_frames(probe(videos["clip"]), 7)
    by_decord = _joined(_decode(videos["clip"], plan, "decord", size=size))
    by_ffmpeg = _joined(_decode(videos["clip"], plan, "ffmpeg", size=size))
    assert by_decord[1] == by_ffmpeg[1] == plan.indices
    assert by_decord[2] == by_ffmpeg[2] == plan.timestamps
    difference = np.abs(by_decord[0].astype(np.int16) - by_ffmpeg[0].astype(np.int16))
    assert difference.mean() <= 2.0
    if size is None:
        assert [_frame_number(f) for f in by_ffmpeg[0]] == list(plan.indices)


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_chunks_have_chunk_frames_frames_and_their_plan_position(videos, backend):
    plan = plan_frames(probe(videos["clip"]), 7)
    chunks = _decode(videos["clip"], plan, backend, chunk_frames=3)
    assert [len(c.frames) for c in chunks] == [3, 3, 1]
    assert [c.first for c in chunks] == [0, 3, 6]
    for chunk in chunks:
        assert chunk.frames.dtype == np.uint8 and chunk.frames.shape[1:] == (48, 64, 3)
        assert chunk.indices == plan.indices[chunk.first : chunk.first + len(chunk.frames)]
        assert chunk.timestamps == plan.timestamps[chunk.first : chunk.first + len(chunk.frames)]
        assert chunk.skipped == ()
        assert [_frame_number(f) for f in chunk.frames] == list(chunk.indices)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(32, 24), (30, 20), (96, 72)])
def test_resize_happens_at_decode(videos, backend, size):
    plan = plan_frames(probe(videos["clip"]), 5)
    chunks = _decode(videos["clip"], plan, backend, chunk_frames=2, size=size)
    assert {c.frames.shape[1:] for c in chunks} == {(size[1], size[0], 3)}


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_variable_frame_rate_decodes_the_timestamped_frames(videos, backend):
    times = frame_timestamps(videos["vfr"])
    info = probe(videos["vfr"])
    plan = plan_frames(info, 5, timestamps=times)
    frames, indices, _ = _joined(_decode(videos["vfr"], plan, backend))
    if times is not None:
        assert times == pytest.approx([t / 1000 for t in VFR_PTS_MS], abs=1e-6)
        centres = [(k + 0.5) * info.duration_seconds / 5 for k in range(5)]
        on_screen = [max(i for i, t in enumerate(times) if t <= c) for c in centres]
        assert list(indices) == on_screen
    assert [_frame_number(f) for f in frames] == list(indices)


def test_auto_uses_ffmpeg_when_decord_cannot_decode(videos):
    plan = plan_frames(probe(videos["ts"]), 6)
    frames, indices, _ = _joined(_decode(videos["ts"], plan, "auto", chunk_frames=4))
    assert indices == plan.indices
    assert [_frame_number(f) for f in frames] == list(indices)


def test_auto_uses_ffmpeg_without_decord(videos, monkeypatch):
    monkeypatch.setattr(video, "decord", None)
    plan = plan_frames(probe(videos["clip"]), 4)
    frames, indices, _ = _joined(_decode(videos["clip"], plan, "auto"))
    assert [_frame_number(f) for f in frames] == list(indices) == [5, 15, 25, 35]
    assert frame_timestamps(videos["clip"]) is None


@pytest.mark.skipif(video.decord is None, reason="decord is not installed")
def test_frame_timestamps_start_at_zero(videos):
    assert frame_timestamps(videos["clip"]) == pytest.approx([i / 10 for i in range(40)])


def _use_flaky_decord(monkeypatch, broken) -> None:
    """Make the decord backend read through a _FlakyReader (even where decord is absent)."""
    if video.decord is None:
        monkeypatch.setattr(video, "decord", object())
    monkeypatch.setattr(video, "_open_decord", lambda path, size: _FlakyReader(broken))


class _FlakyReader:
    """Stands in for decord.VideoReader: frames in `broken` fail to decode."""

    def __init__(self, broken):
        self.broken = set(broken)

    def get_batch(self, indices):
        if self.broken & set(indices):
            raise RuntimeError("corrupt frame")
        return np.stack([_picture(i) for i in indices])


def test_corrupt_frames_are_skipped_and_reported(videos, monkeypatch):
    plan = plan_frames(probe(videos["clip"]), 10)  # indices 2, 6, 10, ..., 38
    broken = {plan.indices[1], plan.indices[9]}
    _use_flaky_decord(monkeypatch, broken)
    chunks = _decode(videos["clip"], plan, "decord", chunk_frames=4)
    assert [len(c.frames) for c in chunks] == [4, 4]
    assert [c.first for c in chunks] == [0, 5]
    assert chunks[0].skipped == (plan.timestamps[1],)
    assert chunks[1].skipped == (plan.timestamps[9],)  # after the last frame: on the last chunk
    decoded = sum((c.indices for c in chunks), ())
    assert decoded == tuple(i for i in plan.indices if i not in broken)


def test_no_decodable_frame_is_an_input_error(videos, monkeypatch):
    plan = plan_frames(probe(videos["clip"]), 5)
    _use_flaky_decord(monkeypatch, range(40))
    with pytest.raises(InputError, match="has no decodable frames"):
        _decode(videos["clip"], plan, "decord")
    # auto: decord failing on the whole first batch hands the file to ffmpeg
    frames, indices, _ = _joined(_decode(videos["clip"], plan, "auto"))
    assert [_frame_number(f) for f in frames] == list(indices) == list(plan.indices)


@pytest.mark.parametrize(
    "options",
    [{"chunk_frames": 0}, {"size": (0, 10)}, {"size": (10,)}, {"size": (10.5, 8)},
     {"backend": "gpu"}],
)  # fmt: skip
def test_bad_decode_options_are_usage_errors(videos, options):
    with pytest.raises(UsageError):
        iter_chunks(videos["clip"], FramePlan((0,), (0.0,)), **options)


def test_ffmpeg_selects_hundreds_of_frames(videos):
    # more indices than ffmpeg's expression parser takes in one flat sum (~100)
    plan = plan_frames(probe(videos["long"]), 250)
    frames, indices, _ = _joined(_decode(videos["long"], plan, "ffmpeg", chunk_frames=64))
    assert indices == plan.indices and len(indices) == 250
    assert [_frame_number(f) for f in frames] == [i % FRAMES for i in indices]


def test_stopping_early_leaves_no_ffmpeg_running(videos):
    plan = plan_frames(probe(videos["clip"]), 40)
    chunks = iter_chunks(videos["clip"], plan, chunk_frames=2, backend="ffmpeg")
    first = next(chunks)
    chunks.close()  # must kill and reap the ffmpeg process, not wait for it
    assert first.indices == (0, 1)

"""Every bad input gets a sentence and an exit code; memory is checked before work; Ctrl-C is clean."""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import write_video
from statekv.policies import StateKV, Window
from statekv_cli.app import app

runner = CliRunner()
FAST = ["--max-frames", "2", "--fps", "4", "--max-new-tokens", "2"]


def _audio_only(path):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for _ in range(8):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, clip):
    from PIL import Image

    folder = tmp_path_factory.mktemp("bad")
    files = {"missing": folder / "missing.mp4", "directory": folder / "a folder"}
    files["directory"].mkdir()
    files["empty"] = folder / "empty.mp4"
    files["empty"].write_bytes(b"")
    files["random"] = folder / "random.mp4"
    files["random"].write_bytes(np.random.default_rng(0).bytes(8192))
    files["text"] = folder / "notes.mp4"
    files["text"].write_text("this is not a video\n" * 50)
    files["truncated"] = folder / "truncated.mp4"
    data = clip.read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["audio"] = _audio_only(folder / "audio.m4a")
    files["image"] = folder / "still.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(files["image"])
    return files


MESSAGES = {
    "missing": "no such file", "directory": "is a directory", "empty": "empty",
    "random": "not a readable video", "text": "not a readable video",
    "truncated": "not a readable video", "audio": "no video", "image": "still image",
}


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_bad_video_gets_one_line_and_exit_3(bad_files, tiny_internvl_dir, kind):
    result = runner.invoke(app, ["ask", str(bad_files[kind]), "q?", "--model",
                                 str(tiny_internvl_dir), *FAST])
    assert result.exit_code == 3, result.output
    assert MESSAGES[kind] in result.stderr.lower()
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreadable_file_says_permission_denied(clip, tiny_internvl_dir, monkeypatch):
    # CI runs as root, where chmod does not stop reads: simulate the refusal.
    real_open = builtins.open

    def refusing(file, *args, **kwargs):
        if os.fspath(file) == str(clip):
            raise PermissionError(13, "Permission denied", str(clip))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    result = runner.invoke(app, ["ask", str(clip), "q?", "--model", str(tiny_internvl_dir), *FAST])
    assert result.exit_code == 3
    assert "permission denied" in result.stderr


def test_batch_records_each_bad_file_and_goes_on(bad_files, clip, tiny_internvl_dir, tmp_path):
    folder = tmp_path / "mixed videos ü"
    folder.mkdir()
    (folder / "good clip é.mp4").write_bytes(clip.read_bytes())
    for kind in ("empty", "random", "text", "truncated", "audio"):
        target = folder / f"{kind}.mp4"
        target.write_bytes(bad_files[kind].read_bytes())
    os.symlink(folder, folder / "loop")  # a symlink loop inside the folder
    out = tmp_path / "s.jsonl"
    result = runner.invoke(app, ["summarize", str(folder), "--out", str(out), "--model",
                                 str(tiny_internvl_dir), *FAST])
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    status = {os.path.basename(r["path"]): r["status"] for r in records}
    assert status.pop("good clip é.mp4") == "ok"
    assert set(status.values()) == {"error"} and len(status) == 5
    assert all(r["error"]["message"] for r in records if r["status"] == "error")


def test_output_never_overwrites_an_input(clip, tiny_internvl_dir, tmp_path):
    video = tmp_path / "v.mp4"
    video.write_bytes(clip.read_bytes())
    before = video.read_bytes()
    result = runner.invoke(app, ["summarize", str(video), "--out", str(video), "--model",
                                 str(tiny_internvl_dir), *FAST])
    assert result.exit_code == 2
    assert "one of the input videos" in result.stderr
    assert video.read_bytes() == before


def test_path_with_spaces_and_non_ascii_works(clip, tiny_internvl_dir, tmp_path):
    video = tmp_path / "my holiday vidéo 東京.mp4"
    video.write_bytes(clip.read_bytes())
    result = runner.invoke(app, ["ask", str(video), "q?", "--model", str(tiny_internvl_dir),
                                 "--json", *FAST])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["path"] == str(video)


def test_start_beyond_the_end_is_a_usage_error(clip, tiny_internvl_dir):
    result = runner.invoke(app, ["ask", str(clip), "q?", "--start", "1:00", "--model",
                                 str(tiny_internvl_dir), *FAST])
    assert result.exit_code == 2
    assert "3.0" in result.stderr or "duration" in result.stderr


def test_huge_resolution_is_decoded_at_the_model_size(tmp_path, tiny_model, monkeypatch):
    video = write_video(tmp_path / "uhd.mp4", frames=2, size=(3840, 2160), fps=2)
    shapes = []
    original = tiny_model.adapter.video_chunk

    def spy(frames, first, offset):
        shapes.append(frames.shape)
        return original(frames, first, offset)

    monkeypatch.setattr(tiny_model.adapter, "video_chunk", spy)
    tiny_model.prefill(str(video), max_frames=2, method="full")
    assert shapes and all(shape[1:] == (64, 64, 3) for shape in shapes)


# memory -------------------------------------------------------------------------------
def test_preflight_refuses_what_does_not_fit_unless_forced(clip, tiny_internvl_dir, monkeypatch):
    import statekv.accounting

    monkeypatch.setattr(statekv.accounting, "available_memory", lambda device: 1024)
    args = ["ask", str(clip), "q?", "--model", str(tiny_internvl_dir), *FAST]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 5
    assert "--force" in refused.stderr and "--max-frames" in refused.stderr
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    import psutil
    import statekv, statekv.commands.plan as tasks, statekv.commands.ask as commands, transformers, statekv.models, statekv.session  # the level after imports (the library loads torch lazily)
    process = psutil.Process()
    base = peak = process.memory_info().rss
    done = False
    def sample():
        global peak
        while not done:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    options = tasks.RunOptions(model=sys.argv[1], max_frames=24, fps=100, max_new_tokens=4,
                               device="cpu", dtype="float32", budget=600, method="statekv")
    plan = tasks.plan_run(sys.argv[2], options)
    commands.ask(sys.argv[2], ["what happens?"], options)
    done = True
    thread.join()
    print(json.dumps({"rise": peak - base, "estimate": plan.memory.peak_memory_bytes}))
""")


def test_memory_estimate_matches_the_measured_rise(tmp_path):
    from statekv.testing import build_tiny_internvl

    checkpoint = build_tiny_internvl(tmp_path / "mid", hidden=1024, heads=16, kv_heads=4,
                                     text_layers=8, image_size=128, patch_size=8)
    video = write_video(tmp_path / "v.mp4", frames=24, size=(128, 128), fps=8)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-c", MEASURE, str(checkpoint), str(video)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rise"] > 200 * 2**20
    assert abs(result["estimate"] - result["rise"]) <= 0.25 * result["rise"], result


# interrupts ---------------------------------------------------------------------------
SLOW_ASK = textwrap.dedent("""
    import sys, time
    import statekv.prefill as prefill
    original = prefill.forward_chunk
    def slow(*args):
        print("CHUNK", file=sys.stderr, flush=True)
        time.sleep(0.3)
        return original(*args)
    prefill.forward_chunk = slow
    from statekv_cli.app import main
    sys.argv = ["statekv"] + sys.argv[1:]
    main()
""")


def test_ctrl_c_during_prefill_exits_130_quickly(clip, tiny_internvl_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd())
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_ASK, "ask", str(clip), "q?", "--model", str(tiny_internvl_dir),
         "--max-frames", "12", "--fps", "100"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    for line in process.stderr:
        if "CHUNK" in line:
            break
    process.send_signal(signal.SIGINT)
    sent = time.perf_counter()
    _, stderr = process.communicate(timeout=30)
    elapsed = time.perf_counter() - sent
    assert process.returncode == 130
    assert elapsed < 2.0
    assert "interrupted" in stderr and "Traceback" not in stderr


# properties ---------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(kv_heads=st.integers(1, 4), candidates=st.integers(1, 60), budget=st.integers(1, 80),
       seed=st.integers(0, 2**16))
def test_statekv_keeps_exactly_the_top_masses(kv_heads, candidates, budget, seed):
    generator = torch.Generator().manual_seed(seed)
    mass = torch.rand(kv_heads, candidates, generator=generator)
    assume(all(len(set(row.tolist())) == candidates for row in mass))
    positions = torch.arange(100, 100 + candidates).expand(kv_heads, -1)
    kept = StateKV(tokens=budget).select(mass, positions)
    assert kept.shape == (kv_heads, min(budget, candidates))
    for head in range(kv_heads):
        row = kept[head].tolist()
        assert row == sorted(set(row))
        top = set(mass[head].topk(min(budget, candidates)).indices.tolist())
        assert set(row) == top


@settings(max_examples=40, deadline=None)
@given(candidates=st.integers(1, 60), window=st.integers(1, 80))
def test_window_keeps_the_most_recent(candidates, window):
    positions = torch.arange(candidates).expand(2, -1)
    kept = Window(tokens=window).select(None, positions)
    expected = list(range(max(0, candidates - window), candidates))
    assert kept[0].tolist() == expected == kept[1].tolist()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.integers(1, 5), chunk_frames=st.integers(1, 3), seed=st.integers(0, 99))
def test_engine_equals_full_attention_for_any_chunking(tiny_model, frames, chunk_frames, seed):

    from conftest import chat_video_inputs
    from statekv.testing import tiny_video_frames

    reference = _reference(tiny_model)
    video = tiny_video_frames(frames, seed=seed)
    inputs = chat_video_inputs(reference[1], video, "what?")
    with torch.inference_mode():
        expected = reference[0](**inputs).logits[0].float()
    session = tiny_model.prefill_frames(video, method="statekv", budget=10**6,
                                        chunk_frames=chunk_frames)
    logits = session.question_logits("what?")
    assert (logits - expected[-logits.shape[0]:]).abs().max().item() < 1e-4


_REFERENCES: dict = {}


def _reference(tiny_model):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_model.name
    if path not in _REFERENCES:
        _REFERENCES[path] = (
            AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval(),
            AutoProcessor.from_pretrained(path))
    return _REFERENCES[path]


def test_batch_preflight_refuses_before_loading(clip, tiny_internvl_dir, monkeypatch, tmp_path):
    import statekv.accounting

    monkeypatch.setattr(statekv.accounting, "available_memory", lambda device: 1024)
    out = tmp_path / "s.jsonl"
    args = ["summarize", str(clip), "--out", str(out), "--model", str(tiny_internvl_dir), *FAST]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 5 and "--force" in refused.stderr
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert json.loads(out.read_text().splitlines()[-1])["status"] == "ok"

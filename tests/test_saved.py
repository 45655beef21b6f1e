"""Prefill files (statekv/saved.py) and the automatic prefill cache (commands/cache.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_video
from typer.testing import CliRunner

from statekv import saved
from statekv.commands import cache as caching
from statekv.errors import InputError, UsageError
from statekv.units import parse_duration, parse_size
from statekv_cli.app import app

runner = CliRunner()
FAST = ["--max-frames", "4", "--fps", "4", "--max-new-tokens", "4", "--budget", "30",
        "--device", "cpu"]
ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["what happens?", "what colour is it?"]


def run(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


# round trip: every family ---------------------------------------------------------------
def test_round_trip_bit_for_bit_every_family(family, tmp_path):
    """Answers, first-token log-probs and question logits from the file equal the live
    session's exactly, even after another video has changed the adapter's state."""
    model, frames = family.model, family.frames
    unit = model.adapter.frames_per_unit
    live = model.prefill_frames(frames, method="statekv", budget=24, chunk_frames=unit,
                                max_new_tokens=4)
    answers = live.ask(QUESTIONS)
    logits = live.question_logits(QUESTIONS[0])
    path = tmp_path / "clip.skv"
    size = live.save(str(path))
    assert size == path.stat().st_size
    assert size - live.stats.detailed_cache_bytes < saved.header_bytes(
        len(live.state.cache.layers), len(frames))
    # another video in between: the adapter's layout and positions are now the other one's
    model.prefill_frames(frames[: 2 * unit][::-1].copy(), method="full", chunk_frames=unit)
    opened = model.open(str(path))
    again = opened.ask(QUESTIONS)
    assert [a.token_ids for a in again] == [a.token_ids for a in answers]
    assert [a.answer for a in again] == [a.answer for a in answers]
    for a, b in zip(answers, again):
        assert torch.equal(a.first_token_logprobs, b.first_token_logprobs)
    assert torch.equal(opened.question_logits(QUESTIONS[0]), logits)
    stats, before = opened.stats, live.stats
    assert stats.prefills == 0 and stats.vision_flops == 0 and stats.lm_prefill_flops == 0
    assert stats.lm_prefill_seconds == 0 and stats.vision_seconds == 0
    assert (stats.frames, stats.frame_timestamps, stats.detailed_tokens, stats.carried_tokens,
            stats.tokens_per_frame, stats.detailed_cache_bytes) == (
        before.frames, before.frame_timestamps, before.detailed_tokens, before.carried_tokens,
        before.tokens_per_frame, before.detailed_cache_bytes)
    assert opened.settings.to_dict() == live.settings.to_dict()
    assert opened.source == str(path)


def test_round_trip_keeps_the_videos_rotary_base(tiny_internvl_dir, frames, tmp_path):
    """A dynamic-rope model answers from the file with the base its prefill fixed, not the
    short prompt's: the logits equal the live session's exactly."""
    import statekv
    from statekv.testing.rope import with_rope

    checkpoint = with_rope(tiny_internvl_dir, tmp_path / "dynamic", max_position_embeddings=64,
                           rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    model = statekv.load(str(checkpoint), device="cpu", dtype="float32")
    live = model.prefill_frames(frames, method="full")
    assert live.state.rotary_length > 64  # beyond the context: the base depends on the length
    logits = live.question_logits(QUESTIONS[0])
    live.save(str(tmp_path / "dynamic.skv"))
    opened = model.open(str(tmp_path / "dynamic.skv"))
    assert opened.state.rotary_length == live.state.rotary_length
    assert torch.equal(opened.question_logits(QUESTIONS[0]), logits)


def test_file_is_plain_safetensors(tiny_model, frames, tmp_path):
    """Any safetensors reader opens it: one keys and one values tensor per layer, seen tokens."""
    from safetensors import safe_open

    session = tiny_model.prefill_frames(frames, method="window", window_frames=2)
    path = tmp_path / "w.skv"
    session.save(str(path))
    cache = session.state.cache
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()[saved.META_KEY])
        assert sorted(handle.keys()) == sorted(
            f"layer.{i}.{p}" for i in range(len(cache.layers)) for p in ("keys", "values"))
        keys = handle.get_tensor("layer.1.keys")
    assert torch.equal(keys, cache.layers[1].keys[0, :, : cache.detailed_tokens])
    assert meta["format_version"] == saved.FORMAT_VERSION
    assert meta["model"]["family"] == "internvl" and meta["settings"]["method"] == "window"
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed


# refusals ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def skv(tiny_internvl_dir, clip, tmp_path_factory):
    """A prefill file of the test clip, written by `statekv prefill --json`."""
    out = tmp_path_factory.mktemp("skv") / "clip.skv"
    result = run("prefill", clip, "-o", out, "--model", tiny_internvl_dir, "--json", *FAST)
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_prefill_json_contract(skv, clip):
    out, record = skv
    assert set(record) >= {"path", "out", "bytes", "settings", "stats"}
    assert record["path"] == str(clip) and record["out"] == str(out)
    assert record["bytes"] == out.stat().st_size
    assert record["stats"]["prefills"] == 1 and record["stats"]["lm_prefill_flops"] > 0
    meta = saved.read_metadata(str(out))
    assert meta["video"]["size_bytes"] == clip.stat().st_size
    assert meta["video"]["content_hash"] == hashlib.sha256(clip.read_bytes()).hexdigest()


def test_ask_file_answers_as_the_video_did(skv, clip, tiny_internvl_dir):
    out, _ = skv
    from_file = run("ask", out, *QUESTIONS, "--json")
    assert from_file.exit_code == 0, from_file.output
    record = json.loads(from_file.stdout)
    live = json.loads(run("ask", clip, *QUESTIONS, "--model", tiny_internvl_dir, "--json",
                          *FAST).stdout)
    assert record["answers"] == live["answers"]
    assert record["source"] == str(out) and record["path"] == str(clip)
    stats = record["stats"]
    assert stats["vision_flops"] == 0 and stats["lm_prefill_flops"] == 0
    assert stats["prefills"] == 0
    assert stats["detailed_tokens"] == live["stats"]["detailed_tokens"]
    assert {k: v for k, v in record["settings"].items()} == live["settings"]


def _one_line(result, code, *words):
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    for word in words:  # a word, or a tuple of words any of which will do
        assert any(w in lines[0] for w in ((word,) if isinstance(word, str) else word)), lines[0]


def test_other_model_family_dtype_or_settings_refused(skv, tmp_path, checkpoints, monkeypatch):
    """Refused before any work: no weights load (checked from the checkpoint's files)."""
    import statekv.session

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(statekv.session, "load_weights", no_load)
    out, _ = skv
    _one_line(run("ask", out, "q", "--model", checkpoints("smolvlm")), 2, "family smolvlm")
    _one_line(run("ask", out, "q", "--dtype", "bfloat16"), 2, "dtype bfloat16")
    _one_line(run("ask", out, "q", "--budget", "12"), 2, "--budget 12")
    # the same architecture, other weights (a retrained copy): its fingerprint differs
    other = tmp_path / "retrained"
    shutil.copytree(saved.read_metadata(str(out))["model"]["name"], other)
    config = json.loads((other / "config.json").read_text())
    config["retrained"] = True
    (other / "config.json").write_text(json.dumps(config))
    _one_line(run("ask", out, "q", "--model", other), 2, "weights")


def test_library_refuses_other_model(skv, family):
    out, _ = skv
    if family.name == "internvl":
        pytest.skip("the file's own family")
    with pytest.raises(UsageError, match="another model"):
        family.model.open(str(out))


def _rewrite_meta(src: Path, dst: Path, change) -> None:
    """Copy a prefill file with its JSON record changed and its header checksum recomputed."""
    data = src.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    meta = json.loads(header["__metadata__"][saved.META_KEY])
    change(meta)
    text = json.dumps(meta)
    header["__metadata__"] = {saved.META_KEY: text,
                              saved.CHECKSUM_KEY: hashlib.sha256(text.encode()).hexdigest()}
    head = json.dumps(header).encode()
    head += b" " * (-(8 + len(head)) % 8)
    dst.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + length:])


def test_damaged_and_future_files_refused_one_line(skv, tmp_path):
    out, _ = skv
    data = out.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    cases = {
        "truncated": (data[: len(data) - 1000], "truncated"),
        "flipped_tensor": (data[:-50] + bytes([data[-50] ^ 0x01]) + data[-49:], "checksum"),
        "flipped_header": (data[:8 + length // 2] + bytes([data[8 + length // 2] ^ 0x04])
                           + data[8 + length // 2 + 1:], ("corrupted", "damaged", "not a statekv")),
        "empty": (b"", "too short"),
    }
    for name, (content, word) in cases.items():
        bad = tmp_path / f"{name}.skv"
        bad.write_bytes(content)
        _one_line(run("ask", bad, "q"), 3, word)
    future = tmp_path / "future.skv"
    _rewrite_meta(out, future, lambda meta: meta.update(format_version=saved.FORMAT_VERSION + 1))
    _one_line(run("ask", future, "q"), 3, "newer statekv")
    with pytest.raises(InputError, match="checksum"):
        _flip_check(out, tmp_path)


def _flip_check(out: Path, tmp_path: Path) -> None:
    """The library refuses a flipped tensor byte too (not only the command line)."""
    import statekv

    data = bytearray(out.read_bytes())
    data[-7] ^= 0x10
    bad = tmp_path / "lib.skv"
    bad.write_bytes(bytes(data))
    meta = saved.read_metadata(str(bad))
    statekv.load(meta["model"]["name"], device="cpu", dtype="float32").open(str(bad))


# the automatic cache ------------------------------------------------------------------------
@pytest.fixture
def counted(monkeypatch):
    """Counts prefills and vision-tower chunks run in this process."""
    import statekv.session as session_module

    calls = {"prefills": 0, "vision": 0}
    original = session_module.prefill_chunks

    def counting(adapter, chunks, *args, **kwargs):
        calls["prefills"] += 1
        video_chunk = adapter.video_chunk

        def vision(*a, **k):
            calls["vision"] += 1
            return video_chunk(*a, **k)

        adapter.video_chunk = vision
        try:
            return original(adapter, chunks, *args, **kwargs)
        finally:
            del adapter.video_chunk

    monkeypatch.setattr(session_module, "prefill_chunks", counting)
    return calls


def test_cache_hit_runs_no_vision_and_no_prefill(clip, tiny_internvl_dir, tmp_path, counted):
    cache = tmp_path / "cache"
    first = run("ask", clip, QUESTIONS[0], "--model", tiny_internvl_dir, "--cache", cache,
                "--json", *FAST)
    assert first.exit_code == 0, first.output
    assert counted == {"prefills": 1, "vision": 4}
    miss = json.loads(first.stdout)
    assert miss["cache"] == "miss" and miss["stats"]["cache"] == "miss"
    second = run("ask", clip, QUESTIONS[0], "--model", tiny_internvl_dir, "--json", *FAST,
                 env={caching.ENV: str(cache)})  # the environment default
    hit = json.loads(second.stdout)
    assert counted == {"prefills": 1, "vision": 4}  # nothing more ran
    assert hit["cache"] == "hit" and hit["stats"]["prefills"] == 0
    assert hit["stats"]["vision_flops"] == 0 and hit["stats"]["lm_prefill_flops"] == 0
    assert hit["answers"] == miss["answers"]
    assert Path(hit["source"]).parent == cache
    other = run("ask", clip, QUESTIONS[0], "--model", tiny_internvl_dir, "--cache", cache,
                "--json", *FAST[:-4], "--budget", "40", "--device", "cpu")
    assert json.loads(other.stdout)["cache"] == "miss"  # other settings: another entry
    off = run("ask", clip, QUESTIONS[0], "--model", tiny_internvl_dir, "--cache", "off",
              "--json", *FAST, env={caching.ENV: str(cache)})
    assert "cache" not in json.loads(off.stdout)
    assert counted["prefills"] == 3


def test_changed_video_same_name_is_a_miss(tiny_internvl_dir, tmp_path, counted):
    video, cache = tmp_path / "v.mp4", tmp_path / "cache"
    write_video(video, frames=12)
    args = ("ask", video, "q", "--model", tiny_internvl_dir, "--cache", cache, "--json", *FAST)
    assert json.loads(run(*args).stdout)["cache"] == "miss"
    assert json.loads(run(*args).stdout)["cache"] == "hit"
    write_video(video, frames=16)  # new content under the same name
    assert json.loads(run(*args).stdout)["cache"] == "miss"
    assert counted["prefills"] == 2


def test_damaged_entry_deleted_and_rebuilt(clip, tiny_internvl_dir, tmp_path):
    cache = tmp_path / "cache"
    args = ("ask", clip, "q", "--model", tiny_internvl_dir, "--cache", cache, "--json", *FAST)
    first = json.loads(run(*args).stdout)
    (entry,) = cache.glob("*.skv")
    entry.write_bytes(entry.read_bytes()[:-10])
    again = json.loads(run(*args).stdout)
    assert again["cache"] == "miss" and again["answers"] == first["answers"]
    assert any("deleted and rebuilt" in w for w in again["warnings"])
    assert json.loads(run(*args).stdout)["cache"] == "hit"


CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from statekv_cli.app import app
app(sys.argv[2:])
"""


def test_two_processes_fill_one_cache_safely(clip, tiny_internvl_dir, tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", CHILD, str(ROOT), "ask", str(clip), "q", "--model",
               str(tiny_internvl_dir), "--cache", str(cache), "--json", *FAST]
    children = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE) for _ in range(2)]
    records = []
    for child in children:
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr.decode()
        records.append(json.loads(stdout))
    assert sorted(r["cache"] for r in records) == ["hit", "miss"]  # the lock: one prefill
    assert records[0]["answers"] == records[1]["answers"]
    assert len(list(cache.glob("*.skv"))) == 1 and not list(cache.glob(".*.tmp"))
    third = json.loads(run("ask", clip, "q", "--model", tiny_internvl_dir, "--cache", cache,
                           "--json", *FAST).stdout)
    assert third["cache"] == "hit" and third["answers"] == records[0]["answers"]


def test_compare_and_summarize_use_the_cache(clip, tiny_internvl_dir, tmp_path):
    cache = tmp_path / "cache"
    args = ("compare", clip, "q", "--methods", "full,statekv", "--model", tiny_internvl_dir,
            "--cache", cache, "--json", *FAST)
    first = json.loads(run(*args).stdout)
    assert [row["cache"] for row in first["methods"]] == ["miss", "miss"]
    second = json.loads(run(*args).stdout)
    assert [row["cache"] for row in second["methods"]] == ["hit", "hit"]
    assert [r["answer"] for r in second["methods"]] == [r["answer"] for r in first["methods"]]
    assert all(row["lm_prefill_flops"] == 0 for row in second["methods"])
    out = tmp_path / "s.jsonl"
    summary = run("summarize", clip, "--out", out, "--model", tiny_internvl_dir, "--cache",
                  cache, "--method", "statekv", "--redo", "-q", *FAST)
    assert summary.exit_code == 0, summary.output
    assert json.loads(out.read_text().splitlines()[-1])["cache"] == "hit"


def _fake_entries(folder: Path, sizes_and_ages: list[tuple[int, float]], now: float) -> None:
    for index, (size, age) in enumerate(sizes_and_ages):
        key = f"{index:032x}"
        (folder / f"{key}.skv").write_bytes(b"\0" * size)
        (folder / f"{key}.json").write_text(json.dumps(
            {"key": key, "video": f"v{index}.mp4", "settings": {"method": "statekv"},
             "created": now - age, "last_used": now - age}))


def test_eviction_keeps_the_size_limit_lru_first(tmp_path):
    folder, now = tmp_path / "cache", time.time()
    folder.mkdir()
    _fake_entries(folder, [(4000, 10), (3000, 50), (5000, 30), (2000, 5)], now)
    record = caching.clear(str(folder), max_size=8000, now=now)
    left = caching.list_cache(str(folder))
    assert left["bytes"] <= 8000 and record["bytes"] == left["bytes"]
    # least recently used go first: ages 50 then 30; the two most recent stay
    assert [row["video"] for row in left["entries"]] == ["v3.mp4", "v0.mp4"]
    _fake_entries(folder, [(1000, 3600 * 24 * 8), (1000, 60)], now)  # v0 unused for 8 days
    result = run("cache", "clear", "--cache", folder, "--older-than", "7d", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["removed"] == 1
    videos = [row["video"] for row in caching.list_cache(str(folder))["entries"]]
    assert sorted(videos) == ["v1.mp4", "v3.mp4"]
    assert run("cache", "clear", "--cache", folder).exit_code == 0
    assert caching.list_cache(str(folder))["entries"] == []
    _one_line(run("cache", "clear", "--cache", folder, "--max-size", "lots"), 2, "not a size")


def test_cache_list_json(clip, tiny_internvl_dir, tmp_path):
    cache = tmp_path / "cache"
    run("ask", clip, "q", "--model", tiny_internvl_dir, "--cache", cache, *FAST)
    record = json.loads(run("cache", "list", "--cache", cache, "--json").stdout)
    (row,) = record["entries"]
    assert row["video"] == str(clip) and row["method"] == "statekv"
    assert row["bytes"] == record["bytes"] == next(cache.glob("*.skv")).stat().st_size


# info predicts the file -------------------------------------------------------------------
def test_info_predicts_the_file_size(skv, clip, tiny_internvl_dir):
    out, record = skv
    args = ["--max-frames", "4", "--fps", "4", "--budget", "30", "--device", "cpu"]
    info = json.loads(run("info", clip, "--model", tiny_internvl_dir, "--json", *args).stdout)
    predicted = info["predicted"]
    assert predicted["detailed_cache_bytes"] == record["stats"]["detailed_cache_bytes"]
    (length,) = struct.unpack("<Q", out.read_bytes()[:8])
    header = 8 + length
    assert record["bytes"] == record["stats"]["detailed_cache_bytes"] + header
    assert abs(predicted["prefill_file_bytes"] - record["bytes"]) <= header


def test_units_parse_sizes_and_durations():
    assert parse_size("50G") == 50 * 2**30 and parse_size("512M") == 512 * 2**20
    assert parse_size("1.5KiB") == 1536 and parse_size("100") == 100
    assert parse_duration("7d") == 7 * 86400 and parse_duration("30m") == 1800
    assert parse_duration("45") == 45
    for bad in ("", "x", "-1G", "5Q"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        parse_duration("soon")

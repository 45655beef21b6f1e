"""`statekv summarize`: JSONL records, failure isolation, resume, kill-safety, shards, Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_video
from typer.testing import CliRunner

from statekv.commands import summarize as batch
from statekv_cli.app import app

runner = CliRunner()
FAST = ["--max-frames", "2", "--fps", "4", "--max-new-tokens", "3"]
KEYS = {"path", "size_bytes", "mtime", "settings", "settings_hash", "status", "summary", "stats",
        "error", "warnings"}


def run(*args):
    return runner.invoke(app, ["summarize", *[str(a) for a in args]])


def lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def comparable(record: dict) -> dict:
    """A record without what varies between runs (timings, memory, mtime-free)."""
    record = json.loads(json.dumps(record))
    for key in batch.TIMING_STATS:
        (record.get("stats") or {}).pop(key, None)
    return record


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 good videos (one in a subfolder) and 1 corrupt file, plus a symlink loop."""
    root = tmp_path_factory.mktemp("batch") / "videos"
    (root / "sub").mkdir(parents=True)
    write_video(root / "a.mp4", frames=8)
    write_video(root / "sub" / "b.mp4", frames=6)
    write_video(root / "c.mkv", frames=4)
    (root / "broken.mp4").write_bytes(b"this is not a video" * 20)
    (root / "notes.txt").write_text("not a video")
    os.symlink("..", root / "sub" / "loop")
    return root


@pytest.fixture(scope="module")
def good(folder):
    return [str(folder / "a.mp4"), str(folder / "c.mkv"), str(folder / "sub" / "b.mp4")]


@pytest.fixture(scope="module")
def model_dir(tiny_internvl_dir):
    return str(tiny_internvl_dir)


@pytest.fixture(scope="module")
def first_run(folder, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "summaries.jsonl"
    result = run(folder, "--model", model_dir, "--out", out, *FAST)
    return result, out


@pytest.fixture
def count_prefills(monkeypatch):
    from statekv.commands import plan as tasks

    calls = []
    original = tasks.prefill_video

    def counting(model, resolved, options, path, *args, **kwargs):
        calls.append(path)
        return original(model, resolved, options, path, *args, **kwargs)

    monkeypatch.setattr(tasks, "prefill_video", counting)
    return calls


# discovery, sharding, hashing, reading --------------------------------------------------
def test_find_videos_recursive_sorted_loop_safe(folder, good):
    assert batch.find_videos([str(folder)]) == sorted(good + [str(folder / "broken.mp4")])
    assert batch.find_videos([str(folder)], glob="*.mkv") == [str(folder / "c.mkv")]
    assert batch.find_videos([str(folder / "notes.txt"), str(folder)], glob="b.*") == [
        str(folder / "notes.txt"), str(folder / "sub" / "b.mp4")]


def test_shards_partition_the_sorted_list():
    videos = [f"v{i:02d}.mp4" for i in range(11)]
    for n in (1, 2, 3, 5, 11, 13):
        parts = [batch.shard(videos, k, n) for k in range(1, n + 1)]
        assert sorted(v for part in parts for v in part) == videos
        assert sum(len(p) for p in parts) == len(videos)
    assert batch.shard(videos, 2, 3) == ["v01.mp4", "v04.mp4", "v07.mp4", "v10.mp4"]
    for bad in ("0/3", "4/3", "x", "1/0"):
        with pytest.raises(batch.UsageError):
            batch.parse_shard(bad)


def test_settings_hash_ignores_device_not_prompt():
    base = {"model": "m", "method": "statekv", "budget": 10, "prompt": "p", "device": "cpu"}
    assert batch.settings_hash(base) == batch.settings_hash(dict(base, device="cuda:1"))
    assert batch.settings_hash(base) != batch.settings_hash(dict(base, prompt="q"))
    assert batch.settings_hash(base) != batch.settings_hash(dict(base, budget=11))


def test_read_records_last_wins_and_partial_line_dropped(tmp_path):
    out = tmp_path / "s.jsonl"
    out.write_text('{"path": "a", "n": 1}\n{"path": "b", "n": 1}\n{"path": "a", "n": 2}\n{"path": "c", "n')
    assert {p: r["n"] for p, r in batch.read_records(str(out)).items()} == {"a": 2, "b": 1}
    with batch.JsonlWriter(str(out)) as writer:  # appending first cuts the partial line
        writer.write({"path": "c", "n": 3})
    assert out.read_text().splitlines()[-1] == '{"path": "c", "n": 3}'
    assert batch.read_records(str(out))["c"]["n"] == 3


# the command -------------------------------------------------------------------------------
def test_three_summaries_one_error_exit_1(first_run, folder):
    result, out = first_run
    assert result.exit_code == 1, result.output
    records = lines(out)
    assert len(records) == 4
    assert all(set(r) == KEYS for r in records)
    by_path = {r["path"]: r for r in records}
    bad = by_path.pop(str(folder / "broken.mp4"))
    assert bad["status"] == "error" and bad["summary"] is None and bad["stats"] is None
    assert bad["error"]["type"] == "InputError" and bad["error"]["message"]
    assert len(by_path) == 3
    hashes = {r["settings_hash"] for r in records}
    assert len(hashes) == 1
    for record in by_path.values():
        assert record["status"] == "ok" and record["error"] is None
        assert isinstance(record["summary"], str)
        assert record["stats"]["prefills"] == 1 and record["stats"]["frames"] == 2
        assert record["size_bytes"] == os.path.getsize(record["path"])
        assert record["settings"]["max_frames"] == 2 and record["settings"]["prompt"]
    assert "done" in result.stderr and "failed" in result.stderr


def test_rerun_does_no_new_prefill(first_run, folder, good, model_dir, count_prefills):
    _, out = first_run
    before = out.read_text()
    result = run(*good, "--model", model_dir, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert count_prefills == []
    assert out.read_text() == before
    # the whole folder again: only the failed video is retried (and fails again)
    result = run(folder, "--model", model_dir, "--out", out, *FAST)
    assert result.exit_code == 1
    assert count_prefills == [str(folder / "broken.mp4")]
    # other settings are a different result: everything runs again
    result = run(*good, "--model", model_dir, "--out", out, "--prompt", "Say hi.", *FAST)
    assert result.exit_code == 0, result.output
    assert len(count_prefills) == 4
    last = batch.read_records(str(out))
    assert {last[p]["settings"]["prompt"] for p in good} == {"Say hi."}


def test_redo_and_stdout(good, model_dir, tmp_path, count_prefills):
    out = tmp_path / "s.jsonl"
    assert run(good[0], "--model", model_dir, "--out", out, *FAST).exit_code == 0
    assert run(good[0], "--model", model_dir, "--out", out, "--redo", *FAST).exit_code == 0
    assert count_prefills == [good[0], good[0]]
    assert len(lines(out)) == 2
    result = run(good[0], "--model", model_dir, "--out", "-", "-q", *FAST)
    assert result.exit_code == 0
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["path"] == good[0] and record["status"] == "ok"


SLOW_CHILD = """
import sys, time
import statekv.commands.plan as tasks
original = tasks.prefill_video
def slow(*args, **kwargs):
    time.sleep(float(sys.argv[1]))
    return original(*args, **kwargs)
tasks.prefill_video = slow
from statekv_cli.app import app
app(sys.argv[2:])
"""


def test_killed_run_resumes_and_completes(good, model_dir, tmp_path, count_prefills):
    """SIGKILL after the first record (prefill slowed down so the kill lands mid-batch), a
    partial line at the end as a kill mid-write leaves it; the rerun completes."""
    videos = tmp_path / "v"
    videos.mkdir()
    for path in good:
        shutil.copy(path, videos / Path(path).name)
    out = tmp_path / "s.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_CHILD, "1", "summarize", str(videos), "--model", model_dir,
         "--out", str(out), "-q", *FAST], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert out.read_bytes().count(b"\n") == 1, child.stderr.read().decode()
    with open(out, "ab") as file:
        file.write(b'{"path": "' + str(videos).encode() + b'/half')  # a torn last line
    result = run(videos, "--model", model_dir, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert len(count_prefills) == 2
    records = lines(out)
    assert sorted(r["path"] for r in records) == batch.find_videos([str(videos)])
    assert all(r["status"] == "ok" for r in records)


def test_shards_cover_every_video_once(folder, model_dir):
    seen = []
    for k in (1, 2):
        result = run(folder, "--model", model_dir, "--out", "-", "--shard", f"{k}/2", "-q", *FAST)
        assert result.exit_code in (0, 1), result.output
        seen += [json.loads(line)["path"] for line in result.stdout.splitlines()]
    assert sorted(seen) == batch.find_videos([str(folder)])
    assert run(folder, "--shard", "4/3").exit_code == 2


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_backend_same_records_as_local(first_run, folder, good, model_dir, local_ray, tmp_path):
    _, local_out = first_run
    out = tmp_path / "ray.jsonl"
    result = run(folder, "--model", model_dir, "--out", out, "--ray", *FAST)
    assert result.exit_code == 1, result.output
    local = {r["path"]: comparable(r) for r in lines(local_out)[:4]}
    remote = {r["path"]: comparable(r) for r in lines(out)}
    assert len(lines(out)) == 4
    assert remote == local
    # the same resume rules: nothing left to do starts no worker
    result = run(*good, "--model", model_dir, "--out", out, "--ray", *FAST)
    assert result.exit_code == 0, result.output
    assert len(lines(out)) == 4


# --json, the all-skipped table, the output lock ------------------------------------------
def test_json_final_record_and_all_skipped_table(good, model_dir, tmp_path):
    out = tmp_path / "s.jsonl"
    good = good[:1]
    assert run(*good, "--model", model_dir, "--out", out, *FAST).exit_code == 0
    result = run(*good, "--model", model_dir, "--out", out, "--json", *FAST)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert set(record) == {"out", "done", "skipped", "failed", "lm_prefill_flops",
                           "full_lm_prefill_flops", "seconds"}
    assert record["out"] == str(out)
    assert (record["done"], record["skipped"], record["failed"]) == (0, len(good), 0)
    assert record["lm_prefill_flops"] == record["full_lm_prefill_flops"] == 0
    rerun = run(*good, "--model", model_dir, "--out", out, *FAST)
    assert rerun.exit_code == 0 and rerun.stdout == ""
    assert "0 FLOP" not in rerun.stderr and "none this run" in rerun.stderr
    refused = run(*good, "--model", model_dir, "--out", "-", "--json", *FAST)
    assert refused.exit_code == 2


def test_json_record_counts_what_ran(good, model_dir, tmp_path):
    out = tmp_path / "s.jsonl"
    result = run(good[0], "--model", model_dir, "--out", out, "--json", *FAST)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    written = lines(out)
    assert record["done"] == 1 and len(written) == 1
    assert record["lm_prefill_flops"] == written[0]["stats"]["lm_prefill_flops"]
    assert record["full_lm_prefill_flops"] == written[0]["stats"]["full_lm_prefill_flops"]


HOLD = """
import sys, time
from statekv.locks import output_lock
with output_lock(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(out, part=None):
    args = [sys.executable, "-c", HOLD, str(out)] + ([part] if part else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_refuses_naming_the_first(good, model_dir, tmp_path):
    from statekv.errors import BusyError
    from statekv.locks import output_lock

    out = tmp_path / "s.jsonl"
    holder = _holder(out)
    try:
        result = run(good[0], "--model", model_dir, "--out", out, *FAST)
        assert result.exit_code == 3
        assert f"pid {holder.pid}" in result.stderr and len(result.stderr.splitlines()) == 1
        assert not out.exists() or lines(out) == []  # nothing was done twice
        with pytest.raises(BusyError, match=f"pid {holder.pid}"):  # a shard overlaps it too
            with output_lock(str(out), "1/2"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(str(out)):  # released when its process ended
        pass


def test_shards_of_one_file_run_together_but_not_twice(tmp_path):
    from statekv.errors import BusyError
    from statekv.locks import output_lock

    out = str(tmp_path / "s.jsonl")
    first = _holder(out, "1/2")
    try:
        with output_lock(out, "2/2"):  # the other shard of the same file: allowed
            pass
        with pytest.raises(BusyError, match=f"pid {first.pid}, shard 1/2"):
            with output_lock(out, "1/2"):
                pass
        with pytest.raises(BusyError, match=f"pid {first.pid}, shard 1/2"):
            with output_lock(out):  # the whole file overlaps every shard
                pass
    finally:
        first.kill()
        first.wait()

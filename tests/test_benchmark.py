"""`statekv eval --benchmark` / `--report`: miniature Video-MME and MLVU copies, tiny models.

The fixtures use the publishers' file names and columns (docs/benchmarks.md); random weights
make accuracy meaningless, so what is checked is the pipeline: records, resume, shards, the
report's arithmetic and every malformed input.
"""

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

from statekv.commands import benchmark as bench
from statekv.errors import InputError
from statekv_cli.app import app

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

runner = CliRunner()
# 4 frames, one per chunk: window sees 1 frame, statekv carries 8 tokens (less than a frame)
FAST = ["--max-frames", "4", "--fps", "4", "--max-new-tokens", "2", "--dtype", "float32",
        "--window-frames", "1", "--budget", "8", "--device", "cpu"]
RESULT_KEYS = {"benchmark", "question_id", "video_id", "method", "settings", "settings_hash",
               "status", "prediction", "answer", "correct", "duration", "task_type", "category",
               "lm_prefill_flops", "full_lm_prefill_flops", "seconds", "error"}


def lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def videomme_rows() -> list[dict]:
    def row(vid, qid, duration, domain, task, answer):
        return {"video_id": vid[-3:], "duration": duration, "domain": domain,
                "sub_category": domain + " sub", "url": f"https://example.invalid/{vid}",
                "videoID": vid, "question_id": qid, "task_type": task,
                "question": f"What happens in {vid} ({qid})?",
                "options": ["A. a red bar", "B. a green bar", "C. nothing", "D. a cat"],
                "answer": answer}

    return [row("vid001", "001-1", "short", "Knowledge", "Counting Problem", "A"),
            row("vid001", "001-2", "short", "Knowledge", "OCR Problems", "B"),
            row("vid002", "002-1", "medium", "Sports", "Counting Problem", "C"),
            row("vid003", "003-1", "long", "Sports", "Action Reasoning", "D"),
            row("vid004", "004-1", "long", "Life Record", "Action Reasoning", "A")]


def make_videomme(root: Path, rows=None, broken: bool = True) -> Path:
    """Video-MME as lmms-lab/Video-MME ships it: videomme/test-*.parquet beside data/*.mp4."""
    (root / "videomme").mkdir(parents=True)
    (root / "data").mkdir()
    rows = videomme_rows() if rows is None else rows
    pq.write_table(pa.Table.from_pylist(rows), root / "videomme" / "test-00000-of-00001.parquet")
    write_video(root / "data" / "vid001.mp4", frames=8)
    write_video(root / "data" / "vid002.mp4", frames=6)
    write_video(root / "data" / "vid003.mp4", frames=5)
    if broken:  # an unreadable video: its questions become error records
        (root / "data" / "vid004.mp4").write_bytes(b"not a video" * 30)
    else:
        write_video(root / "data" / "vid004.mp4", frames=4)
    return root


MLVU_ITEMS = {
    "1_plotQA": [
        {"video": "movie101_1.mp4", "duration": 420.5, "question": "Who drives?",
         "candidates": ["the cat", "the dog", "a man", "a woman"], "answer": "a man",
         "question_type": "plotQA"},
        {"video": "movie101_1.mp4", "duration": 420.5, "question": "What colour is the car?",
         "candidates": ["red", "blue", "green", "grey"], "answer": "red",
         "question_type": "plotQA"}],
    "4_count": [
        {"video": "count_7.mp4", "duration": 1500, "question": "How many jumps?",
         "candidates": ["1", "2", "3", "4"], "answer": "4", "question_type": "count"}],
}


def make_mlvu(root: Path, items=None) -> Path:
    """MLVU dev as MLVU/MVLU ships it: MLVU/json/<n>_<task>.json beside MLVU/video/<n>_<task>/."""
    items = MLVU_ITEMS if items is None else items
    base = root / "MLVU"
    (base / "json").mkdir(parents=True)
    for task, questions in items.items():
        (base / "json" / f"{task}.json").write_text(json.dumps(questions))
        (base / "video" / task).mkdir(parents=True)
        for video in {q["video"] for q in questions}:
            write_video(base / "video" / task / video, frames=6)
    # an open-ended task (not multiple choice): left out
    (base / "json" / "9_summary.json").write_text(json.dumps(
        [{"video": "s.mp4", "duration": 10, "question": "Summarise", "answer": "...",
          "question_type": "summary"}]))
    return root


@pytest.fixture(scope="module")
def model_dir(tiny_internvl_dir):
    return str(tiny_internvl_dir)


@pytest.fixture(scope="module")
def videomme(tmp_path_factory):
    return make_videomme(tmp_path_factory.mktemp("vmme") / "Video-MME")


@pytest.fixture(scope="module")
def videomme_run(videomme, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vmme_out") / "results.jsonl"
    result = runner.invoke(app, ["eval", "--benchmark", "videomme", "--data", str(videomme),
                                 "--model", model_dir, "--out", str(out), *FAST])
    return result, out


# Readers -------------------------------------------------------------------------------------
def test_videomme_reader_columns_letters_and_paths(videomme):
    questions = bench.read_benchmark("videomme", str(videomme))
    assert [q.question_id for q in questions] == [r["question_id"] for r in videomme_rows()]
    q = questions[0]
    assert q.options == ("a red bar", "a green bar", "nothing", "a cat") and q.letters == "ABCD"
    assert (q.duration, q.category, q.task_type) == ("short", "Knowledge", "Counting Problem")
    assert q.extra == {"sub_category": "Knowledge sub"}
    assert q.video == str(videomme / "data" / "vid001.mp4")
    prompt = q.prompt()
    # the question and lettered options come after the video, then the letter instruction
    assert prompt.index(q.question) < prompt.index("A. a red bar") < prompt.index("D. a cat")
    assert prompt.rstrip().endswith(bench.ANSWER_LINE)


def test_mlvu_reader_maps_answer_text_to_letter(tmp_path):
    root = make_mlvu(tmp_path / "mlvu")
    questions = bench.read_benchmark("mlvu", str(root))
    assert [q.question_id for q in questions] == ["1_plotQA/0", "1_plotQA/1", "4_count/0"]
    assert [q.answer for q in questions] == ["C", "A", "D"]
    assert questions[0].category == "plotQA" and questions[0].duration == 420.5
    assert questions[2].video == str(root / "MLVU" / "video" / "4_count" / "count_7.mp4")
    assert questions[2].video_id == "count_7"


def test_missing_column_names_it(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "task_type"} for r in videomme_rows()]
    root = make_videomme(tmp_path / "v", rows=rows)
    with pytest.raises(InputError, match="missing column task_type"):
        bench.read_videomme(str(root))
    result = runner.invoke(app, ["eval", "--benchmark", "videomme", "--data", str(root)])
    assert result.exit_code == 3
    assert "missing column task_type" in result.output and "Traceback" not in result.output


def test_answer_not_among_options(tmp_path):
    rows = videomme_rows()
    rows[2]["answer"] = "E"
    root = make_videomme(tmp_path / "v", rows=rows)
    with pytest.raises(InputError, match="question 002-1 answer 'E' is not among its options"):
        bench.read_videomme(str(root))
    items = json.loads(json.dumps(MLVU_ITEMS))
    items["4_count"][0]["answer"] = "five"
    root = make_mlvu(tmp_path / "m", items)
    with pytest.raises(InputError, match="answer 'five' is not among its candidates"):
        bench.read_mlvu(str(root))


def test_missing_files_and_fields(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Video-MME question table"):
        bench.read_videomme(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no MLVU json folder"):
        bench.read_mlvu(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no such folder"):
        bench.read_benchmark("mlvu", str(tmp_path / "absent"))
    items = json.loads(json.dumps(MLVU_ITEMS))
    del items["1_plotQA"][1]["candidates"]
    root = make_mlvu(tmp_path / "m", items)
    with pytest.raises(InputError, match="1_plotQA.json: question 1 is missing field candidates"):
        bench.read_mlvu(str(root))
    result = runner.invoke(app, ["eval", "--benchmark", "nope", "--data", str(root)])
    assert result.exit_code == 2 and "unknown benchmark" in result.output


# The whole path ------------------------------------------------------------------------------
def test_records_one_line_per_question_and_method(videomme_run, videomme):
    result, out = videomme_run
    assert result.exit_code == 1, result.output  # vid004 cannot be read
    records = lines(out)
    assert len(records) == 5 * 3
    assert {(r["question_id"], r["method"]) for r in records} == {
        (r["question_id"], m) for r in videomme_rows() for m in ("full", "window", "statekv")}
    for r in records:
        assert RESULT_KEYS <= set(r)
        assert r["benchmark"] == "videomme" and r["settings"]["method"] == r["method"]
    ok = [r for r in records if r["status"] == "ok"]
    bad = [r for r in records if r["status"] != "ok"]
    assert {r["video_id"] for r in bad} == {"vid004"} and len(bad) == 3
    assert all(r["prediction"] is None and r["correct"] is None and r["error"]["message"]
               for r in bad)
    for r in ok:
        assert r["prediction"] in "ABCD" and r["correct"] == (r["prediction"] == r["answer"])
        assert r["error"] is None and r["seconds"] > 0
        # the prediction is the best-scoring valid letter at the first answer token
        assert r["prediction"] == max(r["letter_logprobs"], key=r["letter_logprobs"].get)
    by = {(r["question_id"], r["method"]): r for r in ok}
    # all methods on the same sampled frames; statekv and window do less LM work than full
    for qid in ("001-1", "002-1", "003-1"):
        digests = {by[(qid, m)]["frames_digest"] for m in ("full", "window", "statekv")}
        assert len(digests) == 1 and by[(qid, "full")]["frames"] == 4
        full = by[(qid, "full")]
        assert full["lm_prefill_flops"] == full["full_lm_prefill_flops"]
        for m in ("window", "statekv"):
            assert by[(qid, m)]["full_lm_prefill_flops"] == full["full_lm_prefill_flops"]
            assert by[(qid, m)]["lm_prefill_flops"] < full["lm_prefill_flops"]
    assert by[("001-1", "statekv")]["settings"]["budget"] == 8
    assert by[("001-1", "window")]["settings"]["window_frames"] == 1


def test_letter_is_argmax_of_question_logits(videomme, tiny_model):
    """The recorded choice equals the best letter of Session.question_logits at the last
    prompt position (the first answer token)."""
    q = bench.read_videomme(str(videomme))[0]
    session = tiny_model.prefill(q.video, "full", max_frames=4, fps=4)
    logits = session.question_logits(q.prompt())[-1]
    ids = bench.letter_token_ids(tiny_model.adapter, q.letters)
    expected = max(q.letters, key=lambda letter: max(float(logits[i]) for i in ids[letter]))
    answer = session.ask([q.prompt()], 1)[0]
    assert bench.pick_letter(answer.first_token_logprobs, tiny_model.adapter, q.letters)[0] == expected


def test_report_accuracies_by_hand(videomme_run):
    _, out = videomme_run
    records = lines(out)
    result = runner.invoke(app, ["eval", "--report", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["benchmark"] == "videomme" and report["questions"] == 5
    assert set(report["methods"]) == {"full", "window", "statekv"}
    full = {r["question_id"]: r["prediction"] for r in records
            if r["method"] == "full" and r["status"] == "ok"}
    for method, m in report["methods"].items():
        ok = [r for r in records if r["method"] == method and r["status"] == "ok"]
        right = [r for r in ok if r["prediction"] == r["answer"]]
        assert (m["n"], m["errors"]) == (4, 1)
        assert m["accuracy"] == pytest.approx(len(right) / 4)
        assert m["ci_low"] <= m["accuracy"] <= m["ci_high"]
        assert m["agreement_with_full"] == pytest.approx(
            sum(r["prediction"] == full[r["question_id"]] for r in ok) / 4)
        short = [r for r in ok if r["duration"] == "short"]
        assert m["by_duration"]["short"] == {
            "n": 2, "accuracy": pytest.approx(sum(r["correct"] for r in short) / 2)}
        assert set(m["by_duration"]) == {"short", "medium", "long"}
        assert m["by_task_type"]["Counting Problem"]["n"] == 2
        assert m["by_category"]["Sports"]["n"] == 2
        assert m["paper"] is None  # --model replaced the preset's checkpoint
    assert report["methods"]["full"]["agreement_with_full"] == 1.0
    text = runner.invoke(app, ["eval", "--report", str(out)])
    assert text.exit_code == 0 and "95% Wilson interval" in text.output


def test_wilson_interval_known_values():
    low, high = bench.wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # standard table values
    assert bench.wilson_interval(0, 0) == (0.0, 1.0)


def test_paper_numbers_for_paper_presets():
    from statekv.presets import load_preset

    preset = load_preset("internvl3-1b")
    settings = {"preset": "internvl3-1b", "model": preset.model, "max_frames": 512, "fps": 1.0,
                "budget": 4096, "window_frames": 16}
    assert bench._paper(settings, "videomme", "statekv") == pytest.approx(0.4580)
    assert bench._paper(settings, "mlvu", "window") == pytest.approx(0.3344)
    assert bench._paper_settings(settings, "statekv")
    assert not bench._paper_settings(dict(settings, max_frames=256), "full")
    assert bench._paper(dict(settings, model="elsewhere/x"), "videomme", "full") is None
    assert bench._paper(dict(settings, preset="qwen3-vl-2b"), "mlvu", "full") is None


def test_rerun_skips_everything_done(videomme_run, videomme, model_dir, monkeypatch):
    from statekv.commands import plan as planning

    _, out = videomme_run
    copy = out.parent / "copy.jsonl"
    shutil.copy(out, copy)
    calls = []
    original = planning.prefill_video
    monkeypatch.setattr(planning, "prefill_video",
                        lambda m, r, o, path, method, *a, **k: calls.append((path, method))
                        or original(m, r, o, path, method, *a, **k))
    result = runner.invoke(app, ["eval", "--benchmark", "videomme", "--data", str(videomme),
                                 "--model", model_dir, "--out", str(copy), "-q", *FAST])
    assert result.exit_code == 1  # the broken video is retried and fails again
    assert {path for path, _ in calls} == {str(videomme / "data" / "vid004.mp4")}
    assert len(lines(copy)) == 15 + 3


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


def test_killed_run_resumes_and_completes(model_dir, tmp_path):
    """SIGKILL once the first (video, method) is written, plus a torn last line; the rerun
    completes every (question, method) exactly once."""
    root = make_videomme(tmp_path / "Video-MME", rows=videomme_rows()[:3], broken=False)
    out = tmp_path / "r.jsonl"
    args = ["eval", "--benchmark", "videomme", "--data", str(root), "--model", model_dir,
            "--out", str(out), "-q", "--methods", "full,statekv", *FAST]
    child = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, "1", *args],
                             env=dict(os.environ, HF_HUB_OFFLINE="1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and child.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    written = out.read_bytes().count(b"\n")
    assert 2 <= written < 6, child.stderr.read().decode()
    with open(out, "ab") as file:
        file.write(b'{"benchmark": "videomme", "question_id": "002')  # a torn last line
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    records = lines(out)
    assert len(records) == 6
    assert sorted((r["question_id"], r["method"]) for r in records) == sorted(
        (q, m) for q in ("001-1", "001-2", "002-1") for m in ("full", "statekv"))


def test_shards_cover_every_question_once(videomme, model_dir):
    seen = []
    for k in (1, 2):
        result = runner.invoke(app, ["eval", "--benchmark", "videomme", "--data", str(videomme),
                                     "--model", model_dir, "--out", "-", "--shard", f"{k}/2",
                                     "-q", "--methods", "full", *FAST])
        assert result.exit_code in (0, 1), result.output
        shard = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        # a video's questions stay in one shard (one prefill per method)
        seen += [(r["question_id"], r["video_id"]) for r in shard]
    assert sorted(q for q, _ in seen) == sorted(r["question_id"] for r in videomme_rows())
    assert runner.invoke(app, ["eval", "--benchmark", "videomme", "--data", str(videomme),
                               "--shard", "3/2"]).exit_code == 2


def test_limit_and_mlvu_end_to_end(tmp_path, model_dir):
    root = make_mlvu(tmp_path / "mlvu")
    out = tmp_path / "mlvu.jsonl"
    result = runner.invoke(app, ["eval", "--benchmark", "mlvu", "--data", str(root), "--model",
                                 model_dir, "--out", str(out), "--limit", "2", "--methods",
                                 "full,statekv", "--json", "-q", *FAST])
    assert result.exit_code == 0, result.output
    records = lines(out)
    assert sorted((r["question_id"], r["method"]) for r in records) == [
        ("1_plotQA/0", "full"), ("1_plotQA/0", "statekv"), ("1_plotQA/1", "full"),
        ("1_plotQA/1", "statekv")]
    assert {r["category"] for r in records} == {"plotQA"}
    assert {r["duration"] for r in records} == {420.5}
    report = json.loads(result.stdout)
    assert report["benchmark"] == "mlvu" and report["questions"] == 2
    assert set(report["methods"]["full"]["by_duration"]) == {"5-10 min"}


def test_videomme_finds_videos_wherever_the_archives_unpacked(tmp_path):
    root = make_videomme(tmp_path / "v")
    (root / "unpacked" / "deep").mkdir(parents=True)
    os.rename(root / "data" / "vid002.mp4", root / "unpacked" / "deep" / "vid002.mp4")
    os.remove(root / "data" / "vid003.mp4")
    by_video = {q.video_id: q.video for q in bench.read_videomme(str(root))}
    assert by_video["vid002"] == str(root / "unpacked" / "deep" / "vid002.mp4")
    assert by_video["vid003"] == str(root / "data" / "vid003.mp4")  # missing: an error record later


def test_mlvu_finds_videos_in_another_folder_name(tmp_path):
    root = make_mlvu(tmp_path / "m")
    os.rename(root / "MLVU" / "video", root / "MLVU" / "video_25fps")
    q = bench.read_mlvu(str(root))[2]
    assert q.video == str(root / "MLVU" / "video_25fps" / "4_count" / "count_7.mp4")


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_backend_same_answers_as_local(videomme_run, videomme, model_dir, local_ray, tmp_path):
    _, local_out = videomme_run
    out = tmp_path / "ray.jsonl"
    result = runner.invoke(app, ["eval", "--benchmark", "videomme", "--data", str(videomme),
                                 "--model", model_dir, "--out", str(out), "--ray", "-q",
                                 "--methods", "full,statekv", *FAST])
    assert result.exit_code == 1, result.output  # the broken video, as locally

    def answers(path):
        return {(r["question_id"], r["method"]): (r["status"], r["prediction"], r["frames_digest"],
                                                  r["lm_prefill_flops"], r["settings_hash"])
                for r in lines(path) if r["method"] in ("full", "statekv")}

    assert answers(out) == answers(local_out)


def test_memory_preflight_refuses_before_loading(videomme, model_dir, tmp_path, monkeypatch):
    from statekv import accounting
    from statekv.commands import plan as planning

    monkeypatch.setattr(accounting, "available_memory", lambda device: 1)
    monkeypatch.setattr(planning, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "r.jsonl"
    args = ["eval", "--benchmark", "videomme", "--data", str(videomme), "--model", model_dir,
            "--out", str(out), *FAST]
    result = runner.invoke(app, args)
    assert result.exit_code == 5 and "--force" in result.output
    assert not out.exists() or not lines(out)


def _documented(name: str) -> set[str]:
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md").read_text()
    match = re.search(rf"^{re.escape(name)}: \{{(.*)\}}$", text, re.MULTILINE)
    assert match, name
    return {field.strip() for field in match.group(1).split(",")}


def test_records_and_report_have_exactly_the_documented_fields(videomme_run):
    _, out = videomme_run
    for record in lines(out):
        assert set(record) - {"sub_category"} == _documented("result")
    report = bench.report(bench.load_results(str(out)))
    assert set(report) == _documented("report")
    for m in report["methods"].values():
        assert set(m) == _documented("report.methods[]")

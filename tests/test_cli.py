"""The command line through Typer's runner: JSON contracts, agreement, predictions, errors."""

from __future__ import annotations

import json
import os
import sys

import pytest
from typer.testing import CliRunner

from statekv_cli.app import app

runner = CliRunner()
FAST = ["--max-frames", "4", "--fps", "4", "--max-new-tokens", "4"]


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def model_dir(tiny_internvl_dir):
    return str(tiny_internvl_dir)


def test_ask_two_questions_one_prefill_json(clip, model_dir):
    result = run("ask", clip, "what happens?", "who is there?", "--model", model_dir, "--json",
                 "--budget", "30", *FAST)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert set(record) == {"path", "settings", "answers", "stats", "warnings"}
    assert record["path"] == str(clip)
    assert [a["question"] for a in record["answers"]] == ["what happens?", "who is there?"]
    assert all(isinstance(a["answer"], str) for a in record["answers"])
    stats = record["stats"]
    assert stats["prefills"] == 1 and stats["frames"] == 4
    assert len(stats["frame_timestamps"]) == 4
    for key in ("tokens_per_frame", "detailed_tokens", "carried_tokens", "decode_seconds",
                "vision_seconds", "lm_prefill_seconds", "answer_seconds", "vision_flops",
                "lm_prefill_flops", "full_lm_prefill_flops", "peak_memory_bytes",
                "detailed_cache_bytes", "carried_cache_bytes"):
        assert key in stats
    assert stats["carried_tokens"] == 30
    settings = record["settings"]
    assert settings["method"] == "statekv" and settings["budget"] == 30
    assert settings["window_frames"] is None and settings["max_frames"] == 4
    assert set(settings) >= {"model", "model_revision", "family", "fps", "start", "end",
                             "chunk_frames", "dtype", "device", "max_new_tokens", "seed"}


def test_ask_human_output_and_questions_file(clip, model_dir, tmp_path):
    questions = tmp_path / "q.yaml"
    questions.write_text("- what happens?\n- what colour?\n")
    result = run("ask", clip, "--questions", questions, "--model", model_dir, *FAST)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Q: ") == 2 and "A: " in result.stdout
    assert "LM prefill" in result.stderr


def test_compare_all_methods_agree_when_nothing_is_dropped(clip, model_dir):
    result = run("compare", clip, "what happens?", "--model", model_dir, "--json",
                 "--methods", "full,window,statekv", "--budget", "100000",
                 "--window-frames", "1000", *FAST)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert [m["method"] for m in record["methods"]] == ["full", "window", "statekv"]
    assert "method" not in record["settings"]
    for row in record["methods"]:
        assert row["agrees_with_full"] is True
        assert row["first_token_kl_vs_full"] < 1e-6
        for key in ("lm_prefill_flops", "vision_flops", "lm_prefill_seconds",
                    "peak_memory_bytes", "carried_tokens", "detailed_tokens"):
            assert row[key] == row["stats"][key]
    budgets = {m["method"]: (m["budget"], m["window_frames"]) for m in record["methods"]}
    assert budgets == {"full": (None, None), "window": (None, 1000), "statekv": (100000, None)}


def test_compare_small_budget_costs_less(clip, model_dir):
    result = run("compare", clip, "what happens?", "--model", model_dir, "--json",
                 "--methods", "full,statekv", "--budget", "20", *FAST)
    assert result.exit_code == 0, result.output
    rows = {m["method"]: m for m in json.loads(result.stdout)["methods"]}
    assert rows["statekv"]["carried_tokens"] == 20
    assert rows["statekv"]["lm_prefill_flops"] < rows["full"]["lm_prefill_flops"]


@pytest.mark.parametrize("method", ["full", "window", "statekv"])
def test_info_predicts_what_the_prefill_reports(clip, model_dir, method):
    options = ["--model", model_dir, "--budget", "20", "--window-frames", "1", "--max-frames", "4",
               "--fps", "4"]
    predicted = run("info", clip, "--json", *options)
    assert predicted.exit_code == 0, predicted.output
    info = json.loads(predicted.stdout)
    assert info["sampled_frames"] == 4 and info["predicted"]["exact_layout"]
    assert {"duration_seconds", "fps", "frame_count", "width", "height", "codec"} <= set(info)
    ran = run("ask", clip, "q?", "--json", "--method", method, "--max-new-tokens", "1", *options)
    stats = json.loads(ran.stdout)["stats"]
    assert info["predicted"]["methods"][method]["lm_prefill_flops"] == stats["lm_prefill_flops"]
    assert info["predicted"]["detailed_cache_bytes"] == stats["detailed_cache_bytes"]
    assert info["tokens_per_frame"] == stats["tokens_per_frame"]


def test_presets_list_and_show():
    listed = run("presets", "--json")
    assert listed.exit_code == 0, listed.output
    names = {p["name"] for p in json.loads(listed.stdout)}
    assert {"internvl3-1b", "internvl3-2b", "internvl3-8b"} <= names
    shown = run("presets", "show", "internvl3-1b", "--json")
    preset = json.loads(shown.stdout)
    assert preset["model"] == "OpenGVLab/InternVL3-1B-hf" and preset["family"] == "internvl"
    assert "internvl3-8b" in run("presets").stdout


@pytest.mark.parametrize("args,code,message", [
    (["ask", "{missing}", "q?"], 3, "no such file"),
    (["ask", "{clip}", "q?", "--budget", "0"], 2, "--budget must be at least 1"),
    (["ask", "{clip}", "q?", "--window-frames", "0", "--method", "window"], 2, "--window-frames"),
    (["ask", "{clip}", "q?", "--max-frames", "0"], 2, "--max-frames"),
    (["ask", "{clip}", "q?", "--fps", "-1"], 2, "--fps"),
    (["ask", "{clip}", "q?", "--start", "5", "--end", "2"], 2, "--start"),
    (["ask", "{clip}", "q?", "--method", "magic"], 2, "unknown method"),
    (["ask", "{clip}", "q?", "--preset", "nope"], 2, "unknown preset"),
    (["ask", "{clip}", "q?", "--device", "tpu"], 2, "unknown device"),
    (["ask", "{clip}", "--questions", "{empty}"], 3, "holds no questions"),
    (["ask", "{clip}", "q?", "--model", "{tmp}/no-such-model/"], 4, "not found"),
    (["ask", "{clip}", "q?", "--preset", "{badpreset}"], 3, "budget"),
    (["presets", "show", "nope"], 2, "unknown preset"),
    (["compare", "{clip}", "q?", "--methods", "full,magic"], 2, "unknown method"),
    (["info", "{tmp}"], 3, "directory"),
])
def test_errors_are_one_line_with_exit_code(clip, model_dir, tmp_path, args, code, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: y\nfamily: internvl\nbudget: lots\narchitecture: {layers: 1, "
                   "hidden: 8, heads: 1, kv_heads: 1, intermediate: 8}\n")
    values = {"missing": tmp_path / "missing.mp4", "clip": clip, "empty": empty, "tmp": tmp_path,
              "badpreset": bad}
    argv = [a.format(**values) for a in args]
    if argv[0] in ("ask", "compare") and "--model" not in argv:
        argv += ["--model", model_dir]
    result = run(*argv)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) <= 2


def test_debug_shows_the_traceback(tmp_path):
    result = run("ask", tmp_path / "missing.mp4", "q?", "--debug")
    assert result.exit_code == 3
    assert "Traceback" in result.stderr


def test_help_teaches_every_command():
    for command in (["ask"], ["compare"], ["info"], ["presets", "show"]):
        result = run(*command, "--help")
        assert result.exit_code == 0
        assert "Example" in result.stdout or command[0] == "presets"


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_live_progress_renders_in_a_terminal(clip, model_dir):
    import pty
    import subprocess

    leader, follower = pty.openpty()
    env = dict(os.environ, COLUMNS="200", HF_HUB_OFFLINE="1")  # wide: every detail shows
    process = subprocess.Popen(
        [sys.executable, "-m", "statekv_cli.app", "ask", str(clip), "what happens?", "--model",
         model_dir, *FAST], stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    output = b""
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:
            break
        if not data:
            break
        output += data
    assert process.wait(timeout=120) == 0
    text = output.decode(errors="replace")
    assert "4/4 frames" in text and "carried" in text and "tokens/s" in text
    assert "A: " in text


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl", "smolvlm", "llava_onevision"])
def test_info_and_compare_work_for_every_family(clip, checkpoints, name):
    model_dir = str(checkpoints(name))
    options = ["--model", model_dir, "--budget", "20", "--max-frames", "4", "--fps", "4"]
    info = run("info", clip, "--json", *options)
    assert info.exit_code == 0, info.output
    predicted = json.loads(info.stdout)
    compared = run("compare", clip, "what?", "--json", "--methods", "full,statekv",
                   "--max-new-tokens", "2", *options)
    assert compared.exit_code == 0, compared.output
    rows = {row["method"]: row for row in json.loads(compared.stdout)["methods"]}
    assert rows["statekv"]["carried_tokens"] == 20
    if predicted["predicted"]["exact_layout"]:  # the adapter can lay the video out without pixels
        for method in ("full", "statekv"):
            assert (predicted["predicted"]["methods"][method]["lm_prefill_flops"]
                    == rows[method]["lm_prefill_flops"])
        assert predicted["tokens_per_frame"] == rows["full"]["stats"]["tokens_per_frame"]


def test_compare_peak_memory_does_not_depend_on_the_order(clip, model_dir):
    # Budget and window hold the whole video: every method does the same work, so each one's
    # peak above the common baseline must come out the same whichever ran first.
    common = ["--model", model_dir, "--json", "--budget", "100000", "--window-frames", "1000",
              "--max-frames", "12", "--fps", "12", "--max-new-tokens", "2"]
    peaks = {}
    for order in ("full,window,statekv", "statekv,window,full"):
        result = run("compare", clip, "what happens?", "--methods", order, *common)
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout)
        assert record["memory_baseline_bytes"] > 0
        peaks[order] = {row["method"]: row["peak_memory_bytes"] for row in record["methods"]}
    first, second = peaks.values()
    for method in ("full", "window", "statekv"):
        a, b = first[method], second[method]
        assert abs(a - b) <= max(0.2 * max(a, b), 2 * 2**20), (method, peaks)


def test_info_with_a_model_dir_names_no_preset_and_the_dtype(clip, model_dir):
    result = run("info", clip, "--model", model_dir, "--max-frames", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "(preset" not in result.stdout and model_dir in result.stdout
    assert "float32 on cpu" in result.stdout  # auto on the CPU: the weights' dtype is named
    record = json.loads(run("info", clip, "--model", model_dir, "--max-frames", "4", "--json",
                            "--device", "cpu", "--dtype", "bfloat16").stdout)
    assert record["model_from"] == "--model" and record["dtype"] == "bfloat16"
    by_preset = json.loads(run("info", clip, "--max-frames", "4", "--json", "--device", "cpu").stdout)
    assert by_preset["model_from"] == "preset"


def test_demo_model_on_a_real_video_warns_in_one_line(clip, tmp_path):
    from conftest import write_video

    args = ["--preset", "demo", "--max-frames", "2", "--fps", "4", "--max-new-tokens", "2"]
    real = run("ask", clip, "hat color?", *args)
    assert real.exit_code == 0, real.output
    warnings = [line for line in real.stderr.splitlines() if "demo model" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    synthetic = write_video(tmp_path / "synthetic.mp4", frames=4, size=(32, 32))
    quiet = json.loads(run("ask", synthetic, "hat color?", "--json", *args).stdout)
    assert not any("demo model" in w for w in quiet["warnings"])

"""The trained context: stated by `info`, warned about once, fitted by `--max-frames fit`."""

from __future__ import annotations

import json

import pytest
from conftest import write_video
from typer.testing import CliRunner

import statekv
from statekv.accounting import ANSWER_ROOM
from statekv.errors import UsageError
from statekv.testing.rope import with_rope
from statekv_cli.app import app

runner = CliRunner()
TRAINED = 750  # the tiny InternVL's 48-frame clip takes about 1,130 tokens with its prompt
OPTIONS = ["--fps", "4", "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def short_dir(tiny_internvl_dir, tmp_path_factory):
    """The tiny InternVL with a dynamic-NTK language model trained for TRAINED positions."""
    return str(with_rope(tiny_internvl_dir, tmp_path_factory.mktemp("short"),
                         max_position_embeddings=TRAINED,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0}))


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", frames=48, fps=4)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def info(clip, model, *extra):
    result = run("info", clip, "--model", model, "--json", "--fps", "4", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_info_states_the_trained_context_and_the_frames_that_fit(long_clip, short_dir):
    context = info(long_clip, short_dir)["context"]
    assert set(context) == {"trained_positions", "planned_tokens", "answer_room", "frames_that_fit"}
    assert context["trained_positions"] == TRAINED and context["answer_room"] == ANSWER_ROOM
    # planned tokens: what a real prefill of the same frames holds
    result = run("ask", long_clip, "q?", "--model", short_dir, "--json", "--method", "full", *OPTIONS)
    assert json.loads(result.stdout)["stats"]["detailed_tokens"] == context["planned_tokens"]
    # frames that fit: the most frames whose own plan fits with the answer room
    fit = context["frames_that_fit"]
    planned = lambda n: info(long_clip, short_dir, "--max-frames", n)["context"]["planned_tokens"]
    assert 0 < fit < 48
    assert planned(fit) + ANSWER_ROOM <= TRAINED < planned(fit + 1) + ANSWER_ROOM


def test_ask_warns_once_beyond_the_trained_context_naming_the_frames_that_fit(long_clip, short_dir):
    fit = info(long_clip, short_dir)["context"]["frames_that_fit"]
    result = run("ask", long_clip, "what happens?", "who is there?", "--model", short_dir,
                 "--json", *OPTIONS)
    assert result.exit_code == 0, result.output
    warnings = [w for w in json.loads(result.stdout)["warnings"] if "trained context" in w]
    assert len(warnings) == 1 and f"--max-frames {fit}" in warnings[0]
    shown = run("ask", long_clip, "what happens?", "--model", short_dir, *OPTIONS)
    lines = [line for line in shown.stderr.splitlines() if "trained context" in line]
    assert len(lines) == 1 and f"--max-frames {fit}" in lines[0]


def test_max_frames_fit_samples_exactly_the_frames_that_fit(long_clip, short_dir):
    fit = info(long_clip, short_dir)["context"]["frames_that_fit"]
    assert info(long_clip, short_dir, "--max-frames", "fit")["sampled_frames"] == fit
    result = run("ask", long_clip, "what happens?", "--model", short_dir, "--json",
                 "--max-frames", "fit", *OPTIONS)
    record = json.loads(result.stdout)
    assert record["stats"]["frames"] == record["settings"]["max_frames"] == fit
    assert not [w for w in record["warnings"] if "trained context" in w]


def test_compare_warns_once_for_all_methods(long_clip, short_dir):
    result = run("compare", long_clip, "what happens?", "--model", short_dir, "--json",
                 "--methods", "full,window", *OPTIONS)
    record = json.loads(result.stdout)
    assert [w for w in record["warnings"] if "trained context" in w]
    assert not [w for row in record["methods"] for w in row["warnings"] if "trained context" in w]


def test_a_question_that_cannot_fit_is_refused_before_any_work(long_clip, short_dir, monkeypatch):
    import statekv.commands.ask as commands

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load for a question that cannot fit")

    monkeypatch.setattr(commands, "load_model", no_load)
    question = " ".join(["describe every frame of the video"] * 200)
    result = run("ask", long_clip, question, "--model", short_dir, *OPTIONS)
    assert result.exit_code == 2
    assert "trained context" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_python_api_warns_in_session_warnings(short_dir, long_clip):
    model = statekv.load(short_dir, device="cpu", dtype="float32")
    session = model.prefill(str(long_clip), method="full", max_frames=48, fps=4.0)
    session.ask(["what happens?"], max_new_tokens=3)
    session.ask(["who is there?"], max_new_tokens=3)
    assert len([w for w in session.warnings if "trained context" in w]) == 1
    assert session.context.trained_positions == TRAINED
    fitted = model.prefill(str(long_clip), method="full", max_frames="fit", fps=4.0)
    assert fitted.stats.frames == session.context.frames_that_fit
    with pytest.raises(UsageError, match="trained context"):
        session.ask([" ".join(["what happens?"] * 400)])


def test_within_the_trained_context_nothing_is_said(tiny_model, frames):
    session = tiny_model.prefill_frames(frames, method="full")
    session.ask(["what happens?"], max_new_tokens=3)
    assert session.context.frames_that_fit == len(frames)
    assert not [w for w in session.warnings if "trained context" in w]


def test_compare_shows_the_window_in_frames_and_tokens(clip, tiny_internvl_dir):
    args = ["compare", clip, "what happens?", "--model", tiny_internvl_dir, "--methods",
            "full,window", "--window-frames", "2", "--max-frames", "4", "--fps", "4",
            "--max-new-tokens", "2"]
    record = json.loads(run(*args, "--json").stdout)
    row = next(r for r in record["methods"] if r["method"] == "window")
    # two whole frames: visual tokens plus each frame's label and <img>/</img> delimiters
    assert row["window_frames"] == 2
    assert row["window_tokens"] == row["carried_tokens"] > 2 * row["stats"]["tokens_per_frame"]
    assert f"window 2 fr ({row['window_tokens']} tok)" in run(*args).stdout


def test_summarize_warns_in_each_record_and_once_on_stderr(long_clip, short_dir, tmp_path):
    import shutil

    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(long_clip, folder / name)
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["summarize", str(folder), "--model", short_dir, "--out", str(out),
                                 *OPTIONS])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert len(records) == 2
    assert all(any("trained context" in w for w in r["warnings"]) for r in records)
    assert len([line for line in result.stderr.splitlines() if "trained context" in line]) == 1

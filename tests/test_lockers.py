"""The lockers task (exact answers, evidence ages), its eval by age, and their CLI options."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from statekv.demo import lockers
from statekv.demo.synthetic import COLOURS
from statekv_cli.app import app


def _replayed(video):
    """(answer, age) per question from the events alone, as a reader would count them."""
    out = []
    for q in video.questions:
        probe = video.events[q.probe_frame]
        assert probe.kind == "probe" and f"{probe.glyph} color?" == q.text
        paints = [e for e in video.events[:q.probe_frame] if e.kind == "paint" and e.slot == probe.slot]
        out.append((paints[-1].colour, q.probe_frame - paints[-1].frame))
    return out


def test_answers_and_evidence_ages_are_exact():
    for index in range(20):
        video = lockers.generate_video(128, lockers.split_seed("test", index, 128))
        assert [(q.answer, q.evidence_age) for q in video.questions] == _replayed(video)
        assert len({q.text for q in video.questions}) == len(video.questions) == 6
        assert [e.frame for e in video.events] == list(range(128))
        assert video.frames.shape == (128, 64, 64, 3) and video.frames.dtype == np.uint8


def test_a_probed_locker_is_painted_once_before_its_probe():
    """The evidence is the probed locker's only paint before the probe (no older paint
    competes), while other lockers are repainted freely."""
    repainted = 0
    for index in range(20):
        video = lockers.generate_video(128, lockers.split_seed("test", index, 128))
        for q in video.questions:
            before = [e for e in video.events[:q.probe_frame]
                      if e.kind == "paint" and e.slot == q.locker]
            assert len(before) == 1 and before[0].frame == q.probe_frame - q.evidence_age
        probed = {q.locker for q in video.questions}
        counts = {}
        for e in video.events:
            if e.kind == "paint" and e.slot not in probed:
                counts[e.slot] = counts.get(e.slot, 0) + 1
        repainted += any(c > 1 for c in counts.values())
    assert repainted == 20


def test_same_seed_same_video_and_disjoint_splits():
    a, b = lockers.generate_video(64, 5), lockers.generate_video(64, 5)
    assert np.array_equal(a.frames, b.frames) and a.questions == b.questions
    seeds = {split: {lockers.split_seed(split, i, 64) for i in range(200)}
             for split in ("train", "test", "demo")}
    assert not (seeds["train"] & seeds["test"]) and not (seeds["test"] & seeds["demo"])


def test_ages_spread_from_inside_the_window_to_beyond_100_frames():
    ages = np.array([q.evidence_age for i in range(60)
                     for q in lockers.generate_video(128, lockers.split_seed("test", i, 128)).questions])
    for lo, hi in lockers.AGE_BUCKETS:
        share = ((ages >= lo) & (ages <= hi)).mean()
        assert share > 0.15, (lo, hi, share)
    assert 0.35 < (ages <= lockers.WINDOW_FRAMES).mean() < 0.65
    assert ages.min() >= 1 and ages.max() >= 100


def test_the_latest_paint_is_usually_the_wrong_answer_at_question_time():
    wrong = total = 0
    for i in range(30):
        video = lockers.generate_video(128, lockers.split_seed("test", i, 128))
        final = lockers.locker_colours(video.events)[-1]
        for q in video.questions:
            total += 1
            wrong += final[q.locker] != q.answer
    assert wrong / total > 0.8


def test_frames_show_the_event_in_its_locker_only():
    video = lockers.generate_video(32, 3)
    for event in video.events:
        frame = video.frames[event.frame].astype(int)
        row, col = divmod(max(event.slot, 0), lockers.GRID)
        block = frame[row * 16 + 4: row * 16 + 12, col * 16 + 4: col * 16 + 12]
        if event.kind == "paint":
            assert np.abs(block.mean((0, 1)) - COLOURS[event.colour]).max() < 12
        elif event.kind == "probe":
            assert frame.max() > 240 and (np.abs(frame - frame.mean(-1, keepdims=True)).max() < 40)
        else:
            assert frame.max() < 60


def test_locker_tokens_tile_the_frame():
    owner = lockers.token_lockers()
    assert sorted(t for k in range(lockers.LOCKERS) for t in lockers.locker_tokens(k)) == list(range(64))
    assert owner[0] == owner[1] == owner[8] == owner[9] == 0 and owner[63] == lockers.LOCKERS - 1


@pytest.fixture(scope="module")
def lockers_model(tmp_path_factory):
    """A random-weight InternVL in the lockers layout (64x64 frames, patch 4: 64 tokens a frame)."""
    import statekv
    from statekv.testing import build_tiny_internvl

    path = build_tiny_internvl(tmp_path_factory.mktemp("lockers") / "ckpt", image_size=64, patch_size=4)
    return str(path), statekv.load(str(path), device="cpu", dtype="float32")


def test_eval_by_age_contract(lockers_model):
    from statekv.demo.age_eval import run_age_eval

    path, model = lockers_model
    report = run_age_eval(model, frames=20, budgets=[146], videos=2, model_name=path,
                          methods=["full", "isolated", "window", "statekv"])
    record = json.loads(json.dumps(report.to_dict()))
    assert {"model", "chance", "rows", "verdict"} <= set(record)
    assert record["chance"] == pytest.approx(1 / 6)
    labels = [r["label"] for r in record["rows"]]
    assert labels[:2] == ["full", "isolated"] and "window@146+pin" in labels
    questions = sum(len(v.questions) for v in lockers.split_videos("test", 2, 20))
    statekv_flops = None
    for row in record["rows"]:
        assert {"method", "budget", "pinned", "frames", "accuracy", "ci_low", "ci_high",
                "lm_flops_fraction", "by_age"} <= set(row)
        assert row["frames"] == 20 and row["questions"] == questions
        assert row["ci_low"] <= row["accuracy"] <= row["ci_high"]
        assert sum(b["n"] for b in row["by_age"]) == questions
        assert all(set(b) == {"age_min", "age_max", "n", "accuracy"} for b in row["by_age"])
        for key in ("accuracy", "ci_low", "ci_high", "lm_flops_fraction"):
            assert 0.0 <= row[key] <= 1.0
        if row["label"] == "statekv@146":
            statekv_flops = row["lm_prefill_flops"]
    full = record["rows"][0]
    assert full["lm_flops_fraction"] == 1.0 and full["delta_vs_full"] == 0.0
    matched = [r for r in record["rows"] if r["matched_to"] == "statekv@146"]
    assert len(matched) == 1 and matched[0]["method"] == "window"
    assert matched[0]["lm_prefill_flops"] <= statekv_flops  # the largest window within its FLOPs
    assert matched[0]["budget"] > 146  # statekv pays for its mass pass: the window gets more tokens


def test_demo_json_adds_evidence_age_only_for_lockers(lockers_model):
    runner = CliRunner()
    path, _ = lockers_model
    result = runner.invoke(app, ["demo", "--task", "lockers", "--model", path, "--frames", "12",
                                 "--budget", "146", "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["settings"]["threads"] == 1  # --threads reaches the lockers model too
    two = runner.invoke(app, ["demo", "--task", "lockers", "--model", path, "--frames", "12",
                              "--budget", "146", "--json", "--threads", "2"])
    assert json.loads(two.stdout)["settings"]["threads"] == 2
    video = lockers.generate_video(12, 0)
    assert [a["evidence_age"] for a in record["answers"]] == [q.evidence_age for q in video.questions]
    assert [a["truth"] for a in record["answers"]] == [q.answer for q in video.questions]
    assert all("full_answer" in a and "answer" in a for a in record["answers"])
    slots = runner.invoke(app, ["demo", "--task", "slots", "--frames", "8", "--json"])
    assert slots.exit_code == 0, slots.output
    assert all("evidence_age" not in a for a in json.loads(slots.stdout)["answers"])


def test_option_validation():
    from statekv.demo.age_eval import age_specs
    from statekv.errors import UsageError

    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--lengths", "64,128"])  # lockers is the default task
    assert result.exit_code == 2 and "one length" in result.output
    result = runner.invoke(app, ["demo", "--task", "slots", "--model", "x"])
    assert result.exit_code == 2 and "--model" in result.output
    result = runner.invoke(app, ["eval", "--task", "nope"])
    assert result.exit_code == 2 and "--task" in result.output
    with pytest.raises(UsageError):
        age_specs([0])
    with pytest.raises(UsageError):
        age_specs([64], ["full", "bogus"])
    assert [s.label for s in age_specs([64], ["full", "window"])] == ["full", "window@64",
                                                                      "window@64+pin"]


def test_demo_defaults_to_the_shipped_lockers_model():
    from statekv.demo.age_eval import LOCKERS_MODEL
    from statekv.loading import resolve_checkpoint

    result = CliRunner().invoke(app, ["demo", "--frames", "16", "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    video = lockers.generate_video(16, 0)
    assert [a["evidence_age"] for a in record["answers"]] == [q.evidence_age for q in video.questions]
    assert record["settings"]["model"] == LOCKERS_MODEL
    assert "lockers_checkpoint" in resolve_checkpoint(LOCKERS_MODEL)
    table = CliRunner().invoke(app, ["demo", "--frames", "16", "--method", "window"])
    assert table.exit_code == 0 and "evidence age" in table.stdout
    assert "full attention on the same video" in table.stdout
    full = CliRunner().invoke(app, ["demo", "--frames", "16", "--method", "full", "--json"])
    record = json.loads(full.stdout)  # full is its own reference, as in the slots demo
    assert record["full_correct"] is None
    assert all(a["full_answer"] == a["answer"] for a in record["answers"])


@pytest.fixture(scope="module")
def shipped_lockers():
    from statekv_cli.lockers import load_lockers_model

    return load_lockers_model(None, "cpu", 2)


def test_shipped_lockers_weights_full_accuracy_and_isolated_floor(shipped_lockers):
    # Fixed held-out 64-frame videos (the first 8 of the test split, 48 probes). The thresholds
    # sit a few questions below what the shipped weights score on them (README's Fidelity
    # section has the 32-video figures): room for the platform's float noise, not for a model
    # that stopped fetching colours during prefill.
    from statekv.demo.age_eval import run_age_eval

    report = run_age_eval(shipped_lockers, frames=64, budgets=[292], videos=8,
                          methods=["full", "isolated"], compute_matched=False)
    rows = {r.label: r for r in report.rows}
    full, isolated = rows["full"], rows["isolated"]
    assert full.questions == 48
    # measured: full 16/48 right, 13/26 beyond the window; isolated 7/48, 4/26 beyond
    assert full.accuracy >= 13 / 48 and full.accuracy_beyond_window >= 10 / 26
    assert isolated.accuracy_beyond_window <= full.accuracy_beyond_window - 0.2
    assert isolated.accuracy <= 10 / 48

"""The synthetic task, the demo-model training script, the shipped demo weights and their commands."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from statekv import synthetic

ROOT = Path(__file__).resolve().parent.parent


# the generator ---------------------------------------------------------------------------------
def test_videos_are_seeded_and_splits_disjoint():
    a, b = synthetic.generate_video(48, 7), synthetic.generate_video(48, 7)
    assert np.array_equal(a.frames, b.frames) and a.questions == b.questions
    assert not np.array_equal(a.frames, synthetic.generate_video(48, 8).frames)
    train = {synthetic.split_seed("train", i, 64) for i in range(2000)}
    test = {synthetic.split_seed("test", i, 64) for i in range(500)}
    assert not train & test
    assert a.frames.shape == (48, 32, 32, 3) and a.frames.dtype == np.uint8


@pytest.mark.parametrize("seed", range(5))
def test_answers_are_exact_and_probe_frames_show_no_colour(seed):
    video = synthetic.generate_video(64, seed)
    colours, probes = {}, {}
    for e in video.events:
        if e.kind == "paint":
            colours[e.slot] = e.colour
        elif e.kind == "probe":
            probes[e.glyph] = colours[e.slot]
            frame = video.frames[e.frame].astype(int)
            assert (frame.max(-1) - frame.min(-1)).max() < 40  # grey/white only: ambiguous alone
    for q in video.questions:
        if q.kind == "probe":
            assert q.answer == probes[q.text.split()[0]]
        else:
            slot = synthetic.SLOTS.index(q.text.removesuffix(" color now?"))
            assert q.answer == colours[slot]
    assert {q.kind for q in video.questions} == set(synthetic.KINDS)


def test_probes_usually_read_a_slot_repainted_later():
    # what keeps the isolated floor low: the final colour is rarely the probed one
    later, total = 0, 0
    for seed in range(40):
        video = synthetic.generate_video(64, seed)
        final = {int(synthetic.SLOTS.index(q.text.removesuffix(" color now?"))): q.answer
                 for q in video.questions if q.kind == "final"}
        for e, q in zip([e for e in video.events if e.kind == "probe"],
                        [q for q in video.questions if q.kind == "probe"]):
            total += 1
            later += final[e.slot] != q.answer
    assert later / total > 0.6


# training ---------------------------------------------------------------------------------------
def _train_module():
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "tools" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_few_training_steps_reduce_the_loss(tmp_path):
    train_demo = _train_module()
    summary = train_demo.train(tmp_path / "model", steps=12, batch=2, lr=3e-3, eval_videos=0,
                               log=lambda s: None)
    losses = summary["losses"]
    assert np.mean(losses[-3:]) < losses[0] - 0.5
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "model" / "tokenizer.json").is_file()


# the shipped weights -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_model():
    from statekv.demo import load_demo

    return load_demo()


def test_demo_preset_resolves_to_the_shipped_checkpoint():
    from statekv.demo import demo_checkpoint
    from statekv.loading import resolve_checkpoint
    from statekv.presets import load_preset

    preset = load_preset("demo")
    assert resolve_checkpoint(preset.model) == demo_checkpoint()
    weights = Path(demo_checkpoint()) / "model.safetensors"
    assert weights.stat().st_size < 5 * 2**20


def test_shipped_weights_accuracy_and_isolated_floor(demo_model):
    # Fixed held-out videos at the training length (32 frames). On 120 test videos the shipped
    # model reaches chance + 31 points on `final` questions but only chance + 19 on `probe`
    # questions, and isolated prefill sits 12 points below full (README): the thresholds
    # below guard against regressions; they are what it reaches, not the goal.
    from statekv.demo import run_eval

    report = run_eval(lengths=(32,), budgets=(), videos=8, methods=("full", "isolated"), pin="off",
                      model=demo_model)
    full, isolated = report.rows
    assert full.accuracy_final >= synthetic.CHANCE["final"] + 0.25, full
    assert full.accuracy_probe >= synthetic.CHANCE["probe"] + 0.08, full
    assert full.accuracy - isolated.accuracy >= 0.10, report.floor  # the benchmark's floor


# the commands ----------------------------------------------------------------------------------------
def test_demo_command_prints_answers_beside_the_truth():
    from statekv_cli.app import app

    result = CliRunner().invoke(app, ["demo", "--frames", "32", "--seed", "3", "--method", "full"])
    assert result.exit_code == 0, result.output
    video = synthetic.generate_video(32, 3)
    for q in video.questions:
        assert q.text in result.output
    assert "truth" in result.output and "correct" in result.output

    result = CliRunner().invoke(app, ["demo", "--frames", "32", "--json", "--budget", "16"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["method"] == "statekv" and record["budget"] == 16
    assert {"question", "answer", "truth", "correct"} <= set(record["answers"][0])


def test_eval_command_writes_table_and_csv(tmp_path):
    from statekv_cli.app import app

    path = tmp_path / "eval.csv"
    result = CliRunner().invoke(app, ["eval", "--lengths", "16", "--budgets", "16", "--videos", "2",
                                      "--pin", "off", "--csv", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.index("isolated floor") < result.output.index("statekv@16")
    rows = list(csv.DictReader(path.open()))
    assert [r["method"] for r in rows] == ["full", "isolated", "window", "statekv", "random"]
    full = rows[0]
    assert float(full["agreement"]) == 1.0 and float(full["kl"]) < 1e-6
    assert all(float(r["lm_prefill_flops"]) <= float(full["lm_prefill_flops"]) * 1.2 for r in rows)

"""`statekv recall`: the exact definitions of concentration, weighted recall and churn."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from statekv.commands.recall import (
    FullMass, KeptStates, check_budgets, measure, measured_chunks,
)
from statekv.errors import UsageError
from statekv_cli.app import app

FIELDS = {"budget", "concentration", "weighted_recall", "churn"}


def _prefill(model, frames):
    def prefill(method, on_carried=None, on_mass=None):
        return model.prefill_frames(frames, method=method, on_carried=on_carried, on_mass=on_mass)
    return prefill


def test_recall_definitions_on_every_family(family):
    """In [0, 1]; 1.0 (and churn 0) once the budget covers the history; monotone in budget."""
    model, frames = family.model, family.frames
    chunks = len(frames) // model.adapter.frames_per_unit
    tokens = model.prefill_frames(frames, method="full").stats.detailed_tokens
    budgets = [2, 8, 32, tokens]
    record = measure(_prefill(model, frames), chunks, budgets)
    assert record["tokens"] == tokens
    rows = record["rows"]
    assert [r["budget"] for r in rows] == budgets and all(set(r) == FIELDS for r in rows)
    layers = model.adapter.text_config.num_hidden_layers
    assert [entry["layer"] for entry in record["per_layer"]] == list(range(layers))
    for table in [rows] + [entry["rows"] for entry in record["per_layer"]]:
        for r in table:
            for key in FIELDS - {"budget"}:
                assert 0.0 <= r[key] <= 1.0
            # the kept set is one of the B-token sets: never above the best one
            assert r["weighted_recall"] <= r["concentration"] + 1e-6
        assert table[-1]["concentration"] == 1.0 and table[-1]["weighted_recall"] == 1.0
        assert table[-1]["churn"] == 0.0
        for low, high in zip(table, table[1:]):
            assert high["concentration"] >= low["concentration"]
    recalls = [r["weighted_recall"] for r in rows]
    assert recalls == sorted(recalls)
    assert rows[0]["weighted_recall"] < 1.0 and rows[0]["churn"] > 0.0
    assert record["suggested_budget"] == next(r["budget"] for r in rows if r["weighted_recall"] >= 0.9)


def test_full_mass_against_a_hand_computed_chunk():
    """concentration = top-B past mass share per KV head summed; recall = mass on kept keys."""
    kept = KeptStates({1})
    kept(0, 4, torch.tensor([[0, 3], [1, 2]]))  # after the prefix (chunk 0): carried for chunk 1
    full = FullMass([2], {2: kept})
    mass = torch.tensor([[4.0, 1.0, 2.0, 3.0, 9.0], [1.0, 1.0, 1.0, 5.0, 9.0]])  # 4 past + 1 chunk
    full(0, 4, mass)
    assert full.sums.concentration[(0, 2)] == [pytest.approx((7 + 6) / (10 + 8))]
    assert full.sums.recall[(0, 2)] == [pytest.approx((7 + 2) / 18)]


def test_churn_is_the_share_of_the_previous_state_dropped():
    kept = KeptStates(set())
    kept(0, 4, torch.tensor([[0, 1, 2, 3]]))
    kept(0, 8, torch.tensor([[0, 1, 6, 7]]))  # 2 of 4 dropped
    kept(0, 12, torch.tensor([[0, 1, 6, 7]]))  # none dropped
    assert kept.churn[0] == [pytest.approx(0.5), pytest.approx(0.0)]


def test_option_validation():
    with pytest.raises(UsageError):
        check_budgets([])
    with pytest.raises(UsageError):
        check_budgets([0, 4])
    assert check_budgets([64, 8, 64]) == [8, 64]
    with pytest.raises(UsageError):
        measured_chunks(10, 0)
    assert measured_chunks(5, 32) == {1, 2, 3, 4, 5}
    picked = measured_chunks(100, 4)
    assert len(picked) == 4 and min(picked) == 1 and max(picked) == 100


def test_cli_recall_json_contract(clip, tiny_internvl_dir, tmp_path):
    runner = CliRunner()
    plot = tmp_path / "recall.png"
    args = ["recall", str(clip), "--model", str(tiny_internvl_dir), "--budgets", "4,16,4096",
            "--max-frames", "4", "--fps", "4", "--device", "cpu", "--json"]
    result = runner.invoke(app, args + ["--plot", str(plot)])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert {"path", "model", "tokens", "rows", "per_layer", "suggested_budget"} <= set(record)
    assert record["path"] == str(clip) and [r["budget"] for r in record["rows"]] == [4, 16, 4096]
    assert record["suggested_budget"] is not None and plot.stat().st_size > 0
    bad = runner.invoke(app, ["recall", str(clip), "--model", str(tiny_internvl_dir),
                              "--budgets", "0,16"])
    assert bad.exit_code == 2 and "--budgets" in bad.output
    bad = runner.invoke(app, ["recall", str(clip), "--budgets", "x"])
    assert bad.exit_code == 2


def test_cli_recall_refuses_a_missing_video_before_loading(tiny_internvl_dir, tmp_path):
    result = CliRunner().invoke(app, ["recall", str(tmp_path / "missing.mp4"), "--model",
                                      str(tiny_internvl_dir), "--device", "cpu"])
    assert result.exit_code == 3 and "Traceback" not in result.output

"""Families the method cannot serve are refused with one line naming the reason."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from statekv.errors import ModelError
from statekv.models import adapter_for
from statekv_cli.app import app


@pytest.mark.parametrize("model_type,reason", [("gemma3", "sliding-window"),
                                               ("qwen3_next", "linear-attention"),
                                               ("some_new_vlm", "unsupported model family")])
def test_unservable_families_are_refused(model_type, reason):
    with pytest.raises(ModelError, match=reason):
        adapter_for(model_type)


def test_sliding_window_layers_are_refused_at_load(tiny_internvl_dir, tmp_path, clip):
    checkpoint = tmp_path / "sliding"
    shutil.copytree(tiny_internvl_dir, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    layers = config["text_config"]["num_hidden_layers"]
    config["text_config"].update(use_sliding_window=True, sliding_window=8, max_window_layers=0,
                                 layer_types=["sliding_attention"] * layers)
    (checkpoint / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["ask", str(clip), "q?", "--model", str(checkpoint),
                                      "--max-frames", "2"])
    assert result.exit_code == 4, result.output
    assert "sliding-window" in result.stderr

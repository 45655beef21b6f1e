"""Tiny checkpoints with another position scheme: the same weights, a rewritten rope config.

Rotary embeddings hold no weights (their frequencies are recomputed from the config at load),
so a tiny checkpoint copied with new `rope_parameters` and `max_position_embeddings` loads
like a real checkpoint with those settings: the contract tests build dynamic-NTK, LongRoPE,
YaRN, ... variants of every family this way.

    path = with_rope(build_tiny_internvl(tmp / "a"), tmp / "b", max_position_embeddings=128,
                     rope_parameters={"rope_type": "dynamic", "factor": 2.0})
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def with_rope(checkpoint: str | Path, out_dir: str | Path, *, max_position_embeddings: int,
              rope_parameters: dict[str, Any]) -> Path:
    """Copy `checkpoint` to `out_dir` with the language model's rope settings replaced.

    `rope_parameters` is merged over the checkpoint's own (so `rope_theta` and M-RoPE's
    `mrope_section` stay unless given)."""
    out = Path(out_dir)
    shutil.copytree(checkpoint, out, dirs_exist_ok=True)
    path = out / "config.json"
    config = json.loads(path.read_text())
    text = config.get("text_config", config)
    text["max_position_embeddings"] = int(max_position_embeddings)
    text["rope_parameters"] = {**(text.get("rope_parameters") or {}), **rope_parameters}
    text.pop("rope_scaling", None)
    path.write_text(json.dumps(config, indent=2))
    return out

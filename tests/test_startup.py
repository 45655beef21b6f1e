"""Commands that need no model answer without importing torch or transformers (fast startup)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI in a fresh interpreter, then reports which heavy modules it imported.
PROBE = """
import sys
from statekv_cli.app import app
try:
    app(sys.argv[1:], prog_name="statekv")
except SystemExit as exit:
    code = exit.code
else:
    code = 0
heavy = sorted(m for m in ("torch", "transformers", "huggingface_hub") if m in sys.modules)
sys.stderr.write("\\nEXIT=%s HEAVY=%s\\n" % (code, ",".join(heavy)))
"""


def run_cli(*args: str) -> tuple[int, list[str], str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1]
    code, heavy = last.removeprefix("EXIT=").split(" HEAVY=")
    return int(code), [m for m in heavy.split(",") if m], done.stdout + done.stderr


@pytest.mark.parametrize("args, code", [
    (("presets",), 0),
    (("presets", "show", "qwen3-vl-2b"), 0),
    (("ask", "--help"), 0),
    (("summarize", "--help"), 0),
    (("ask", "missing.mp4"), 2),  # "give at least one question"
    (("ask", "missing.mp4", "what?", "--budget", "0"), 2),
    (("compare", "missing.mp4", "what?", "--methods", "full,nope"), 2),
])
def test_small_commands_import_no_torch(args, code):
    exit_code, heavy, output = run_cli(*args)
    assert exit_code == code, output
    assert heavy == [], f"{' '.join(args)} imported {heavy}"


def test_usage_error_is_the_usage_message():
    exit_code, _, output = run_cli("ask", "missing.mp4")
    assert exit_code == 2 and "give at least one question" in output


def test_info_from_preset_numbers_imports_no_torch(clip, tmp_path, monkeypatch):
    # An empty Hugging Face cache: the preset's checkpoint is not here, its numbers are used.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    exit_code, heavy, output = run_cli("info", str(clip), "--json", "--device", "cpu")
    assert exit_code == 0, output
    assert heavy == []
    assert '"exact_layout": false' in output

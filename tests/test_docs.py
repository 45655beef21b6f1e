"""README, --help, docs/ and the code agree: defaults, the options table, record fields,
and every file README names exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from statekv_cli.app import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
FORMATS = (ROOT / "docs" / "formats.md").read_text(encoding="utf-8")
runner = CliRunner()
FAST = ["--max-frames", "4", "--fps", "4", "--max-new-tokens", "2"]


def _fields(record: str) -> set[str]:
    """The field list `record: {a, b, ...}` that docs/formats.md states."""
    match = re.search(rf"^{re.escape(record)}: \{{(.*)\}}$", FORMATS, re.MULTILINE)
    assert match, f"docs/formats.md states no {record} record"
    return {name.strip() for name in match.group(1).split(",")}


def test_readme_options_table_is_the_generated_one():
    from statekv_cli.options import options_markdown

    block = re.search(r"<!-- options table:[^\n]*-->\n(.*?)\n<!-- end of options table -->",
                      README, re.DOTALL)
    assert block, "README lost its generated options table"
    assert block.group(1) == options_markdown()


def test_defaults_agree_between_readme_help_and_code():
    from statekv.presets import DEFAULT_PRESET, DEFAULTS, load_preset

    preset = load_preset(DEFAULT_PRESET)
    assert f"Default: {DEFAULT_PRESET}." in README
    help_text = runner.invoke(app, ["ask", "--help"], terminal_width=400).stdout
    squashed = " ".join(help_text.split())
    for field in ("budget", "window_frames", "max_frames", "fps", "max_new_tokens"):
        assert f"{DEFAULT_PRESET}: {getattr(preset, field)})" in squashed, field
        # the Python API's defaults are the default preset's too
        assert getattr(DEFAULTS, field) == getattr(preset, field), field
    assert f"Default: {DEFAULT_PRESET}" in squashed
    assert "internvl3-1b`" not in README.split("## Models")[0]  # the old drifted default


def test_every_file_readme_names_exists():
    named = set(re.findall(r"\b((?:docs|tools|tests|statekv|statekv_cli|presets)/[\w./-]+)", README))
    named |= {m for m in re.findall(r"`([\w.-]+\.(?:md|py|toml|yaml))`", README) if "/" not in m}
    assert named, "no file names found: the pattern is broken"
    missing = sorted(n.rstrip(".") for n in named
                     if not (ROOT / n.rstrip(".")).exists() and not n.endswith("/"))
    assert missing == []


# Design pages the developers keep outside the repository (spelled so this file cites neither).
OUTSIDE_DOCUMENTS = ("CONTRACTS" + ".md", "METHOD" + ".md")


def test_no_file_cites_a_document_outside_the_repository():
    texts = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("statekv/**/*.py"),
             *ROOT.glob("statekv_cli/*.py")]
    for path in texts:
        text = path.read_text(encoding="utf-8")
        for outside in OUTSIDE_DOCUMENTS:
            assert outside not in text, (path, outside)


@pytest.fixture(scope="module")
def records(clip, tiny_internvl_dir):
    model = str(tiny_internvl_dir)
    out = {}
    for name, args in {
        "ask": ["ask", clip, "what?", "--model", model, "--json", *FAST],
        "compare": ["compare", clip, "what?", "--model", model, "--json", "--budget", "20", *FAST],
        "info": ["info", clip, "--model", model, "--json", "--max-frames", "4", "--fps", "4"],
    }.items():
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        out[name] = json.loads(result.stdout)
    return out


def test_records_have_exactly_the_documented_fields(records):
    assert set(records["ask"]) == _fields("ask")
    assert set(records["ask"]["settings"]) == _fields("settings")
    assert set(records["ask"]["stats"]) == _fields("stats")
    assert set(records["compare"]) == _fields("compare")
    for row in records["compare"]["methods"]:
        assert set(row) == _fields("compare.methods[]")
    assert set(records["info"]) == _fields("info")
    assert set(records["info"]["predicted"]) == _fields("info.predicted")


def test_summarize_bench_and_demo_fields_are_documented():
    from dataclasses import fields

    from statekv.commands.bench import BenchRow
    from statekv.commands.summarize import RECORD_KEYS
    from statekv.demo.evaluation import DemoResult

    assert {f.name for f in fields(BenchRow)} == _fields("bench[]")
    assert {f.name for f in fields(DemoResult)} | {"accuracy"} == _fields("demo")
    assert set(RECORD_KEYS) - {"prompt"} <= _fields("settings")
    assert "settings_hash" in _fields("summarize")

"""Shipped presets: valid, of supported families, and packaged inside the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from statekv.errors import InputError, UsageError
from statekv.models import families
from statekv.presets import DEFAULT_PRESET, list_presets, load_preset, parse_preset


def test_every_shipped_preset_is_valid_and_served():
    presets = list_presets()
    names = {p.name for p in presets}
    assert DEFAULT_PRESET in names
    assert {"internvl3-1b", "qwen3-vl-2b", "qwen2.5-vl-7b", "smolvlm2-500m",
            "llava-onevision-0.5b"} <= names
    for preset in presets:
        assert preset.family in families(), preset.name
        assert preset.license and preset.license != "unknown"
        assert preset.architecture.tokens_per_frame > 0


@pytest.mark.parametrize("change,message", [
    ({"budget": 0}, "budget"), ({"budget": "x"}, "budget"), ({"colour": 1}, "unknown field"),
    ({"method": "magic"}, "method"), ({"architecture": {"layers": 1}}, "architecture"),
])
def test_bad_fields_are_named(change, message):
    data = load_preset("internvl3-1b").to_dict()
    data.update(change)
    with pytest.raises(InputError, match=message):
        parse_preset(data, "test.yaml")


def test_malformed_yaml_and_unknown_names(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(InputError, match="malformed YAML"):
        load_preset(str(bad))
    with pytest.raises(UsageError, match="unknown preset"):
        load_preset("no-such-preset")


def test_presets_ship_inside_the_wheel(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                            "--no-build-isolation", "-w", str(tmp_path), "-q"],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(tmp_path.glob("statekv-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.rsplit("/", 1)[-1][:-5] for n in names if n.startswith("statekv/presets/")
               and n.endswith(".yaml")}
    assert {p.name for p in list_presets()} <= shipped
    assert "statekv_cli/app.py" in names
    from statekv.loading import BUNDLED

    for folder in BUNDLED.values():  # both demo models, weights and processor files
        base = "/".join(("statekv", *folder))
        for file in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
            assert f"{base}/{file}" in names, (base, file)


def test_parameter_counts_are_real_and_the_default_is_marked():
    import json
    import math
    import struct
    from pathlib import Path

    from statekv.units import format_count

    presets = list_presets()
    assert all(p.parameters > 0 for p in presets)
    # The demo presets' numbers are the shipped checkpoints' own tensor sizes.
    counts = {}
    for name, folder in (("demo", "checkpoint"), ("demo-lockers", "lockers_checkpoint")):
        weights = Path(__file__).resolve().parents[1] / "statekv/demo" / folder / "model.safetensors"
        with weights.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        header.pop("__metadata__", None)
        vision = sum(math.prod(t["shape"]) for k, t in header.items()
                     if k.startswith(("vision_tower.", "multi_modal_projector.")))
        counts[name] = sum(math.prod(t["shape"]) for t in header.values())
        arch = load_preset(name).architecture
        assert (arch.text_params, arch.vision_params) == (counts[name] - vision, vision), name
    counted = counts["demo"]
    assert format_count(counted) != "0"
    listed = subprocess.run([sys.executable, "-m", "statekv_cli.app", "presets", "--json"],
                            capture_output=True, text=True, check=True).stdout
    rows = json.loads(listed)
    assert [r["name"] for r in rows if r["default"]] == [DEFAULT_PRESET]
    assert {r["name"]: r["parameters"] for r in rows}["demo"] == counted
    table = subprocess.run([sys.executable, "-m", "statekv_cli.app", "presets"],
                           capture_output=True, text=True, check=True).stdout
    assert f"{DEFAULT_PRESET} *" in table and "0.00 B" not in table

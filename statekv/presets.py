"""Model presets: a checkpoint with its defaults and the architecture numbers `info` needs.

Presets are YAML files shipped in the package (`statekv/presets/*.yaml`, mapped from the
repository's `presets/` folder) or any file a user passes. Loaded with yaml.safe_load and
validated field by field; a bad field is named in the error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from statekv.errors import InputError, UsageError

DEFAULT_PRESET = "qwen3-vl-2b"


@dataclass(frozen=True)
class Architecture:
    """Numbers of the language model and vision tower, enough to predict cost without weights."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int | None = None
    vocab: int = 0
    tokens_per_frame: int = 256  # per frame at the preset's input size
    frame_size: int = 448  # pixels (square) a frame is resized to
    vision_params: int = 0  # vision tower + projector parameters (for memory estimates)
    text_params: int = 0  # language model parameters incl. embeddings (0: estimate)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


@dataclass(frozen=True)
class Preset:
    """A named checkpoint with defaults for every option a run needs."""

    name: str
    model: str
    family: str
    architecture: Architecture
    license: str = "unknown"
    revision: str | None = None
    dtype: str = "auto"
    max_frames: int = 256
    fps: float | None = 1.0
    method: str = "statekv"
    budget: int = 4096
    window_frames: int = 16
    chunk_frames: int | None = None
    max_new_tokens: int = 128
    system_prompt: str | None = None
    summary_prompt: str = "Describe what happens in this video in a few sentences."
    notes: str = ""
    # The checkpoint's language-model positions, as its config.json states them: the trained
    # context (max_position_embeddings) and the rope settings (rope_scaling / rope_parameters).
    trained_positions: int | None = None
    rope: dict | None = None
    source: str = field(default="", compare=False)  # where it was loaded from

    @property
    def parameters(self) -> int:
        """Approximate total parameters (language model + vision)."""
        a = self.architecture
        if a.text_params:
            return a.text_params + a.vision_params
        hd = a.resolved_head_dim
        per_layer = a.hidden * hd * (2 * a.heads + 2 * a.kv_heads) + 3 * a.hidden * a.intermediate
        return a.layers * per_layer + 2 * a.vocab * a.hidden + a.vision_params

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data


# Run defaults every entry point shares (a preset file overrides them; the CLI reads the
# preset, the Python API reads these): one source, so README, --help and code agree.
DEFAULTS = Preset(name="defaults", model="", family="",
                  architecture=Architecture(layers=0, hidden=0, heads=1, kv_heads=1, intermediate=0))


def _check(name: str, value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        if kind is float or kind == (int, float):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InputError(f"{where}: field '{name}' must be {expected}, got {value!r}")
    return value


_TYPES: dict[str, Any] = {
    "name": str, "model": str, "family": str, "license": str, "revision": (str, type(None)),
    "dtype": str, "max_frames": int, "fps": (int, float, type(None)), "method": str,
    "budget": int, "window_frames": int, "chunk_frames": (int, type(None)),
    "max_new_tokens": int, "system_prompt": (str, type(None)), "summary_prompt": str,
    "notes": str, "trained_positions": (int, type(None)), "rope": (dict, type(None)),
}


def parse_preset(data: Any, where: str) -> Preset:
    """Validate a preset mapping; every problem names its field."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: a preset must be a mapping of fields, got {type(data).__name__}")
    known = {f.name for f in fields(Preset)} - {"source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for required in ("name", "model", "family", "architecture"):
        if required not in data:
            raise InputError(f"{where}: missing required field '{required}'")
    values = {k: _check(k, v, _TYPES[k], where) for k, v in data.items() if k != "architecture"}
    for positive in ("max_frames", "budget", "window_frames", "max_new_tokens"):
        if positive in values and values[positive] < 1:
            raise InputError(f"{where}: field '{positive}' must be at least 1, got {values[positive]}")
    from statekv.policies import METHODS

    if values.get("method", "statekv") not in METHODS:  # listed in policies.py, the registry
        raise InputError(f"{where}: field 'method' must be one of {', '.join(METHODS)}")
    return Preset(architecture=_parse_architecture(data["architecture"], where), source=where, **values)


def _parse_architecture(data: Any, where: str) -> Architecture:
    if not isinstance(data, dict):
        raise InputError(f"{where}: field 'architecture' must be a mapping")
    known = {f.name for f in fields(Architecture)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{where}: unknown architecture field(s) {', '.join(unknown)}")
    for key, value in data.items():
        _check(f"architecture.{key}", value, (int, type(None)) if key == "head_dim" else int, where)
    try:
        return Architecture(**data)
    except TypeError as exc:
        raise InputError(f"{where}: architecture: {exc}") from None


def _shipped() -> dict[str, Any]:
    folder = resources.files("statekv") / "presets"
    if not folder.is_dir():  # running from a source checkout without the package mapping
        folder = Path(__file__).resolve().parent.parent / "presets"
    return {p.name[:-5]: p for p in folder.iterdir() if p.name.endswith(".yaml")}


def _read_yaml(source: Any, where: str) -> Any:
    try:
        return yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{where}: malformed YAML ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise InputError(f"cannot read preset {where}: {exc.strerror or exc}") from None


def list_presets() -> list[Preset]:
    """Every shipped preset, sorted by name."""
    return [load_preset(name) for name in sorted(_shipped())]


def load_preset(name_or_file: str) -> Preset:
    """A shipped preset by name, or a YAML file by path."""
    shipped = _shipped()
    if name_or_file in shipped:
        return parse_preset(_read_yaml(shipped[name_or_file], name_or_file), name_or_file)
    path = Path(name_or_file).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise InputError(f"preset file not found: {name_or_file}")
        return parse_preset(_read_yaml(path, str(path)), str(path))
    raise UsageError(f"unknown preset {name_or_file!r}; shipped presets: {', '.join(sorted(shipped))} "
                     f"(or pass a .yaml file)")

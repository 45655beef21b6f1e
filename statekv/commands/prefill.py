"""`statekv prefill VIDEO -o FILE.skv` and `statekv ask FILE.skv`: prefill once, ask any day.

`prefill_file` runs one prefill and writes it (statekv/saved.py, docs/prefill-files.md);
`ask_saved` answers from such a file: the model named in the file (or the one asked for,
which must be the same weights, family and dtype: checked from the checkpoint's files and
config before any weights load), no video, no vision tower, no prefill.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from statekv import saved
from statekv.commands.plan import RunOptions, load_model, plan_run, preflight, prefill_video
from statekv.errors import UsageError
from statekv.prefill import PrefillEvent
from statekv.session import Model, Session

# Options that change a prefill: given with a prefill file, they must match what it holds.
PREFILL_OPTIONS = ("method", "budget", "window_frames", "max_frames", "fps", "start", "end",
                   "chunk_frames")


def default_out(path: str) -> str:
    return str(Path(path).with_suffix(saved.EXTENSION))


def prefill_file(path: str, out: str | None, options: RunOptions, model: Model | None = None,
                 on_event: Callable[[PrefillEvent], None] | None = None) -> dict[str, Any]:
    """`statekv prefill`: prefill `path` and save it to `out`; {path, out, bytes, settings,
    stats} (the stats of the prefill; the file's size in `bytes`)."""
    out = out or default_out(path)
    if not saved.is_prefill_file(out):
        raise UsageError(f"-o {out}: a prefill file's name ends in {saved.EXTENSION}")
    if Path(out).exists() and Path(path).exists() and Path(out).samefile(path):
        raise UsageError(f"-o {out} is the video itself; choose another file")
    if not Path(out).parent.is_dir() and str(Path(out).parent):
        raise UsageError(f"-o {out}: folder {Path(out).parent} does not exist")
    run = plan_run(path, options)  # a bad file or option fails before the model loads
    resolved = run.resolved
    if model is None:
        preflight(run, options.force)
        model, _ = load_model(options, resolved)
    # Never through the automatic cache: this file is the product, its stats the prefill's.
    session = prefill_video(model, resolved, replace(options, cache="off"), path,
                            resolved.method, on_event)
    size = session.save(out)
    return {"path": path, "out": out, "bytes": size, "settings": session.settings.to_dict(),
            "stats": session.stats.to_dict(), "warnings": session.warnings}


def _refuse_other_settings(meta: dict[str, Any], options: RunOptions, path: str) -> None:
    settings = meta["settings"]
    differences = []
    for name in PREFILL_OPTIONS:
        asked = getattr(options, name)
        if asked is not None and asked != settings.get(name):
            differences.append(f"--{name.replace('_', '-')} {asked} asked, "
                               f"{settings.get(name)} in the file")
    if differences:
        raise UsageError(f"{path} was prefilled with other settings: " + "; ".join(differences)
                         + " (prefill the video again with them)")


def _model_identity(name: str, revision: str | None, dtype: str, options: RunOptions
                    ) -> dict[str, Any]:
    """Family, dtype and weights fingerprint of a checkpoint, from its files (no weights load)."""
    from statekv.loading import read_config, resolve_checkpoint, resolve_device, resolve_dtype
    from statekv.loading import weights_hash
    from statekv.models import adapter_for

    checkpoint = resolve_checkpoint(name, revision)
    config = read_config(checkpoint, options.trust_remote_code)
    torch_dtype = resolve_dtype(dtype, resolve_device(options.device))
    return {"name": name, "family": adapter_for(config.model_type).family,
            "dtype": str(torch_dtype).removeprefix("torch."), "revision": revision,
            "weights_hash": weights_hash(checkpoint)}


def ask_saved(path: str, questions: list[str], options: RunOptions, model: Model | None = None
              ) -> dict[str, Any]:
    """`statekv ask FILE.skv`: every answer from the saved prefill; the usual ask record with
    zero vision and prefill cost (`stats.prefills == 0`) and `source` naming the file."""
    from statekv.presets import load_preset

    if not questions:
        raise UsageError("give at least one question (or --questions FILE)")
    options.validate()
    meta = saved.read_metadata(path)
    _refuse_other_settings(meta, options, path)
    stored = meta["model"]
    if model is None:
        revision = None
        if options.model:
            name = options.model
        elif options.preset:
            preset = load_preset(options.preset)
            name, revision = preset.model, preset.revision
        else:
            name, revision = stored.get("checkpoint") or stored["name"], stored.get("revision")
        dtype = options.dtype or stored["dtype"]
        saved.check_model(meta, _Identity(_model_identity(name, revision, dtype, options)), path)
        from statekv.session import load

        model = load(name, device=options.device, dtype=dtype, revision=revision,
                     trust_remote_code=options.trust_remote_code)
    session = model.open(path)
    limit = options.max_new_tokens or meta["settings"].get("max_new_tokens")
    answers = session.ask(questions, limit)
    video = meta.get("video") or {}
    return {"path": video.get("path"), "source": str(path),
            "settings": session.settings.to_dict(), "answers": [a.to_dict() for a in answers],
            "stats": session.stats.to_dict(), "warnings": session.warnings}


class _Identity:
    """A checkpoint's identity seen through the attributes `saved.mismatch` reads."""

    def __init__(self, identity: dict[str, Any]) -> None:
        self.name = identity["name"]
        self.family = identity["family"]
        self.dtype = identity["dtype"]
        self.revision = identity["revision"]
        self.weights_hash = identity["weights_hash"]


def cache_fields(session: Session, record: dict[str, Any]) -> dict[str, Any]:
    """Add `cache` (hit/miss) and `source` (the prefill file) to a record and its stats."""
    if session.cache is not None:
        record["cache"] = session.cache
        if isinstance(record.get("stats"), dict):
            record["stats"]["cache"] = session.cache
    if session.source is not None:
        record["source"] = session.source
    return record

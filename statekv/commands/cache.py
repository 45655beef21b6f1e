"""The automatic prefill cache: `--cache DIR` (or STATEKV_CACHE) on ask, compare, summarize.

An entry is one prefill file (statekv/saved.py) named by a key: a hash of the video's
identity (size, mtime, content hash) and of every setting that changes the prefill (the
weights' fingerprint, family, dtype, device type, method, budget, window, sampling, chunk
size, system prompt, pinned prefix, attention, decoder, seed). Anything else is a miss, so a
cache can never answer about another video or from another model.

    DIR/<key>.skv    the prefill file, written atomically (temporary file, fsync, rename)
    DIR/<key>.json   what it is (video, settings) and when it was last used (LRU order)
    DIR/<key>.lock   held (flock) while the entry is looked up or filled, so two processes
                     asking for the same entry prefill it once; the other then hits

A damaged entry is deleted and rebuilt, with a warning. `clear` evicts by age and/or total
size, least recently used first, skipping entries another process holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from statekv.errors import InputError, UsageError

ENV = "STATEKV_CACHE"
OFF = ("", "off", "none", "0")
STALE_TEMP_SECONDS = 3600  # a writer's temporary file older than this was abandoned


def cache_dir(value: str | None) -> str | None:
    """The cache folder asked for: the option, else $STATEKV_CACHE; None (off) otherwise.
    `off` (option or variable) turns it off."""
    chosen = value if value is not None else os.environ.get(ENV)
    if chosen is None or chosen.strip().lower() in OFF:
        return None
    return chosen


def prefill_settings(model: Any, resolved: Any, options: Any, method: str) -> dict[str, Any]:
    """Everything that changes a prefill's cache (what a cache key covers)."""
    unit = model.adapter.frames_per_unit
    return {
        "weights_hash": model.weights_hash, "family": model.family, "dtype": model.dtype,
        "device": model.device.type, "method": method,
        "budget": resolved.budget if method in ("statekv", "random") else None,
        "window_frames": resolved.window_frames if method == "window" else None,
        "max_frames": resolved.max_frames, "fps": resolved.fps,
        "start": options.start, "end": options.end,
        "chunk_frames": resolved.chunk_frames or unit,
        "system_prompt": resolved.preset.system_prompt, "pin_prefix": options.pin_prefix,
        "attention": options.attention, "backend": options.backend, "seed": options.seed,
    }


def cache_key(identity: dict[str, Any], settings: dict[str, Any]) -> str:
    video = {k: identity[k] for k in ("size_bytes", "mtime", "content_hash")}
    text = json.dumps({"video": video, "settings": settings}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (yields False if not blocking and it is held)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): atomic renames still keep entries whole
        yield True
        return
    with open(path, "a+b") as handle:
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(handle.fileno(), flags)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_json(path: Path, record: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove(directory: Path, key: str) -> None:
    for suffix in (".skv", ".json"):
        with contextlib.suppress(FileNotFoundError):
            (directory / f"{key}{suffix}").unlink()


def _folder(directory: str) -> Path:
    folder = Path(directory).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use cache folder {directory}: {exc.strerror or exc}") from None
    if not folder.is_dir():
        raise UsageError(f"--cache {directory} is not a folder")
    return folder


def cached_prefill(model: Any, resolved: Any, options: Any, path: str, method: str,
                   directory: str, prefill: Callable[[], Any]) -> Any:
    """The session for `path` from the cache at `directory` (`session.cache == "hit"`), or
    `prefill()`'s, then stored (`"miss"`)."""
    from statekv import saved

    folder = _folder(directory)
    identity = saved.video_identity(path)
    settings = prefill_settings(model, resolved, options, method)
    key = cache_key(identity, settings)
    entry = folder / f"{key}.skv"
    warnings: list[str] = []
    with _locked(folder / f"{key}.lock"):
        if entry.exists():
            try:
                session = model.open(str(entry))
            except (InputError, UsageError) as exc:
                warnings.append(f"cache entry {entry.name} was unusable ({exc}); deleted and "
                                f"rebuilt")
                _remove(folder, key)
            else:
                _touch(folder, key)
                session.cache = "hit"
                return session
        session = prefill()
        session.cache = "miss"
        try:
            size = session.save(str(entry))
            now = time.time()
            _write_json(folder / f"{key}.json", {
                "key": key, "video": str(path), "video_identity": identity,
                "settings": settings, "model": model.name, "bytes": size, "created": now,
                "last_used": now})
        except OSError as exc:  # a full disk must not cost the answers
            _remove(folder, key)
            warnings.append(f"could not save the prefill to the cache {directory}: "
                            f"{exc.strerror or exc}")
        session.warnings.extend(warnings)
        return session


def _touch(folder: Path, key: str) -> None:
    sidecar = folder / f"{key}.json"
    record = _read_json(sidecar) or {"key": key}
    record["last_used"] = time.time()
    with contextlib.suppress(OSError):
        _write_json(sidecar, record)


# list and clear ---------------------------------------------------------------------------
def entries(directory: str) -> list[dict[str, Any]]:
    """Every entry, most recently used first: key, video, model, method, bytes, times."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        return []
    rows = []
    for file in folder.glob("*.skv"):
        key = file.stem
        try:
            st = file.stat()
        except FileNotFoundError:
            continue
        record = _read_json(folder / f"{key}.json") or {}
        settings = record.get("settings") or {}
        rows.append({"key": key, "video": record.get("video"), "model": record.get("model"),
                     "method": settings.get("method"), "bytes": st.st_size,
                     "created": record.get("created", st.st_mtime),
                     "last_used": record.get("last_used", st.st_mtime)})
    return sorted(rows, key=lambda row: row["last_used"], reverse=True)


def list_cache(directory: str) -> dict[str, Any]:
    """`statekv cache list`: the entries and their total size."""
    rows = entries(directory)
    return {"directory": str(directory), "entries": rows,
            "bytes": sum(row["bytes"] for row in rows)}


def clear(directory: str, older_than: float | None = None, max_size: int | None = None,
          now: float | None = None) -> dict[str, Any]:
    """`statekv cache clear`: without limits, every entry; else those unused for longer than
    `older_than` seconds, then least recently used ones until the total is at most `max_size`
    bytes. Entries another process holds are kept. Abandoned temporary files go too."""
    now = time.time() if now is None else now
    folder = Path(directory).expanduser()
    rows = entries(directory)
    every = older_than is None and max_size is None
    doomed = [row for row in rows
              if every or (older_than is not None and now - row["last_used"] > older_than)]
    total = sum(row["bytes"] for row in rows if row not in doomed)
    if max_size is not None:
        for row in reversed(rows):  # least recently used first
            if total <= max_size:
                break
            if row not in doomed:
                doomed.append(row)
                total -= row["bytes"]
    removed, kept_busy = [], []
    for row in doomed:
        with _locked(folder / f"{row['key']}.lock", blocking=False) as held:
            if not held:
                kept_busy.append(row["key"])
                continue
            _remove(folder, row["key"])  # the empty lock file stays: another process may wait on it
        removed.append(row)
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if every or now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                    tmp.unlink()
    left = entries(directory)
    return {"directory": str(directory), "removed": len(removed),
            "removed_bytes": sum(row["bytes"] for row in removed), "busy": kept_busy,
            "entries": len(left), "bytes": sum(row["bytes"] for row in left)}

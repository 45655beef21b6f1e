"""One writer per output file: exclusive locks that name the process holding them.

    with output_lock("summaries.jsonl"):            # the only writer of the whole file
        ...
    with output_lock("summaries.jsonl", part="1/4"):  # one of several shards of one file
        ...

The lock is `fcntl.flock` on a sidecar file, `<output>.lock` (never the output itself, so
readers and the appending writer keep their own descriptors). A whole-file writer holds it
exclusively; a shard holds it shared, so the shards of one file run side by side (their
appends are single `write` calls, which do not interleave), plus an exclusive lock on
`<output>.<K>-of-<N>.lock`, so the same shard cannot run twice. Anything else refuses at
once with a `BusyError` naming the holder's pid. Locks end with the process that holds them
(also when it is killed); the empty sidecar files stay and are harmless.
Works where `fcntl` exists (Linux, macOS); elsewhere the lock is a no-op.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager

from statekv.errors import BusyError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def lock_path(output: str, part: str | None = None) -> str:
    """The sidecar lock file of `output` (or of one part of it, 'K/N')."""
    if part is None:
        return output + ".lock"
    return f"{output}.{part.replace('/', '-of-')}.lock"


@contextmanager
def output_lock(output: str, part: str | None = None, what: str = "output") -> Iterator[None]:
    """Hold the write lock of `output` (a part of it, e.g. the shard 'K/N') while inside."""
    if fcntl is None or output == "-":
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    whole = _open(lock_path(output))
    held, owned = [whole], None
    try:
        if part is None:
            _take(whole, fcntl.LOCK_EX, output, what)
            owned = whole
        else:
            _take(whole, fcntl.LOCK_SH, output, what)
            mine = _open(lock_path(output, part))
            held.append(mine)
            _take(mine, fcntl.LOCK_EX, output, what, part)
            owned = mine
        _write_owner(owned, part or "")
        yield
    finally:
        if owned is not None:
            os.ftruncate(owned, 0)  # no stale pid for the next reader of this file
        for fd in reversed(held):
            os.close(fd)  # closing releases the lock


def _open(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _write_owner(fd: int, part: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {part}\n".encode(), 0)


def _take(fd: int, mode: int, output: str, what: str, part: str | None = None) -> None:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BusyError(f"{output} is being written by another process ({_holders(output, part)}); "
                        f"wait for it to finish, or write this {what} elsewhere") from None


def _holders(output: str, part: str | None) -> str:
    """Who holds the lock, as the sidecar files say: 'pid 123' or 'pid 123, shard 1/4'."""
    files = [lock_path(output, part)] if part else [lock_path(output)] + sorted(
        glob.glob(glob.escape(output) + ".*-of-*.lock"))
    found = []
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                pid, _, shard = f.read().strip().partition(" ")
        except OSError:
            continue
        if pid.isdigit() and _alive(int(pid)):
            found.append(f"pid {pid}" + (f", shard {shard}" if shard else ""))
    return "; ".join(found) if found else "pid unknown"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

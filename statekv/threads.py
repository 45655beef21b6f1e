"""How many CPU threads statekv runs with, and how its OpenMP threads wait.

    statekv.threads.resolve("auto")      # the cores this process may run on, e.g. 2
    statekv.threads.apply(2)             # torch intra-op (and, if still possible, inter-op) threads

`auto` counts the cores this process may actually use: its CPU affinity (what `taskset`,
SLURM's `--cpus-per-task` or a container's cpuset allow) capped by its cgroup CPU quota
(cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), never the machine's core
count. The command line's order is: `--threads`, then `STATEKV_THREADS`, then
`OMP_NUM_THREADS`, then `auto` (`resolve`); the Python API (`statekv.load(threads=...)`)
applies its argument or `STATEKV_THREADS` and otherwise leaves torch as the caller set it
(`requested`).

Why the wait policy matters. torch's CPU kernels run in OpenMP parallel regions (GNU
libgomp in the pip wheels, which MKL's matrix products share). At the end of each region
the threads that finished wait for the others; by default they spin for a while first. A
chunked prefill runs many short regions (a frame of 64-256 tokens through every layer), so
on a CPU where other processes hold cores every region waits for a descheduled thread while
the spinning ones burn the time slices that thread needs: the loop ran 10-30x slower under
load. `prepare_openmp` (called when `statekv` is imported) sets `OMP_WAIT_POLICY=PASSIVE`
(threads sleep at once instead of spinning) unless the user chose a policy, which only
works before torch is imported: libgomp reads it once, when it loads. `openmp_wait_policy()`
tells what the running process got. This module imports torch only inside `apply`.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from statekv.errors import UsageError

ENV = "STATEKV_THREADS"
# Environment variables by which a user already chose how OpenMP threads wait.
_WAIT_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
_prepared: str | None = None  # what prepare_openmp found/did, for openmp_wait_policy()


# OpenMP wait policy ---------------------------------------------------------------------------
def prepare_openmp(environ: dict[str, str] | None = None,
                   modules: dict[str, object] | None = None) -> str:
    """Make OpenMP threads sleep instead of spinning while they wait (before torch loads).

    Returns what happened: "passive" (set now), "user" (the user set a wait variable: left
    alone) or "too-late" (torch was imported first; nothing can change it in this process).
    """
    global _prepared
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if any(name in environ for name in _WAIT_CHOICES):
        state = "user"
    elif "torch" in modules:
        state = "too-late"
    else:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        state = "passive"
    if environ is os.environ and _prepared is None:
        _prepared = state
    return state


def openmp_wait_policy() -> str:
    """The OpenMP wait policy this process runs with: "passive", or "default" (spin first),
    or the user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT setting."""
    if _prepared == "too-late":
        return "default"
    for name in _WAIT_CHOICES:
        if name in os.environ:
            value = os.environ[name]
            return "passive" if name == "OMP_WAIT_POLICY" and value.upper() == "PASSIVE" \
                else f"{name}={value}"
    return "default"


# how many cores ---------------------------------------------------------------------------
def affinity_cores() -> int:
    """Cores in this process's CPU affinity mask (the machine's count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup",
                     self_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """Cores' worth of CPU time this process's cgroup may use (quota / period), or None if
    unlimited or unknown. cgroup v2 (`cpu.max`) and v1 (`cpu.cfs_quota_us`), the tightest
    limit on the path from the process's group up to the root."""
    root = Path(root)
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, group = parts
        if controllers == "":  # v2 unified hierarchy: 0::/path
            for directory in _ancestors(root, group):
                limits.append(_v2_limit(directory / "cpu.max"))
        elif "cpu" in controllers.split(","):
            for base in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if base.is_dir():
                    for directory in _ancestors(base, group):
                        limits.append(_v1_limit(directory))
                    break
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


def _ancestors(base: Path, group: str) -> list[Path]:
    """`base/group` and its parents up to `base` (a container sees its group as `/`)."""
    parts = [p for p in group.strip().split("/") if p]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_limit(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return _ratio(quota, period)


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text().strip()
        period = (directory / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:  # v1 writes -1 for "no limit"
        return None
    return quota_us / period_us


def available_cores() -> int:
    """The cores this process may run on: its affinity, capped by its cgroup CPU quota
    (rounded up: a 1.5-core quota still keeps two threads busy half the time), at least 1."""
    cores = affinity_cores()
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota - 1e-9)))
    return max(1, cores)


# the option ------------------------------------------------------------------------------
def parse(value: int | str | None, option: str = "--threads") -> int | None:
    """A thread count from N or "auto" (None: not given). Raises UsageError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise UsageError(f"{option} must be a positive integer or auto, got {value!r}")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip().lower()
        if text == "auto":
            return available_cores()
        try:
            number = int(text)
        except ValueError:
            raise UsageError(f"{option} must be a positive integer or auto, got {value!r}") from None
    if number < 1:
        raise UsageError(f"{option} must be at least 1 (or auto), got {number}")
    return number


def resolve(value: int | str | None = None, environ: dict[str, str] | None = None) -> int:
    """The thread count to run with: `value` (N or "auto"), else STATEKV_THREADS, else
    OMP_NUM_THREADS, else auto."""
    environ = os.environ if environ is None else environ
    if value is not None:
        return parse(value)
    if environ.get(ENV, "").strip():
        return parse(environ[ENV], option=ENV)
    omp = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp)
    return available_cores()


def requested(value: int | str | None = None, environ: dict[str, str] | None = None) -> int | None:
    """What the Python API applies: `value` (N or "auto"), else STATEKV_THREADS, else None
    (leave torch's threads as the caller set them)."""
    environ = os.environ if environ is None else environ
    if value is not None:
        return parse(value)
    if environ.get(ENV, "").strip():
        return parse(environ[ENV], option=ENV)
    return None


def check(value: int | str | None) -> None:
    """Validate `value` and STATEKV_THREADS without applying them (a UsageError if bad)."""
    resolve(value)


def apply(threads: int) -> int:
    """Run torch with `threads` intra-op threads; inter-op threads too while torch still
    allows it (only before its first inter-op work; statekv itself runs none, so failing
    to change them costs nothing). Returns `threads`."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # already started: torch allows setting it only once, early
            pass
    return threads

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
the threads that finished wait for the others; by default they spin for a while first
(300,000 rounds). A chunked prefill runs many short regions (a frame of 64-256 tokens through
every layer), so on a CPU where other processes hold cores every region waits for a
descheduled thread while the spinning ones burn the time slices that thread needs: the loop
ran 10-30x slower under load. Two things fix it together:

* `prepare_openmp` (called when `statekv` is imported) sets `GOMP_SPINCOUNT=10000`, a short
  spin: a waiting thread spins about as long as the gap between two matrix products of a
  chunk, then sleeps, unless the user chose a policy. It only works before torch is imported:
  libgomp reads it once, when it loads. `openmp_wait_policy()` tells what the process got.
* `SerialSmallOps` runs a small chunk's elementwise ops on one thread, so a chunk has a few
  parallel regions per layer (its matrix products) instead of dozens.

Sleeping at once (`OMP_WAIT_POLICY=PASSIVE`) is the most robust under load but costs a thread
wake-up per region (quiet prefills 12-25% slower in our runs); spinning as by default is fastest
quiet and several times slower under load. docs/shared-cpu.md has the measurements. This
module imports torch only inside `apply` and `SerialSmallOps`.
"""

from __future__ import annotations

import contextlib

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
SHORT_SPIN = "10000"  # GOMP_SPINCOUNT statekv sets: rounds a waiting thread spins, then sleeps


def prepare_openmp(environ: dict[str, str] | None = None,
                   modules: dict[str, object] | None = None) -> str:
    """Make OpenMP threads spin only briefly before they sleep while waiting (before torch
    loads).

    Returns what happened: "short-spin" (set now), "user" (the user set a wait variable:
    left alone) or "too-late" (torch was imported first; nothing can change it in this
    process).
    """
    global _prepared
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if any(name in environ for name in _WAIT_CHOICES):
        state = "user"
    elif "torch" in modules:
        state = "too-late"
    else:
        environ["GOMP_SPINCOUNT"] = SHORT_SPIN
        state = "short-spin"
    if environ is os.environ and _prepared is None:
        _prepared = state
    return state


def openmp_wait_policy() -> str:
    """The OpenMP wait policy this process runs with: "short-spin" (statekv's), "passive",
    "default" (libgomp's long spin) or the user's own setting (e.g. "GOMP_SPINCOUNT=1000")."""
    if _prepared == "too-late":
        return "default"
    if _prepared == "short-spin" and os.environ.get("GOMP_SPINCOUNT") == SHORT_SPIN:
        return "short-spin"
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


# matrix products on every thread, the rest on one -------------------------------------------
# A chunk of at most this many elements per hidden state (tokens x hidden size) runs its small
# ops on one thread: measured on a 2-core CPU with passive waiting, an elementwise op on 36,864
# floats took 5 us on one thread and 68 us on two (waking the sleeping thread costs more than
# the work), and the two are even at about 600,000 (tools/profile_prefill.py).
SERIAL_SMALL_OPS_ELEMENTS = 1 << 19
# An attention call of a small chunk with at least this many scores (query heads x queries x
# keys) runs on every thread even inside a serial chunk: a 64-token chunk against a carried
# state of 1,024 keys is ~0.6M scores and ~0.2 GFLOP, where one thread left ~30% of the
# chunk's time single-threaded (`tools/profile_prefill.py`: softmax, baddbmm and bmm of the
# mass pass). 0 keeps attention on one thread as before.
WIDE_ATTENTION_SCORES = 1 << 17


class SerialSmallOps:
    """Run a small chunk's elementwise and reduction ops on one thread and only its matrix
    products (every `nn.Linear` of `model`) on all of them.

    Each torch op over more than ~32k elements is an OpenMP parallel region; a 64-token chunk
    through one decoder layer runs dozens of them (norms, rotary, residual adds, activation),
    each doing microseconds of work and then waiting at a barrier for every thread. Passive
    waiting makes each of those waits a thread wake-up, and on a shared CPU a wait for a
    descheduled thread. With this, a chunk pays that only around its ~7 matrix products per
    layer, where it is a few per cent of the work. Results do not depend on it (the same
    kernels, run with fewer threads).

        serial = SerialSmallOps(language_model)     # hooks on its Linear modules
        with serial.chunk(tokens, hidden):          # one thread, Linear layers on all
            model(...)
        serial.close()                              # hooks removed
    """

    def __init__(self, model, threads: int | None = None) -> None:
        import torch

        self.threads = threads or torch.get_num_threads()
        self.active = False
        self._torch = torch
        self._handles = []
        if self.threads > 1:
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    self._handles.append(module.register_forward_pre_hook(self._widen, prepend=True))
                    self._handles.append(module.register_forward_hook(self._narrow))

    def _widen(self, module, args) -> None:
        if self.active:
            self._torch.set_num_threads(self.threads)

    def _narrow(self, module, args, output) -> None:
        if self.active:
            self._torch.set_num_threads(1)

    def applies(self, tokens: int, hidden: int) -> bool:
        return bool(self._handles) and tokens * hidden <= SERIAL_SMALL_OPS_ELEMENTS

    def attention(self, scores: int):
        """Context around one attention call of `scores` score entries: every thread when the
        call is large (WIDE_ATTENTION_SCORES) and a serial chunk is running, else unchanged."""
        wide = self.active and 0 < WIDE_ATTENTION_SCORES <= scores
        return _Widened(self._torch, self.threads) if wide else contextlib.nullcontext()

    def chunk(self, tokens: int, hidden: int):
        """Context: the chunk's ops on one thread (Linear layers on all), if it is small."""
        return _SerialChunk(self, self.applies(tokens, hidden))

    def close(self) -> None:
        """Remove the hooks and give torch its thread count back."""
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._torch.set_num_threads(self.threads)


class _Widened:
    def __init__(self, torch_module, threads: int) -> None:
        self.torch, self.threads = torch_module, threads

    def __enter__(self):
        self.torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc) -> None:
        self.torch.set_num_threads(1)


class _SerialChunk:
    def __init__(self, owner: SerialSmallOps, on: bool) -> None:
        self.owner, self.on = owner, on

    def __enter__(self):
        if self.on:
            self.owner.active = True
            self.owner._torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        if self.on:
            self.owner.active = False
            self.owner._torch.set_num_threads(self.owner.threads)

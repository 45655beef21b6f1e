"""statekv: linear-time long-video question answering with video VLMs (StateKV prefill).

    import statekv
    model = statekv.load("OpenGVLab/InternVL3-1B-hf")
    session = model.prefill("movie.mp4", method="statekv", budget=4096, max_frames=256)
    print(session.ask(["who enters the room?"])[0].answer, session.stats.lm_prefill_flops)

`method` is a name (`statekv.METHODS`) or any `statekv.policies.Policy` object. The names
below load on first use, so `import statekv` (and the command line) starts without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# Before anything imports torch: OpenMP threads that spin only briefly before sleeping keep
# the chunked prefill fast when other processes share the CPU (see statekv/threads.py).
from statekv import threads as _threads  # noqa: E402

_threads.prepare_openmp()

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "load": "statekv.session", "Model": "statekv.session", "Session": "statekv.session",
    "Settings": "statekv.session", "Stats": "statekv.session", "Answer": "statekv.answer",
    "METHODS": "statekv.policies", "Policy": "statekv.policies",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'statekv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

"""statekv: linear-time long-video question answering with video VLMs (StateKV prefill).

    import statekv
    model = statekv.load("OpenGVLab/InternVL3-1B-hf")
    session = model.prefill("movie.mp4", method="statekv", budget=4096, max_frames=256)
    print(session.ask(["who enters the room?"])[0].answer, session.stats.lm_prefill_flops)
"""

from typing import TYPE_CHECKING, Any

__all__ = ["load", "Model", "Session", "Answer", "Settings", "Stats", "METHODS"]
__version__ = "0.1.0.dev0"

# Imported on first use, so `import statekv.presets` (the CLI's small commands) loads no torch.
_LAZY = {"Answer": "statekv.answer", "METHODS": "statekv.policies", "Model": "statekv.session",
         "Session": "statekv.session", "Settings": "statekv.session", "Stats": "statekv.session",
         "load": "statekv.session"}

if TYPE_CHECKING:
    from statekv.answer import Answer
    from statekv.policies import METHODS
    from statekv.session import Model, Session, Settings, Stats, load


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'statekv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

"""statekv: linear-time long-video question answering with video VLMs (StateKV prefill).

    import statekv
    model = statekv.load("OpenGVLab/InternVL3-1B-hf")
    session = model.prefill("movie.mp4", method="statekv", budget=4096, max_frames=256)
    print(session.ask(["who enters the room?"])[0].answer, session.stats.lm_prefill_flops)
"""

# Before anything imports torch: OpenMP threads that sleep rather than spin while waiting keep
# the chunked prefill fast when other processes share the CPU (see statekv/threads.py).
from statekv import threads as _threads

_threads.prepare_openmp()

from statekv.answer import Answer  # noqa: E402
from statekv.policies import METHODS  # noqa: E402
from statekv.session import Model, Session, Settings, Stats, load  # noqa: E402

__all__ = ["load", "Model", "Session", "Answer", "Settings", "Stats", "METHODS"]
__version__ = "0.1.0.dev0"

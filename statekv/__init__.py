"""statekv: linear-time long-video question answering with video VLMs (StateKV prefill).

    import statekv
    model = statekv.load("OpenGVLab/InternVL3-1B-hf")
    session = model.prefill("movie.mp4", method="statekv", budget=4096, max_frames=256)
    print(session.ask(["who enters the room?"])[0].answer, session.stats.lm_prefill_flops)
"""

from statekv.answer import Answer
from statekv.policies import METHODS
from statekv.session import Model, Session, Settings, Stats, load

__all__ = ["load", "Model", "Session", "Answer", "Settings", "Stats", "METHODS"]
__version__ = "0.1.0.dev0"

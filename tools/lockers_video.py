"""Write a lockers-task video (statekv.demo.lockers) to a file, e.g. to run `statekv recall` on it.

    python tools/lockers_video.py lockers.mp4 --frames 128 --seed 0
    statekv recall lockers.mp4 --preset demo-lockers --fps 1 --max-frames 128 --budgets 292,1150,2304

Frames are written at 1 fps, nearly lossless (h264, crf 0 in yuv444p), so the model sees
what it was trained on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write(path: str, frames: int, seed: int) -> None:
    import av

    from statekv.demo import lockers

    video = lockers.generate_video(frames, seed)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=1, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv444p"
        for image in video.frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write(args.out, args.frames, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

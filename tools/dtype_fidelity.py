"""How often the demo model's answers in bfloat16 (or another dtype) agree with float32.

Runs `statekv eval`'s held-out questions through full, window and statekv twice, float32 and
`--dtype`, and prints one JSON record: per method, the first-answer-token agreement and each
dtype's accuracy.

    python tools/dtype_fidelity.py --dtype bfloat16 --videos 16 --frames 32 --budgets 64
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--budgets", default="64")
    args = parser.parse_args()
    from statekv.demo.evaluation import dtype_agreement

    result = dtype_agreement(args.dtype, args.frames,
                             [int(b) for b in args.budgets.split(",") if b], args.videos,
                             on_progress=lambda text: print(text, file=sys.stderr))
    print(json.dumps({"dtype": args.dtype, "frames": args.frames, "videos": args.videos,
                      "methods": result}))


if __name__ == "__main__":
    main()

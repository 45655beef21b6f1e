"""A/B of one prefill setting: large attention calls of small chunks on every thread or on one.

    python tools/wide_attention_ab.py --frames 64 --budget 1024 --repeats 3

Builds the preset's language model (random weights), prefills synthetic chunks with
`statekv` at the budget, alternating `statekv.threads.WIDE_ATTENTION_SCORES` between its
default ("wide") and 0 ("narrow": attention on one thread inside a serial chunk), and prints
the median seconds of each and their ratio. Results do not depend on the setting (tested).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smolvlm2-256m")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="2")
    args = parser.parse_args()
    import statekv  # noqa: F401  (before torch: statekv's OpenMP wait policy)
    from statekv import threads
    from statekv.commands import bench
    from statekv.models.synthetic import SyntheticAdapter, build_language_model, synthetic_chunks
    from statekv.policies import make_policy
    from statekv.prefill import prefill_chunks

    threads.apply(threads.resolve(args.threads))
    arch, _ = bench.resolve_architecture(args.preset)
    adapter = SyntheticAdapter(build_language_model(arch), arch.tokens_per_frame)

    def run() -> float:
        started = time.perf_counter()
        prefill_chunks(adapter, synthetic_chunks(args.frames, 1),
                       make_policy("statekv", budget=args.budget), frame_count=args.frames,
                       timestamps=())
        return time.perf_counter() - started

    default = threads.WIDE_ATTENTION_SCORES
    run()  # warm-up
    seconds: dict[str, list[float]] = {"wide": [], "narrow": []}
    for _ in range(args.repeats):
        for name, limit in (("wide", default), ("narrow", 0)):
            threads.WIDE_ATTENTION_SCORES = limit
            seconds[name].append(run())
    threads.WIDE_ATTENTION_SCORES = default
    wide, narrow = (statistics.median(seconds[k]) for k in ("wide", "narrow"))
    print(f"{args.preset}, {args.frames} frames, B = {args.budget}, {args.threads} threads: "
          f"wide {wide:.2f} s, narrow {narrow:.2f} s (medians of {args.repeats}); "
          f"narrow / wide {narrow / wide:.3f}")


if __name__ == "__main__":
    sys.exit(main())

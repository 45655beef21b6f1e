"""A/B of grouped prefill: several chunks per language-model forward, or one forward each.

    python tools/grouped_prefill_ab.py --frames 64 --budget 1024 --repeats 3

Builds the preset's language model (random weights) and prefills synthetic chunks with the
method, alternating `group_tokens` between the default (GROUP_FORWARD_TOKENS, bounded by
memory) and 0 (one forward per chunk), and prints the median language-model seconds of each
and their ratio. Results do not depend on the setting (tests/test_engine.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smolvlm2-256m")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--method", default="statekv", help="statekv or window")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--window-frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="2")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    args = parser.parse_args()
    import statekv  # noqa: F401  (before torch: statekv's OpenMP wait policy)
    import torch

    from statekv import threads
    from statekv.commands import bench
    from statekv.models.synthetic import SyntheticAdapter, build_language_model, synthetic_chunks
    from statekv.policies import make_policy
    from statekv.prefill import prefill_chunks

    threads.apply(threads.resolve(args.threads))
    arch, _ = bench.resolve_architecture(args.preset)
    model = build_language_model(arch, dtype=getattr(torch, args.dtype))
    adapter = SyntheticAdapter(model, arch.tokens_per_frame)
    policy = make_policy(args.method, budget=args.budget,
                         window_tokens=args.window_frames * arch.tokens_per_frame)

    def run(group_tokens: int | None) -> float:
        result = prefill_chunks(adapter, synthetic_chunks(args.frames, 1), policy,
                                frame_count=args.frames, timestamps=(), group_tokens=group_tokens)
        return result.seconds["lm_prefill_seconds"]

    run(None)  # warm-up
    seconds: dict[str, list[float]] = {"grouped": [], "one per chunk": []}
    for _ in range(args.repeats):
        for name, group_tokens in (("grouped", None), ("one per chunk", 0)):
            seconds[name].append(run(group_tokens))
    grouped, single = (statistics.median(seconds[k]) for k in ("grouped", "one per chunk"))
    runs = ", ".join(f"{k}: " + " ".join(f"{s:.2f}" for s in v) for k, v in seconds.items())
    print(f"{args.preset} ({args.dtype}), {args.frames} frames, {args.method}"
          f"{f' B = {args.budget}' if args.method == 'statekv' else ''}, {args.threads} threads: "
          f"grouped {grouped:.2f} s, one forward per chunk {single:.2f} s "
          f"(medians of {args.repeats}; {runs}); speed-up {single / grouped:.2f}x")


if __name__ == "__main__":
    sys.exit(main())

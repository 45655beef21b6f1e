"""A/B of grouped prefill: several chunks per language-model forward, or one forward each.

    python tools/grouped_prefill_ab.py --frames 64 --budget 1024 --repeats 3

Builds the preset's language model (random weights) and prefills synthetic chunks with the
method, alternating the tokens per forward between the default (GROUP_FORWARD_TOKENS, or
FULL_FORWARD_TOKENS for `full`, bounded by memory) and `--versus` (0: one forward per chunk),
and prints the median language-model seconds of each and their ratio. Results do not depend
on the setting (tests/test_engine.py).

    python tools/grouped_prefill_ab.py --method full --versus 8192   # full: larger forwards
"""

from __future__ import annotations

import argparse
import statistics
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smolvlm2-256m")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--method", default="statekv", help="statekv, window or full")
    parser.add_argument("--versus", type=int, default=0,
                        help="tokens per forward to compare the default with (0: one per chunk)")
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

    option = "full_forward_tokens" if args.method == "full" else "group_tokens"

    def run(tokens: int | None) -> float:
        result = prefill_chunks(adapter, synthetic_chunks(args.frames, 1), policy,
                                frame_count=args.frames, timestamps=(), **{option: tokens})
        return result.seconds["lm_prefill_seconds"]

    run(None)  # warm-up
    other = "one forward per chunk" if args.versus == 0 else f"{args.versus} tokens per forward"
    seconds: dict[str, list[float]] = {"default": [], other: []}
    for _ in range(args.repeats):
        for name, tokens in (("default", None), (other, args.versus)):
            seconds[name].append(run(tokens))
    default, versus = (statistics.median(seconds[k]) for k in ("default", other))
    runs = ", ".join(f"{k}: " + " ".join(f"{s:.2f}" for s in v) for k, v in seconds.items())
    print(f"{args.preset} ({args.dtype}), {args.frames} frames, {args.method}"
          f"{f' B = {args.budget}' if args.method == 'statekv' else ''}, {args.threads} threads: "
          f"default {default:.2f} s, {other} {versus:.2f} s "
          f"(medians of {args.repeats}; {runs}); default is {versus / default:.2f}x as fast")


if __name__ == "__main__":
    sys.exit(main())

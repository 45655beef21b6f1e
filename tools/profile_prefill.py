"""Profile statekv's chunked LM prefill with torch.profiler, optionally under competing load.

    python tools/profile_prefill.py --preset smolvlm2-256m --frames 3 --busy 2
    python tools/profile_prefill.py --preset smolvlm2-256m --frames 3 --busy 2 --default-wait

Prints the wall time, the number of torch ops per layer and chunk, and the ops by self CPU
time. `--default-wait` imports torch before statekv, so libgomp keeps its default (spinning)
wait policy: the state before statekv set its own wait policy. Under load the default
policy shows every small op (mul, add, pow, copy_) taking milliseconds instead of microseconds.
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smolvlm2-256m")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--busy", type=int, default=2, help="busy processes during the profile")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--rows", type=int, default=14)
    parser.add_argument("--default-wait", action="store_true",
                        help="import torch first: libgomp's default spinning wait")
    args = parser.parse_args()
    if args.default_wait:
        import torch  # noqa: F401  (before statekv: the wait policy stays the default)
    import statekv  # noqa: F401  (before torch otherwise: it sets statekv's wait policy)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from statekv import threads
    from statekv.commands import bench
    from statekv.models.synthetic import SyntheticAdapter, build_language_model, synthetic_chunks
    from statekv.policies import make_policy
    from statekv.prefill import prefill_chunks

    threads.apply(threads.resolve(args.threads))
    arch, _ = bench.resolve_architecture(args.preset)
    adapter = SyntheticAdapter(build_language_model(arch), arch.tokens_per_frame)
    policy = make_policy("statekv", budget=args.budget)

    def run():
        return prefill_chunks(adapter, synthetic_chunks(args.frames, 1), policy,
                              frame_count=args.frames, timestamps=())

    run()  # warm-up
    with bench.BusyProcesses(args.busy, seconds=1200):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            run()
            wall = time.perf_counter() - started
    averages = prof.key_averages()
    calls = sum(event.count for event in averages)
    print(f"threads {torch.get_num_threads()}, OpenMP wait {threads.openmp_wait_policy()}, "
          f"{args.busy} busy processes: {wall:.2f} s for {args.frames} frames; {calls} ops, "
          f"{calls / (arch.layers * (args.frames + 1)):.0f} per layer and chunk")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    sys.exit(main())

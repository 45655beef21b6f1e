"""Where a vision tower's time goes, per dtype: torch.profiler over a few frames' forward.

    python tools/profile_vision.py --preset smolvlm2-256m --frames 4 --dtypes float32,bfloat16

Builds the preset's real vision tower with random weights (as `statekv bench --e2e` does),
runs the tower and projector on `--frames` random frames in each dtype, and prints the wall
seconds per frame and the ops by self CPU time, so the share that bfloat16 cannot speed up
(attention kernels) is measured rather than guessed.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smolvlm2-256m")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()

    import torch

    from statekv import threads
    from statekv.commands.e2e import random_model
    from statekv.presets import load_preset

    threads.apply(threads.resolve(args.threads))
    preset = load_preset(args.preset)
    for name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        dtype = getattr(torch, name)
        model, _ = random_model(preset, dtype, seed=0)
        size = model.config.vision_config.image_size
        pixels = torch.randn(args.frames, 3, size, size, dtype=dtype)
        tower = model.model.vision_model
        projector = model.model.connector
        with torch.inference_mode():
            projector(tower(pixel_values=pixels[:1]).last_hidden_state)  # warm-up
            started = time.perf_counter()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                projector(tower(pixel_values=pixels).last_hidden_state)
            wall = time.perf_counter() - started
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) or 1
        print(f"{name}: {wall / args.frames:.2f} s per frame ({args.frames} frames, "
              f"{torch.get_num_threads()} threads)")
        for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.rows]:
            print(f"  {event.key:<40} {100 * event.self_cpu_time_total / total:5.1f}%  "
                  f"{event.self_cpu_time_total / 1e6:6.2f} s  x{event.count}")


if __name__ == "__main__":
    main()

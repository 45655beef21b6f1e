"""Median wall-clock and CPU seconds of the CLI's small commands, for one or more source trees.

    python tools/startup_times.py VIDEO [--runs 5] [--tree OLD_CHECKOUT --tree .]

Each command runs in a fresh interpreter with the tree on PYTHONPATH and an empty Hugging
Face cache (so `info` uses the preset's numbers); trees are interleaved run by run, so a
busy machine slows them alike. CPU seconds (user + system) depend less on other load than
wall-clock seconds.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", help="a video file for `ask` (usage error) and `info`")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tree", action="append", help="source tree(s); default: this one")
    args = parser.parse_args()
    trees = args.tree or [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    commands = [["--help"], ["ask", "--help"], ["presets"], ["presets", "show", "qwen3-vl-2b"],
                ["ask", args.video], ["info", args.video, "--device", "cpu"]]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as empty_cache:
        for _ in range(args.runs):
            for command in commands:
                for tree in trees:
                    env = dict(os.environ, PYTHONPATH=tree, HF_HOME=empty_cache)
                    before = resource.getrusage(resource.RUSAGE_CHILDREN)
                    started = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "statekv_cli.app", *command], cwd=tree,
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    wall = time.perf_counter() - started
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                    times.setdefault((" ".join(command), tree), []).append((wall, cpu))
    for command in commands:
        name = " ".join(command)
        cells = []
        for tree in trees:
            runs = times[(name, tree)]
            cells.append(f"{tree}: wall {statistics.median(w for w, _ in runs):5.2f} s, "
                         f"cpu {statistics.median(c for _, c in runs):5.2f} s")
        print(f"statekv {name:38s} " + " | ".join(cells))
    print(f"median of {args.runs} runs; load average at the end: "
          + ", ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()

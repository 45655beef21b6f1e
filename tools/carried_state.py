"""What does a selection method carry? A diagnostic for the demo model's fidelity benchmark.

    python tools/carried_state.py                    # 16 test videos, 32 frames, budget 64
    python tools/carried_state.py --budget 128 --videos 32

Prefills held-out synthetic videos with the shipped demo model one frame per chunk, records
the carried state after every chunk (per layer and KV head), and reports for statekv, random
selection and the recency window at the same budget:

* recall: how often the carried state holds the visual token of each slot's latest paint
  (the one token a later frame needs to know that slot's colour), over chunks, layers, heads;
* composition: which kinds of tokens fill the carried state (frame-label text, <img>/</img>
  markers, paint / glyph / other visual tokens), next to their share of the sequence.

Only chunks after which the video no longer fits in the budget count. Chance for recall is
about budget / tokens so far; a selection that finds the informative tokens beats it, a
window wins only when the paint is recent.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from statekv import video as video_module
from statekv.demo.evaluation import synthetic
from statekv.demo.evaluation import MethodSpec, load_demo
from statekv.prefill import prefill_chunks
from statekv.session import load

SLOTS = len(synthetic.SLOTS)


def token_kinds(adapter, video) -> tuple[list[str], list[int], list[dict[int, int]]]:
    """The kind of every sequence position, where each frame's tokens end, and per frame the
    position of each slot's latest paint token (after that frame's event)."""
    kinds = ["prefix"] * len(adapter.tokenize(adapter.prompt(None).prefix))
    latest: dict[int, int] = {}
    ends, history = [], []
    for i, event in enumerate(video.events):
        ids = adapter.frame_token_ids(i)
        start, first_visual = len(kinds), len(kinds) + len(ids) - 1 - SLOTS
        kinds += ["label"] * (len(ids) - SLOTS - 2) + ["<img>"]
        for s in range(SLOTS):
            touched = event.slot == s
            kinds.append("paint" if touched and event.kind == "paint"
                         else "glyph" if touched and event.kind == "probe" else "visual")
        kinds.append("</img>")
        assert len(kinds) == start + len(ids)
        ends.append(len(kinds))
        if event.kind == "paint":
            latest[event.slot] = first_visual + event.slot
        history.append(dict(latest))
    return kinds, ends, history


def record(model, video, spec: MethodSpec, seed: int) -> list[tuple[int, torch.Tensor]]:
    """(end of the chunk just prefilled, carried positions (kv_heads, budget)) per chunk and layer."""
    kept: list[tuple[int, torch.Tensor]] = []
    chunks = video_module.chunks_of(video.frames, video.timestamps, 1)
    prefill_chunks(model.adapter, chunks, spec.policy(model.adapter.tokens_per_frame(), seed),
                   frame_count=len(video.frames), timestamps=tuple(video.timestamps),
                   frame_size=video.frames.shape[1:3],
                   on_carried=lambda layer, seen, positions: kept.append((seen, positions.clone())))
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: the shipped one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load(args.model, device="cpu", dtype="float32") if args.model else load_demo()
    layers = model.adapter.model.config.text_config.num_hidden_layers
    hits = collections.Counter()
    tries = collections.Counter()
    filled = {m: collections.Counter() for m in ("statekv", "random", "window")}
    sequence = collections.Counter()
    for index, video in enumerate(synthetic.split_videos("test", args.videos, args.frames)):
        kinds, frame_end, history = token_kinds(model.adapter, video)
        sequence.update(kinds)
        for method in ("statekv", "random"):
            frame_of = {end: i for i, end in enumerate(frame_end)}
            states = record(model, video, MethodSpec(method, args.budget), index)
            matched = sum(end in frame_of for end, _ in states)
            if matched != args.frames * layers:
                raise SystemExit(f"token layout mismatch: {matched} chunk ends match frames")
            for end, positions in states:
                full = end in frame_of and end > args.budget  # only once selection matters
                if full:  # the state the next frame will see
                    frame = frame_of[end]
                    flat = positions.flatten().tolist()
                    filled[method].update(kinds[p] for p in flat)
                    for target in history[frame].values():
                        for head in positions:
                            tries[method] += 1
                            hits[method] += int(target in set(head.tolist()))
        for frame in range(args.frames):  # window: the last `budget` tokens before the next chunk
            if frame_end[frame] <= args.budget:
                continue
            lo = frame_end[frame] - args.budget
            window = set(range(lo, frame_end[frame]))
            filled["window"].update(kinds[p] for p in window)
            for target in history[frame].values():
                tries["window"] += layers
                hits["window"] += layers * int(target in window)
    print(f"{args.videos} test videos of {args.frames} frames, budget {args.budget} tokens "
          f"per layer and KV head")
    print("latest-paint recall (carried state holds each slot's latest paint token):")
    for method in ("statekv", "random", "window"):
        print(f"  {method:8s} {hits[method] / max(1, tries[method]):6.1%}")
    total = sum(sequence.values())
    print("composition of the carried state (share of the sequence in brackets):")
    for kind, count in sequence.most_common():
        shares = "  ".join(f"{m} {filled[m][kind] / max(1, sum(filled[m].values())):5.1%}"
                           for m in ("statekv", "random", "window"))
        print(f"  {kind:8s} [{count / total:5.1%}]  {shares}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

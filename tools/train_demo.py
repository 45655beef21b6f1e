"""Train statekv's shipped demo model: a tiny InternVL on statekv.synthetic videos (CPU, minutes).

    python tools/train_demo.py              # the shipped checkpoint (about 55 CPU-minutes)
    python tools/train_demo.py --steps 3 --out scratch     # smoke test

The model is a real `InternVLForConditionalGeneration` built by `statekv.tiny` (trained BPE
tokenizer, InternVLProcessor), trained end to end (vision tower + projector + language model)
with ordinary full causal attention. Sequences are laid out exactly as statekv's InternVL
adapter lays them out at inference (same token ids, same positions). Each video is followed by
all its questions, each in its own block that sees the video and itself only and starts at the
same position (as `Session.ask` asks them: one at a time, the cache rewound); the loss is on
the answer token and the end-of-turn token, plus (weight `--aux-weight`, default 0.5)
auxiliary targets on the frames (`--aux`):

* ``slots`` (the default, the shipped model's): every frame's four visual tokens (one per
  screen slot: the pixel shuffle keeps the quadrants in raster order) predict the colour their
  slot has after that frame. Only a paint frame shows it; every other frame must fetch the
  slot's latest paint from earlier frames during prefill, as a real VLM's frame tokens carry
  context forward. A causal transformer cannot relay that state frame to frame (each hop costs
  a layer), so the tokens learn to look back directly, which is what makes the prefill method
  matter: isolated prefill drops to about chance on probe questions.
* ``frame``: only each event frame's last token (`</img>`) predicts the colour of the slot the
  event touches (the first shipped model's). Weaker: that model learned to answer from the
  detailed cache at question time and its isolated floor sat only 12 points below full.

Nothing at inference reads those positions' predictions. Fixed seeds and one thread: the same
command gives the same weights on the same machine and torch version. The summary written
next to the weights (`training.json`) holds the held-out accuracy with full attention and with
an isolated mask (each frame's tokens see only the prompt and their own frame: exactly what
`--method isolated` prefill computes). `--eval-every N` logs both while training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from statekv.demo import lockers, synthetic

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "statekv" / "demo" / "checkpoint"
ARCH = {"image_size": 32, "patch_size": 8, "text_layers": 5, "hidden": 64, "heads": 4,
        "kv_heads": 2, "vision_layers": 1}
# (fraction of the steps done, video length in frames): a length curriculum
CURRICULUM = ((0.2, 8), (0.4, 16), (1.0, 32))  # the shipped model's; 32 = training length
# `--task lockers` (statekv.demo.lockers): 64x64 frames, patch 4 -> 64 visual tokens per frame
TASKS = {"slots": synthetic, "lockers": lockers}
# two heads of 32: with head size 16 only about three of the eight rotary frequency pairs turn
# slowly enough over a few thousand tokens to match content (a locker) at any distance, and the
# model never learned the look-back; at 32 (six slow pairs) it does (docs/demo-task.md)
LOCKERS_ARCH = {"image_size": 64, "patch_size": 4, "heads": 2,  # kv_heads: ARCH's 2
                "max_positions": 16384}  # 128-frame videos are ~9,300 positions
LOCKERS_CURRICULUM = ((0.3, 8), (0.55, 16), (0.85, 32), (1.0, 64))
# command-line defaults per task (the shipped checkpoints' settings)
TASK_DEFAULTS = {
    "slots": {"steps": 10000, "batch": 8, "lr": 3e-3, "heads": ARCH["heads"], "eval_frames": None},
    "lockers": {"steps": 3600, "batch": 4, "lr": 1e-3, "heads": LOCKERS_ARCH["heads"],
                "eval_frames": 64},
}


class Layout:
    """Token ids exactly as statekv's InternVL adapter builds them."""

    def __init__(self, model, processor) -> None:
        from statekv.models.internvl import InternVLAdapter

        self.adapter = InternVLAdapter(model, processor)
        self.prompt = self.adapter.prompt(None)
        self.prefix = self.adapter.tokenize(self.prompt.prefix)
        self.eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.context_id = self.adapter.context_id
        self._frames: dict[int, list[int]] = {}

    def frame(self, index: int) -> list[int]:
        if index not in self._frames:
            self._frames[index] = self.adapter.frame_token_ids(index)
        return self._frames[index]

    def question(self, text: str) -> list[int]:
        return self.adapter.tokenize(self.prompt.question_text(text))

    def answer(self, text: str) -> int:
        ids = self.adapter.tokenize(text)
        assert len(ids) == 1, f"answers must be one token, {text!r} is {ids}"
        return ids[0]


def pixel_values(frames: np.ndarray, processor) -> torch.Tensor:
    """(n, 3, H, W) float32 as InternVLVideoProcessor makes them (frames already at its size)."""
    vp = processor.video_processor
    x = torch.from_numpy(frames).float().permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(vp.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(vp.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def question_block(layout: Layout, question) -> tuple[list[int], list[int], list[int]]:
    """One question's tokens (question, answer, end of turn), targets and kinds: the last
    question token predicts the answer (its kind marked), the answer the end of turn."""
    qids = layout.question(question.text) + [layout.answer(question.answer)]
    block = qids + [layout.eos]
    targets, kinds = [-100] * len(block), [-1] * len(block)
    targets[len(qids) - 2], targets[len(qids) - 1] = qids[-1], layout.eos
    kinds[len(qids) - 2] = synthetic.KINDS.index(question.kind)
    return block, targets, kinds


def aux_hidden(lm, result, aux_layer: int | None) -> torch.Tensor | None:
    """The normed residual after `aux_layer` decoder layers (None: the last layer's output,
    which `last_hidden_state` already is). `result.hidden_states` holds the embeddings, then
    each layer's output, the last one already normed."""
    if aux_layer is None or aux_layer >= len(result.hidden_states) - 1:
        return None
    return lm.norm(result.hidden_states[aux_layer])


def build_batch(videos, layout: Layout, isolated: bool = False, aux: str | None = None,
                with_mask: bool = True):
    """ids (B, L), position ids (B, L), mask (B, 1, L, L) bool, targets (B, L) (-100 = no loss),
    kinds (B, L) question kind index (-1 = none), context positions of each frame token."""
    rows = []
    for v in videos:
        ids, seg = list(layout.prefix), [0] * len(layout.prefix)
        targets = [-100] * len(ids)
        for i, target in enumerate(_aux_targets(v, aux, layout)):
            f = layout.frame(i)
            ids += f
            seg += [i + 1] * len(f)
            targets += target
        video_len = len(ids)
        pos = list(range(video_len))
        kinds = [-1] * video_len
        for j, q in enumerate(v.questions):
            block, t, k = question_block(layout, q)
            ids += block
            seg += [-(j + 1)] * len(block)
            pos += list(range(video_len, video_len + len(block)))
            targets += t
            kinds += k
        rows.append((ids, seg, pos, targets, kinds, video_len))
    length = max(len(r[0]) for r in rows)
    B = len(rows)
    ids_t = torch.full((B, length), layout.eos, dtype=torch.long)
    pos_t = torch.zeros((B, length), dtype=torch.long)
    tgt_t = torch.full((B, length), -100, dtype=torch.long)
    kind_t = torch.full((B, length), -1, dtype=torch.long)
    mask = torch.zeros((B, 1, length, length), dtype=torch.bool) if with_mask else None
    causal = torch.ones(length, length, dtype=torch.bool).tril() if with_mask else None
    for b, (ids, seg, pos, targets, kinds, video_len) in enumerate(rows):
        n = len(ids)
        ids_t[b, :n] = torch.tensor(ids)
        pos_t[b, :n] = torch.tensor(pos)
        pos_t[b, n:] = torch.arange(n, length)
        tgt_t[b, :n] = torch.tensor(targets)
        kind_t[b, :n] = torch.tensor(kinds)
        if not with_mask:
            continue
        s = torch.tensor(seg + [-10_000 - i for i in range(length - n)])
        same = s[:, None] == s[None, :]
        video_q = s[:, None] > -1  # a video token
        video_k = s[None, :] > -1
        if isolated:
            allowed_video = video_q & video_k & (same | (s[None, :] == 0))
        else:
            allowed_video = video_q & video_k
        question_q = (s[:, None] < 0) & (s[:, None] > -10_000)
        allowed = allowed_video | (question_q & video_k) | same
        mask[b, 0] = allowed & causal
    return ids_t, pos_t, mask, tgt_t, kind_t


def _aux_targets(video, aux: str | None, layout: Layout) -> list[list[int]]:
    """Per frame, the auxiliary targets of its tokens (-100: none).

    "lockers" (the lockers task): each visual token predicts the colour its locker has after
    this frame's event (every token belongs to one locker: 2x2 tokens each), while its locker
    has been painted exactly once (a probed locker's state up to its probe; later the target
    would need "the most recent paint", which a tiny model's rotary frequencies tell only
    weakly: docs/demo-task.md);
    "slots": each slot's visual token (InternVL's pixel shuffle keeps the quadrants in raster
    order, one token each) predicts the colour that slot has after this frame's event;
    "frame": the frame's last token predicts the colour of the slot its event touches."""
    n = len(video.frames)
    lengths = [len(layout.frame(i)) for i in range(n)]
    if not aux:
        return [[-100] * length for length in lengths]
    if aux == "lockers":
        owner = lockers.token_lockers()
        rows, paints = [], {}
        for i, colours in enumerate(lockers.locker_colours(video.events)):
            event = video.events[i]
            if event.kind == "paint":
                paints[event.slot] = paints.get(event.slot, 0) + 1
            ids, target, visual = layout.frame(i), [], 0
            for token in ids:
                locker = owner[visual] if token == layout.context_id else None
                visual += token == layout.context_id
                once = locker in colours and paints.get(locker) == 1  # one paint: no recency
                target.append(layout.answer(colours[locker]) if once else -100)
            rows.append(target)
        return rows
    if aux == "frame":
        return [[-100] * (length - 1) + [layout.answer(c) if c else -100]
                for length, c in zip(lengths, _frame_colours(video))]
    if aux != "slots":
        raise ValueError(f"unknown aux target {aux!r}")
    tokens = len(synthetic.SLOTS)
    return [[-100] * (length - tokens - 1)
            + [layout.answer(colours[s]) if s in colours else -100 for s in range(tokens)] + [-100]
            for colours, length in zip(synthetic.slot_colours(video.events), lengths)]


def _frame_colours(video) -> list[str | None]:
    """Per frame, the colour of the slot its event touches, after the event (None: no event)."""
    return [colours.get(e.slot) if e.kind != "empty" else None
            for e, colours in zip(video.events, synthetic.slot_colours(video.events))]


def _embed(model, layout: Layout, processor, ids: torch.Tensor, videos) -> torch.Tensor:
    """Token embeddings with the videos' frame features in their image-context slots."""
    embeds = model.get_input_embeddings()(ids)
    frames = np.concatenate([v.frames for v in videos])
    cfg = model.config
    features = model.model.get_image_features(
        pixel_values=pixel_values(frames, processor),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        return_dict=True).pooler_output
    features = features.reshape(-1, features.shape[-1])
    image = ids == layout.context_id
    return embeds.masked_scatter(image.unsqueeze(-1), features.to(embeds.dtype))


def forward_apart(model, layout: Layout, processor, videos, aux: str | None = None,
                  aux_layer: int | None = None):
    """As `forward`, with each question apart: the video runs once (one plain causal sequence,
    its keys and values kept), then every question runs as its own batch row against its
    video's keys and values, at the positions inference gives it. That is exactly what
    `Session.ask` computes (no question sees another), at the cost of one short extra forward."""
    rows, blocks, owners = [], [], []
    for b, v in enumerate(videos):
        ids = list(layout.prefix)
        targets = [-100] * len(ids)
        for i, target in enumerate(_aux_targets(v, aux, layout)):
            ids += layout.frame(i)
            targets += target
        rows.append((ids, targets))
        for q in v.questions:
            blocks.append(question_block(layout, q))
            owners.append(b)
    video_len = len(rows[0][0])
    assert all(len(ids) == video_len for ids, _ in rows), "a batch's videos must be equally long"
    ids_v = torch.tensor([ids for ids, _ in rows])
    tgt_v = torch.tensor([t for _, t in rows])
    embeds = _embed(model, layout, processor, ids_v, videos)
    lm = model.model.language_model
    pos_v = torch.arange(video_len).expand(len(videos), -1)
    result = lm(inputs_embeds=embeds, position_ids=pos_v, use_cache=True,
                output_hidden_states=aux_layer is not None)
    early = aux_hidden(lm, result, aux_layer)  # the video part holds only auxiliary targets
    hidden_v = result.last_hidden_state if early is None else early
    cache = result.past_key_values
    cache.batch_select_indices(torch.tensor(owners))  # one copy of its video per question
    width = max(len(ids) for ids, _, _ in blocks)
    ids_q = torch.full((len(blocks), width), layout.eos, dtype=torch.long)
    tgt_q = torch.full((len(blocks), width), -100, dtype=torch.long)
    kind_q = torch.full((len(blocks), width), -1, dtype=torch.long)
    for j, (ids, targets, kinds) in enumerate(blocks):
        ids_q[j, :len(ids)] = torch.tensor(ids)
        tgt_q[j, :len(ids)] = torch.tensor(targets)
        kind_q[j, :len(ids)] = torch.tensor(kinds)
    pos_q = torch.arange(video_len, video_len + width).expand(len(blocks), -1)
    hidden_q = lm(inputs_embeds=model.get_input_embeddings()(ids_q), position_ids=pos_q,
                  past_key_values=cache, use_cache=True).last_hidden_state
    head = model.get_output_embeddings()
    seen_v, seen_q = tgt_v != -100, tgt_q != -100
    logits = torch.cat([head(hidden_v[seen_v]), head(hidden_q[seen_q])])
    targets = torch.cat([tgt_v[seen_v], tgt_q[seen_q]])
    kinds = torch.cat([torch.full((int(seen_v.sum()),), -1, dtype=torch.long), kind_q[seen_q]])
    return logits, targets, kinds


def forward(model, layout: Layout, processor, videos, isolated: bool = False, aux: str | None = None,
            causal: bool = False, aux_layer: int | None = None):
    """Logits at the supervised positions, their targets and question kinds (-1: not a question).

    `causal` (the lockers task's training): one plain causal sequence, the fused kernel and no
    mask tensor (O(length) memory, not O(length^2)); the question blocks then also see the
    earlier questions of their video (at inference each sees only the video), a small
    mismatch bought for a several-fold cheaper step.

    `aux_layer` K: the auxiliary targets are read from the residual stream after K decoder
    layers (through the final norm and the output head) instead of after the last, so what a
    frame's tokens fetch is in place early enough for the question's later layers to read it."""
    ids, pos, mask, targets, kinds = build_batch(videos, layout, isolated, aux, not causal)
    embeds = _embed(model, layout, processor, ids, videos)
    lm = model.model.language_model
    result = lm(inputs_embeds=embeds, position_ids=pos,
                attention_mask={"full_attention": mask, "sliding_attention": mask},
                use_cache=False, output_hidden_states=aux_layer is not None)
    hidden = result.last_hidden_state
    supervised = targets != -100
    early = aux_hidden(lm, result, aux_layer)
    if early is not None:  # the auxiliary positions read the earlier layer
        auxiliary = supervised & (kinds < 0) & (targets != layout.eos)
        hidden = torch.where(auxiliary.unsqueeze(-1), early, hidden)
    logits = model.get_output_embeddings()(hidden[supervised])
    return logits, targets[supervised], kinds[supervised]


def length_at(step: int, steps: int, curriculum=None) -> int:
    curriculum = curriculum or CURRICULUM
    for fraction, frames in curriculum:
        if step < fraction * steps:
            return frames
    return curriculum[-1][1]


def lr_factor(step: int, steps: int, schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """The learning rate at `step` as a fraction of the peak: a linear warmup (100 steps at
    most), then "cosine" (decay from the first step to 5% at the end) or "wsd" (warmup, stable,
    decay: the peak held until the last `decay_fraction` of the steps, then a cosine to 5%), which
    keeps the full rate through a curriculum's late, long stages."""
    warmup = max(1, min(100, steps // 10))
    ramp = min(1.0, (step + 1) / warmup)
    if schedule == "cosine":
        progress = min(1.0, step / max(1, steps))
    elif schedule == "wsd":
        start = (1 - decay_fraction) * steps
        progress = min(1.0, max(0.0, step - start) / max(1.0, decay_fraction * steps))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return ramp * (0.5 * (1 + math.cos(math.pi * progress))) * 0.95 + 0.05


def accuracy(model, layout, processor, frames: int, videos: int, isolated: bool = False,
             batch: int = 8, task: str = "slots") -> dict[str, float]:
    """Held-out (test split) first-answer-token accuracy per question kind, full attention;
    for the lockers task also beyond the 16-frame window ("old": evidence age > 16)."""
    hits = {k: [0, 0] for k in (*synthetic.KINDS, "old")}
    model.eval()
    with torch.no_grad():
        for start in range(0, videos, max(1, batch)):
            vids = TASKS[task].split_videos("test", min(batch, videos - start), frames, start)
            if task == "lockers" and not isolated:  # each question apart, as at inference
                logits, targets, kinds = forward_apart(model, layout, processor, vids)
            else:
                logits, targets, kinds = forward(model, layout, processor, vids, isolated)
            answer = kinds >= 0
            right = logits[answer].argmax(-1) == targets[answer]
            ages = [getattr(q, "evidence_age", 0) for v in vids for q in v.questions]
            for k, ok, age in zip(kinds[answer].tolist(), right.tolist(), ages):
                hits[synthetic.KINDS[k]][0] += int(ok)
                hits[synthetic.KINDS[k]][1] += 1
                if age > lockers.WINDOW_FRAMES:
                    hits["old"][0] += int(ok)
                    hits["old"][1] += 1
    return {k: h / n for k, (h, n) in hits.items() if n}


def build_base(workdir: Path, seed: int, arch=None):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from statekv.testing.internvl import build_tiny_internvl

    path = build_tiny_internvl(workdir, seed=seed, **{**ARCH, **(arch or {})})
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32,
                                                        attn_implementation="sdpa")
    return model, processor


def train(out: Path, steps: int = 10000, batch: int = 8, lr: float = 3e-3, seed: int = 0,
          eval_videos: int = 64, log=print, threads: int | None = None,
          aux_weight: float = 0.5, curriculum=None, aux: str = "slots", arch=None,
          eval_every: int = 0, task: str = "slots", eval_frames: int | None = None,
          max_cpu_seconds: float | None = None, max_wall_seconds: float | None = None,
          lr_schedule: str = "cosine", decay_fraction: float = 0.2,
          aux_layer: int | None = None, questions: str = "causal") -> dict:
    """Train, save the checkpoint to `out`, return a summary (losses, accuracies, seconds)."""
    if threads:
        torch.set_num_threads(threads)
    tasks = TASKS[task]
    if task == "lockers":
        arch = {**LOCKERS_ARCH, **(arch or {})}
        curriculum = curriculum or LOCKERS_CURRICULUM
    torch.manual_seed(seed)
    started = time.process_time()
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build_base(Path(tmp), seed, arch)
    layout = Layout(model, processor)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: lr_factor(s, steps, lr_schedule, decay_fraction))
    losses, answer_losses, aux_losses = [], [], []
    model.train()
    for step in range(steps):
        frames = length_at(step, steps, curriculum)
        vids = [tasks.generate_video(frames, tasks.split_seed("train", step * batch + b, frames))
                for b in range(batch)]
        if questions == "apart":
            logits, targets, kinds = forward_apart(model, layout, processor, vids,
                                                   aux=aux if aux_weight > 0 else None,
                                                   aux_layer=aux_layer)
        else:
            logits, targets, kinds = forward(model, layout, processor, vids,
                                             aux=aux if aux_weight > 0 else None,
                                             causal=task == "lockers", aux_layer=aux_layer)
        per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        question = kinds >= 0
        answers = question | (targets == layout.eos)
        loss = per_token[answers].mean()
        answer_losses.append(loss.item())
        if aux_weight > 0 and (~answers).any():
            aux_loss = per_token[~answers].mean()
            aux_losses.append(aux_loss.item())
            loss = loss + aux_weight * aux_loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        schedule.step()
        losses.append(loss.item())
        if eval_every and step and step % eval_every == 0:
            frames_eval = eval_frames or length_at(steps - 1, steps, curriculum)
            log(f"step {step} eval {frames_eval} frames: full "
                f"{accuracy(model, layout, processor, frames_eval, 16, batch=2, task=task)} isolated "
                f"{accuracy(model, layout, processor, frames_eval, 8, True, 1, task)}")
            model.train()
        if step % 50 == 0 or step == steps - 1:
            aux_part = f" aux {np.mean(aux_losses[-50:]):.4f}" if aux_losses else ""
            log(f"step {step} frames {frames} loss {np.mean(losses[-50:]):.4f} "
                f"(answers {np.mean(answer_losses[-50:]):.4f}{aux_part}) "
                f"cpu {time.process_time() - started:.0f}s wall {time.perf_counter() - wall:.0f}s")
        if (max_cpu_seconds and time.process_time() - started > max_cpu_seconds) or \
                (max_wall_seconds and time.perf_counter() - wall > max_wall_seconds):
            log(f"stopping at step {step}: the time budget is spent")
            steps_done = step + 1
            break
    else:
        steps_done = steps
    model.eval()
    summary = {"task": task, "steps": steps, "steps_done": steps_done, "batch": batch, "lr": lr, "lr_schedule": lr_schedule,
               **({"decay_fraction": decay_fraction} if lr_schedule == "wsd" else {}),
               "seed": seed, "aux_weight": aux_weight,
               **({"aux_layer": aux_layer} if aux_layer is not None else {}),
               **({"questions": questions} if task == "lockers" else {}),
               "aux": aux, "arch": {**ARCH, **(arch or {})}, "curriculum": curriculum or CURRICULUM,
               "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])), "losses": losses,
               "cpu_seconds": time.process_time() - started,
               "wall_seconds": time.perf_counter() - wall}
    if eval_videos:
        length = eval_frames or length_at(steps - 1, steps, curriculum)
        summary["test_frames"] = length
        summary["test_accuracy"] = accuracy(model, layout, processor, length, eval_videos,
                                            batch=2, task=task)
        summary["test_accuracy_isolated"] = accuracy(model, layout, processor, length,
                                                     eval_videos, isolated=True, batch=1, task=task)
        log(json.dumps({k: v for k, v in summary.items() if k != "losses"}))
    save(model, processor, out, summary)
    return summary


def save(model, processor, out: Path, summary: dict) -> None:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    kept = {k: v for k, v in summary.items() if k != "losses"}
    (out / "training.json").write_text(json.dumps(kept, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=None, help="default: 10000 (slots), 3600 (lockers)")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 (slots), 4 (lockers)")
    parser.add_argument("--lr", type=float, default=None, help="default: 3e-3 (slots), 1e-3 (lockers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-videos", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--aux-weight", type=float, default=0.5,
                        help="weight of the auxiliary per-frame colour targets (0: answers only)")
    parser.add_argument("--task", choices=tuple(TASKS), default="slots",
                        help="slots: statekv.demo.synthetic (the first demo model); lockers: "
                             "statekv.demo.lockers (64 visual tokens a frame, evidence ages)")
    parser.add_argument("--eval-frames", type=int, default=None,
                        help="video length of the held-out evaluation (default: the last "
                             "curriculum length)")
    parser.add_argument("--max-cpu-minutes", type=float, default=None,
                        help="stop training once this much CPU time is spent (a stated budget)")
    parser.add_argument("--max-wall-minutes", type=float, default=None,
                        help="stop training (and save) once this much wall time has passed")
    parser.add_argument("--aux", choices=("slots", "frame", "lockers"), default=None,
                        help="auxiliary targets: every slot token's current colour, or the touched "
                             "slot's colour at each event frame's last token; lockers: every "
                             "locker token's current colour (default: slots, or lockers for "
                             "--task lockers)")
    parser.add_argument("--aux-layer", type=int, default=None,
                        help="read the auxiliary targets after this many decoder layers "
                             "(default: after the last)")
    parser.add_argument("--questions", choices=("causal", "apart"), default="causal",
                        help="lockers: how the training sequence holds a video's questions: "
                             "causal (one sequence, a question also sees the earlier ones) or "
                             "apart (each question its own row against the video's keys and "
                             "values, exactly as at inference)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="log held-out accuracy (full and isolated) every N steps")
    parser.add_argument("--hidden", type=int, default=ARCH["hidden"])
    parser.add_argument("--layers", type=int, default=ARCH["text_layers"])
    parser.add_argument("--heads", type=int, default=None, help="default: 4 (slots), 2 (lockers)")
    parser.add_argument("--vision-layers", type=int, default=None,
                        help="layers of the tiny vision tower (default: 1)")
    parser.add_argument("--rope-theta", type=float, default=None,
                        help="the language model's rotary base (default: 1e6, as Qwen2)")
    parser.add_argument("--schedule", choices=("cosine", "wsd"), default="cosine",
                        help="learning-rate schedule: cosine decay over all steps, or wsd "
                             "(warmup, stable, then a cosine decay over --decay-fraction)")
    parser.add_argument("--decay-fraction", type=float, default=0.2,
                        help="with --schedule wsd: the share of the steps spent decaying")
    parser.add_argument("--curriculum", default=None,
                        help="frames:until-fraction pairs, e.g. 8:0.3,16:0.6,32:1.0")
    args = parser.parse_args(argv)
    if not 0 < args.decay_fraction <= 1:
        parser.error(f"--decay-fraction must lie in (0, 1], not {args.decay_fraction}")
    if args.questions == "apart" and args.task != "lockers":
        parser.error("--questions apart is for --task lockers")
    if args.aux_layer is not None and not 1 <= args.aux_layer <= args.layers:
        parser.error(f"--aux-layer must lie in 1..{args.layers} (--layers), not {args.aux_layer}")
    for name, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    curriculum = None
    if args.curriculum:
        pairs = [item.split(":") for item in args.curriculum.split(",")]
        curriculum = tuple((float(f), int(n)) for n, f in pairs)
    aux = args.aux or ("lockers" if args.task == "lockers" else "slots")
    train(args.out, args.steps, args.batch, args.lr, args.seed, args.eval_videos,
          threads=args.threads, log=lambda s: print(s, flush=True), aux_weight=args.aux_weight,
          curriculum=curriculum, aux=aux, eval_every=args.eval_every,
          arch={"hidden": args.hidden, "text_layers": args.layers, "heads": args.heads,
                "kv_heads": min(ARCH["kv_heads"], args.heads),
                **({"rope_theta": args.rope_theta} if args.rope_theta else {}),
                **({"vision_layers": args.vision_layers} if args.vision_layers else {})},
          task=args.task, eval_frames=args.eval_frames,
          max_cpu_seconds=args.max_cpu_minutes * 60 if args.max_cpu_minutes else None,
          max_wall_seconds=args.max_wall_minutes * 60 if args.max_wall_minutes else None,
          lr_schedule=args.schedule, decay_fraction=args.decay_fraction, aux_layer=args.aux_layer,
          questions=args.questions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`statekv bench --e2e`: every runner on the same decoded frames, the output contract, parity."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from statekv.commands import e2e
from statekv.errors import ModelError, UsageError
from statekv_cli.bench import bench as bench_command

CONTRACT = {"runner", "frames", "dtype", "threads", "seconds", "lm_prefill_flops",
            "vision_flops", "peak_memory_bytes", "answer"}


@pytest.fixture(scope="module")
def report(checkpoints, clip):
    return e2e.run_e2e("smolvlm2-256m", str(clip), frames=[3, 5], model=str(checkpoints("smolvlm")),
                       repeats=2, threads=1, max_new_tokens=3, warmup=False)


def test_report_follows_the_contract(report, clip):
    assert report["video"] == str(clip) and report["preset"] == "smolvlm2-256m"
    rows = report["rows"]
    assert [(r["runner"], r["frames"]) for r in rows] == [
        (runner, n) for n in (3, 5) for runner in e2e.RUNNERS]
    for row in rows:
        assert CONTRACT <= set(row)
        assert set(row["seconds"]) == set(e2e.SECONDS)
        assert row["dtype"] == "float32" and row["threads"] == 1
        assert len(row["seconds_runs"]) == 2
        parts = sum(row["seconds"][k] for k in ("decode", "processor", "vision", "lm_prefill",
                                                "answer"))
        assert parts <= row["seconds"]["total"] * 1.05 + 1e-3  # the split never exceeds the whole
        assert row["seconds"]["vision"] > 0 and row["seconds"]["lm_prefill"] > 0
        assert row["lm_prefill_flops"] > 0 and row["vision_flops"] > 0


def test_full_agrees_with_transformers(report):
    for frames in (3, 5):
        cell = {r["runner"]: r for r in report["rows"] if r["frames"] == frames}
        # same frames, same weights, exact attention: the same greedy answer
        assert cell["full"]["answer"] == cell["transformers"]["answer"]
        # transformers also prefills the question; statekv's LM FLOPs cover the video only
        assert cell["transformers"]["tokens"] > cell["full"]["tokens"]
        assert cell["transformers"]["lm_prefill_flops"] > cell["full"]["lm_prefill_flops"]


def test_parity_check_catches_other_frames():
    e2e._check_parity([1, 2, 3], [1, 2, 3], [0.0, 1.0], (0.0, 1.0))
    with pytest.raises(ModelError, match="frame parity"):
        e2e._check_parity([1, 2, 3], [1, 2, 4], [0.0, 1.0], (0.0, 1.0))
    with pytest.raises(ModelError, match="frame parity"):
        e2e._check_parity(None, [], [0.0, 2.0], (0.0, 1.0))


def test_transformers_sees_the_ids_statekv_lays_out(checkpoints, clip):
    model, _ = e2e.load_e2e_model(None, str(checkpoints("smolvlm")), "float32")
    adapter = model.adapter
    info = __import__("statekv.video", fromlist=["probe"]).probe(str(clip))
    frames, stamps, _ = e2e.decode_frames(str(clip), 4, adapter.decode_size(info.height, info.width))
    run = e2e._transformers_run(model, frames, stamps, e2e.QUESTION, 2)
    assert run["ids"] == e2e.layout_ids(adapter, stamps, e2e.QUESTION)
    assert adapter.text_config._attn_implementation == "sdpa"  # the peer runs plain sdpa
    model.prefill_frames(frames, stamps, method="full")
    assert adapter.text_config._attn_implementation == "statekv"  # and statekv switches back


def test_csv_and_speedups(report, tmp_path):
    e2e.write_csv(report, str(tmp_path / "e2e.csv"))
    lines = (tmp_path / "e2e.csv").read_text().splitlines()
    assert lines[0].split(",")[:5] == ["runner", "frames", "dtype", "threads", "decode_seconds"]
    assert len(lines) == 1 + len(report["rows"])
    ratios = e2e.speedups(report)
    assert set(ratios) == {(n, "float32", r) for n in (3, 5) for r in ("full", "window", "statekv")}
    assert all(v["lm_flop_ratio"] > 1 for v in ratios.values())


def test_several_dtypes_run_side_by_side(checkpoints, clip):
    report = e2e.run_e2e("smolvlm2-256m", str(clip), frames=[2], model=str(checkpoints("smolvlm")),
                         runners=["transformers", "full"], repeats=1, threads=1,
                         max_new_tokens=2, warmup=False, dtype=["float32", "bfloat16"])
    rows = report["rows"]
    assert [(r["dtype"], r["runner"]) for r in rows] == [
        ("float32", "transformers"), ("float32", "full"),
        ("bfloat16", "transformers"), ("bfloat16", "full")]
    assert rows[0]["vision_flops"] == rows[2]["vision_flops"]  # the same frames for both
    ratios = e2e.speedups(report)
    # each statekv row against transformers at its own dtype and against float32 transformers
    assert set(ratios) == {(2, "float32", "full"), (2, "bfloat16", "transformers"),
                           (2, "bfloat16", "full")}
    bf16 = ratios[(2, "bfloat16", "full")]
    assert bf16["total_vs_float32"] == pytest.approx(
        rows[0]["seconds"]["total"] / rows[3]["seconds"]["total"])
    assert bf16["total"] == pytest.approx(rows[2]["seconds"]["total"] / rows[3]["seconds"]["total"])
    assert set(ratios[(2, "bfloat16", "transformers")]) == {"total_vs_float32"}


def test_random_weights_have_the_presets_shape():
    from statekv.presets import load_preset

    preset = load_preset("smolvlm2-256m")
    shape = e2e.VISION_SHAPES["smolvlm"]
    grid = shape["image_size"] // shape["patch_size"]
    assert grid * grid // shape["scale_factor"] ** 2 == preset.architecture.tokens_per_frame
    assert shape["image_size"] == preset.architecture.frame_size


def test_bad_options():
    with pytest.raises(UsageError):
        e2e.run_e2e("smolvlm2-256m", "", frames=[2])
    with pytest.raises(UsageError, match="runner"):
        e2e.run_e2e("smolvlm2-256m", "x.mp4", frames=[2], runners=["nope"])
    with pytest.raises(UsageError, match="each dtype once"):
        e2e.run_e2e("smolvlm2-256m", "x.mp4", frames=[2], dtype=["float32", "float32"])
    with pytest.raises(UsageError, match="unknown dtype"):
        e2e.run_e2e("smolvlm2-256m", "x.mp4", frames=[2], dtype=["float32", "fp8"])


def _bench_app() -> typer.Typer:
    app = typer.Typer()
    app.command("bench")(bench_command)
    app.command("noop")(lambda: None)
    return app


def test_command_json(checkpoints, clip, tmp_path):
    app = _bench_app()
    result = CliRunner().invoke(app, [
        "bench", "--e2e", "--preset", "smolvlm2-256m", "--model", str(checkpoints("smolvlm")),
        "--video", str(clip), "--frames", "2", "--runners", "transformers,full", "--repeats", "1",
        "--threads", "1", "--max-new-tokens", "2", "--json", "--csv", str(tmp_path / "e.csv")])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert {"video", "preset", "rows"} <= set(record)
    assert [r["runner"] for r in record["rows"]] == ["transformers", "full"]
    assert (tmp_path / "e.csv").exists()
    missing = CliRunner().invoke(app, ["bench", "--e2e", "--frames", "2"])
    assert missing.exit_code == 2


# the background decode thread -------------------------------------------------------------
def test_prefetch_yields_everything_in_order_and_bounds_the_queue():
    import threading

    from statekv.video import prefetch

    produced = []
    gate = threading.Event()

    def source():
        for i in range(6):
            produced.append(i)
            yield i
            if i == 2:
                gate.wait(2.0)

    stream = prefetch(source(), depth=2)
    assert next(stream) == 0
    import time

    time.sleep(0.3)
    assert len(produced) <= 4  # one taken, two queued, one being made: bounded
    gate.set()
    assert list(stream) == [1, 2, 3, 4, 5]


def test_prefetch_raises_decode_errors_at_their_chunk_and_stops_on_close():
    from statekv.errors import InputError
    from statekv.video import prefetch

    def failing():
        yield 0
        yield 1
        raise InputError("frame 2 is corrupt")

    stream = prefetch(failing())
    assert next(stream) == 0 and next(stream) == 1
    with pytest.raises(InputError, match="corrupt"):
        next(stream)
    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    stream = prefetch(endless())
    assert next(stream) == 0
    stream.close()  # what an error or Ctrl-C in the consumer does
    assert closed == [True]


def test_prefill_from_a_file_decodes_in_the_background(tiny_model, clip, monkeypatch):
    import threading

    from statekv import video

    names = []
    original = video.iter_chunks

    def spy(*args, **kwargs):
        for chunk in original(*args, **kwargs):
            names.append(threading.current_thread().name)
            yield chunk

    monkeypatch.setattr(video, "iter_chunks", spy)
    session = tiny_model.prefill(str(clip), method="full", max_frames=4, fps=None)
    assert session.stats.frames == 4
    assert names and set(names) == {"statekv-decode"}


def test_command_table_with_two_dtypes(checkpoints, clip):
    app = _bench_app()
    result = CliRunner().invoke(app, [
        "bench", "--e2e", "--preset", "smolvlm2-256m", "--model", str(checkpoints("smolvlm")),
        "--video", str(clip), "--frames", "2", "--runners", "transformers,full", "--repeats", "1",
        "--threads", "1", "--max-new-tokens", "2", "--dtype", "float32,bfloat16"])
    assert result.exit_code == 0, result.output
    assert "vs float32" in result.stdout and "bfloat16" in result.stdout
    bad = CliRunner().invoke(app, ["bench", "--e2e", "--preset", "smolvlm2-256m", "--video",
                                   str(clip), "--dtype", "float32,float32"])
    assert bad.exit_code == 2 and "each dtype once" in bad.output

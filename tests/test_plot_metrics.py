"""tools/plot_metrics.py: a run's metrics.jsonl becomes one readable PNG; bad input exits 2."""

import json

import numpy as np
from PIL import Image

from conftest import load_tool

plot_metrics = load_tool("plot_metrics")


def _write_run(work_dir, iterations=40, cam_iters=10, eval_every=10):
    """A metrics.jsonl shaped like the trainer's (afa/engine/logger.py): train records every
    iteration, validation records every ``eval_every``, and a last line cut short by a kill."""
    lines = []
    for it in range(1, iterations + 1):
        joint = it > cam_iters
        cls = 0.7 * 0.9 ** it + 0.05
        seg, aff = (1.5 * 0.95 ** it, 0.4 * 0.95 ** it) if joint else (0.0, 0.0)
        lines.append({"iter": it, "time": 1000.0 + it, "train/cls_loss": cls,
                      "train/seg_loss": seg, "train/aff_loss": aff, "train/reg_loss": 0.0,
                      "train/total": cls + 0.1 * (seg + aff), "train/lr": 6e-5 * (1 - it / 41),
                      "train/skipped_steps": 0.0, "train/sec_per_iter": 0.3})
        if it % eval_every == 0:
            score = 0.2 + 0.01 * it
            lines.append({"iter": it, "time": 1000.0 + it, "val/cam": score,
                          "val/refined": score + 0.01, "val/aff_cam": score + 0.02,
                          "val/affinity": score + 0.03, "val/seg": score - 0.05,
                          "val/cls_f1": 0.8})
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"iter": 41, "train/')
    return path


def test_a_run_becomes_one_png_of_the_expected_size(tmp_path, capsys):
    path = _write_run(tmp_path / "run")
    assert plot_metrics.main(["--work-dir", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "metrics.png"
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote {out}"
    assert f"skipped 1 unreadable line(s) of {path}" in captured.err
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (plot_metrics.HEIGHT_PX, plot_metrics.WIDTH_PX, 3)
    # Not blank: dark text and axes, and the colours of several curves.
    assert (image.min(axis=2) < 80).mean() > 0.005
    colours = {tuple(c) for c in image.reshape(-1, 3)[::7] // 32}
    assert len(colours) > 20


def test_metrics_file_and_out_paths(tmp_path):
    path = _write_run(tmp_path / "elsewhere")
    out = tmp_path / "figures" / "curves.png"
    assert plot_metrics.main(["--metrics", str(path), "--out", str(out)]) == 0
    assert Image.open(out).size == (plot_metrics.WIDTH_PX, plot_metrics.HEIGHT_PX)


def test_the_series_are_read_per_iteration(tmp_path):
    series, skipped = plot_metrics.read_metrics(_write_run(tmp_path, iterations=20))
    assert skipped == 1
    assert sorted(series["val/seg"]) == [10, 20]
    assert series["train/lr"][20] == 6e-5 * (1 - 20 / 41)
    assert "iter" not in series and "time" not in series


def test_a_run_without_validation_is_drawn(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(
        {"iter": 5, "time": 1.0, "train/total": 0.7, "train/cls_loss": 0.7, "train/lr": 1e-6}))
    assert plot_metrics.main(["--work-dir", str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").is_file()


def test_bad_input_is_named_and_exits_2(tmp_path, capsys):
    assert plot_metrics.main(["--work-dir", str(tmp_path / "nothing")]) == 2
    assert f"No metrics file: '{tmp_path / 'nothing' / 'metrics.jsonl'}'" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_metrics.main(["--metrics", str(empty)]) == 2
    assert f"No records in '{empty}' (the file is empty)" in capsys.readouterr().err
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not json\n{\"time\": 3}\n")
    assert plot_metrics.main(["--metrics", str(garbage)]) == 2
    assert f"No records in '{garbage}' (2 unreadable line(s))" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))

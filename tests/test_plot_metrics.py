"""tools/plot_metrics.py: a run's metrics.jsonl becomes one readable PNG; bad input exits 2."""

import json
import re

import numpy as np
import pytest
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


def _val_lines(fig):
    """label -> (iterations, values) of every line of the validation panel."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in fig.axes[2].get_lines()}


def test_the_authors_voc_log_is_drawn_up_to_the_run(tmp_path):
    """A run at 5,000 iterations sees the authors' curve at 2,000, 4,000 and 6,000 (the next
    validation), values in %, beside its own curves."""
    series, _ = plot_metrics.read_metrics(_write_run(tmp_path))
    series = {key: {it * 125: v for it, v in points.items()} for key, points in series.items()}
    reference = plot_metrics.read_reference("voc")
    fig = plot_metrics.plot_metrics(series, tmp_path / "m.png", "run", reference)
    assert (tmp_path / "m.png").is_file()
    lines = _val_lines(fig)
    # The published values (docs/RESULTS.md), not read back from the data file.
    assert lines["cam, authors' VOC log"] == ([2000, 4000, 6000], [47.02, 58.33, 59.37])
    assert lines["aff_cam, authors' VOC log"] == ([2000, 4000, 6000], [29.06, 61.27, 63.19])
    assert lines["seg, authors' VOC log"] == ([2000, 4000, 6000], [0.81, 54.82, 58.88])
    # The run's own curves are still there, in % too, and the axis holds both.
    iters, values = lines["seg mIoU"]
    assert iters == [1250, 2500, 3750, 5000]
    assert values[-1] == pytest.approx(100 * (0.2 + 0.01 * 40 - 0.05))
    assert fig.axes[2].get_ylim()[1] >= 59.37


def test_a_finished_run_gets_the_whole_reference(tmp_path):
    series = {"val/seg": {20000: 0.6}, "train/total": {25000: 0.1}}
    fig = plot_metrics.plot_metrics(series, tmp_path / "m.png", "run",
                                    plot_metrics.read_reference("voc"))
    iters, values = _val_lines(fig)["seg, authors' VOC log"]
    assert iters == list(range(2000, 20001, 2000))
    assert values[-2:] == [63.85, 63.11]


def test_reference_option_and_unknown_name(tmp_path, capsys):
    _write_run(tmp_path / "run")
    out = tmp_path / "run" / "metrics.png"
    assert plot_metrics.main(["--work-dir", str(tmp_path / "run"), "--reference", "voc"]) == 0
    assert Image.open(out).size == (plot_metrics.WIDTH_PX, plot_metrics.HEIGHT_PX)
    out.unlink()
    capsys.readouterr()
    assert plot_metrics.main(["--work-dir", str(tmp_path / "run"), "--reference", "coco"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown reference 'coco' (known: voc)\n"
    assert not out.exists()


def test_the_reference_file_matches_docs_results(tmp_path):
    """docs/data/authors_voc_log.json and the table of docs/RESULTS.md say the same."""
    table = (plot_metrics.REPO / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| ([\d,]+) \| \**([\d.]+)\** \| \**([\d.]+)\** \| \**([\d.]+)\** \|",
                      table, flags=re.MULTILINE)
    published = {int(i.replace(",", "")): (float(c), float(a), float(s)) for i, c, a, s in rows}
    reference = plot_metrics.read_reference("voc").series
    assert sorted(published) == list(range(2000, 20001, 2000))
    assert {i: (reference["cam"][i], reference["aff_cam"][i], reference["seg"][i])
            for i in reference["seg"]} == published


def test_constant_zero_and_negative_losses_are_named_as_they_are(tmp_path):
    """A loss that is 0 in every record is left out and named; the regularized loss, negative
    when on, is drawn sign-flipped under its own name."""
    series, _ = plot_metrics.read_metrics(_write_run(tmp_path))
    series["train/reg_loss"] = {i: (0.0 if i <= 10 else -2.0 - 0.01 * i) for i in range(1, 41)}
    series["train/extra_loss"] = {i: 0.0 for i in range(1, 41)}
    fig = plot_metrics.plot_metrics(series, tmp_path / "m.png", "run")
    loss_ax = fig.axes[0]
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert "-reg_loss" in lines and "reg_loss" not in lines
    assert list(lines["-reg_loss"].get_xdata()) == list(range(11, 41))
    assert list(lines["-reg_loss"].get_ydata())[0] == pytest.approx(2.11)
    legend = loss_ax.get_legend()
    assert legend.get_title().get_text() == "0 in every record, not drawn: extra_loss"
    assert {t.get_text() for t in legend.get_texts()} == {
        "total", "cls_loss", "seg_loss", "aff_loss", "-reg_loss"}

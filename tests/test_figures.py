"""What the figures and the printed results show: the precision-recall curve drawn only at real
thresholds, operating points said to be drawn only where they are, the calibrated reliability
curve, the few-positives flag, the bundled-sample notice, heatmaps without seams, beside the
plain X-ray with NIH's boxes, and figure files that never overwrite each other."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_main
from labels import NIH_CLASSES, read_list


@pytest.fixture
def drawn(monkeypatch):
    """The figures report.py draws, kept open: {file suffix: matplotlib figure}."""
    import report
    figures = {}
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.update(
        {str(path).rsplit("_", 1)[-1].removesuffix(".png"): fig}))
    yield figures
    import matplotlib.pyplot as plt
    for fig in figures.values():
        plt.close(fig)


def _evaluation(n=300, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, len(NIH_CLASSES))) < 0.15).astype(np.float64)
    labels[:, 13] = 0
    labels[:4, 13] = 1  # Hernia: 4 positives
    probs = np.clip(0.25 * labels + 0.75 * rng.random(labels.shape), 0, 1)
    names = [f"{i:08d}_000.png" for i in range(n)]
    return names, labels, probs


def _blue_lines(ax):
    return [line for line in ax.get_lines() if line.get_color() == "tab:blue"]


def test_pr_curve_points_are_real_thresholds_without_the_recall_0_spike(drawn):
    """Every point of the drawn curve is a threshold's direct count (scikit-learn's appended
    (recall 0, precision 1), which no threshold gives, is not drawn), precision drops at a
    constant recall included; the curve starts at recall 0 with the first threshold's
    precision; the steps enclose the average precision; a finding with one positive has a
    curve; every operating-point marker is a vertex of its curve."""
    from report import choose_operating_points, pr_curve, write_figures
    y = np.array([0, 1, 1, 0, 1, 0, 0, 1, 0, 0])
    p = np.array([.95, .9, .8, .7, .6, .5, .4, .3, .2, .1])  # the likeliest image is negative
    recall, precision = pr_curve(y, p)
    assert (recall[0], precision[0]) == (0.0, 0.0)  # the first threshold: one negative
    for r, q, t in zip(recall[1:], precision[1:], sorted(p, reverse=True)):
        called = p >= t  # at each threshold: a direct count
        assert (r, q) == pytest.approx((called[y == 1].mean(), y[called].mean()))
    assert len(recall) == len(p) + 1 and (np.diff(recall) >= 0).all()
    from sklearn.metrics import average_precision_score
    assert (np.diff(recall) * precision[1:]).sum() == pytest.approx(
        average_precision_score(y, p))  # the area under the drawn steps
    one = pr_curve(np.r_[1, np.zeros(9)], p)  # one positive, scored highest: still a curve
    assert len(one[0]) > 2 and one[1][0] == 1.0
    names, labels, probs = _evaluation()
    points = choose_operating_points(labels, probs, "m", "val_list.txt", NIH_CLASSES)
    write_figures("unused", labels, probs, NIH_CLASSES, points)
    for d, ax in enumerate(drawn["pr"].axes[:len(NIH_CLASSES)]):
        (curve,) = _blue_lines(ax)
        x, q = curve.get_xdata(), curve.get_ydata()
        np.testing.assert_array_equal(np.stack([x, q]), np.stack(pr_curve(labels[:, d],
                                                                          probs[:, d])))
        vertices = set(zip(np.round(x, 9), np.round(q, 9)))
        for marker in [ln for ln in ax.get_lines() if ln.get_label() in
                       ("youden", "f1", "sensitivity")]:
            at = (round(float(marker.get_xdata()[0]), 9), round(float(marker.get_ydata()[0]), 9))
            assert at in vertices, (NIH_CLASSES[d], marker.get_label(), at)
        assert ax.get_xlim()[0] <= 0 and ax.get_xlim()[1] >= 1
        assert ax.get_ylim()[0] <= 0 and ax.get_ylim()[1] >= 1  # every panel from 0 to 1


def test_operating_points_are_announced_only_where_drawn(drawn):
    from report import build_report, choose_operating_points, write_figures
    names, labels, probs = _evaluation()
    report = build_report(names, labels, probs, NIH_CLASSES, n_boot=20, mode="fp32", part="val")
    write_figures("unused", labels, probs, NIH_CLASSES, report=report)
    texts = " ".join(t.get_text() for t in drawn["roc"].findobj(lambda o: hasattr(o, "get_text")))
    assert "operating points" not in texts and "fp32, val, raw probabilities: 300 images" in texts
    assert "Hernia\nAUC" in texts and "4 pos.\u2020" in texts  # AUC, interval, positives, flag
    points = choose_operating_points(labels, probs, "m", "val_list.txt", NIH_CLASSES)
    write_figures("unused", labels, probs, NIH_CLASSES, points, report=report, platt=points)
    texts = " ".join(t.get_text() for t in drawn["roc"].findobj(lambda o: hasattr(o, "get_text")))
    assert "operating points chosen on 300 val images" in texts
    markers = [ln for ln in drawn["roc"].axes[0].get_lines() if ln.get_label() in
               ("youden", "f1", "sensitivity")]
    assert len(markers) == 3
    # the smallest marker on top: never hidden under the others where the rules agree
    by_size = sorted(markers, key=lambda ln: ln.get_markersize())
    assert [ln.get_zorder() for ln in by_size] == sorted((ln.get_zorder() for ln in by_size),
                                                         reverse=True)
    # the reliability diagram: as predicted and Platt-calibrated, with the images per bin
    # (under each panel a strip of its own: the counts, with the x axis's label)
    ax, counts = drawn["reliability"].axes[:2]
    curves = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    assert [ln.get_color() for ln in curves] == ["tab:blue", "tab:red"]
    # the points: filled where a bin holds 10 images or more, hollow (white) where fewer
    from report import FEW_IN_BIN, calibrate, reliability
    for colour, values in (("tab:blue", probs), ("tab:red", calibrate(probs, points))):
        r = reliability(labels[:, 0], values[:, 0])
        dots = [ln for ln in ax.get_lines() if ln.get_marker() == "o" and ln.get_color() == colour]
        filled = next(ln for ln in dots if ln.get_markerfacecolor() != "white")
        hollow = next(ln for ln in dots if ln.get_markerfacecolor() == "white")
        assert len(filled.get_xdata()) == (r["count"] >= FEW_IN_BIN).sum()
        assert len(hollow.get_xdata()) == (r["count"] < FEW_IN_BIN).sum()
    assert ax.get_ylabel() == "fraction positive" and not ax.patches
    assert counts.get_xlabel() == "mean predicted probability" and counts.get_ylabel() == "images"
    assert counts.get_shared_x_axes().joined(ax, counts)
    # the images per bin of each curve: as predicted (grey) and calibrated (red)
    assert sum(patch.get_height() for patch in counts.patches) == 2 * 300


def test_few_positives_are_counted_and_flagged():
    from report import FEW_NOTE, build_report, markdown, summary
    names, labels, probs = _evaluation()
    report = build_report(names, labels, probs, NIH_CLASSES, n_boot=20)
    hernia = report["diseases"]["Hernia"]
    assert hernia["positives"] == 4 and hernia["few_positives"] is True
    assert report["diseases"]["Atelectasis"]["few_positives"] is False
    table = markdown(report)
    assert "| Hernia\u2020 | 0.013 (4) |" in table and FEW_NOTE in table
    assert "| Atelectasis | " in table  # no flag with enough positives
    line = next(ln for ln in summary(report).splitlines() if ln.startswith("Hernia"))
    assert line.split()[-1] == "4\u2020" and FEW_NOTE in summary(report)
    names, labels, probs = _evaluation()
    labels[:, 13] = 0
    labels[:40, 13] = 1
    report = build_report(names, labels, probs, NIH_CLASSES, n_boot=20)
    assert FEW_NOTE not in markdown(report) and FEW_NOTE not in summary(report)


@pytest.mark.integration
def test_sample_notice_in_every_report(tmp_path, nih_dir, capsys):
    from report import SAMPLE_NOTICE, build_report, markdown, summary, trained_on_sample
    assert trained_on_sample(REPO / "sample") and trained_on_sample("sample")
    assert trained_on_sample("/gone/clone/sample")  # a clone since moved: the name says it
    assert not trained_on_sample(nih_dir) and not trained_on_sample(None)
    assert not trained_on_sample(tmp_path)
    names, labels, probs = _evaluation()
    report = build_report(names, labels, probs, NIH_CLASSES, n_boot=20, notice=SAMPLE_NOTICE)
    assert SAMPLE_NOTICE in markdown(report) and SAMPLE_NOTICE in summary(report)
    # report.py on an existing predictions file: the export beside it says what it came from
    test_names, test_labels = read_list(nih_dir / "test_list.txt")
    csv = tmp_path / "predictions_fp32.csv"
    csv.write_text("Image Index," + ",".join(NIH_CLASSES) + "\n" + "".join(
        n + "," + ",".join("0.5" for _ in NIH_CLASSES) + "\n" for n in test_names))
    (tmp_path / "chexnet.json").write_text(json.dumps({"data_dir": str(nih_dir),
                                                       "trained_on": str(REPO / "sample")}))
    proc = run_main(capsys, csv, "--data-dir", nih_dir, "--n-boot", "100", "--no-figures",
                    module="report")
    assert proc.returncode == 0, proc.stderr
    assert SAMPLE_NOTICE in proc.stdout
    assert json.loads((tmp_path / "predictions_fp32_rerun_report.json").read_text())["notice"] \
        == SAMPLE_NOTICE
    (tmp_path / "chexnet.json").write_text(json.dumps({"data_dir": str(nih_dir)}))
    proc = run_main(capsys, csv, "--data-dir", nih_dir, "--n-boot", "100", "--no-figures",
                    module="report")
    assert proc.returncode == 0 and SAMPLE_NOTICE not in proc.stdout


def test_ten_crops_meet_without_seams_or_stars():
    """Each crop's map a different constant (a 56 crop's 1x1 map is one): a plain average
    steps where a crop ends; the feathered one changes by little from pixel to pixel, and
    without kinks (a sudden change of slope drew a straight seam where the weights of one set
    of crops ran out near the image's border). 7x7 maps of random peaks: no kinks either (a
    bilinear blow-up drew star-shaped facets around each peak; bicubic does not)."""
    from cam import tencrop_heatmap

    def kinks(heat):  # the largest change of slope, as a share of the map's range
        return max(np.abs(np.diff(heat, 2, axis=0)).max(),
                   np.abs(np.diff(heat, 2, axis=1)).max()) / (heat.max() - heat.min())
    maps = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1) % 5 * 10.0  # 0..40
    heat = tencrop_heatmap(maps, (64, 80), 56)[0]
    steps = max(np.abs(np.diff(heat, axis=0)).max(), np.abs(np.diff(heat, axis=1)).max())
    assert steps < 0.1 * (heat.max() - heat.min()), steps
    assert heat.min() >= 0 and heat.max() <= 40
    assert kinks(heat) < 0.02, kinks(heat)  # 0.039 with the old weights
    rng = np.random.default_rng(0)
    for shape, crop, side in (((64, 64), 56, 1), ((256, 256), 224, 7), ((256, 320), 224, 7)):
        heat = tencrop_heatmap(rng.random((10, 1, side, side)).astype(np.float32), shape,
                               crop)[0]
        assert kinks(heat) < 0.015, (shape, kinks(heat))  # 0.02-0.04 before


def test_heatmap_beside_the_xray_with_colour_bar_and_boxes(nih_dir):
    """The plain X-ray at its own resolution left, the overlay right, the radiologist's box
    drawn (00001369_000.png has a Cardiomegaly box)."""
    from cam import image_boxes, overlay
    from images import load_gray
    gray = np.asarray(load_gray(nih_dir / "images" / "00001369_000.png"))
    boxes = image_boxes(nih_dir, "00001369_000.png", gray.shape)
    assert list(boxes) == ["Cardiomegaly"]
    heat = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    image = np.asarray(overlay(gray, heat, "a title", [("Cardiomegaly", b)
                                                       for b in boxes["Cardiomegaly"]],
                               "Cardiomegaly"))
    height, width = gray.shape
    assert image.shape[0] > height and image.shape[1] > 2 * width  # title, colour bar
    head = image.shape[0] - height
    plain = image[head:, :width, 0].astype(int)
    assert np.abs(plain - gray).mean() < 3  # the X-ray itself, untouched
    x, y, w, h = (int(round(v)) for v in boxes["Cardiomegaly"][0])
    gap = max(8, width // 40)  # between the panels
    edge = image[head + y + h // 2, width + gap + x - 2: width + gap + x + 3]
    assert (edge.min(axis=1) > 200).any()  # the box's white left edge
    small = np.asarray(overlay(gray[:256, :256], heat, "t"))  # no boxes: still a figure
    assert small.shape[1] > 512


@pytest.mark.integration
def test_stats_titles_name_no_absolute_path(tmp_path, capsys, drawn):
    proc = run_main(capsys, "--plot", tmp_path, module="stats")
    assert proc.returncode == 0, proc.stderr
    for fig in drawn.values():
        title = fig.axes[0].get_title()
        assert str(REPO) not in title and "/work" not in title, title
    # prevalence: bars whose length is their value (a linear axis from 0), labelled 9 pt or more
    ax = drawn["prevalence"].axes[0]
    assert ax.get_xscale() == "linear" and ax.get_xlim()[0] == 0
    widths = [bar.get_width() for bar in ax.patches]
    assert max(widths) < ax.get_xlim()[1] and min(widths) > 0
    assert all(t.get_fontsize() >= 9 for t in ax.texts)
    # co-occurrence: each pair once (below the diagonal), coloured by observed / expected,
    # each number in a colour readable on its cell
    ax = drawn["cooccurrence"].axes[0]
    image = ax.get_images()[0]
    shown = image.get_array()
    k = shown.shape[0]
    assert shown.mask[np.triu_indices(k)].all()  # the diagonal and above: not coloured
    assert image.norm.vmin == pytest.approx(1 / image.norm.vmax)  # centred on 1
    for t in ax.texts:
        if t.get_text() and t.get_color() not in ("0.15", "0.5"):
            x, y = (int(round(v)) for v in t.get_position())
            r, g, b, _ = image.cmap(image.norm(shown[y, x]))
            light = 0.299 * r + 0.587 * g + 0.114 * b
            assert (t.get_color() == "black") == (light >= 0.45), (t.get_text(), light)


@pytest.mark.integration
def test_sample_model_results_say_so_and_figures_never_collide(small_model, nih_dir, tmp_path, capsys):
    """The small model was trained on the bundled sample: evaluation, --image and the report
    say so; val, fp32 and int8 figures go to separate files."""
    from report import SAMPLE_NOTICE
    work, export = small_model
    models = tmp_path / "models"
    import shutil
    shutil.copytree(work / "models", models, ignore=shutil.ignore_patterns("pred*", "oper*"))
    assert "No CUDA runtime" not in export.stderr and "TracerWarning" not in export.stderr
    assert "torch.jit.trace" not in export.stderr
    runs = [("fp32", "val"), ("fp32", "test"), ("int8", "test")]
    for mode, part in runs:
        proc = run_main(capsys, "--mode", mode, "--part", part, "--model-dir", models,
                        "--data-dir", nih_dir, "--n-boot", "100", "--limit", "60", module="infer")
        assert proc.returncode == 0, proc.stderr
        assert SAMPLE_NOTICE in proc.stdout
    pngs = sorted(p.name for p in models.glob("*.png"))
    # the subgroup figure needs thresholds: only FP32's, chosen on FP32's val, exist here
    assert pngs == sorted([f"predictions_{m}{'_val' if p == 'val' else ''}_{kind}.png"
                           for m, p in runs for kind in ("roc", "pr", "reliability")]
                          + ["predictions_fp32_subgroups.png"])
    for mode, part in runs:
        stem = models / f"predictions_{mode}{'_val' if part == 'val' else ''}"
        assert json.loads(stem.with_name(stem.name + "_report.json").read_text())["notice"] \
            == SAMPLE_NOTICE
        assert SAMPLE_NOTICE in stem.with_name(stem.name + "_report.md").read_text()
    image = nih_dir / "images" / read_list(nih_dir / "test_list.txt")[0][0]
    proc = run_main(capsys, "--mode", "int8", "--model-dir", models, "--data-dir",
                    nih_dir, "--image", image, module="infer")
    assert proc.returncode == 0, proc.stderr
    assert f"mode int8: {models / 'chexnet_int8.xml'}" in proc.stdout
    assert SAMPLE_NOTICE in proc.stdout
    assert f"labels in {nih_dir / 'test_list.txt'}: " in proc.stdout
    with Image.open(models / "predictions_int8_roc.png") as im:
        assert im.size[0] > 800

"""The evaluation report: bootstrap intervals that cover the truth and widen with patients'
correlated images, operating points chosen on val and applied unchanged to test, paired
comparison, calibration, figures, and bad prediction files."""
import json

import numpy as np
import pytest
from PIL import Image
from scipy.stats import norm

from conftest import assert_clean_error, run_main
from labels import NIH_CLASSES, read_list
from metrics import (at_threshold, bootstrap_aucs, choose_thresholds, fit_platt, apply_platt,
                     calibration_errors, interval, weighted_aucs)


def binormal(rng, n, mu, prevalence=0.3):
    y = (rng.random(n) < prevalence).astype(np.uint8)
    return y, rng.normal(mu * y, 1.0)


def test_auc_interval_covers_the_true_auc_95_percent_of_the_time():
    """Binormal scores (positives N(1, 1), negatives N(0, 1)): true AUC = Phi(1 / sqrt 2)."""
    truth, rng, covered, trials = norm.cdf(1 / np.sqrt(2)), np.random.default_rng(0), 0, 300
    for trial in range(trials):
        y, s = binormal(rng, 200, 1.0)
        aucs, _ = bootstrap_aucs(y[:, None], s[:, None], np.arange(200), n_boot=400, seed=trial)
        lo, hi = interval(aucs)
        covered += lo[0] <= truth <= hi[0]
    assert 0.91 <= covered / trials <= 0.985, covered / trials


def test_patient_level_interval_is_wider_with_many_images_per_patient():
    """40 patients x 25 images whose labels and scores depend on the patient: resampling
    images pretends there are 1000 independent cases and is far too narrow."""
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(40), 25)
    sick = rng.random(40) < 0.4
    y = (rng.random(1000) < np.where(sick[patients], 0.8, 0.1)).astype(np.uint8)
    s = rng.normal(1.2 * sick, 1.0, 40)[patients] + rng.normal(0, 0.3, 1000)
    by_patient = np.diff(interval(bootstrap_aucs(y[:, None], s[:, None], patients, 1000)[0]),
                         axis=0)
    by_image = np.diff(interval(bootstrap_aucs(y[:, None], s[:, None], np.arange(1000), 1000)[0]),
                       axis=0)
    assert by_patient[0, 0] > 2 * by_image[0, 0]


def test_weighted_auc_equals_sklearn_with_ties_and_weights():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(y, 1), 1)  # many ties
    w = rng.integers(0, 4, (6, 300)).astype(float)
    expected = [roc_auc_score(y, s, sample_weight=row) for row in w]
    assert np.allclose(weighted_aucs(y, s, w), expected, atol=1e-12)


def test_threshold_statistics_agree_with_a_direct_count():
    rng = np.random.default_rng(3)
    labels = (rng.random((500, 3)) < 0.2).astype(np.uint8)
    probs = np.clip(labels * 0.4 + rng.random((500, 3)) * 0.6, 0, 1)
    thresholds = choose_thresholds(labels, probs)["youden"]
    stats = at_threshold(labels, probs, thresholds, np.arange(500), n_boot=200)
    for d in range(3):
        positive = probs[:, d] >= thresholds[d]
        tp = (positive & (labels[:, d] == 1)).sum()
        assert stats["sensitivity"][0][d] == pytest.approx(tp / labels[:, d].sum())
        tn = (~positive & (labels[:, d] == 0)).sum()
        assert stats["specificity"][0][d] == pytest.approx(tn / (labels[:, d] == 0).sum())
        assert stats["sensitivity"][1][d] <= stats["sensitivity"][0][d] <= stats["sensitivity"][2][d]
    target = choose_thresholds(labels, probs, 0.9)["sensitivity"]
    reached = at_threshold(labels, probs, target, np.arange(500), n_boot=10)["sensitivity"][0]
    assert (reached >= 0.9).all()


def test_platt_scaling_improves_calibration_and_keeps_order():
    rng = np.random.default_rng(4)
    labels = (rng.random((2000, 2)) < 0.1).astype(np.uint8)
    probs = np.clip(0.5 + 0.3 * labels + rng.normal(0, 0.1, (2000, 2)), 0.01, 0.99)  # too high
    a, b = fit_platt(labels, probs)
    calibrated = apply_platt(probs, a, b)
    assert (calibration_errors(labels, calibrated) < calibration_errors(labels, probs) / 3).all()
    assert (np.argsort(calibrated[:, 0]) == np.argsort(probs[:, 0])).all()


def test_single_class_disease_is_na_not_a_crash():
    from report import build_report, markdown
    rng = np.random.default_rng(5)
    labels = (rng.random((60, 14)) < 0.3).astype(np.uint8)
    labels[:, 13] = 0  # no Hernia among these images
    names = [f"{i:08d}_000.png" for i in range(60)]
    report = build_report(names, labels, rng.random((60, 14)), NIH_CLASSES, n_boot=50)
    assert report["diseases"]["Hernia"]["auc"] is None
    assert report["diseases"]["Hernia"]["auc_ci"] == [None, None]
    assert "| Hernia\u2020 | 0.000 (0) | n/a n/a |" in markdown(report)
    json.dumps(report, allow_nan=False)


# ---- the commands ---------------------------------------------------------------------------

def _predictions(path, names, probs):
    path.write_text("Image Index," + ",".join(NIH_CLASSES) + "\n" + "".join(
        n + "," + ",".join(f"{p:.6f}" for p in row) + "\n" for n, row in zip(names, probs)))
    return path


@pytest.mark.integration
def test_compare_identical_and_clearly_worse_models(nih_dir, tmp_path, capsys):
    names, labels = read_list(nih_dir / "test_list.txt")
    rng = np.random.default_rng(6)
    good = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.15, labels.shape), 0, 1)
    worse = np.clip(good + rng.normal(0, 0.5, labels.shape), 0, 1)
    a = _predictions(tmp_path / "a.csv", names, good)
    b = _predictions(tmp_path / "b.csv", names[::-1], good[::-1])  # the same, in another order
    same = run_main(capsys, "compare", a, b, "--data-dir", nih_dir, "--n-boot", "300",
                    module="report")
    assert same.returncode == 0, same.stderr
    mean = next(ln for ln in same.stdout.splitlines() if ln.startswith("mean")).split()
    assert mean[3] == "+0.0000" and "[0.0000, 0.0000]" in same.stdout
    assert mean[-2:] == ["not", "significant"]
    c = _predictions(tmp_path / "c.csv", names, worse)
    diff = run_main(capsys, "compare", a, c, "--data-dir", nih_dir, "--n-boot", "300",
                    module="report")
    mean = next(ln for ln in diff.stdout.splitlines() if ln.startswith("mean")).split()
    assert float(mean[3]) < -0.1 and mean[-1] == "significant" and mean[-2] != "not"


@pytest.mark.parametrize("damage,fragment", [
    ("other images", "not the images of"),
    ("missing column", "no column 'Hernia'"),
    ("nan", "b.csv:3: probabilities must be numbers in [0, 1]"),
    ("unknown image", "in no list of the split"),
])
@pytest.mark.integration
def test_bad_prediction_files(nih_dir, tmp_path, capsys, damage, fragment):
    names, labels = read_list(nih_dir / "test_list.txt")
    probs = np.full(labels.shape, 0.5)
    a = _predictions(tmp_path / "a.csv", names, probs)
    b = _predictions(tmp_path / "b.csv", names, probs)
    text = b.read_text().splitlines()
    if damage == "other images":
        b = _predictions(b, names[:-1], probs[:-1])
    elif damage == "missing column":
        b.write_text("\n".join(",".join(ln.split(",")[:-1]) for ln in text) + "\n")
    elif damage == "nan":
        text[2] = text[2].rsplit(",", 1)[0] + ",nan"
        b.write_text("\n".join(text) + "\n")
    else:
        a = _predictions(a, ["99999999_000.png"] + names[1:], probs)
        b = _predictions(b, ["99999999_000.png"] + names[1:], probs)
    assert_clean_error(run_main(capsys, "compare", a, b, "--data-dir", nih_dir, module="report"),
                       fragment)


@pytest.mark.integration
def test_stats_plot_writes_the_figures(tmp_path, capsys):
    proc = run_main(capsys, "--plot", tmp_path, module="stats")
    assert proc.returncode == 0, proc.stderr
    for name in ("stats_prevalence.png", "stats_cooccurrence.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] > 400


@pytest.mark.integration
def test_a_missing_predictions_file_says_which_command_writes_it(tmp_path, capsys):
    missing = tmp_path / "predictions_fp32.csv"
    proc = run_main(capsys, "compare", missing, tmp_path / "predictions_int8.csv",
                    module="report")
    assert_clean_error(proc, "predictions_fp32.csv: no such predictions file",
                       "`python infer.py --mode fp32` writes it")
    proc = run_main(capsys, tmp_path / "predictions_int8_val.csv", module="report")
    assert_clean_error(proc, "`python infer.py --mode int8 --part val` writes it")

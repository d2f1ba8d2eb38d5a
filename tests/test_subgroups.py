"""The subgroup section (subgroups.py): a planted TPR gap is flagged, no gap is covered ~95%
of the time, demographics missing, partly missing or impossible are 'unknown' and counted, a
subgroup without positives is n/a, and the real path: report.py on prediction files of NIH
images with their table's demographics, and infer.py on a model exported by infer.sh."""
import csv
import gzip
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import assert_clean_error, run_main, run_script
from labels import NIH_CLASSES, read_list
from tables import read_label_table
from subgroups import (AGE_BANDS, UNKNOWN, load_demographics, markdown_section, parse_age,
                       subgroup_statistics, write_figure)

BANDS = [b[2] for b in AGE_BANDS]


def synthetic(rng, n_patients=600, per_patient=3, k=3, prevalence=(0.3, 0.3, 0.3)):
    """Images of patients (1..per_patient*2 each), a sex and an age band per patient, labels,
    and logit scores with a patient effect (so that a patient's images are correlated)."""
    sizes = rng.integers(1, 2 * per_patient, n_patients)
    patients = np.repeat(np.arange(n_patients), sizes)
    sex = np.where(rng.random(n_patients) < 0.5, "female", "male").astype(object)[patients]
    age = np.array(BANDS, dtype=object)[rng.integers(0, 5, n_patients)][patients]
    labels = (rng.random((len(patients), k)) < np.array(prevalence)).astype(np.float64)
    scores = 1.5 * labels + rng.normal(0, 0.7, (n_patients, 1))[patients] + rng.normal(
        0, 0.7, labels.shape)
    return patients, sex, age, labels, scores


def gap(section, attr, disease, group, stat="tpr", rule="youden"):
    return section["attributes"][attr]["diseases"][disease][group]["at"][rule][f"{stat}_gap"]


def test_planted_gap_is_flagged_and_no_gap_is_not():
    """Disease A: women's positives score lower (their TPR drops); disease B: patients over 80
    score lower; disease C: no gap."""
    rng = np.random.default_rng(1)
    patients, sex, age, labels, scores = synthetic(rng)
    scores[(sex == "female") & (labels[:, 0] == 1), 0] -= 1.0
    scores[(age == "80+") & (labels[:, 1] == 1), 1] -= 1.5
    probs = 1 / (1 + np.exp(-scores))
    out = subgroup_statistics(labels, probs, patients, {"sex": sex, "age": age},
                              {"youden": np.full(3, 0.6)}, n_boot=300, seed=0,
                              class_names=["A", "B", "C"])
    women, men = gap(out, "sex", "A", "female"), gap(out, "sex", "A", "male")
    assert women["flagged"] and women["value"] < -0.15 and women["ci"][1] < 0
    assert men["flagged"] and men["value"] == pytest.approx(-women["value"])
    old = gap(out, "age", "B", "80+")
    assert old["flagged"] and old["value"] < -0.2
    assert not gap(out, "sex", "C", "female")["flagged"]
    assert not gap(out, "sex", "A", "female", "fpr")["flagged"]  # negatives were not moved
    # The rates themselves, by a direct count.
    female_pos = (sex == "female") & (labels[:, 0] == 1)
    tpr = out["attributes"]["sex"]["diseases"]["A"]["female"]["at"]["youden"]["tpr"]
    assert tpr["value"] == pytest.approx((probs[female_pos, 0] >= 0.6).mean())
    row = out["attributes"]["sex"]["diseases"]["A"]["female"]
    assert row["positives"] == female_pos.sum()
    assert row["patients"] == len(np.unique(patients[sex == "female"]))


def test_without_a_gap_the_paired_interval_covers_zero_about_95_percent_of_the_time():
    """200 seeded trials, both sexes scored alike: the true TPR and FPR gaps are 0."""
    rng, trials, covered = np.random.default_rng(2), 200, {"tpr": 0, "fpr": 0}
    for trial in range(trials):
        patients, sex, _, labels, scores = synthetic(rng, n_patients=150, k=1, prevalence=(0.4,))
        out = subgroup_statistics(labels, scores, patients, {"sex": sex}, {"youden": [0.75]},
                                  n_boot=200, seed=trial, class_names=["A"])
        for stat in covered:
            lo, hi = gap(out, "sex", "A", "female", stat)["ci"]
            covered[stat] += lo <= 0 <= hi
    for stat, count in covered.items():  # binomial sd at 95%: 1.5 points
        assert 0.90 <= count / trials <= 0.99, (stat, count / trials)


def test_intervals_at_the_edges_are_never_zero_width_nor_a_flag_from_one_patient(capsys):
    """One patient with 14 positive images made a subgroup of its own (the minimum counted
    images): its bootstrap resamples that one patient, so TPR 1.000 [1.000, 1.000] and a
    'significant' gap. And 14 of 14 positives from 14 patients resampled to [1, 1]. Now the
    first is n/a (positives of 1 patient) and the second's interval is Wilson's at least,
    [0.785, 1], with a gap that is not flagged against a rest at 0.88 (the bootstrap alone
    flagged it: [1 - 0.92, 1 - 0.84])."""
    from subgroups import summary_lines
    rng = np.random.default_rng(0)
    # everyone else: 400 patients, one image each, female, half positive, TPR about 0.88
    n_rest = 400
    labels = (np.arange(n_rest) % 2 == 0).astype(np.float64)
    detected = labels.astype(bool) & (rng.random(n_rest) < 0.88)
    probs = np.where(detected | (~labels.astype(bool) & (rng.random(n_rest) < 0.1)), 0.9, 0.1)
    patients = np.arange(n_rest)
    sex = np.full(n_rest, "female", dtype=object)
    age = np.full(n_rest, "40-60", dtype=object)
    # men: one patient with 14 positive images, all detected, and 40 negatives of 40 patients
    one = np.r_[np.ones(14), np.zeros(40)]
    labels = np.r_[labels, one]
    probs = np.r_[probs, np.where(one == 1, 0.9, 0.1)]
    patients = np.r_[patients, np.full(14, n_rest), n_rest + 1 + np.arange(40)]
    sex = np.r_[sex, np.full(54, "male", dtype=object)]
    # age 80+: 14 positives of 14 patients, every one detected, and 20 negatives
    labels = np.r_[labels, np.ones(14), np.zeros(20)]
    probs = np.r_[probs, np.full(14, 0.9), np.full(20, 0.1)]
    patients = np.r_[patients, patients.max() + 1 + np.arange(34)]
    sex = np.r_[sex, np.full(34, "female", dtype=object)]
    age = np.r_[age, np.full(54, "40-60", dtype=object), np.full(34, "80+", dtype=object)]
    out = subgroup_statistics(labels[:, None], probs[:, None], patients, {"sex": sex, "age": age},
                              {"youden": [0.5]}, n_boot=500, seed=0, class_names=["A"])
    men = out["attributes"]["sex"]["diseases"]["A"]["male"]
    assert men["positives"] == 14
    assert men["at"]["youden"]["tpr"] == {
        "value": None, "why": "14 positives of 1 patient, fewer than 10 patients"}
    assert men["auc"]["value"] is None and "of 1 patient" in men["auc"]["why"]
    assert men["at"]["youden"]["tpr_gap"]["value"] is None
    old = out["attributes"]["age"]["diseases"]["A"]["80+"]["at"]["youden"]
    assert old["tpr"]["value"] == 1.0
    assert old["tpr"]["ci"][0] == pytest.approx(0.785, abs=0.001) and old["tpr"]["ci"][1] == 1.0
    assert old["tpr_gap"]["value"] > 0.1 and old["tpr_gap"]["ci"][0] < 0
    assert not old["tpr_gap"]["flagged"]
    # the family of gaps: how many 5% would flag by chance, on stdout and in the Markdown
    out.update(note="demographics of the test", gap="the subgroup's rate minus the rest's",
               thresholds="val")
    line = summary_lines(out)[1]
    assert "gaps tested are flagged; with no real gap at all, about" in line, line
    assert "would be by chance alone" in markdown_section(out)
    tested = int(line.split(" of ")[1].split()[0])
    assert f"{0.05 * tested:.1f} would be by chance" in line


def test_score_intervals_against_published_values():
    """Wilson's interval (Newcombe 1998, table I: 81/263 -> [0.2553, 0.3662]; 15/148 ->
    [0.0624, 0.1605]), Newcombe's for a difference (his example: 56/70 - 48/80 -> [0.0524,
    0.3339]), both within [0, 1] at the edges; and the report's sensitivity of 14 of 14
    detected is [0.785, 1] however the bootstrap falls (it collapsed to [1, 1])."""
    from metrics import at_threshold, newcombe, wilson
    lo, hi = wilson(np.array([81 / 263, 15 / 148]), np.array([263, 148]))
    np.testing.assert_allclose(lo, [0.2553, 0.0624], atol=1e-4)
    np.testing.assert_allclose(hi, [0.3662, 0.1605], atol=1e-4)
    p1, p2 = 56 / 70, 48 / 80
    d_lo, d_hi = newcombe(p1, wilson(p1, 70), p2, wilson(p2, 80))
    assert (d_lo, d_hi) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert wilson(0.0, 14)[0] == 0.0 and wilson(1.0, 14)[1] == 1.0
    labels = np.r_[np.ones(14), np.zeros(30)][:, None]
    probs = np.r_[np.full(14, 0.9), np.linspace(0, 0.8, 30)][:, None]
    sens = at_threshold(labels, probs, [0.85], np.arange(44), n_boot=200)["sensitivity"]
    assert sens[0][0] == 1.0 and sens[1][0] == pytest.approx(0.785, abs=1e-3)
    assert sens[2][0] == 1.0
    # a perfect ranking: AUROC 1 in every resample; the interval is Wilson's on the 14
    # patients of the rarer class (van Dantzig's bound), in the report and its subgroups
    from report import build_report
    names = [f"{i:08d}_000.png" for i in range(44)]
    report = build_report(names, labels, probs, ["A"], n_boot=200)
    assert report["diseases"]["A"]["auc"] == 1.0
    assert report["diseases"]["A"]["auc_ci"] == pytest.approx([0.785, 1.0], abs=1e-3)
    sex = np.array(["female"] * 22 + ["male"] * 22, dtype=object)
    out = subgroup_statistics(np.r_[labels[::2], labels[1::2]], np.r_[probs[::2], probs[1::2]],
                              np.arange(44), {"sex": sex}, n_boot=200, class_names=["A"],
                              min_count=5)
    women = out["attributes"]["sex"]["diseases"]["A"]["female"]["auc"]
    assert women["value"] == 1.0 and women["ci"][0] < 0.9 and women["ci"][1] == 1.0


def test_a_subgroup_without_positives_is_na_never_a_crash(tmp_path):
    rng = np.random.default_rng(3)
    patients, sex, age, labels, scores = synthetic(rng, n_patients=200)
    labels[sex == "female", 1] = 0  # no woman has B
    labels[:, 2] = 0  # nobody has C
    age[:] = "40-60"  # one age band: no one else to compare with
    out = subgroup_statistics(labels, 1 / (1 + np.exp(-scores)), patients,
                              {"sex": sex, "age": age}, {"youden": [0.5, 0.5, np.nan]},
                              n_boot=100, class_names=["A", "B", "C"])
    women_b = out["attributes"]["sex"]["diseases"]["B"]["female"]
    assert women_b["auc"] == {"value": None, "why": "0 positives"}
    assert women_b["at"]["youden"]["tpr"]["value"] is None
    assert gap(out, "sex", "B", "female")["why"] == "0 positives"
    assert gap(out, "sex", "B", "male")["why"] == "everyone else: 0 positives"
    assert gap(out, "sex", "C", "male")["why"] == "no threshold chosen on val"
    assert gap(out, "age", "A", "40-60")["why"].startswith("everyone else: 0 positives")
    assert out["attributes"]["age"]["diseases"]["A"]["80+"]["images"] == 0
    out.update(note="note", gap="gap", thresholds="val")
    text = markdown_section(out)
    assert "n/a (0 positives)" in text and "| B | female |" in text
    with Image.open(write_figure(tmp_path / "f.png", out)) as im:
        assert im.format == "PNG"


def _nih_table(path, rows):
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
              "Patient Gender", "View Position"]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def test_missing_partly_missing_and_impossible_demographics(tmp_path):
    """Blank, unreadable, impossible (the 2017 table's ages over 100 that the 2020 revision
    corrects: 412 here) and unknown codes are 'unknown', counted by reason; an image without a
    table row is unknown too."""
    rows = [["00000001_000.png", "No Finding", "0", "1", "58", "M", "PA"],
            ["00000001_001.png", "Hernia", "1", "1", "058Y", "M", "PA"],  # the first release
            ["00000002_000.png", "No Finding", "0", "2", "412", "F", "PA"],
            ["00000003_000.png", "No Finding", "0", "3", "", "", "PA"],
            ["00000004_000.png", "No Finding", "0", "4", "-3", "O", "PA"],
            ["00000005_000.png", "No Finding", "0", "5", "abc", "f", "AP"],
            ["00000006_000.png", "No Finding", "0", "6", "80", "Female", "AP"],
            ["00000007_000.png", "No Finding", "0", "7", "19.9", "male", "AP"]]
    _nih_table(tmp_path / "Data_Entry_2017.csv", rows)
    found, why = load_demographics(tmp_path)
    names = [r[0] for r in rows] + ["00000009_000.png"]
    groups, note = found.assign(names)
    assert list(groups["sex"]) == ["male", "male", "female", UNKNOWN, UNKNOWN, "female",
                                   "female", "male", UNKNOWN]
    assert list(groups["age"]) == ["40-60", "40-60", UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, "80+",
                                   "0-20", UNKNOWN]
    assert "of 9 images" in note
    assert ("sex unknown for 3 (1 blank, 1 no row in the table, 1 unrecognised code)"
            in note), note
    assert "age unknown for 5 (2 outside 0-110, 1 blank, 1 no row in the " \
           "table, 1 not a number)" in note, note
    assert parse_age("110") == (110.0, None) and parse_age("111")[0] is None
    # Everyone unknown: the section still builds, every gap n/a.
    labels = np.array([[0], [1]] * 4 + [[1]], float)
    out = subgroup_statistics(labels, np.full((9, 1), 0.5), np.arange(9),
                              {"sex": np.array([UNKNOWN] * 9, object)}, {"youden": [0.5]},
                              n_boot=50, class_names=["A"])
    assert gap(out, "sex", "A", "female")["value"] is None
    # No demographic columns, no table: no section, and why.
    (tmp_path / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,Patient ID\n"
                                                  "00000001_000.png,No Finding,1\n")
    assert load_demographics(tmp_path)[0] is None
    assert "no demographics" in load_demographics(tmp_path / "none")[1]


def test_chexpert_and_mimic_demographics(tmp_path):
    from tables import CHEXPERT_CLASSES
    data = tmp_path / "CheXpert-v1.0-small"
    data.mkdir()
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_CLASSES]
    for part, sex, age in (("train", "Female", "68"), ("valid", "Unknown", "0")):
        with open(data / f"{part}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, [f"CheXpert-v1.0-small/{part}/patient00001/study1/"
                                              "view1_frontal.jpg", sex, age, "Frontal", "AP",
                                              *[""] * 14]])
    found, _ = load_demographics(data)
    groups, note = found.assign(["train/patient00001/study1/view1_frontal.jpg",
                                 "valid/patient00001/study1/view1_frontal.jpg"])
    assert list(groups["sex"]) == ["female", UNKNOWN] and list(groups["age"]) == ["60-80", "0-20"]
    assert "1 recorded as unknown" in note
    mimic = tmp_path / "mimic"
    mimic.mkdir()
    (mimic / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(b"dicom_id\n"))
    assert "pass --patients-table" in load_demographics(mimic)[1]
    table = tmp_path / "patients.csv.gz"
    table.write_bytes(gzip.compress(b"subject_id,gender,anchor_age,anchor_year\n"
                                    b"10000032,F,52,2180\n10001000,M,91,2150\n"))
    found, _ = load_demographics(mimic, table)
    groups, note = found.assign(["files/p10/p10000032/s50000000/a.jpg",
                                 "files/p10/p10001000/s50000100/b.jpg",
                                 "files/p10/p10002000/s50000200/c.jpg"])
    assert list(groups["sex"]) == ["female", "male", UNKNOWN]
    assert list(groups["age"]) == ["40-60", "80+", UNKNOWN]
    # A bad patients table is one line naming it: absent, truncated, a subject twice.
    from common import DataError
    with pytest.raises(DataError, match="not found"):
        load_demographics(mimic, tmp_path / "absent.csv.gz")
    whole = table.read_bytes()
    table.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match="patients.csv.gz: cannot read"):
        load_demographics(mimic, table)
    table.write_bytes(gzip.compress(b"subject_id,gender,anchor_age\n1,F,5\n1,M,6\n"))
    with pytest.raises(DataError, match=r"patients.csv.gz:3: subject_id 1 is listed twice"):
        load_demographics(mimic, table)


def _predictions(path, names, probs):
    path.write_text("Image Index," + ",".join(NIH_CLASSES) + "\n" + "".join(
        n + "," + ",".join(f"{p:.6f}" for p in row) + "\n" for n, row in zip(names, probs)))
    return path


@pytest.mark.integration
def test_report_py_on_prediction_files_of_nih_images(nih_dir, tmp_path, capsys):
    """The real NIH table's demographics for the 340 test images of the shared NIH sample;
    scores in which women's Infiltration, Effusion and Atelectasis are found less often, and
    thresholds chosen on val predictions."""
    all_names, _, _ = read_label_table(nih_dir / "Data_Entry_2017_v2020.csv")
    import pandas as pd
    table = pd.read_csv(nih_dir / "Data_Entry_2017_v2020.csv").set_index("Image Index")
    out = {}
    for part in ("val", "test"):
        names, labels = read_list(nih_dir / f"{part}_list.txt")
        rng = np.random.default_rng(5)
        women = (table.loc[names, "Patient Gender"] == "F").to_numpy()[:, None]
        probs = np.clip(0.3 + 0.4 * labels - 0.3 * labels * women * (np.arange(14) < 4)
                        + rng.normal(0, 0.1, labels.shape), 0, 1)
        out[part] = _predictions(tmp_path / f"{part}.csv", names, probs)
    proc = run_main(capsys, out["test"], "--data-dir", nih_dir, "--val-predictions", out["val"],
                    "--n-boot", "300", module="report")
    assert proc.returncode == 0, proc.stderr
    assert "demographics from" in proc.stdout and "Data_Entry_2017_v2020.csv" in proc.stdout
    assert "subgroup gaps whose 95% interval excludes 0" in proc.stdout
    report = json.loads((tmp_path / "test_rerun_report.json").read_text())
    sub = report["subgroups"]
    names = read_list(nih_dir / "test_list.txt")[0]
    sexes = table.loc[names, "Patient Gender"]
    assert sub["attributes"]["sex"]["images"] == {"female": int((sexes == "F").sum()),
                                                  "male": int((sexes == "M").sum())}
    assert sum(sub["attributes"]["age"]["images"].values()) == 340
    g = gap(sub, "sex", "Infiltration", "female")
    assert g["flagged"] and g["value"] < -0.2
    assert gap(sub, "sex", "Hernia", "female")["value"] is None  # too few positives
    text = (tmp_path / "test_rerun_report.md").read_text()
    assert "## Subgroups" in text and "### By age" in text and "| Infiltration | female |" in text
    with Image.open(tmp_path / "test_rerun_subgroups.png") as im:
        assert im.format == "PNG" and im.size[0] > 800
    # --no-subgroups: no section; thresholds must come from other images than the report's.
    proc = run_main(capsys, out["test"], "--data-dir", nih_dir, "--no-subgroups", "--no-figures",
                    "--n-boot", "100", module="report")
    # a second rerun: its own files (test_rerun2_*), the first's untouched
    assert "subgroups" not in json.loads((tmp_path / "test_rerun2_report.json").read_text())
    assert "subgroups" in json.loads((tmp_path / "test_rerun_report.json").read_text())
    assert_clean_error(run_main(capsys, out["test"], "--data-dir", nih_dir, "--val-predictions",
                                out["test"], module="report"), "shares 340 image(s)")


@pytest.mark.parametrize("case,fragment", [
    ("patients table on NIH", "--patients-table: MIMIC-IV's patients table is for MIMIC-CXR"),
    ("image twice in the table", "Data_Entry_2017_v2020.csv:3: image '00000001_000.png' is "
                                 "listed twice (or pass --no-subgroups)"),
    ("empty table", "label table is empty"),
])
@pytest.mark.integration
def test_bad_demographics_are_one_line(case, fragment, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rows = [["00000001_000.png", "No Finding", "0", "1", "58", "M", "PA"]]
    _nih_table(data / "Data_Entry_2017_v2020.csv", rows * (2 if "twice" in case else 1))
    if case == "empty table":
        (data / "Data_Entry_2017_v2020.csv").write_text("")
    names = ["00000001_000.png"]
    for part in ("train", "val", "test"):
        (data / f"{part}_list.txt").write_text("".join(f"{n} {' '.join(['0'] * 14)}\n"
                                                      for n in names) if part == "test" else
                                              f"0000000{2 if part == 'val' else 3}_000.png "
                                              + " ".join(["0"] * 14) + "\n")
    preds = _predictions(tmp_path / "p.csv", names, np.full((1, 14), 0.5))
    extra = ["--patients-table", tmp_path / "p.csv"] if "patients" in case else []
    assert_clean_error(run_main(capsys, preds, "--data-dir", data, "--no-figures", *extra,
                                module="report"), fragment)


@pytest.mark.integration
def test_infer_writes_the_subgroup_section_of_nih_images(small_model, nih_dir, tmp_path):
    """infer.py --part val chooses the thresholds, the test report then has the section,
    its Markdown tables and the figure; --no-subgroups leaves it out."""
    models = tmp_path / "models"
    shutil.copytree(small_model[0] / "models", models, ignore=shutil.ignore_patterns("pred*"))
    common = ["infer.py", "--mode", "int8", "--model-dir", models, "--data-dir", nih_dir,
              "--n-boot", "200"]
    val = run_script(*common, "--part", "val", "--no-figures")
    assert val.returncode == 0, val.stderr
    test = run_script(*common)
    assert test.returncode == 0, test.stderr
    assert "demographics from" in test.stdout and "subgroup gaps" in test.stdout
    report = json.loads((models / "predictions_int8_report.json").read_text())
    sub = report["subgroups"]
    assert sub["thresholds"] == str(nih_dir / "val_list.txt")
    assert set(sub["attributes"]) == {"sex", "age"}
    assert sum(sub["attributes"]["sex"]["images"].values()) == 340
    row = sub["attributes"]["sex"]["diseases"]["Infiltration"]["male"]
    assert row["auc"]["value"] is not None and row["at"]["youden"]["tpr"]["value"] is not None
    assert "## Subgroups" in (models / "predictions_int8_report.md").read_text()
    with Image.open(models / "predictions_int8_subgroups.png") as im:
        assert im.format == "PNG"
    off = run_script(*common, "--no-subgroups", "--no-figures")
    assert off.returncode == 0, off.stderr
    assert "subgroups" not in json.loads((models / "predictions_int8_report.json").read_text())

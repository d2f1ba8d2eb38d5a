"""A researcher's outputs (issue 32): never silently replaced, each saying what it is.

    what                                         where                                      test
    report.py replacing the evaluation's report  report.report_file, rerun_stem,            test_report_py_*
                                                 predictions.read_source (the record)
    --calibrated replacing the raw predictions    infer.evaluate (_calibrated), build_report  test_calibrated_*
    three val AUCs, none saying what it is        images.protocol_name in main, export, infer test_every_auc_*
    --localize on resized images                  cam.box_scale, scaled_boxes                 test_localize_*
    a heatmap or a subgroup figure without the    cam.write_cams, subgroups.write_figure      test_heatmaps_*,
    sample notice or the decision                                                              test_subgroup_*
    curves.py after the Quick start               curves.newest_run                          test_curves_*
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY, run_main, run_script



@pytest.fixture(scope="module")
def evaluated(small_model, nih_dir, tmp_path_factory):
    """A copy of the small exported model, evaluated on val (operating points) and test."""
    work, _ = small_model
    models = tmp_path_factory.mktemp("outputs") / "models"
    shutil.copytree(work / "models", models)
    for part in ("val", "test"):
        proc = run_script("infer.py", "--mode", "int8", "--part", part, "--model-dir", models,
                          "--data-dir", nih_dir, "--n-boot", "100")
        assert proc.returncode == 0, proc.stderr
    return models


@pytest.mark.integration
def test_report_py_finds_what_the_evaluation_knew_and_never_replaces_its_report(
        evaluated, nih_dir, capsys):
    """`python report.py models/predictions_int8.csv` (README), run where data/ does not
    exist: it used to overwrite the evaluation's report with one without thresholds or
    subgroups ('no demographics'). Now it reads the record beside the predictions (data
    directory, split, the operating points applied), gives the same numbers, and writes
    _rerun_* files, a second rerun _rerun2_*; the evaluation's own files are untouched. A
    record of another version of the file is said and not used; a file without one is
    reported as 'not recorded', never guessed raw; an edited record is one line."""
    csv = evaluated / "predictions_int8.csv"
    source = json.loads((evaluated / "predictions_int8_source.json").read_text())
    assert source["made_by"] == "infer.py" and source["data_dir"] == str(nih_dir.resolve())
    stored = json.loads((evaluated / "operating_points.json").read_text())["int8"]
    assert source["operating_points"] == stored and source["calibrated"] is False
    own = {p.name: p.read_bytes() for p in evaluated.glob("predictions_int8_*")
           if "_val" not in p.name}
    assert {"predictions_int8_report.json", "predictions_int8_roc.png"} <= set(own)
    proc = run_main(capsys, csv, "--n-boot", "100", module="report")
    assert proc.returncode == 0, proc.stderr
    assert f"using what infer.py recorded in {evaluated / 'predictions_int8_source.json'}" \
        in proc.stdout
    assert ("340 images, raw probabilities, ten crops of 56 from images resized to 64, "
            "OpenVINO INT8") in proc.stdout
    for name, data in own.items():  # nothing of the evaluation's replaced
        assert (evaluated / name).read_bytes() == data, name
    rerun = json.loads((evaluated / "predictions_int8_rerun_report.json").read_text())
    first = json.loads(own["predictions_int8_report.json"])
    assert rerun["made_by"] == "report.py" and first["made_by"] == "infer.py"
    assert rerun["operating_points"] == first["operating_points"]
    assert rerun["subgroups"]["source"] == first["subgroups"]["source"]
    # the same numbers (the CSV holds every digit: rounded, new ties moved an AUROC)
    assert rerun["mean"] == first["mean"] and rerun["diseases"] == first["diseases"]
    for kind in ("roc", "pr", "reliability"):
        assert (evaluated / f"predictions_int8_rerun_{kind}.png").is_file()
    # operating points chosen again on val since: the rerun keeps those the evaluation applied
    points_file = evaluated / "operating_points.json"
    kept = points_file.read_bytes()
    points_file.write_text(json.dumps({}))
    proc = run_main(capsys, csv, "--n-boot", "100", "--no-figures", module="report")
    points_file.write_bytes(kept)
    assert proc.returncode == 0, proc.stderr
    second = json.loads((evaluated / "predictions_int8_rerun2_report.json").read_text())
    assert second["diseases"] == first["diseases"]
    assert not (evaluated / "predictions_int8_rerun2_roc.png").exists()
    assert (evaluated / "predictions_int8_rerun_roc.png").is_file()  # the first's, kept
    # two reruns at once: each claims its own name (the report JSON, created exclusively)
    from report import rerun_stem
    claims = [rerun_stem(csv), rerun_stem(csv)]
    assert [c.name for c in claims] == ["predictions_int8_rerun3", "predictions_int8_rerun4"]
    for claim in claims:
        Path(f"{claim}_report.json").unlink()
    # a predictions file changed since its record: said, and the record not used
    empty = evaluated.parent / "no-data"
    empty.mkdir()
    changed = evaluated / "changed.csv"
    changed.write_text(csv.read_text().replace("0.", "0.0", 1))
    shutil.copy(evaluated / "predictions_int8_source.json", evaluated / "changed_source.json")
    proc = run_main(capsys, changed, "--n-boot", "100", "--no-figures", "--data-dir", empty,
                    module="report")
    assert (f"note: {evaluated / 'changed_source.json'} is the record of another version of "
            f"{changed}; not used") in proc.stdout
    assert proc.returncode != 0 and "using what" not in proc.stdout
    # no record at all: the report says it does not know raw from calibrated
    bare = evaluated / "bare.csv"
    shutil.copy(csv, bare)
    proc = run_main(capsys, bare, "--n-boot", "100", "--no-figures", "--data-dir", nih_dir,
                    module="report")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((evaluated / "bare_rerun_report.json").read_text())
    assert report["calibrated"] is None and report["probabilities"].startswith("not recorded")
    # an edited record: one line naming the file and the field
    edited = {**source, "calibrated": "false"}
    (evaluated / "predictions_int8_source.json").write_text(json.dumps(edited))
    proc = run_main(capsys, csv, "--no-figures", module="report")
    assert proc.returncode != 0
    assert (f"{evaluated / 'predictions_int8_source.json'}: calibrated is not a bool ('false')"
            in proc.stderr)
    (evaluated / "predictions_int8_source.json").write_text(json.dumps(source))


@pytest.mark.integration
def test_calibrated_predictions_are_their_own_file_and_say_so(evaluated, nih_dir, capsys):
    """--calibrated overwrote predictions_int8.csv, its report byte-identical to the raw run's
    and silent about which it was. Now: predictions_int8_calibrated.csv and its own report
    and figures; the raw files untouched; the report says the probabilities are calibrated,
    its thresholds are the val thresholds mapped through the calibration (the same
    decisions: every sensitivity equal to the raw report's)."""
    raw = {p.name: p.read_bytes() for p in evaluated.glob("predictions_int8*")
           if "calibrated" not in p.name and "rerun" not in p.name}
    proc = run_main(capsys, "--mode", "int8", "--calibrated", "--model-dir", evaluated,
                    "--data-dir", nih_dir, "--n-boot", "100", module="infer")
    assert proc.returncode == 0, proc.stderr
    assert (f"predictions: {evaluated / 'predictions_int8_calibrated.csv'} (Platt-calibrated "
            "probabilities)") in proc.stdout
    for name, data in raw.items():
        assert (evaluated / name).read_bytes() == data, name
    calibrated = json.loads((evaluated / "predictions_int8_calibrated_report.json").read_text())
    plain = json.loads(raw["predictions_int8_report.json"])
    assert calibrated["calibrated"] is True and plain["calibrated"] is False
    assert "Platt-calibrated" in calibrated["probabilities"]
    assert "Probabilities: Platt-calibrated" in (
        evaluated / "predictions_int8_calibrated_report.md").read_text()
    assert "Probabilities: raw" in raw["predictions_int8_report.md"].decode()
    for name, entry in plain["diseases"].items():
        mine = calibrated["diseases"][name]
        assert mine["auc"] == pytest.approx(entry["auc"], abs=1e-5)  # the map is increasing
        for rule in ("youden", "f1", "sensitivity"):
            assert mine["thresholds"][rule]["sensitivity"][0] == pytest.approx(
                entry["thresholds"][rule]["sensitivity"][0], abs=1e-9), (name, rule)
    for kind in ("roc", "pr", "reliability"):
        assert (evaluated / f"predictions_int8_calibrated_{kind}.png").is_file()
    # report.py on the calibrated file: the same report (its record says calibrated)
    proc = run_main(capsys, evaluated / "predictions_int8_calibrated.csv", "--n-boot", "100",
                    "--no-figures", module="report")
    assert proc.returncode == 0, proc.stderr
    again = json.loads((evaluated / "predictions_int8_calibrated_rerun_report.json").read_text())
    assert again["calibrated"] is True and again["diseases"] == calibrated["diseases"]


@pytest.mark.integration
def test_every_auc_says_what_it_is(small_model, evaluated, nih_dir, tmp_path, capsys):
    """Training's val AUC (one centre crop, after each epoch), the export's INT8 check (the
    held-out val images, ten crops) and the evaluation's (ten crops, the back end): three
    numbers for one model, each now printed with its images, crops and protocol."""
    _, export = small_model
    assert ("INT8 vs FP32 on 40 held-out val images (the val images not calibrated on; ten "
            "crops of 56 from images resized to 64)") in export.stdout
    proc = run_main(capsys, *TINY, "--epochs", "1", "--out-dir", tmp_path / "run", module="main")
    assert proc.returncode == 0, proc.stderr
    assert ("val mean AUC after each epoch: 40 val images, one centre crop of 56 from images "
            "resized to 64, PyTorch") in proc.stdout
    assert "val mean AUC" in proc.stdout and "(one centre crop)" in proc.stdout
    assert "done: best val mean AUC" in proc.stdout and "one centre crop)" in proc.stdout
    proc = run_main(capsys, "--mode", "int8", "--part", "val", "--model-dir", evaluated,
                    "--data-dir", nih_dir, "--n-boot", "100", "--no-figures",
                    "--out-csv", tmp_path / "val.csv", module="infer")
    assert ("100 val images of " in proc.stdout and ", ten crops of 56 from images resized to "
            "64, OpenVINO INT8" in proc.stdout), proc.stdout
    report = json.loads((tmp_path / "val_report.json").read_text())
    assert report["protocol"] == "ten crops of 56 from images resized to 64, OpenVINO INT8"


@pytest.mark.integration
def test_localize_places_nih_boxes_on_the_sample_s_256_pixel_images(small_model, capsys):
    """NIH's boxes are in the released 1024x1024 pixels; the sample's images are 256x256:
    --localize said a box lay outside the image, as if the data were corrupt. Now the boxes
    are scaled to the image read (the sample holds boxed images in val and test); an image
    they cannot be placed on (not square: a crop, another image) is left out and said."""
    from cam import box_scale, image_boxes, scaled_boxes
    from common import DataError
    assert box_scale("x.png", (256, 256)) == (0.25, 0.25)
    notes = []  # a heatmap of a boxed image that is not square: drawn without them, and said
    assert image_boxes(None, "00002578_000.png", (256, 300), notes.append) == {}
    assert notes == ["note: cannot place NIH's boxes on 00002578_000.png: it is 300x256, not "
                     "the released 1024x1024 image nor a resized copy (a crop or another "
                     "image); the heatmap is drawn without them"]
    assert image_boxes(None, "00002578_000.png", (256, 256), notes.append)
    assert scaled_boxes({"Nodule": [(800, 320, 80, 60)]}, (0.25, 0.25)) == {
        "Nodule": [(200, 80, 20, 15)]}
    with pytest.raises(DataError, match="cannot place NIH's boxes on x.png: it is 300x256"):
        box_scale("x.png", (300, 256))
    work, _ = small_model
    proc = run_main(capsys, "--mode", "int8", "--model-dir", work / "models", "--data-dir",
                    REPO / "sample", "--localize", module="infer")
    assert proc.returncode == 0, proc.stderr
    assert "val: 2 boxed images, 2 boxes" in proc.stdout
    assert "test: 2 boxed images, 2 boxes" in proc.stdout
    assert "Nodule" in proc.stdout and "Pneumonia" in proc.stdout


@pytest.mark.integration
def test_heatmaps_say_the_decision_and_the_sample_notice(small_model, monkeypatch, tmp_path):
    """Every heatmap's title: the finding, its probability and the decision at the val
    threshold (or that there is none), and the sample model's notice; the grid marks each
    finding + or -."""
    import cam
    from backends import load_openvino, read_metadata
    from report import SAMPLE_NOTICE
    work, _ = small_model
    models = work / "models"
    backend = load_openvino(models, "int8", read_metadata(models), 56, 1)
    from PIL import Image
    titles = []
    monkeypatch.setattr(cam, "overlay", lambda gray, heat, title, *a: titles.append(title)
                        or Image.new("RGB", (8, 8)))
    monkeypatch.setattr(cam, "grid", lambda gray, heats, names, path, title, boxes:
                        titles.append((title, names)))
    thresholds = np.full(len(backend.class_names), 0.0)
    thresholds[1] = 2.0  # never reached: negative
    thresholds[2] = np.nan  # none chosen
    cam.write_cams(backend, [REPO / "sample" / "images" / "00000100_000.png"], tmp_path, 64,
                   56, "int8", thresholds=thresholds, rule="youden", notice=SAMPLE_NOTICE)
    overlays, (grid_title, names) = titles[:-1], titles[-1]
    assert overlays and all(t.endswith(f"\n{SAMPLE_NOTICE}") for t in overlays)
    assert all(", positive (youden threshold 0.000)" in t for t in overlays)
    assert grid_title.endswith(SAMPLE_NOTICE) and "+ positive, - negative" in grid_title
    assert names[0].endswith(" +") and names[1].endswith(" -") and names[2][-1].isdigit()
    assert cam.decision_words(0.3, np.nan, "f1") == \
        "p = 0.300, no decision (no threshold chosen on val)"
    # infer.py --image --cam --calibrated: the titles show what the terminal shows (calibrated
    # probability and threshold), the decision still the raw probability's at the raw threshold
    titles.clear()
    cam.write_cams(backend, [REPO / "sample" / "images" / "00000100_000.png"], tmp_path, 64,
                   56, "int8", thresholds=thresholds, rule="youden",
                   calibrate=lambda raw: np.full_like(raw, 0.25))
    overlays, (grid_title, names) = titles[:-1], titles[-1]
    assert all("p = 0.250, positive (youden threshold 0.250)" in t and "Platt-calibrated p"
               in t for t in overlays)
    assert "Platt-calibrated probability beside each finding" in grid_title
    assert names[0].endswith("0.250 +") and names[1].endswith("0.250 -")


def test_subgroup_figure_says_the_sample_notice_and_the_family(monkeypatch, tmp_path):
    """The subgroup figure carried no sample notice; its title now has it, and how many gaps
    5% would flag by chance."""
    import matplotlib.figure

    from report import SAMPLE_NOTICE
    from subgroups import subgroup_statistics, write_figure
    rng = np.random.default_rng(0)
    n = 400
    labels = (rng.random((n, 2)) < 0.3).astype(float)
    probs = np.clip(labels * 0.3 + rng.random((n, 2)) * 0.7, 0, 1)
    sex = np.where(rng.random(n) < 0.5, "female", "male").astype(object)
    section = subgroup_statistics(labels, probs, np.arange(n), {"sex": sex},
                                  {"youden": [0.5, 0.5]}, n_boot=100, class_names=["A", "B"])
    titles = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (
        titles.append(fig._suptitle.get_text()), real(fig, *a, **k)))
    assert write_figure(tmp_path / "s.png", section, notice=SAMPLE_NOTICE)
    assert titles[0].endswith(SAMPLE_NOTICE) and "would be by chance alone" in titles[0]


@pytest.mark.integration
def test_curves_py_without_an_argument_draws_the_newest_run(tmp_path):
    """`python curves.py runs/chexnet` (README) failed after the Quick start, which writes
    runs/sample-demo: with no argument it now draws the newest run under runs/."""
    proc = run_script("main.py", *TINY, "--epochs", "1", "--out-dir", tmp_path / "runs" / "demo",
                      "--no-tensorboard")
    assert proc.returncode == 0, proc.stderr
    proc = run_script(REPO / "curves.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "curves.py: the last training run: runs/demo" in proc.stdout
    assert (tmp_path / "runs" / "demo" / "curves.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script(REPO / "curves.py", cwd=empty)
    assert proc.returncode != 0 and "no runs/*/metrics.jsonl: train first" in proc.stderr

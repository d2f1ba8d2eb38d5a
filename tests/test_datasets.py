"""CheXpert and MIMIC-CXR-JPG: their tables read exactly, patient-level frontal-only splits,
the uncertainty policies and the masked loss, class names carried by the model, training +
export + evaluation on each layout, and an NIH model evaluated on CheXpert over the shared
classes. Fixtures: real NIH images re-encoded in each layout (other_datasets.py)."""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, assert_clean_error, run_main, run_script
from tables import CHEXPERT_CLASSES, detect_dataset
from labels import evaluation_labels, list_header, patient_of, read_list, training_targets
from splitting import resolve_split
from other_datasets import FIRST_ROW, make_chexpert, make_mimic

C = {c: k for k, c in enumerate(CHEXPERT_CLASSES)}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, nih_images):
    image_dir, _ = nih_images
    pngs = sorted(image_dir.glob("*.png"))[:60]
    root = tmp_path_factory.mktemp("layouts")
    return make_chexpert(root, pngs), make_mimic(root, pngs)


def _args(data_dir):
    return [data_dir if a == REPO / "sample" else a for a in TINY]


def test_chexpert_tables_parse_exactly(layouts):
    chexpert, _ = layouts
    assert detect_dataset(chexpert) == "chexpert"
    lists = resolve_split("auto", chexpert)  # the official split, frontal views only
    assert lists["train"].parent == chexpert / "splits" / "chexpert-official-seed0"
    names, labels = {}, {}
    for split, path in lists.items():
        names[split], labels[split] = read_list(path)
        assert list_header(path) == (CHEXPERT_CLASSES, ".")
        assert all("lateral" not in n for n in names[split])
        assert all((chexpert / n).is_file() for n in names[split])
    # valid.csv (10 patients, frontal) is the test split; train.csv's patients make train+val
    assert len(names["test"]) == 10 and all(n.startswith("valid/") for n in names["test"])
    assert len(names["train"]) + len(names["val"]) == 40
    assert not {patient_of(n) for n in names["train"]} & {patient_of(n) for n in names["val"]}
    # The first row of train.csv, by hand: 1.0 -> 1, 0.0 -> 0, -1.0 -> -1, blank -> NaN
    first = "train/patient00001/study1/view1_frontal.jpg"
    split = next(s for s in names if first in names[s])
    row = labels[split][names[split].index(first)]
    assert row[C["Cardiomegaly"]] == 1 and row[C["Atelectasis"]] == 1
    assert row[C["Edema"]] == -1 and row[C["Pleural Effusion"]] == 0
    assert np.isnan(row[C["No Finding"]]) and np.isnan(row[C["Support Devices"]])
    assert np.isnan(row).sum() == 14 - len([v for v in FIRST_ROW.values() if v])
    values = np.concatenate([labels[s].ravel() for s in labels])
    assert {1.0, 0.0, -1.0} <= set(values[~np.isnan(values)].tolist()) and np.isnan(values).any()
    with_laterals = resolve_split("official", chexpert, keep_laterals=True)
    assert with_laterals["train"].parent.name == "chexpert-official-seed0-laterals"
    assert sum(len(read_list(p)[0]) for p in with_laterals.values()) == 50 + 14 + 4  # laterals


def test_mimic_tables_parse_exactly(layouts):
    _, mimic = layouts
    assert detect_dataset(mimic) == "mimic"
    lists = resolve_split("auto", mimic)
    seen = {}
    for split, path in lists.items():
        names, labels = read_list(path)
        for n in names:
            assert (mimic / n).is_file()
            subject = patient_of(n)
            expected = "test" if (subject - 10000032) // 1000 % 6 == 5 else (
                "val" if (subject - 10000032) // 1000 % 5 == 4 else "train")
            assert split == expected  # MIMIC's own split, by subject
            seen[n] = labels[names.index(n)]
    # The last subject's second study has no labels row: its images are left out.
    assert not [n for n in seen if "/s50002901/" in n]
    # Labels are per study: the first subject's study (alphabetical columns in the file)
    first = next(n for n in seen if "/p10000032/s50000000/" in n)
    from other_datasets import _values
    expected = _values(0)
    for c in CHEXPERT_CLASSES:
        v = {"1.0": 1, "0.0": 0, "-1.0": -1, "": np.nan}[expected[c]]
        assert (np.isnan(seen[first][C[c]]) if np.isnan(v) else seen[first][C[c]] == v), c
    # Frontal only: the metadata's LATERAL images are not listed, unless asked for
    laterals = resolve_split("official", mimic, keep_laterals=True)
    assert sum(len(read_list(p)[0]) for p in laterals.values()) > len(seen)
    random = resolve_split("random", mimic, seed=3)
    assert random["train"].parent.name == "mimic-random-seed3"


def test_uncertainty_policies_and_evaluation_labels():
    raw = np.array([[1, 0, -1, np.nan]], np.float32)
    assert training_targets(raw, "ones").tolist() == [[1, 0, 1, 0]]
    assert training_targets(raw, "zeros").tolist() == [[1, 0, 0, 0]]
    ignore = training_targets(raw, "ignore")
    assert ignore[0, :2].tolist() == [1, 0] and np.isnan(ignore[0, 2:]).all()
    evaluated = evaluation_labels(raw)  # uncertain left out, unmentioned negative
    assert evaluated[0, [0, 1, 3]].tolist() == [1, 0, 0] and np.isnan(evaluated[0, 2])
    nih = np.array([[1, 0]], np.uint8)
    assert training_targets(nih, "ignore") is nih and evaluation_labels(nih) is nih


def test_masked_loss_ignores_what_it_should():
    from fitting import MaskedBCE
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([[1, 0, float("nan")]] * 4)
    loss = MaskedBCE()(logits, targets)
    loss.backward()
    assert (logits.grad[:, 2] == 0).all() and (logits.grad[:, :2] != 0).all()
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :2], targets[:, :2])
    assert torch.allclose(loss, plain)
    full = torch.tensor([[1.0, 0.0, 1.0]] * 4)
    assert torch.allclose(MaskedBCE()(logits, full),
                          torch.nn.BCEWithLogitsLoss()(logits, full))


def test_metrics_leave_uncertain_labels_out():
    from metrics import bootstrap_aucs, roc_aucs
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (60, 2)).astype(np.float32)
    p = rng.random((60, 2))
    with_nan = y.copy()
    with_nan[:10, 0] = np.nan
    aucs = roc_aucs(with_nan, p)
    assert aucs[0] == pytest.approx(roc_aucs(y[10:, :1], p[10:, :1])[0])
    assert aucs[1] == pytest.approx(roc_aucs(y, p)[1])
    boot, _ = bootstrap_aucs(with_nan, p, np.arange(60), n_boot=50)
    assert np.isfinite(boot).all()


@pytest.mark.integration
@pytest.mark.parametrize("which", ["chexpert", "mimic"])
def test_train_export_and_evaluate_on_each_layout(which, layouts, tmp_path, capsys, nih_dir):
    """Trained with --uncertain ignore (masked loss), the checkpoint and the exported model
    carry CheXpert's 14 classes, evaluation reports them; the store works on the nested layout."""
    data = layouts[0] if which == "chexpert" else layouts[1]
    prepared = run_main(capsys, "prepare", "--data-dir", data, "--size", "64", module="dataset")
    assert prepared.returncode == 0, prepared.stderr
    run = tmp_path / "run"
    trained = run_main(capsys, *_args(data), "--uncertain", "ignore", "--epochs", "1",
                       "--out-dir", run)
    assert trained.returncode == 0, trained.stderr
    assert "reading the preprocessed store" in trained.stdout
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["class_names"] == CHEXPERT_CLASSES and ckpt["model"]["classifier.weight"].shape[0] == 14
    refused = run_main(capsys, *_args(data), "--uncertain", "ones", "--epochs", "2",
                       "--out-dir", run)
    assert_clean_error(refused, "--uncertain ignore, not ones")
    export = run_main(capsys, "--export", "--checkpoint", run / "best.pt",
                      "--model-dir", tmp_path / "models", "--calibration-size", "2",
                      "--validation-size", "2", module="infer")
    assert export.returncode == 0, export.stdout + export.stderr
    assert json.loads((tmp_path / "models" / "chexnet.json").read_text())["class_names"] == \
        CHEXPERT_CLASSES
    evaluated = run_main(capsys, "--mode", "int8", "--model-dir", tmp_path / "models",
                         "--no-figures", "--n-boot", "100", module="infer")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "Pleural Effusion" in evaluated.stdout and "Support Devices" in evaluated.stdout
    csv = next((tmp_path / "models").glob("predictions_*.csv")).read_text().splitlines()
    assert csv[0] == "Image Index," + ",".join(CHEXPERT_CLASSES)


@pytest.mark.integration
def test_an_nih_model_evaluates_on_chexpert_over_the_shared_classes(layouts, small_model,
                                                                       tmp_path, capsys):
    chexpert, _ = layouts
    work, _ = small_model
    models = tmp_path / "models"
    shutil.copytree(work / "models", models)
    proc = run_main(capsys, "--mode", "fp32", "--model-dir", models, "--data-dir",
                    chexpert, "--no-figures", "--n-boot", "100", module="infer")
    assert proc.returncode == 0, proc.stderr
    shared = ["Atelectasis", "Cardiomegaly", "Pleural Effusion", "Pneumonia", "Pneumothorax",
              "Consolidation", "Edema"]
    assert "7 of the model's 14 classes are labelled" in proc.stdout
    assert "Effusion = Pleural Effusion" in proc.stdout
    header = (models / "predictions_fp32_on_chexpert.csv").read_text().splitlines()[0].split(",")
    assert not (models / "predictions_fp32.csv").exists() or (
        (work / "models" / "predictions_fp32.csv").read_text()
        == (models / "predictions_fp32.csv").read_text())  # the NIH evaluation is untouched
    assert header == ["Image Index", *shared]
    none = run_main(capsys, "--mode", "fp32", "--model-dir", models, "--data-dir",
                    chexpert, "--class-map", "Hernia=Fracture", "--no-figures", module="infer")
    assert none.returncode == 0, none.stderr  # an explicit map replaces the built-in one
    assert "Hernia = Fracture" in none.stdout


@pytest.mark.integration
def test_bad_tables_are_one_line_errors(layouts, tmp_path):
    chexpert, _ = layouts
    bad = tmp_path / "CheXpert-v1.0-small"
    bad.mkdir()
    shutil.copy(chexpert / "valid.csv", bad)
    text = (chexpert / "train.csv").read_text().splitlines()
    fields = text[1].split(",")
    fields[5 + C["Edema"]] = "maybe"
    (bad / "train.csv").write_text("\n".join([text[0], ",".join(fields), *text[2:]]) + "\n")
    proc = run_script("dataset.py", "split", "--data-dir", bad)
    assert_clean_error(proc, f"{bad / 'train.csv'}:2: Edema is 'maybe'")
    (bad / "train.csv").write_text(text[0].replace("Frontal/Lateral", "View") + "\n")
    proc = run_script("dataset.py", "split", "--data-dir", bad)
    assert_clean_error(proc, "train.csv: table lacks column(s) 'Frontal/Lateral'")


@pytest.mark.integration
def test_stats_of_a_chexpert_split(layouts):
    chexpert, _ = layouts
    proc = run_script("stats.py", "--data-dir", chexpert)
    assert proc.returncode == 0, proc.stderr
    assert "Pleural Effusion" in proc.stdout and "% uncertain (-1)" in proc.stdout
    assert proc.stdout.splitlines()[0].endswith("chexpert-official-seed0")


@pytest.mark.integration
def test_more_bad_tables_and_maps(layouts, tmp_path):
    chexpert, _ = layouts
    bad = tmp_path / "CheXpert-v1.0-small"
    bad.mkdir()
    text = (chexpert / "train.csv").read_text().splitlines()
    (bad / "train.csv").write_text("\n".join(text) + "\n")
    proc = run_script("dataset.py", "split", "--data-dir", bad)  # valid.csv missing
    assert_clean_error(proc, f"{bad / 'valid.csv'}: not found")
    shutil.copy(chexpert / "valid.csv", bad)
    (bad / "train.csv").write_text(text[0] + "\n")
    assert_clean_error(run_script("dataset.py", "split", "--data-dir", bad), "train.csv: table has no rows")
    cut = ",".join(text[1].split(",")[:6])  # a row cut short after 'No Finding'
    (bad / "train.csv").write_text("\n".join([text[0], cut, *text[2:]]) + "\n")
    assert_clean_error(run_script("dataset.py", "split", "--data-dir", bad),
                       "train.csv:2: fewer fields than the header")
    # Paths already relative to the data directory are taken as they are
    relative = [text[0]] + [ln.replace("CheXpert-v1.0-small/", "", 1) for ln in text[1:]]
    (bad / "train.csv").write_text("\n".join(relative) + "\n")
    lists = resolve_split("auto", bad)
    assert read_list(lists["train"])[0][0].startswith("train/patient")
    from common import DataError
    from labels import NIH_CLASSES, shared_classes
    for mapping, says in (({"Nope": "Edema"}, "--class-map: the model has no class 'Nope'"),
                          ({"Edema": "Oedema"}, "--class-map: the list labels no class"),
                          ({"Mass": "Lung Lesion", "Nodule": "Lung Lesion"},
                           "'Lung Lesion' is mapped from several classes")):
        with pytest.raises(DataError, match=says):
            shared_classes(NIH_CLASSES, CHEXPERT_CLASSES, mapping)

@pytest.mark.integration
def test_check_and_evaluation_follow_the_trained_split(layouts, tmp_path, capsys):
    """dataset.py check reads the nested layout; a checkpoint trained on a seeded random split
    is evaluated on that split's test list, never on images it trained on."""
    chexpert, _ = layouts
    proc = run_main(capsys, "check", "--data-dir", chexpert, "--decode", "--workers", "1", module="dataset")
    assert proc.returncode == 0, proc.stderr
    assert "ok, 36 train, 4 val, 10 test images decoded" in proc.stdout
    run = tmp_path / "run"
    trained = run_main(capsys, *_args(chexpert), "--split", "random", "--split-seed", "3",
                       "--epochs", "1", "--limit", "16", "--out-dir", run)
    assert trained.returncode == 0, trained.stderr
    evaluated = run_main(capsys, "--mode", "torch", "--checkpoint", run / "best.pt",
                         "--model-dir", tmp_path / "models", "--no-figures", "--n-boot", "100", module="infer")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "chexpert-random-seed3/test_list.txt" in evaluated.stdout

"""The data layer: label tables, splits, stats.py, the Dataset, and every bad input."""
import gzip
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common import DataError
from conftest import REPO, assert_clean_error, run_script
from dataset import XrayDataset, collate
from labels import NIH_CLASSES, patient_of, read_list
from splitting import SHIPPED_SPLIT_DIR, make_random_split, resolve_split
from tables import read_label_table


@pytest.fixture(scope="session")
def full_table_dir(tmp_path_factory, shared):
    """A data directory holding NIH's complete 2020 label table (112,120 rows)."""
    d = tmp_path_factory.mktemp("full")
    with gzip.open(shared / "Data_Entry_2017_v2020.csv.gz", "rb") as src, \
            open(d / "Data_Entry_2017_v2020.csv", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return d


def test_label_table_both_revisions(full_table_dir, tmp_path):
    names, patients, labels = read_label_table(full_table_dir / "Data_Entry_2017_v2020.csv")
    assert len(names) == 112_120 and len(set(patients)) == 30_805
    assert labels.shape == (112_120, 14)
    # No Finding is all zeros; the first row is "Cardiomegaly" of patient 1.
    assert names[0] == "00000001_000.png" and labels[0].tolist() == [0, 1] + [0] * 12
    assert labels.sum(1).min() == 0 and labels.sum() > 0
    # The 2017 file: the same columns and a trailing comma on every line.
    text = (full_table_dir / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    (tmp_path / "Data_Entry_2017.csv").write_text("".join(line + ",\n" for line in text))
    names17, patients17, labels17 = read_label_table(tmp_path / "Data_Entry_2017.csv")
    assert names17 == names and (labels17 == labels).all() and (patients17 == patients).all()


def test_random_split_is_deterministic_and_patient_disjoint(full_table_dir, tmp_path):
    first = make_random_split(full_table_dir, seed=0)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    shutil.rmtree(first)
    again = make_random_split(full_table_dir, seed=0)
    for split in ("train", "val", "test"):
        name = f"{split}_list.txt"
        assert (again / name).read_bytes() == (copy / name).read_bytes()
    names = {s: read_list(again / f"{s}_list.txt")[0] for s in ("train", "val", "test")}
    sizes = {s: len(n) for s, n in names.items()}
    assert sum(sizes.values()) == 112_120
    assert len(set().union(*map(set, names.values()))) == 112_120
    for split, fraction in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs(sizes[split] / 112_120 - fraction) < 0.005
    patients = {s: {patient_of(n) for n in ns} for s, ns in names.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    other = make_random_split(full_table_dir, seed=1)
    assert (other / "test_list.txt").read_bytes() != (again / "test_list.txt").read_bytes()


def test_official_split_keeps_nih_test_list(full_table_dir):
    # NIH's official lists, rebuilt from the published split (train+val / test).
    test_names = read_list(SHIPPED_SPLIT_DIR / "test_list.txt")[0]
    trainval = read_list(SHIPPED_SPLIT_DIR / "train_list.txt")[0] + read_list(
        SHIPPED_SPLIT_DIR / "val_list.txt")[0]
    (full_table_dir / "test_list.txt").write_text("\n".join(test_names) + "\n")
    (full_table_dir / "train_val_list.txt").write_text("\n".join(trainval) + "\n")
    lists = resolve_split("official", full_table_dir)
    names = {s: read_list(p)[0] for s, p in lists.items()}
    assert sorted(names["test"]) == sorted(test_names)
    assert sorted(names["train"] + names["val"]) == sorted(trainval)
    assert not {patient_of(n) for n in names["train"]} & {patient_of(n) for n in names["val"]}
    assert 0.11 < len(names["val"]) / len(trainval) < 0.14


@pytest.mark.integration
def test_stats_prints_shipped_split_on_fresh_clone():
    proc = run_script("stats.py", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == "                     train     val    test"
    assert lines[2] == "Atelectasis         10.190   9.974  10.788"
    assert lines[-2].split() == ["images", "78468", "11219", "22433"]
    assert [ln.split()[0] for ln in lines[2:16]] == NIH_CLASSES


@pytest.mark.integration
def test_stats_on_a_fresh_random_split(full_table_dir):
    proc = run_script("stats.py", "--data-dir", full_table_dir, "--split", "random")
    assert proc.returncode == 0, proc.stderr
    counts = proc.stdout.splitlines()[-2].split()[1:]
    assert sum(map(int, counts)) == 112_120
    assert "warning" not in proc.stdout


def test_shipped_split_is_patient_disjoint():
    lists = resolve_split("chexnet")
    patients = [{patient_of(n) for n in read_list(p)[0]} for p in lists.values()]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])


def test_auto_split_prefers_the_data_dirs_own_lists():
    assert resolve_split("auto", REPO / "sample")["train"] == REPO / "sample" / "train_list.txt"
    assert resolve_split("auto", REPO / "no-such-dir")["train"].parent == SHIPPED_SPLIT_DIR


def test_dataset_shapes_on_real_images(nih_data_dir):
    from dataset import to_model_input
    lists = resolve_split("auto", nih_data_dir)
    train = XrayDataset(nih_data_dir, lists["train"], mode="train", size=512, crop=224)
    x, y, name = train[0]
    assert x.shape == (1, 224, 224) and x.dtype == torch.uint8  # one channel travels
    assert y.shape == (14,) and y.dtype == torch.float32 and name == train.names[0]
    ten = XrayDataset(nih_data_dir, lists["train"], mode="ten_crop", size=256, crop=224)
    centre = XrayDataset(nih_data_dir, lists["train"], mode="center", size=256, crop=224)
    assert ten[0][0].shape == (10, 1, 224, 224) and centre[0][0].shape == (1, 224, 224)
    float_ten = XrayDataset(nih_data_dir, lists["train"], mode="ten_crop", normalize=True)
    assert float_ten[0][0].shape == (10, 3, 224, 224) and float_ten[0][0].dtype == torch.float32
    # The device-side finish equals the CPU normalisation.
    assert torch.allclose(to_model_input(ten[0][0][None])[0], float_ten[0][0], atol=1e-5)
    # Tests run the same code on small images.
    small = XrayDataset(nih_data_dir, lists["train"], mode="ten_crop", size=64, crop=56)
    assert small[0][0].shape == (10, 1, 56, 56)
    batch = collate([ten[0], ten[1]])
    assert batch[0].shape == (2, 10, 1, 224, 224) and list(batch[2]) == ten.names[:2]


def test_grayscale_and_rgba_match_torchvision_tencrop(nih_data_dir):
    """Our numpy evaluation path equals torchvision's Resize -> TenCrop -> Normalize on RGB."""
    from torchvision import transforms
    reference = transforms.Compose([
        transforms.Resize(256), transforms.TenCrop(224),
        transforms.Lambda(lambda crops: torch.stack([transforms.Normalize(
            [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(transforms.ToTensor()(c))
            for c in crops]))])
    lists = resolve_split("auto", nih_data_dir)
    names = sum((read_list(p)[0] for p in lists.values()), [])
    modes = {n: Image.open(nih_data_dir / "images" / n).mode for n in names}
    assert set(modes.values()) == {"L", "RGBA"}
    chosen = [n for n in names if modes[n] == "RGBA"] + [n for n in names if modes[n] == "L"][:3]
    for split, path in lists.items():
        ds = XrayDataset(nih_data_dir, path, mode="ten_crop", normalize=True)
        for i in (i for i, n in enumerate(ds.names) if n in chosen):  # each mode, all splits
            x = ds[i][0]
            with Image.open(nih_data_dir / "images" / ds.names[i]) as im:
                expected = reference(im.convert("RGB"))
            assert torch.allclose(x, expected, atol=1e-5), ds.names[i]


def test_training_augmentation_is_seeded_by_epoch_and_index(nih_data_dir):
    path = resolve_split("auto", nih_data_dir)["train"]
    ds = XrayDataset(nih_data_dir, path, mode="train", size=256, seed=3)
    a = ds[1][0]
    torch.manual_seed(123)  # the global generator must not matter
    assert torch.equal(ds[1][0], a)
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], a)


# ---- bad input: one clear line naming the file, no traceback --------------------------------

@pytest.mark.integration
def test_missing_data_dir_says_how_to_get_data(tmp_path):
    proc = run_script("dataset.py", "check", "--data-dir", tmp_path / "data")
    assert_clean_error(proc, "data", "batch_download.sh", "--data-dir sample")


@pytest.mark.integration
def test_data_dir_without_images_or_label_table(tmp_path, nih_data_dir):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    assert_clean_error(run_script("dataset.py", "check", "--data-dir", tmp_path / "empty"),
                       "images", "no images (PNG, JPEG or DICOM)")
    (nih_data_dir / "Data_Entry_2017_v2020.csv").unlink()
    assert_clean_error(run_script("dataset.py", "check", "--data-dir", nih_data_dir),
                       "no label table")


@pytest.mark.integration
def test_missing_listed_images_are_counted(nih_data_dir):
    names = read_list(nih_data_dir / "train_list.txt")[0]
    for n in names[:4]:
        (nih_data_dir / "images" / n).unlink()
    line = assert_clean_error(run_script("dataset.py", "check", "--data-dir", nih_data_dir),
                              "train_list.txt", f"4 of {len(names)} listed images are missing")
    assert names[0] in line


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["truncated", "not_png"])
def test_unreadable_image_is_named(nih_data_dir, damage):
    name = read_list(nih_data_dir / "val_list.txt")[0][1]
    path = nih_data_dir / "images" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not an image\n")
    proc = run_script("dataset.py", "check", "--data-dir", nih_data_dir, "--decode")
    assert_clean_error(proc, name, "unreadable image")
    proc = run_script("dataset.py", "check", "--data-dir", nih_data_dir, "--decode",
                      "--skip-bad-images")
    assert proc.returncode == 0 and name in proc.stderr and "skipping" in proc.stderr


LOADER_PROBE = """
import sys, torch
sys.path.insert(0, {repo!r})
from common import DataError, one_line
from dataset import XrayDataset, collate
ds = XrayDataset({data!r}, {data!r} + "/val_list.txt", mode="center")
try:
    list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, collate_fn=collate))
except DataError as e:
    print("ERROR", one_line(e))
ds.skip_bad_images = True
seen = sum(len(b[2]) for b in torch.utils.data.DataLoader(
    ds, batch_size=4, num_workers=0, collate_fn=collate) if b is not None)
print("SEEN", seen, len(ds))
"""


@pytest.mark.integration
def test_unreadable_image_in_a_loader_worker(nih_data_dir, tmp_path):
    """Errors from DataLoader workers reach the user as the original one line. Run in a process
    of its own: loader workers in the pytest process, then OpenVINO and torch inference with
    child processes in that same process, crashed it with SIGSEGV (a signal arriving while a
    pipe closed; torch installs a SIGCHLD handler for loader workers)."""
    name = read_list(nih_data_dir / "val_list.txt")[0][0]
    (nih_data_dir / "images" / name).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    probe = tmp_path / "probe.py"
    probe.write_text(LOADER_PROBE.format(repo=str(REPO), data=str(nih_data_dir)))
    proc = run_script(probe)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines["ERROR"].startswith(str(nih_data_dir / "images" / name) + ": unreadable image")
    seen, total = lines["SEEN"].split()
    assert int(seen) == int(total) - 1
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: skipping")]
    assert len(warnings) == 1 and name in warnings[0]  # one line, not a Python warning


@pytest.mark.integration
def test_label_table_missing_column(nih_data_dir):
    table = nih_data_dir / "Data_Entry_2017_v2020.csv"
    table.write_text(table.read_text().replace("Patient ID", "Patient"))
    proc = run_script("stats.py", "--data-dir", nih_data_dir, "--split", "random")
    assert_clean_error(proc, str(table), "'Patient ID'")


@pytest.mark.integration
def test_label_table_unknown_disease(nih_data_dir):
    table = nih_data_dir / "Data_Entry_2017_v2020.csv"
    lines = table.read_text().splitlines()
    lines[5] = lines[5].replace(lines[5].split(",")[1], "Atelectasis|Flu", 1)
    table.write_text("\n".join(lines) + "\n")
    proc = run_script("stats.py", "--data-dir", nih_data_dir, "--split", "random")
    assert_clean_error(proc, f"{table}:6", "'Flu'")


@pytest.mark.integration
def test_list_line_with_wrong_field_count(nih_data_dir):
    path = nih_data_dir / "val_list.txt"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0]  # 13 labels
    path.write_text("\n".join(lines) + "\n")
    assert_clean_error(run_script("stats.py", "--split", nih_data_dir), "val_list.txt:3",
                       "14 labels")
    with pytest.raises(DataError, match="val_list.txt:3"):
        read_list(path)


@pytest.mark.integration
def test_unknown_split_name():
    assert_clean_error(run_script("stats.py", "--split", "nonsense"), "--split nonsense")


@pytest.mark.integration
def test_bundled_sample_is_a_valid_data_dir():
    proc = run_script("dataset.py", "check", "--data-dir", "sample", "--decode")
    assert proc.returncode == 0, proc.stderr
    assert "120 train, 40 val, 40 test" in proc.stdout
    sizes = sum(p.stat().st_size for p in (REPO / "sample").rglob("*") if p.is_file())
    assert sizes < 10 * 2**20
    for p in (REPO / "sample" / "images").iterdir():
        with Image.open(p) as im:
            assert im.size == (256, 256)
    names = sum((read_list(REPO / "sample" / f"{s}_list.txt")[0]
                 for s in ("train", "val", "test")), [])
    assert len({patient_of(n) for n in names}) == len(names) == 200
    labels = np.concatenate([read_list(REPO / "sample" / f"{s}_list.txt")[1]
                             for s in ("val", "test")])
    assert labels.sum(0).min() >= 1  # every disease has positives to compute an AUC on

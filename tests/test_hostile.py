"""Trust, round 3 (issue 18): the newer features under hostile input, faults and distributed
resume. One test per class of failure, each at the mechanism that owns it:

    class                                   mechanism                                 test
    calibration reverses a ranking          metrics.fit_platt_monotone, operating_points.check_operating_points   test_platt_*
    paths from tables/lists leave data dir  labels.name_problem (tables.check_names, read_list, list_header)   test_names_*
    DICOM transform not well defined        images._dicom_pixels / _voi / _finite, load_gray: DataError only   test_dicom_*
    decompression bombs                     images.MAX_DECODED_BYTES, check_declared_size (header first)      test_dicom_*
    prediction CSV / box file round trip    report.write/read_predictions, cam.read_boxes                  test_*_round_trip
    chunk proves its images                 predictions.Chunks (start, stop, SHA-256 of names, rows)      test_chunks_*
    output names collide                    cam.cam_stem, check_writable_dir before work                  test_heatmap_*
    parameters changed or meaningless       report.n_boot type, cam.Tally(taus)                           test_*_flags
    torchrun resume                         predictions.predict_in_chunks (rank 0 alone touches chunks)   test_torchrun_*
    lock kept by an orphaned worker         common.exclusive_lock (fcntl.lockf: not inherited by fork)    test_lock_*
    store names with spaces                 store.read_names / names_text (one name per line)             test_store_*
    operating points / class map checked    infer.evaluate: checked before Chunks and the first image     test_evaluation_*

Round 4 (issue 31), here and in test_serve_hostile.py (the DICOM node):
    a stream declaring another size         codestreams.frame_problem, images.pixel_data_problem  test_a_codestream_*
    a stream cut short, decoded as grey     codestreams.frame_problem (end marker), pydicom (RLE)  test_a_truncated_*
    a deflate bomb                          codestreams.inflated_problem (bounded inflate)        test_a_deflate_bomb_*
    a class map naming a class twice        infer.class_map                                       test_a_class_map_*
"""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import DataError
from conftest import BLOCK_TORCH, REPO, assert_clean_error, run_main, run_script
from labels import read_list, write_list

PNG = REPO / "sample" / "images" / "00000284_000.png"


# ---------------------------------------------------------------------------------------------
# Calibration: a fitted map is increasing, whatever the val set

def test_platt_map_never_reverses_a_ranking():
    """A val set on which the model ranks positives below negatives fits a negative slope:
    refused, identity kept, a note; the calibrated probabilities keep every AUROC."""
    from metrics import apply_platt, fit_platt_monotone, roc_aucs
    from report import choose_operating_points, platt_notes
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 2)) < 0.3).astype(np.uint8)
    probs = rng.random((200, 2)) * 0.5
    probs[:, 0] += 0.4 * (1 - labels[:, 0])  # disease 0: positives score LOWER (AUROC < 0.5)
    probs[:, 1] += 0.4 * labels[:, 1]  # disease 1: a sound model
    a, b, refused = fit_platt_monotone(labels, probs)
    assert [d for d, _ in refused] == [0] and refused[0][1] < 0
    assert a[0] == 1 and b[0] == 0 and a[1] > 0
    points = choose_operating_points(labels, probs, "m", "val.txt", ["A", "B"])
    calibrated = apply_platt(probs, points["platt"]["a"], points["platt"]["b"])
    assert np.allclose(roc_aucs(labels, calibrated), roc_aucs(labels, probs), atol=0, rtol=0)
    assert "A" in points["platt"]["identity"] and "reverse the ranking" in platt_notes(points)[0]


# ---------------------------------------------------------------------------------------------
# Image names: every path made from a table or a list stays inside the data directory

@pytest.mark.parametrize("name, fragment", [
    ("../outside.png", "'..' folder"), ("/etc/passwd", "absolute path"),
    ("a b.png", "holds whitespace"), ("images/../../x.png", "'..' folder")])
def test_names_from_list_files_stay_inside(tmp_path, name, fragment):
    from dataset import ImageList
    (tmp_path / "images").mkdir()
    names, labels = read_list(REPO / "sample" / "test_list.txt")
    lines = [f"{n} {' '.join(map(str, r))}\n" for n, r in zip(names[:3], labels[:3])]
    bad_line = lines[0].replace(names[0], name, 1) if " " not in name else \
        f"{name} {' '.join(map(str, labels[0]))}\n"
    (tmp_path / "test_list.txt").write_text("".join(lines[1:]) + bad_line)
    with pytest.raises(DataError) as e:
        ImageList(tmp_path, tmp_path / "test_list.txt")
    message = str(e.value)
    if " " in name:  # a space splits the name: the line has a field too many
        assert message.startswith(f"{tmp_path / 'test_list.txt'}:3: expected an image name")
    else:
        assert message.startswith(f"{tmp_path / 'test_list.txt'}:3: ") and fragment in message


def test_list_header_images_folder_stays_inside(tmp_path):
    from labels import list_header
    (tmp_path / "l.txt").write_text("# classes: A,B\n# images: ../../etc\nx.png 1 0\n")
    with pytest.raises(DataError, match="images: ../../etc' has a '..' folder"):
        list_header(tmp_path / "l.txt")


@pytest.mark.parametrize("path, fragment", [
    ("CheXpert-v1.0-small/train/../../../etc/x.jpg", "'..' folder"),
    ("/data/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "absolute path"),
    ("CheXpert-v1.0-small/train/patient00001/study 1/view1_frontal.jpg", "holds whitespace")])
def test_names_from_chexpert_tables_stay_inside(tmp_path, path, fragment):
    """The error names train.csv and the line, not a list file made from it."""
    from other_datasets import make_chexpert
    from tables import read_chexpert
    data = make_chexpert(tmp_path, sorted((REPO / "sample" / "images").glob("*.png"))[:8],
                         n_train=4, n_valid=2)
    with open(data / "train.csv", newline="") as f:
        rows = list(csv.reader(f))
    rows[3][0] = path
    with open(data / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError) as e:
        read_chexpert(data)
    assert str(e.value).startswith(f"{data / 'train.csv'}:4: Path ") and fragment in str(e.value)


@pytest.mark.parametrize("column, value, fragment", [
    ("dicom_id", "../../../../etc/passwd", "'..' folder"),
    ("dicom_id", "a/b", "holds a '/'"),
    ("study_id", "1/../../x", "is not a number"),
    ("subject_id", "..", "is not a number")])
def test_names_from_mimic_tables_stay_inside(tmp_path, column, value, fragment):
    import gzip
    from other_datasets import make_mimic
    from tables import MIMIC_FILES, read_mimic
    data = make_mimic(tmp_path, sorted((REPO / "sample" / "images").glob("*.png"))[:8],
                      n_subjects=6)
    path = data / MIMIC_FILES["split"]
    with gzip.open(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    rows[2][rows[0].index(column)] = value
    with gzip.open(path, "wt", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError) as e:
        read_mimic(data)
    assert str(e.value).startswith(f"{path}:3: ") and fragment in str(e.value), str(e.value)


def test_names_from_the_nih_table_stay_inside(tmp_path):
    from tables import read_label_table
    table = tmp_path / "Data_Entry_2017_v2020.csv"
    text = (REPO / "sample" / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    text[2] = "../../x.png" + text[2][text[2].index(","):]
    table.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"Data_Entry_2017_v2020.csv:3: Image Index gives the "
                                        r"image name '../../x.png', which has a '..' folder"):
        read_label_table(table)


# ---------------------------------------------------------------------------------------------
# DICOM: a pixel transform that is not well defined is an error naming file and attribute

def _dicom(tmp_path, name, kind="window", edit=None, raw=None):
    import pydicom
    from dicom_files import write_dicom
    path = write_dicom(PNG, tmp_path / f"{name}.dcm", kind)
    if edit:
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path)
    if raw:
        path.write_bytes(raw(path.read_bytes()))
    return path


def _set(**values):
    def edit(ds):
        for k, v in values.items():
            setattr(ds, k, v)
    return edit


def _lut(**values):
    def edit(ds):
        for k, v in values.items():
            if v is None:
                delattr(ds.VOILUTSequence[0], k)
            else:
                setattr(ds.VOILUTSequence[0], k, v)
    return edit


DICOM_CASES = {
    "window center NaN": (dict(edit=_set(WindowCenter="nan")), "WindowCenter is 'nan'"),
    "window width inf": (dict(edit=_set(WindowWidth="inf")), "WindowWidth is 'inf'"),
    "window center text": (dict(edit=_set(WindowCenter="12345.67"),
                                raw=lambda b: b.replace(b"12345.67", b"abcdefgh")),
                           "WindowCenter is 'abcdefgh'"),
    "rescale slope NaN": (dict(edit=_set(RescaleSlope="nan", RescaleIntercept=0)),
                          "RescaleSlope is 'nan'"),
    "rescale intercept overflows": (dict(edit=_set(RescaleSlope=1, RescaleIntercept="1e400")),
                                    "RescaleIntercept is '1e400'"),
    "rescale slope 0": (dict(edit=_set(RescaleSlope=0, RescaleIntercept=0)), "RescaleSlope is 0"),
    "VOI function unknown": (dict(edit=_set(VOILUTFunction="CUBIC")), "VOILUTFunction"),
    "VOI LUT 0 bits": (dict(kind="voi_lut", edit=_lut(LUTDescriptor=[4096, 0, 0])),
                       "LUTDescriptor declares 0 bits"),
    "VOI LUT without descriptor": (dict(kind="voi_lut", edit=_lut(LUTDescriptor=None)),
                                   "LUTDescriptor is missing"),
    "VOI LUT data short": (dict(kind="voi_lut", edit=lambda ds: setattr(
        ds.VOILUTSequence[0][0x00283006], "value", b"\0\1")), "VOILUTSequence[0]"),
    "cut in its header": (dict(raw=lambda b: b[:400]), "truncated or corrupt DICOM"),
    "cut before its pixels": (dict(raw=lambda b: b[:560]), "truncated or corrupt DICOM"),
    "cut in its pixels": (dict(raw=lambda b: b[:len(b) // 2]), "truncated or corrupt"),
    "declares 65535x65535": (dict(edit=_set(Rows=65535, Columns=65535)),
                             "declares a 65535x65535 image of 16 bits"),
    "declares 1000 frames": (dict(edit=_set(NumberOfFrames=1000)), "1000 frames"),
}


@pytest.mark.parametrize("case", list(DICOM_CASES))
def test_dicom_transform_not_well_defined_is_an_error_naming_file_and_attribute(tmp_path, case):
    pytest.importorskip("pydicom")
    from images import load_gray
    spec, fragment = DICOM_CASES[case]
    path = _dicom(tmp_path, "x", **spec)
    with pytest.raises(DataError) as e:  # DataError, nothing else: what --skip-bad-images skips
        load_gray(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message, message


# A child program's own peak memory in kB, printed on a line of its own: VmHWM, not
# ru_maxrss, which Linux carries over exec from the forked pytest process (2 GB late in a run)
PRINT_PEAK_KB = "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"


def load_in_child(path):
    """(what load_gray(path) raised, as 'Type message'; the child's peak memory in kB)."""
    code = ("import sys; sys.path.insert(0, '.')\nfrom images import load_gray\n"
            "try:\n    load_gray(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
            f"{PRINT_PEAK_KB}\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    error, peak_kb = proc.stdout.strip().splitlines()
    return error, int(peak_kb)


@pytest.mark.integration
def test_dicom_bomb_is_refused_before_decoding(tmp_path):
    """A compressed file of a few KB declaring 65535x65535: refused from its header, in well
    under the memory its pixels would take (the decoder is never called)."""
    pytest.importorskip("openjpeg", reason="writing the file needs pylibjpeg-openjpeg")
    import pydicom
    path = _dicom(tmp_path, "bomb", "jpeg2000")
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 65535
    ds.save_as(path)
    error, peak_kb = load_in_child(path)
    assert error.startswith(f"DataError {path}: declares a 65535x65535 image"), error
    assert peak_kb < 600_000, f"peak {peak_kb / 1e3:.0f} MB"


def test_a_corrupt_compressed_dicom_is_corrupt_when_its_decoder_is_there(tmp_path):
    pytest.importorskip("openjpeg", reason="JPEG 2000 needs pylibjpeg-openjpeg")
    import pydicom
    from images import load_gray
    path = _dicom(tmp_path, "j2k", "jpeg2000")
    ds = pydicom.dcmread(path)
    frame = bytearray(ds.PixelData)
    frame[40:] = bytes(len(frame) - 40)  # the codestream's body zeroed: the decoder fails
    ds.PixelData = bytes(frame)
    ds.save_as(path)
    with pytest.raises(DataError) as e:
        load_gray(path)
    assert "truncated or corrupt" in str(e.value) and "install" not in str(e.value), str(e.value)


SYNTAXES = {"JPEG Baseline": "1.2.840.10008.1.2.4.50", "JPEG-LS": "1.2.840.10008.1.2.4.80",
            "JPEG 2000": "1.2.840.10008.1.2.4.90"}


@pytest.mark.integration
@pytest.mark.parametrize("codec", list(SYNTAXES))
def test_a_codestream_declaring_another_size_is_refused_before_decoding(codec, tmp_path):
    """The DICOM header says 256x256, the stream's own frame header 65500x65500 (a 122 KB file
    that made a decoder take 15 GB): refused from the stream's header, the decoder never
    called (a child's peak memory stays small), one line naming both sizes."""
    from dicom_files import compressed_dicom, declare_size
    path = compressed_dicom(PNG, tmp_path / "x.dcm", SYNTAXES[codec],
                            lambda frame: declare_size(frame, 65500, 65500))
    error, peak_kb = load_in_child(path)
    assert error.startswith(f"DataError {path}: truncated or corrupt DICOM pixel data: its "), error
    assert "declares 65500x65500 with 1 component(s), the DICOM header 256x256" in error, error
    assert peak_kb < 600_000, f"peak {peak_kb / 1e3:.0f} MB"


@pytest.mark.parametrize("codec", list(SYNTAXES) + ["RLE"])
def test_a_truncated_codestream_is_an_error_not_grey_rows(codec, tmp_path, capsys):
    """A stream cut short decoded with its missing rows flat grey, and was classified: now an
    error for every codec, in load_gray and so in infer.py --image (exit 1, one line); the
    same image uncut decodes."""
    from dicom_files import compressed_dicom
    from images import load_gray
    syntax = SYNTAXES.get(codec, "1.2.840.10008.1.2.5")
    whole = compressed_dicom(PNG, tmp_path / "whole.dcm", syntax)
    assert np.asarray(load_gray(whole)).shape == (256, 256)
    cut = compressed_dicom(PNG, tmp_path / "cut.dcm", syntax, lambda f: f[:len(f) * 2 // 3])
    with pytest.raises(DataError) as e:
        load_gray(cut)
    assert str(e.value).startswith(f"{cut}: ") and "truncated" in str(e.value), str(e.value)


def test_codestreams_read_as_their_standards_write_them():
    """What codestreams.frame_problem reads of a stream: JPEG's fill and padding bytes after
    EOI (00 and FF) are no truncation; JPEG-LS's LSE marker that enlarges the frame is the
    size; a height left to a DNL marker cannot be checked (refused); a second frame header is
    refused; a JP2 file's codestream is its jp2c box, walked by box lengths (an XLBox too)."""
    import io
    import struct

    from codestreams import frame_problem
    gray = np.asarray(Image.open(PNG).convert("L"))
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    baseline = "1.2.840.10008.1.2.4.50"

    def check(frame, syntax=baseline, rows=256, columns=256):
        return frame_problem(syntax, frame, rows, columns, 1, 8)
    assert check(jpeg) is None and check(jpeg + b"\xff\xff\x00") is None
    assert "truncated" in check(jpeg[:-2] + b"\x00\x00")
    sof = jpeg.index(b"\xff\xc0")
    dnl = jpeg[:sof + 5] + b"\x00\x00" + jpeg[sof + 7:]
    assert "DNL marker" in check(dnl)
    twice = jpeg[:sof] + jpeg[sof:sof + 2 + struct.unpack(">H", jpeg[sof + 2:sof + 4])[0]] + \
        jpeg[sof:]
    assert "a second frame header" in check(twice)
    # JPEG-LS: SOF55 says 256x256, an LSE of ID 4 right after says 60000x60000
    ls = b"\xff\xd8\xff\xf7\x00\x0b\x08\x01\x00\x01\x00\x01\x01\x11\x00" \
        b"\xff\xf8\x00\x0a\x04\x03" + (60000).to_bytes(3, "big") * 2 + \
        b"\xff\xda\x00\x08\x01\x01\x00\x00\x00\x00" + b"\x00" * 10 + b"\xff\xd9"
    assert "declares 60000x60000" in check(ls, "1.2.840.10008.1.2.4.80", 256, 256)
    # JPEG 2000 in a JP2 file: signature box, a box of 8-byte length, then the codestream
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + struct.pack(">IIIIIIII", 256, 256, 0, 0,
                                                              256, 256, 0, 0) + b"\x00\x01"
    codestream = siz + b"\x07\x01\x01" + b"\x00" * 20 + b"\xff\xd9"
    jp2 = (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + struct.pack(">I4sQ", 1, b"xml ", 20) + b"<x/>"
           + struct.pack(">I4s", 8 + len(codestream), b"jp2c") + codestream + b"\x00" * 7)
    j2k = "1.2.840.10008.1.2.4.90"
    assert check(codestream, j2k) is None and check(jp2, j2k) is None
    assert "truncated" in check(jp2[:-12], j2k)
    assert "declares 512x256" in check(jp2.replace(struct.pack(">II", 256, 256),
                                                   struct.pack(">II", 512, 256), 1), j2k)


@pytest.mark.integration
def test_a_truncated_dicom_fails_infer_image(small_model, tmp_path, capsys):
    from dicom_files import compressed_dicom
    work, _ = small_model
    cut = compressed_dicom(PNG, tmp_path / "cut.dcm", SYNTAXES["JPEG Baseline"],
                           lambda f: f[:len(f) * 2 // 3])
    proc = run_main(capsys, "--mode", "int8", "--model-dir", work / "models", "--image", cut,
                    module="infer")
    assert_clean_error(proc, str(cut), "is truncated (it does not end with its end-of-image")


@pytest.mark.integration
def test_a_deflate_bomb_is_refused_without_inflating_it(tmp_path):
    """A deflated data set of 2 MB that inflates to 512 MiB: pydicom inflates the whole data
    set at once; it is measured in pieces first and refused past the limit (images: the
    largest image plus 16 MiB of header), in a child whose peak memory stays small."""
    from dicom_files import deflate_bomb
    path = deflate_bomb(tmp_path / "bomb.dcm")
    error, peak_kb = load_in_child(path)
    assert error == (f"DataError {path}: its deflated data set inflates to over 144 MiB "
                     "(a deflate bomb?)"), error
    assert peak_kb < 400_000, f"peak {peak_kb / 1e3:.0f} MB"


def test_a_class_map_pair_wins_over_a_same_named_class_in_any_order():
    """'Pneumonia=Effusion' with a model and a list that both have Effusion and Pneumonia:
    the model's Pneumonia is scored against the list's Effusion, as asked; the model's
    Effusion (its column taken) is left out. It used to take the column first, silently."""
    from labels import shared_classes
    model, listed = ["Effusion", "Pneumonia"], ["Effusion", "Pneumonia"]
    assert shared_classes(model, listed, {"Pneumonia": "Effusion"}) == [(1, 0)]
    assert shared_classes(model, listed, {"Effusion": "Pneumonia"}) == [(0, 1)]
    assert shared_classes(["Effusion", "Mass"], ["Pleural Effusion", "Mass"]) == [(0, 0), (1, 1)]


@pytest.mark.parametrize("mapping, named", [
    ("Effusion=Pleural Effusion,Effusion=Edema", "model class 'Effusion'"),
    ("Effusion=Edema,Pneumonia=Edema", "list class 'Edema'")])
@pytest.mark.integration
def test_a_class_map_naming_a_class_twice_is_refused(mapping, named, capsys, tmp_path):
    """A dict kept the last of two pairs: the model's Effusion scored as Edema, a column gone,
    without a word. Now refused as the flag is read, before any model is loaded."""
    proc = run_main(capsys, "--mode", "int8", "--model-dir", tmp_path, "--class-map", mapping,
                    module="infer")
    line = assert_clean_error(proc, "--class-map", named, "named twice")
    assert "each class once" in line


@pytest.fixture
def dicom_data_dir(tmp_path):
    """40 sample images as DICOM with the sample's lists, two of them damaged (a NaN window,
    a malformed VOI LUT)."""
    from dicom_files import write_dicom
    root = tmp_path / "dicom"
    (root / "images").mkdir(parents=True)
    names = {}
    for split in ("train", "val", "test"):
        ns, labels = read_list(REPO / "sample" / f"{split}_list.txt")
        ns, labels = ns[:8] if split != "test" else ns[:24], labels[:8] if split != "test" else labels[:24]
        write_list(root / f"{split}_list.txt", [n.replace(".png", ".dcm") for n in ns], labels)
        names[split] = ns
    for split, ns in names.items():
        for n in ns:
            write_dicom(REPO / "sample" / "images" / n, root / "images" / n.replace(".png", ".dcm"),
                        "voi_lut" if n == names["test"][5] else "window")
    shutil.copy(REPO / "sample" / "Data_Entry_2017_v2020.csv", root)
    bad = [root / "images" / names["test"][3].replace(".png", ".dcm"),
           root / "images" / names["test"][5].replace(".png", ".dcm")]
    import pydicom
    ds = pydicom.dcmread(bad[0])
    ds.WindowCenter = "nan"
    ds.save_as(bad[0])
    ds = pydicom.dcmread(bad[1])
    ds.VOILUTSequence[0].LUTDescriptor = [4096, 0, 0]
    ds.save_as(bad[1])
    return root, bad


@pytest.mark.integration
def test_dicom_skip_bad_images_in_every_command(dicom_data_dir, small_model, tmp_path, capsys):
    """check --decode, prepare and an evaluation stop with one line naming the file without
    --skip-bad-images, and skip exactly the two damaged files with it."""
    pytest.importorskip("pydicom")
    data, bad = dicom_data_dir
    check = ["check", "--data-dir", data, "--decode", "--workers", "1"]
    assert_clean_error(run_main(capsys, *check, module="dataset"), "corrupt DICOM")
    ok = run_main(capsys, *check, "--skip-bad-images", module="dataset")
    assert ok.returncode == 0 and "22 test" in ok.stdout, ok.stderr
    assert all(str(b) in ok.stderr for b in bad)

    models = small_model[0] / "models"
    evaluation = ["--mode", "fp32", "--model-dir", models, "--data-dir", data, "--no-figures",
                  "--out-csv", tmp_path / "p.csv", "--n-boot", "100"]
    assert_clean_error(run_main(capsys, *evaluation, "--no-store", module="infer"), str(bad[0]))
    ran = run_main(capsys, *evaluation, "--no-store", "--skip-bad-images", module="infer")
    assert ran.returncode == 0, ran.stderr
    assert "22 test images" in ran.stdout and "(2 unreadable skipped)" in ran.stdout

    prepare = ["prepare", "--data-dir", data, "--size", "64", "--workers", "1"]
    assert_clean_error(run_main(capsys, *prepare, module="dataset"), "corrupt DICOM")
    done = run_main(capsys, *prepare, "--skip-bad-images", module="dataset")
    assert done.returncode == 0 and "2 unreadable left out" in done.stdout, done.stderr
    from_store = run_main(capsys, *evaluation, "--skip-bad-images", module="infer")
    assert from_store.returncode == 0 and "22 test images" in from_store.stdout, from_store.stderr


# ---------------------------------------------------------------------------------------------
# What infer.py writes, report.py reads back exactly; the box file is read the same way

def test_predictions_csv_round_trip(tmp_path):
    from predictions import read_predictions, write_predictions
    names = ['a,b.png', 'say "hi".png', "plain.png", "ünï.png"]
    probs = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [1.0, 0.0]])
    path = tmp_path / "p.csv"
    write_predictions(path, names, ["A", "B,C"], probs)
    got_names, got, classes = read_predictions(path)
    assert got_names == names and classes == ["A", "B,C"] and np.array_equal(got, probs)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a spreadsheet's byte-order mark
    assert read_predictions(path)[0] == names
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    for bad, fragment in ((lines[:3] + [lines[3] + ",0.7"] + lines[4:], ":4: expected an image name"),
                          (lines[:2] + ["x.png,0.5"] + lines[3:], ":3: expected an image name"),
                          (lines[:2] + ['"open.png,0.5,0.5'] + lines[3:], "p.csv:3"),
                          (lines[:2] + ["x.png,nan,0.5"] + lines[3:], ":3: probabilities")):
        path.write_text("\n".join(bad) + "\n")
        with pytest.raises(DataError) as e:
            read_predictions(path)
        assert fragment in str(e.value), str(e.value)


def test_box_file_round_trip(tmp_path):
    from cam import read_boxes
    header = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
    path = tmp_path / "BBox_List_2017.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (header + '"a,b.png",Mass,1,2,3,4\n').encode())
    assert read_boxes(path) == {"a,b.png": {"Mass": [(1, 2, 3, 4)]}}
    path.write_text(header + "x.png,Mass,1,2,3,4\ny.png,Mass,1,2,3,4,5\n")
    with pytest.raises(DataError, match=r"BBox_List_2017.csv:3: expected an image, a disease and "
                                        r"4 numbers, got 7 fields"):
        read_boxes(path)
    path.write_text(header + "x.png,Mass,1,2,3,4,,,\n")  # NIH's empty trailing columns
    assert read_boxes(path) == {"x.png": {"Mass": [(1, 2, 3, 4)]}}


# ---------------------------------------------------------------------------------------------
# Saved chunks prove which images they hold

def test_chunks_prove_their_images(tmp_path):
    from predictions import Chunks
    names = [f"{i:08d}_000.png" for i in range(25)]
    notes = []
    key = {"model": "m"}
    chunks = Chunks(tmp_path / "p.csv", key, 10, names, notes.append)
    for c in range(3):
        n = min(10, 25 - 10 * c)
        chunks.write(c, np.full((n, 2), c / 10), np.ones(n, bool))
    assert Chunks(tmp_path / "p.csv", key, 10, names, notes.append).done == 3 and not notes
    partial = tmp_path / "p.csv.partial"

    def resumed(damage):
        for c in range(3):
            n = min(10, 25 - 10 * c)
            chunks.write(c, np.full((n, 2), c / 10), np.ones(n, bool))
        damage()
        notes.clear()
        return Chunks(tmp_path / "p.csv", key, 10, names, notes.append).done, notes
    # chunk 2 (5 rows) copied over chunk 1: a different range
    done, said = resumed(lambda: shutil.copy(partial / "chunk-00002.npz", partial / "chunk-00001.npz"))
    assert done == 1 and "holds images 20..25" in said[0] and "predicting its images again" in said[0]
    assert not (partial / "chunk-00002.npz").exists()  # nothing after a bad chunk is used
    # the same range, other names (a list edited between runs with the same key)
    other = Chunks(tmp_path / "q.csv", key, 10, ["x" + n for n in names], print)
    other.write(0, np.zeros((10, 2)), np.ones(10, bool))
    done, said = resumed(lambda: shutil.copy(tmp_path / "q.csv.partial" / "chunk-00000.npz",
                                             partial / "chunk-00000.npz"))
    assert done == 0 and "other names" in said[0]
    # truncated
    done, said = resumed(lambda: (partial / "chunk-00001.npz").write_bytes(
        (partial / "chunk-00001.npz").read_bytes()[:300]))
    assert done == 1 and "unreadable" in said[0]

    # the right proof, the wrong number of rows
    def wrong_length():
        start, stop, digest = chunks.proof(1)
        with open(partial / "chunk-00001.npz", "wb") as f:
            np.savez(f, probs=np.zeros((7, 2)), readable=np.ones(7, bool), start=start,
                     stop=stop, names_sha256=digest)
    done, said = resumed(wrong_length)
    assert done == 1 and "(7, 2) probabilities for 10 images" in said[0]


@pytest.mark.system
def test_chunks_copied_in_a_real_evaluation_are_predicted_again(small_model, nih_dir, tmp_path,
                                                                 capsys):
    """An evaluation killed after 3 chunks; chunk 0 copied over chunk 1: the rerun notes it,
    predicts images 10.. again and writes exactly the CSV of an uninterrupted run."""
    from test_faults import KILLER
    models = small_model[0] / "models"
    flags = ["--mode", "int8", "--model-dir", models, "--data-dir", nih_dir, "--limit", "40",
             "--chunk-size", "10", "--no-figures", "--n-boot", "100"]
    whole = run_main(capsys, *flags, "--out-csv", tmp_path / "whole.csv", module="infer")
    assert whole.returncode == 0, whole.stderr
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=str(REPO)))
    out = tmp_path / "p.csv"
    killed = run_script(killer, "infer.py", *flags, "--out-csv", out,
                        env={"KILL_AFTER": "chunk-00002.npz:always"})
    assert killed.returncode == 9 and not out.exists()
    partial = tmp_path / "p.csv.partial"
    shutil.copy(partial / "chunk-00000.npz", partial / "chunk-00001.npz")
    again = run_main(capsys, *flags, "--out-csv", out, module="infer")
    assert again.returncode == 0, again.stderr
    assert "chunk-00001.npz: holds images 0..10" in again.stdout
    assert "continuing after 10 images" in again.stdout
    assert out.read_text() == (tmp_path / "whole.csv").read_text()


# ---------------------------------------------------------------------------------------------
# Heatmaps: names never collide; memory follows the crop size

@pytest.mark.integration
def test_heatmap_names_never_collide(full_size_model, tmp_path):
    """Two images called 1.png in two folders, in two modes: four sets of files, none
    overwritten; --cam where a file is: one line, before any work."""
    a, b = tmp_path / "a" / "1.png", tmp_path / "b" / "1.png"
    # the bundled sample's 256x256 copies: the figures of 1024x1024 originals cost a minute
    sources = sorted((REPO / "sample" / "images").glob("*.png"))[:2]
    for path, source in zip((a, b), sources):
        path.parent.mkdir()
        shutil.copy(source, path)
    out = tmp_path / "cams"
    written = []
    for mode, python in (("fp32", ("-c", BLOCK_TORCH)), ("int8", ("-c", BLOCK_TORCH))):
        proc = run_script(*python, "infer.py", "--mode", mode, "--model-dir",
                          full_size_model / "models", "--image", a, b, "--cam", out)
        assert proc.returncode == 0, proc.stderr
        written += [ln.split(": ", 1)[1] for ln in proc.stdout.splitlines()
                    if ln.startswith("heatmap: ")]
    assert len(set(written)) == len(written) and sorted(map(str, out.iterdir())) == sorted(written)
    grids = [Path(w).name for w in written if w.endswith("_all.png")]
    assert len(grids) == 4 and len({g.split("_")[1] for g in grids}) == 2  # 2 folders' hashes
    assert {g.rsplit("_", 2)[1] for g in grids} == {"fp32", "int8"}
    (tmp_path / "file").write_text("precious\n")
    proc = run_script("-c", BLOCK_TORCH, "infer.py", "--mode", "fp32", "--model-dir",
                      full_size_model / "models", "--image", a, "--cam", tmp_path / "file")
    assert_clean_error(proc, f"--cam {tmp_path / 'file'}: exists and is not a directory")
    assert "probabilities" not in proc.stdout and a.name not in proc.stdout
    assert (tmp_path / "file").read_text() == "precious\n"


@pytest.mark.integration
def test_heatmaps_of_a_huge_image_take_the_memory_of_a_small_one(full_size_model, tmp_path):
    """A 5000x5000 PNG: overlays capped at 1024 px, peak memory that of an NIH image."""
    big = tmp_path / "big.png"
    with Image.open(PNG) as im:
        im.convert("L").resize((5000, 5000), Image.BILINEAR).save(big)
    peaks = {}
    for name in ("big", "small"):
        path = big if name == "big" else PNG
        code = (BLOCK_TORCH.replace('runpy.run_path("infer.py", run_name="__main__")',
                                    'try:\n    runpy.run_path("infer.py", run_name="__main__")\n'
                                    f'finally:\n    print("peak", end=" ")\n    {PRINT_PEAK_KB}'))
        proc = run_script("-c", code, "infer.py", "--mode", "fp32", "--model-dir",
                          full_size_model / "models", "--image", path, "--cam", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
        peaks[name] = int(proc.stdout.split("peak ")[1].split()[0]) / 1e3
        for png in (tmp_path / name).glob("*.png"):
            if not png.name.endswith("_all.png"):
                with Image.open(png) as im:
                    if name == "big":  # two capped panels side by side, never 5000 px
                        assert max(im.size) < 3 * 1024, im.size
    assert peaks["big"] < peaks["small"] + 400, peaks  # was +4.8 GB


@pytest.mark.integration
def test_localize_reads_dicom_images(tmp_path, capsys, small_model):
    """--localize on a data set of DICOMs (its box file naming them), with a fixed --localize-tau
    that is not on the grid of thresholds tried on val: scored at exactly that value."""
    pytest.importorskip("pydicom")
    from dicom_files import write_dicom
    from test_cam import blob_data_dir
    data = blob_data_dir(tmp_path / "blobs", n_train=4, n_val=4, n_test=6, size=64)
    for png in sorted((data / "images").glob("*.png")):
        write_dicom(png, png.with_suffix(".dcm"), "window")
        png.unlink()
    for path in [*data.glob("*_list.txt"), data / "BBox_List_2017.csv"]:
        path.write_text(path.read_text().replace(".png", ".dcm"))
    args = ["--mode", "torch", "--checkpoint", small_model[0] / "run" / "best.pt", "--data-dir",
            data, "--localize", "--model-dir", tmp_path / "m", "--localize-tau", "0.33"]
    proc = run_main(capsys, *args, module="infer")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "m" / "localization_torch.json").read_text())
    assert result["methods"]["model"]["tau"] == 0.33
    assert result["methods"]["model"]["test"]["overall"]["boxes"] == 3


# ---------------------------------------------------------------------------------------------
# Parameters: validated up front, never silently changed

@pytest.mark.integration
@pytest.mark.parametrize("value", ["1", "99", "1000000000", "-5", "1e3"])
def test_n_boot_out_of_range_is_refused_up_front(value, capsys, tmp_path):
    proc = run_main(capsys, str(tmp_path / "p.csv"), "--n-boot", value, module="report")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"argument --n-boot: must be a whole number from 100 to 100000, got '{value}'" in \
        proc.stderr and "percentile" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Evaluation: everything a report needs is checked before the first image

def _points_file(models, edit):
    path = models / "operating_points.json"
    points = json.loads(path.read_text())
    edit(points["fp32"])
    path.write_text(json.dumps(points))


OPERATING_POINT_DAMAGE = {
    "thresholds not a list": (lambda e: e["thresholds"].update(youden="0.5"), "thresholds.youden"),
    "a threshold a string": (lambda e: e["thresholds"]["f1"].__setitem__(0, "x"), "thresholds.f1"),
    "a threshold NaN": (lambda e: e["thresholds"]["f1"].__setitem__(0, float("nan")), "NaN"),
    "too few thresholds": (lambda e: e["thresholds"]["youden"].pop(), "thresholds.youden"),
    "platt a too long": (lambda e: e["platt"]["a"].append(1.0), "platt.a"),
    "platt a negative": (lambda e: e["platt"]["a"].__setitem__(0, -21.3), "slope <= 0"),
    "platt missing": (lambda e: e.pop("platt"), "platt"),
    "images a string": (lambda e: e.update(images="many"), "images"),
    "entry a list": (None, "entry 'fp32' is a list"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(OPERATING_POINT_DAMAGE))
def test_evaluation_checks_operating_points_before_the_first_image(small_model, nih_dir,
                                                                   tmp_path, capsys, case):
    models = tmp_path / "models"
    shutil.copytree(small_model[0] / "models", models)
    flags = ["--mode", "fp32", "--model-dir", models, "--data-dir", nih_dir, "--no-figures",
             "--limit", "30", "--n-boot", "100"]
    if not (models / "operating_points.json").exists() or "fp32" not in json.loads(
            (models / "operating_points.json").read_text()):
        val = run_main(capsys, *flags, "--part", "val", module="infer")
        assert val.returncode == 0, val.stderr
    edit, fragment = OPERATING_POINT_DAMAGE[case]
    if edit is None:
        points = json.loads((models / "operating_points.json").read_text())
        points["fp32"] = [1, 2]
        (models / "operating_points.json").write_text(json.dumps(points))
    else:
        _points_file(models, edit)
    before = sorted(p.name for p in models.iterdir())
    for extra in ([], ["--calibrated"]):
        proc = run_main(capsys, *flags, *extra, module="infer")
        line = assert_clean_error(proc, "operating_points.json", fragment)
        assert "predicted" not in proc.stderr + proc.stdout, line
        assert sorted(p.name for p in models.iterdir()) == before  # no CSV, no chunks
    # --part val chooses them again: a damaged entry is replaced, not an obstacle (a file that
    # is not strict JSON, or an entry that is no object, is the user's to delete: it says so)
    if edit is not None and case != "a threshold NaN":
        val = run_main(capsys, *flags, "--part", "val", module="infer")
        assert val.returncode == 0, val.stderr


@pytest.mark.integration
def test_evaluation_checks_the_class_map_before_the_first_image(small_model, tmp_path, capsys):
    from other_datasets import make_chexpert
    data = make_chexpert(tmp_path, sorted((REPO / "sample" / "images").glob("*.png"))[:30],
                         n_train=20, n_valid=8)
    out = tmp_path / "p.csv"
    flags = ["--mode", "fp32", "--model-dir", small_model[0] / "models", "--data-dir", data,
             "--no-figures", "--out-csv", out, "--n-boot", "100"]
    for mapping, fragment in (("Mass=Lung Lesion,Nodule=Lung Lesion", "named twice"),
                              ("Flu=Edema", "the model has no class 'Flu'"),
                              ("Mass=Tumour", "the list labels no class 'Tumour'")):
        proc = run_main(capsys, *flags, "--class-map", mapping, module="infer")
        assert_clean_error(proc, "--class-map", fragment)
        assert "predicted" not in proc.stderr and not out.exists()
        assert not Path(f"{out}.partial").exists()


# ---------------------------------------------------------------------------------------------
# Locks: a killed run's orphaned worker does not keep the lock

HOLD_AND_FORK = """
import os, sys, time
sys.path.insert(0, ".")
from common import exclusive_lock
with exclusive_lock(sys.argv[1], "another evaluation", "wait"):
    child = os.fork()
    if child == 0:  # a loader worker: inherits every descriptor, lives on after its parent
        time.sleep(120)
        os._exit(0)
    print(child, flush=True)
    time.sleep(120)
"""


@pytest.mark.system
def test_lock_is_released_when_its_holder_is_killed_while_a_child_lives(tmp_path):
    from common import exclusive_lock
    lock = tmp_path / ".p.csv.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(lock)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(DataError, match=f"in use by another evaluation \\(pid {holder.pid}\\)"):
            with exclusive_lock(lock, "another evaluation", "wait"):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the orphan is alive
        with exclusive_lock(lock, "another evaluation", "wait"):
            pass  # and the lock is free
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------
# The store: a file name with a space

@pytest.mark.integration
def test_store_with_a_space_in_a_file_name(tmp_path, capsys):
    from store import open_store
    data = tmp_path / "data"
    shutil.copytree(REPO / "sample", data)
    shutil.copy(PNG, data / "images" / "copy of an image.png")
    proc = run_main(capsys, "prepare", "--data-dir", data, "--size", "32", "--workers", "1",
                    module="dataset")
    assert proc.returncode == 0, proc.stderr
    store = open_store(data, 32)  # was: "damaged store", forever
    assert "copy of an image.png" in store.names and store.count == 201
    again = run_main(capsys, "prepare", "--data-dir", data, "--size", "32", module="dataset")
    assert again.returncode == 0 and "0 images decoded now" in again.stdout, again.stderr


# ---------------------------------------------------------------------------------------------
# torchrun: kill -9 of every rank, then the same command resumes

def _descendants(pid):
    """Every process below pid (children, their children...), from `ps`."""
    rows = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children = {}
    for row in rows.split("\n"):
        if row.strip():
            child, parent = map(int, row.split())
            children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.system
def test_torchrun_evaluation_resumes_after_kill_9_of_all_ranks(small_model, nih_dir, tmp_path):
    work, _ = small_model
    out = tmp_path / "ddp.csv"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "infer.py", "--mode", "torch", "--model-dir", work / "models", "--data-dir", nih_dir,
           "--checkpoint", work / "run" / "best.pt", "--no-figures", "--limit", "48",
           "--chunk-size", "4", "--workers", "1", "--batch-size", "2", "--n-boot", "100",
           "--out-csv", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    partial = Path(f"{out}.partial")
    deadline = time.time() + 300
    try:
        while len(list(partial.glob("chunk-*.npz"))) < 2:
            assert job.poll() is None and time.time() < deadline, "no chunks appeared"
            time.sleep(0.05)
    finally:
        # torchrun starts each rank in a session of its own (killpg of torchrun's group would
        # leave them running): kill -9 the whole tree, torchrun and every rank, at once.
        for pid in [job.pid, *_descendants(job.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.wait()
    done = len(list(partial.glob("chunk-*.npz")))
    assert 2 <= done < 12 and not out.exists()
    again = subprocess.run(list(map(str, cmd)), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Traceback" not in again.stderr
    assert again.stdout.count("continuing after") == 1 and "48 test images" in again.stdout, \
        again.stdout + again.stderr
    single = run_script("infer.py", *map(str, cmd[cmd.index("--mode"):-1]), tmp_path / "one.csv",
                        env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    names = [r[0] for r in csv.reader(open(out))]
    assert names == [r[0] for r in csv.reader(open(tmp_path / "one.csv"))]
    assert not partial.exists()

"""DICOM input everywhere an image is read: decoding by the standard (modality LUT, VOI LUT or
window, MONOCHROME1), compressed transfer syntaxes, the store, training and evaluation, and
one-line errors for DICOMs that are not usable X-rays. Files written with pydicom from the
bundled NIH PNGs, so every decoded pixel can be checked against the PNG it came from."""
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY, run_main

pydicom = pytest.importorskip("pydicom")
from dicom_files import KINDS, write_dicom  # noqa: E402
from images import load_gray  # noqa: E402

from common import DataError  # noqa: E402

PNG = REPO / "sample" / "images" / "00000284_000.png"


@pytest.mark.parametrize("kind", KINDS)
def test_a_dicom_decodes_to_the_pixels_of_its_png(kind, tmp_path):
    if kind == "jpeg2000":
        pytest.importorskip("openjpeg", reason="JPEG 2000 needs pylibjpeg-openjpeg")
    png = np.asarray(Image.open(PNG).convert("L")).astype(int)
    decoded = np.asarray(load_gray(write_dicom(PNG, tmp_path / "x.dcm", kind))).astype(int)
    assert decoded.shape == png.shape and np.abs(decoded - png).max() == 0


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_without_a_window_values_are_read_as_stored_not_stretched(photometric, tmp_path):
    """No VOI: 0..4095 of a 12-bit image is black..white whatever range the image holds (an
    image of a narrow range stays dim, as stored; it used to be stretched to its own range)."""
    ds = pydicom.dcmread(write_dicom(PNG, tmp_path / "x.dcm", "window"))
    del ds.WindowCenter, ds.WindowWidth
    png = np.asarray(Image.open(PNG).convert("L")).astype(np.int64)
    stored = png * 8 + 100  # 100..2140 of 0..4095
    ds.PhotometricInterpretation = photometric
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(tmp_path / "x.dcm")
    shown = np.round(stored / 4095 * 255)
    if photometric == "MONOCHROME1":
        shown = 255 - shown
    decoded = np.asarray(load_gray(tmp_path / "x.dcm")).astype(int)
    assert np.abs(decoded - shown).max() <= 1



def _variant(tmp_path, kind):
    """A 12-bit (or 8-bit) image of random values with gaps, in one of the ways a value can
    be displayed: each step and each stored type the lookup table must agree on."""
    rng = np.random.default_rng(0)
    signed = kind in ("signed_own_range", "signed_sigmoid", "signed_voi_lut")
    values = rng.choice(np.arange(-2048, 2048, 7) if signed else np.arange(0, 4096, 5),
                        size=(64, 48))
    ds = pydicom.dcmread(write_dicom(PNG, tmp_path / "base.dcm"))
    for keyword in ("WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    ds.Rows, ds.Columns = values.shape
    ds.PixelRepresentation = int(signed)
    dtype = np.int16 if signed else np.uint16
    if kind == "signed_own_range":  # no VOI: the range of the values the image holds
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -100
    elif kind == "signed_sigmoid":
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = -300, 900, "SIGMOID"
    elif kind == "linear_exact_monochrome1":
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 1800.5, 1500.25, "LINEAR_EXACT"
    elif kind == "eight_bits":
        values = values % 256
        dtype = np.uint8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.WindowCenter, ds.WindowWidth = 100, 120
    elif kind == "modality_lut":  # values from 1000 up mapped by a table, below clipped;
        # the table's extremes at values the image does not hold (it holds multiples of 5)
        lut = 5000 + np.arange(2048) * 13 % 30000
        lut[1], lut[2] = 65535, 0
        item = pydicom.Dataset()
        item.LUTDescriptor = [2048, 1000, 16]
        item.ModalityLUTType = "US"
        item.add_new(0x00283006, "US", [int(v) for v in lut])
        ds.ModalityLUTSequence = [item]
    elif kind == "signed_voi_lut":
        item = pydicom.Dataset()
        item.LUTDescriptor = [1024, -512, 12]
        item.add_new(0x00283006, "OW", (np.arange(1024) * 4).astype(np.uint16).tobytes())
        ds.VOILUTSequence = [item]
    ds.PixelData = values.astype(dtype).tobytes()
    ds.save_as(tmp_path / f"{kind}.dcm", enforce_file_format=True)
    return tmp_path / f"{kind}.dcm"


@pytest.mark.parametrize("kind", ["signed_own_range", "signed_sigmoid", "signed_voi_lut",
                                  "linear_exact_monochrome1", "eight_bits", "modality_lut"])
def test_the_lookup_table_gives_every_pixel_what_the_standard_s_steps_give(kind, tmp_path):
    """An integer image is displayed through a table of its values (images._dicom_pixels);
    here each pixel goes through the steps on its own, as before the table."""
    from images import _displayed
    path = _variant(tmp_path, kind)
    ds = pydicom.dcmread(path)
    per_pixel = _displayed(path, ds, ds.pixel_array, ds.PhotometricInterpretation)
    table = np.asarray(load_gray(path))
    assert per_pixel.std() > 20  # a real spread of grays, not all black or white
    assert table.dtype == per_pixel.dtype and np.array_equal(table, per_pixel)

def test_dicoms_are_found_by_content_whatever_their_name(tmp_path):
    path = write_dicom(PNG, tmp_path / "IM000001", "monochrome1")  # hospital exports: no suffix
    assert np.array_equal(np.asarray(load_gray(path)), np.asarray(Image.open(PNG).convert("L")))


def _bad(tmp_path, kind):
    import pydicom
    path = write_dicom(PNG, tmp_path / f"{kind}.dcm", "window")
    ds = pydicom.dcmread(path)
    if kind == "no_image":  # e.g. a structured report beside the images: no image attributes
        for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
            delattr(ds, keyword)
    elif kind == "rgb":
        ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), np.uint8).tobytes()
    elif kind == "multiframe":
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2
    elif kind == "truncated":
        ds.save_as(path)
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
        return path
    elif kind == "not_dicom":
        path.write_bytes(b"not a DICOM file at all" * 10)
        return path
    ds.save_as(path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("no_image", "a DICOM without an image (no Pixel Data"),
    ("rgb", "a RGB DICOM: only grayscale X-rays"),
    ("multiframe", "not several frames"),
    ("truncated", "cannot decode the DICOM pixel data"),
    ("not_dicom", "unreadable DICOM"),
])
def test_unusable_dicoms_are_one_line_errors_naming_the_file(tmp_path, kind, message):
    path = _bad(tmp_path, kind)
    with pytest.raises(DataError) as e:
        load_gray(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


# pydicom's decoders for JPEG 2000 (pylibjpeg-openjpeg, Pillow, GDCM) all taken away, as on a
# machine with none of them installed.
NO_DECODERS = """
import sys
sys.path.insert(0, ".")
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless
decoder = get_decoder(JPEG2000Lossless)
for label in list(decoder._available) + list(decoder._unavailable):
    decoder.remove_plugin(label)
from common import DataError
from images import load_gray
try:
    load_gray(sys.argv[1])
except DataError as e:
    print(e)
"""


@pytest.mark.integration
def test_a_compressed_dicom_without_its_decoder_says_what_to_install(tmp_path):
    pytest.importorskip("openjpeg", reason="writing the file needs pylibjpeg-openjpeg")
    path = write_dicom(PNG, tmp_path / "j2k.dcm", "jpeg2000")
    proc = subprocess.run([sys.executable, "-c", NO_DECODERS, str(path)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"{path}: cannot decode the DICOM pixel data (JPEG 2000"), line
    assert "pip install pylibjpeg" in line and "\n" not in line


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory):
    """The bundled sample with every image re-encoded as DICOM, the kinds taking turns."""
    root = tmp_path_factory.mktemp("dicom")
    (root / "images").mkdir()
    kinds = list(KINDS)
    try:
        import openjpeg  # noqa: F401
    except ImportError:
        kinds.remove("jpeg2000")
    for i, png in enumerate(sorted((REPO / "sample" / "images").glob("*.png"))):
        write_dicom(png, root / "images" / png.with_suffix(".dcm").name, kinds[i % len(kinds)])
    shutil.copy(REPO / "sample" / "Data_Entry_2017_v2020.csv", root)
    for split in ("train", "val", "test"):
        text = (REPO / "sample" / f"{split}_list.txt").read_text()
        (root / f"{split}_list.txt").write_text(text.replace(".png ", ".dcm "))
    return root


@pytest.mark.integration
def test_dicom_data_dir_gives_the_store_training_and_evaluation_the_png_pixels(
        dicom_dir, small_model, tmp_path, capsys):
    """The store prepared from DICOMs holds the very rows of the one prepared from the PNGs;
    training and evaluation run on the DICOM directory; --image reads a DICOM."""
    from store import open_store, prepare_store
    png_dir = tmp_path / "png"
    shutil.copytree(REPO / "sample", png_dir)
    prepare_store(png_dir, (64,), workers=1, progress=False)
    proc = run_main(capsys, "prepare", "--data-dir", dicom_dir, "--size", "64", module="dataset")
    assert proc.returncode == 0, proc.stderr
    png_store, dicom_store = open_store(png_dir, 64), open_store(dicom_dir, 64)
    assert [n.replace(".png", ".dcm") for n in png_store.names] == list(dicom_store.names)
    assert np.array_equal(np.asarray(png_store.array), np.asarray(dicom_store.array))

    args = [a if a != REPO / "sample" else dicom_dir for a in TINY]
    run = run_main(capsys, *args, "--epochs", "1", "--limit", "16", "--out-dir", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    evaluation = run_main(capsys, "--mode", "torch", "--checkpoint", tmp_path / "run" / "best.pt",
                          "--data-dir", dicom_dir, "--model-dir", tmp_path / "models",
                          "--no-figures", module="infer")
    assert evaluation.returncode == 0, evaluation.stderr
    assert "mean" in evaluation.stdout

    work, _ = small_model
    dcm = dicom_dir / "images" / PNG.with_suffix(".dcm").name
    outputs = [run_main(capsys, "--mode", "fp32", "--model-dir", work / "models", "--image",
                        path, module="infer") for path in (PNG, dcm)]
    assert all(o.returncode == 0 for o in outputs), outputs[1].stderr
    def probabilities(out):  # the 14 lines (the PNG's NIH name also gets its list's labels)
        return [ln for ln in out.split(":\n", 1)[1].splitlines() if not ln.startswith("  labels")]
    assert probabilities(outputs[0].stdout) == probabilities(outputs[1].stdout)


def test_dicoms_without_a_suffix_go_into_the_store(tmp_path):
    from store import image_names, open_store, prepare_store
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    pngs = sorted((REPO / "sample" / "images").glob("*.png"))[:4]
    for i, png in enumerate(pngs):
        write_dicom(png, data / "images" / f"IM{i:06d}", "window")
    (data / "images" / "notes.txt").write_text("not an image")
    shutil.copy(REPO / "sample" / "Data_Entry_2017_v2020.csv", data)
    assert image_names(data) == [f"IM{i:06d}" for i in range(4)]
    prepare_store(data, (32,), workers=1, progress=False)
    assert open_store(data, 32).count == 4


def test_the_node_s_socket_reads_what_arrives_and_stops_where_the_peer_closes():
    """node.pynetdicom_internals._recv, the node's reading of a PDU: every byte of a 3 MB PDU
    sent in pieces, in order; where the peer closes early, what arrived (pynetdicom then
    reports a PDU shorter than declared and ends the association), with no memory taken for a
    length merely declared; a PDU over the node's maximum is not read at all; one dripped a
    byte at a time, or begun and then silent, is given up at its deadline (--timeout plus its
    length at the minimum rate), never held for as long as the peer likes."""
    import socket
    import threading

    from node import pynetdicom_internals as internals

    def stand_in(sock, timeout=30.0):  # pynetdicom's AssociationSocket, as _recv uses it
        return type("Socket", (), {"socket": sock, "assoc": type("Assoc", (), {
            "network_timeout": timeout})()})()
    data = np.random.default_rng(0).integers(0, 256, 3 * 2 ** 20 + 17, np.uint8).tobytes()
    for declared, sent in ((len(data), data), (internals.MAX_PDU_BYTES, data[:1000]), (10, b"")):
        ours, peer = socket.socketpair()

        def send(sent=sent, peer=peer):
            for at in range(0, len(sent), 100_000):
                peer.sendall(sent[at:at + 100_000])
            peer.close()
        sender = threading.Thread(target=send)
        sender.start()
        assert bytes(internals._recv(stand_in(ours), declared)) == sent
        sender.join()
        assert ours.gettimeout() is None  # as it was
        ours.close()
    # a PDU longer than the node accepts (a peer may declare 4 GB, then send it): not read
    ours, peer = socket.socketpair()
    peer.sendall(b"x" * 1000)
    assert internals._recv(stand_in(ours), internals.MAX_PDU_BYTES + 1) == b""
    assert len(ours.recv(2000)) == 1000  # untouched
    ours.close()
    peer.close()
    # dripped, and begun then silent: 1 s (the timeout) + 1000 bytes at 1000 B/s
    rate, internals.MIN_RECV_RATE = internals.MIN_RECV_RATE, 1000
    try:
        for drips in (True, False):
            ours, peer = socket.socketpair()
            stop = threading.Event()

            def drip(drips=drips, peer=peer, stop=stop):
                peer.sendall(b"xyz")
                while drips and not stop.wait(0.1):
                    peer.sendall(b"x")
            dripper = threading.Thread(target=drip)
            dripper.start()
            started = time.monotonic()
            got = internals._recv(stand_in(ours, 1.0), 1000)
            assert 3 <= len(got) < 1000 and 1.9 < time.monotonic() - started < 4, drips
            stop.set()
            dripper.join()
            ours.close()
            peer.close()
    finally:
        internals.MIN_RECV_RATE = rate


def test_the_node_s_fast_report_is_highdicom_s_report(tmp_path):
    """node.sr.ReportWriter (a template of the content tree, this image's values spliced
    in) gives the report build_sr builds with highdicom, element for element: across sources
    (DX and CR, other character sets, names that need them), findings with and without
    thresholds and calibration, and values at the edges of their range."""
    import io

    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    from dicom_files import dx_file
    from node import results, sr
    from node.dicom import CR
    pngs = sorted((REPO / "sample" / "images").glob("*.png"))
    plain = pydicom.dcmread(dx_file(pngs[0], tmp_path / "a.dcm", generate_uid(), generate_uid(),
                                    1), stop_before_pixels=True)
    other = pydicom.dcmread(dx_file(pngs[1], tmp_path / "b.dcm", generate_uid(), generate_uid(),
                                    7, sop_class=CR), stop_before_pixels=True)
    other.SpecificCharacterSet, other.PatientName = "ISO_IR 192", "Müller^Jürgen"
    other.PatientAge, other.OtherPatientIDs = "045Y", ["X1", "X2"]
    # a character set the standard allows and highdicom refuses: the results are in UTF-8
    japanese = pydicom.dcmread(tmp_path / "a.dcm", stop_before_pixels=True)
    japanese.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    japanese.PatientName = "Yamada^Tarou=山田^太郎"
    identity = {"name": "CheXNet densenet121 OpenVINO INT8", "mode": "int8", "version": "v",
                "sha256": "ab" * 32, "exported": "2026-12-02", "runtime": "OpenVINO x",
                "files": {"chexnet_int8.xml": "cd" * 32, "chexnet_int8.bin": "ef" * 32},
                "classes": [f"Finding {k}" for k in range(14)]}
    rng = np.random.default_rng(0)

    def findings(names, thresholds=True, calibrated=True, values=None):
        rows = []
        for k, name in enumerate(names):
            p = float(values[k % len(values)]) if values is not None else float(rng.random())
            row = {"finding": name, "probability": p}
            t = 0.1 * (k % 9 + 1)
            row.update(threshold=t, decision="positive" if p >= t else "negative") \
                if thresholds else row.update(threshold=None, decision=None)
            if calibrated:
                row["calibrated_probability"] = float(rng.random())
            rows.append(row)
        return rows

    def content(data):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.InstanceCreationTime = ds.ContentTime = "000000"
        ds.ContributingEquipmentSequence[0].ContributionDateTime = "20000101"
        return ds.to_json_dict()

    nih = [f"Finding {k}" for k in range(14)]
    edges = findings(nih)  # thresholds a saturated model or a hand-written file may hold
    edges[0].update(threshold=1.0, decision="negative")
    edges[1].update(threshold=0.0, decision="positive")
    writer = sr.ReportWriter(identity, "youden rule, 100 validation images", "1.2.826.1.")
    cases = [(plain, findings(nih)), (plain, findings(nih)), (other, findings(nih)),
             (plain, findings(nih, values=[0.0, 1.0, 1e-12, 1 / 3, 0.5, 1 - 1e-9])),
             (other, findings(["Épanchement", "Nodule"], thresholds=False, calibrated=False)),
             (plain, findings(["Effusion"], calibrated=False)), (japanese, findings(nih)),
             (plain, edges)]
    for source, rows in cases:
        fast = writer(source, rows)
        reference = sr.build_sr(source, rows, identity, writer.points_note, writer.uid_root)
        assert content(fast) == content(reference)
        read, image = sr.read_sr(pydicom.dcmread(io.BytesIO(fast)))  # highdicom's reader
        assert image == source.SOPInstanceUID
        assert read == {row["finding"]: (row["probability"], row.get("calibrated_probability"),
                                         row["threshold"], {"positive": "Present", "negative":
                                                            "Absent", None: None}[row["decision"]])
                        for row in rows}
    assert len(writer.templates) == 5 and all(writer.templates.values())  # none fell back
    report = pydicom.dcmread(io.BytesIO(writer(japanese, findings(nih))))
    assert report.SpecificCharacterSet == "ISO_IR 192"
    assert report.PatientName == "Yamada^Tarou=山田^太郎"
    [(_, heatmap)] = results.build_heatmaps(japanese, [(0, np.zeros((16, 16, 3), np.uint8))],
                                            identity, "1.2.826.1.", JPEGBaseline8Bit)
    assert pydicom.dcmread(io.BytesIO(heatmap)).PatientName == "Yamada^Tarou=山田^太郎"
    for value, charset in ((None, None), ("ISO_IR 100", "ISO_IR 100"), ("GB18030", "GB18030"),
                           ("ISO 2022 IR 100", "ISO_IR 192"), ("ISO_IR 999", "ISO_IR 192"),
                           (["ISO_IR 100", "ISO 2022 IR 87"], "ISO_IR 192")):
        source = pydicom.Dataset()
        if value is not None:
            source.SpecificCharacterSet = value
        assert results.result_charset(source, ()) == charset, value
    # class names the source's character set cannot hold: the results are in UTF-8
    for value, names, charset in ((None, ["Effusion"], None),
                                  (None, ["Épanchement"], "ISO_IR 192"),
                                  ("ISO_IR 100", ["Épanchement"], "ISO_IR 100"),
                                  ("ISO_IR 100", ["胸水"], "ISO_IR 192"),
                                  ("ISO_IR 203", ["胸水"], "ISO_IR 192")):  # pydicom: no codec
        source = pydicom.Dataset()
        if value is not None:
            source.SpecificCharacterSet = value
        assert results.result_charset(source, names) == charset, (value, names)
    assert results.class_name_problem(["Effusion", "Épanchement 胸水"]) is None
    for names, why in ((["A", "A"], "repeat"), (["a\nb"], "control"), ([" "], "empty"),
                       (["x" * 65], "longer than 64"), (["a\\b"], "backslash")):
        assert why in results.class_name_problem(names), names


def test_every_finding_is_coded_from_the_dictionary_or_the_project_s_scheme():
    """Each NIH and CheXpert/MIMIC finding's code in the reports is a concept of pydicom's DICOM
    code dictionary (never a made-up SNOMED code) or of the private scheme, whose values fit a
    Code Value (16 characters), mean the class name and are distinct; a class of any other set
    gets one derived from its name."""
    from pydicom.sr import _concepts_dict

    from labels import NIH_CLASSES
    from node import sr
    from tables import CHEXPERT_CLASSES
    names = list(dict.fromkeys(NIH_CLASSES + CHEXPERT_CLASSES)) + ["Épanchement 胸水", "A" * 64]
    private = {}
    for name in names:
        code = sr.finding_code(name)
        if code.scheme_designator == sr.PRIVATE_SCHEME:
            assert len(code.value) <= 16 and code.meaning == name, code
            assert code.value not in private, (name, private.get(code.value))
            private[code.value] = name
        else:  # the dictionary's own concept, meaning what the data sets' name means
            known = {(value, meaning) for concepts in
                     _concepts_dict.concepts[code.scheme_designator].values()
                     for value, (meaning, _) in concepts.items()}
            assert (code.value, code.meaning) in known, code
    assert {n for n in names if sr.finding_code(n).scheme_designator != sr.PRIVATE_SCHEME} == {
        "Cardiomegaly", "Effusion", "Pleural Effusion", "Nodule", "Mass", "Pneumothorax",
        "Edema", "Fibrosis", "Infiltration"}
    assert sr.finding_code("Épanchement 胸水") == sr.finding_code("Épanchement 胸水")


def test_a_heatmap_s_caption_says_what_the_report_says():
    """The caption burnt into a heatmap states the report's probabilities, each labelled raw or
    calibrated, and the bundled-sample notice where the model was trained on it."""
    from node.workers import heatmap_caption
    identity = {"mode": "int8", "notice": None}
    row = {"finding": "Effusion", "probability": 0.81234, "calibrated_probability": 0.4,
           "threshold": 0.5, "decision": "positive"}
    assert heatmap_caption(row, identity) == ("Effusion  p = 0.812 raw, 0.400 calibrated  "
                                              "(CAM, int8; red = most weight)  RESEARCH USE ONLY")
    row["calibrated_probability"] = None
    caption = heatmap_caption(row, {**identity, "notice": "note: the sample"})
    assert "p = 0.812 raw  " in caption and "calibrated" not in caption
    assert "BUNDLED-SAMPLE MODEL" in caption


def test_the_node_s_heatmaps_after_an_image_s_first_are_highdicom_s(tmp_path):
    """build_heatmaps builds an image's first heatmap with highdicom and puts the next ones'
    own attributes into it: each is, element for element, the one highdicom builds alone
    (JPEG and uncompressed, a source with and without its orientation)."""
    import io

    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    from dicom_files import dx_file
    from node import results
    png = sorted((REPO / "sample" / "images").glob("*.png"))[0]
    oriented = pydicom.dcmread(dx_file(png, tmp_path / "a.dcm", generate_uid(), generate_uid(),
                                       1), stop_before_pixels=True)
    unknown = pydicom.dcmread(tmp_path / "a.dcm", stop_before_pixels=True)
    unknown.PatientOrientation = None
    identity = {"sha256": "ab" * 32, "classes": [f"Finding {k}" for k in range(14)]}
    rng = np.random.default_rng(0)
    overlays = [(k, rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)) for k in (0, 3, 13)]

    def content(data):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.InstanceCreationTime = ds.ContentTime = ds.TimeOfSecondaryCapture = "000000"
        ds.InstanceCreationDate = ds.ContentDate = ds.DateOfSecondaryCapture = "20000101"
        ds.ContributingEquipmentSequence[0].ContributionDateTime = "20000101"
        return ds.file_meta.to_json_dict(), ds.to_json_dict()

    for source in (oriented, unknown):
        for syntax in (JPEGBaseline8Bit, ExplicitVRLittleEndian):
            together = list(results.build_heatmaps(source, overlays, identity, "1.2.826.1.",
                                                   syntax))
            assert [k for k, _ in together] == [0, 3, 13]
            for (k, data), overlay in zip(together, overlays):
                [(_, alone)] = results.build_heatmaps(source, [overlay], identity,
                                                      "1.2.826.1.", syntax)
                assert content(data) == content(alone), (k, syntax)

"""The edge box as the README installs it: requirements-edge.txt in a virtual environment of its
own, without torch. Every command an edge box runs is run there (EDGE_PYTHON, the environment's
python, which .ci/run builds as .venv-edge) against a model exported in the full environment;
and a user who installed less gets one line naming the missing package, never a traceback.

    python3 -m venv .venv-edge && .venv-edge/bin/pip install -r requirements-edge.txt
    EDGE_PYTHON=.venv-edge/bin/python python -m pytest -q tests/test_edge.py
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, assert_clean_error
from dicom_files import write_dicom

EDGE = os.environ.get("EDGE_PYTHON")


@pytest.fixture(scope="module")
def edge_python():
    """The edge environment's python; under CI a missing one fails rather than skips."""
    if not EDGE:
        why = ("EDGE_PYTHON is not set (python3 -m venv .venv-edge && .venv-edge/bin/pip install "
               "-r requirements-edge.txt, then EDGE_PYTHON=.venv-edge/bin/python)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must test the edge environment: {why}")
        pytest.skip(why)
    python = Path(EDGE).absolute()  # not resolved: a venv's python is a link to the system's
    assert os.access(python, os.X_OK), f"EDGE_PYTHON={EDGE} is not an executable"
    proc = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr, \
        f"the edge environment {EDGE} has torch: it must not"
    return python


def run(python, *args, env=None):
    return subprocess.run([str(python), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def ok(proc):
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def edge_model(small_model, tmp_path_factory):
    """A copy of the small model exported in the full environment (by infer.sh), so that the
    operating points and predictions written here touch no other test's."""
    models = tmp_path_factory.mktemp("edge") / "models"
    shutil.copytree(small_model[0] / "models", models)
    return models


@pytest.fixture(scope="module")
def images(nih_dir, tmp_path_factory):
    """One NIH X-ray as PNG, JPEG, a JPEG 2000 compressed DICOM and a JPEG baseline DICOM
    (each compressed kind needs its decoder in the edge environment)."""
    out = tmp_path_factory.mktemp("edge_images")
    png = nih_dir / "images" / "00000100_000.png"
    jpeg = out / "00000100_000.jpg"
    Image.open(png).convert("L").save(jpeg, quality=95)
    j2k = write_dicom(png, out / "IM000001", "jpeg2000")  # a PACS export's name, no suffix
    return {"png": png, "jpeg": jpeg, "j2k": j2k, "jpeg_dicom": jpeg_dicom(jpeg, out / "jpeg.dcm")}


def jpeg_dicom(jpeg, path):
    """A JPEG baseline (8-bit, process 1) DICOM holding the JPEG file's bytes as they are."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid
    with Image.open(jpeg) as im:
        width, height = im.size
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
        SecondaryCaptureImageStorage, generate_uid())
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "test"
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.WindowCenter, ds.WindowWidth = 128, 256  # the identity on 0..255 (PS3.3 C.11.2.1.2)
    ds.PixelData = encapsulate([Path(jpeg).read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------------------------
# The environment

EDGE_MODULES = ["openvino", "numpy", "PIL", "sklearn", "scipy.ndimage", "pandas", "tqdm",
                "matplotlib.pyplot", "pydicom", "pylibjpeg", "libjpeg", "openjpeg", "pynetdicom",
                "highdicom"]


@pytest.mark.system
def test_the_edge_environment_has_what_the_edge_needs_and_no_torch(edge_python):
    code = (f"import importlib, importlib.util\n"
            f"for m in {EDGE_MODULES!r}: importlib.import_module(m)\n"
            "print([m for m in ('torch', 'torchvision', 'nncf', 'timm')"
            " if importlib.util.find_spec(m)])")
    assert ok(run(edge_python, "-c", code)).stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Every command of the README's edge section, in the edge environment

@pytest.mark.system
def test_evaluation_report_and_compare(edge_python, edge_model, nih_dir, tmp_path):
    """Both OpenVINO modes on val (operating points, calibration) and test (--calibrated too),
    each with its report and figures; report.py on a predictions file; report.py compare."""
    # 100 images of each split: every path of the full evaluation, a third of the decoding
    common = ["--model-dir", edge_model, "--data-dir", nih_dir, "--n-boot", "200",
              "--limit", "100"]
    for mode in ("fp32", "int8"):
        val = ok(run(edge_python, "infer.py", "--mode", mode, "--part", "val", *common,
                     "--no-figures"))  # the test runs draw them (10 s each run)
        assert "mean" in val.stdout
        test = ok(run(edge_python, "infer.py", "--mode", mode, *common))
        assert "mean" in test.stdout and "pip install" not in test.stdout, test.stdout
        stem = edge_model / f"predictions_{mode}"
        report = json.loads(Path(f"{stem}_report.json").read_text())
        assert report["images"] == 100 and report["operating_points"], report.keys()
        for figure in ("roc", "pr", "reliability"):
            assert Path(f"{stem}_{figure}.png").is_file()
    calibrated = ok(run(edge_python, "infer.py", "--mode", "int8", "--calibrated",
                        "--out-csv", tmp_path / "calibrated.csv", *common))
    assert "mean" in calibrated.stdout
    plain = (edge_model / "predictions_int8.csv").read_text()
    assert (tmp_path / "calibrated.csv").read_text() != plain
    again = ok(run(edge_python, "report.py", edge_model / "predictions_int8.csv", "--data-dir",
                   nih_dir, "--n-boot", "200", "--no-figures"))
    assert "Atelectasis" in again.stdout
    compare = ok(run(edge_python, "report.py", "compare", edge_model / "predictions_fp32.csv",
                     edge_model / "predictions_int8.csv", "--data-dir", nih_dir, "--n-boot", "200"))
    assert "paired bootstrap" in compare.stdout


@pytest.mark.system
def test_images_heatmaps_and_localization(edge_python, edge_model, nih_dir, images, tmp_path):
    """--image on PNG, JPEG and two compressed DICOMs, --cam on one; --localize on NIH's boxes."""
    paths = [images[k] for k in ("png", "jpeg", "j2k", "jpeg_dicom")]
    proc = ok(run(edge_python, "infer.py", "--mode", "int8", "--model-dir", edge_model,
                  "--image", *paths))
    probs = {path: probabilities(proc.stdout, path) for path in paths}
    assert probs[images["j2k"]] == probs[images["png"]]  # lossless: the PNG's pixels
    # The same JPEG bytes, through pydicom's JPEG decoder and through Pillow's: two decoders
    # round the inverse DCT differently, by one grey level on 3% of the pixels (measured);
    # the pixels are what must agree. A tiny model trained on the sample moves by up to 0.012
    # for that (measured), a trained one far less.
    pixels = ok(run(edge_python, "-c", "import sys; import numpy as np; from PIL import Image; "
                    "from images import load_gray; a, b = (np.asarray(Image.open(p) if i else "
                    "load_gray(p), np.int16) for i, p in enumerate(sys.argv[1:])); "
                    "print(int(np.abs(a - b).max()))", images["jpeg_dicom"], images["jpeg"]))
    assert int(pixels.stdout) <= 1, pixels.stdout
    a, b = probs[images["jpeg_dicom"]], probs[images["jpeg"]]
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 0.03, (a, b)
    # heatmaps of the compressed DICOM (drawing them for all four costs a minute, and the
    # decoders are what differs between the four)
    cams = ok(run(edge_python, "infer.py", "--mode", "int8", "--model-dir", edge_model,
                  "--image", images["j2k"], "--cam", tmp_path / "cams"))
    assert probabilities(cams.stdout, images["j2k"]) == probs[images["j2k"]]
    stem = Path(images["j2k"]).stem  # <stem>_<path hash>_<method>_<mode>_<finding or all>.png
    assert list((tmp_path / "cams").glob(f"{stem}_*_cam_int8_all.png")), cams.stdout
    overlays = [p for p in (tmp_path / "cams").glob(f"{stem}_*_cam_int8_*.png")
                if not p.name.endswith("_all.png")]
    assert overlays, cams.stdout
    with Image.open(overlays[0]) as im:  # the 1024x1024 X-ray beside its overlay
        assert im.size[0] > 2 * 1024 and im.size[1] > 1024, im.size
    loc = ok(run(edge_python, "infer.py", "--mode", "int8", "--model-dir", edge_model,
                 "--data-dir", nih_dir, "--localize"))
    assert "random" in loc.stdout
    assert (edge_model / "localization_int8.json").is_file()


def probabilities(stdout, path):
    """{disease: probability} of one image in `infer.py --image`'s output."""
    lines = stdout.split(f"{path}:\n", 1)[1].splitlines()[:14]
    return {m[1]: float(m[2]) for m in (re.match(r"  (.+?)\s+(\d\.\d{4})", ln) for ln in lines)}


@pytest.mark.system
def test_stats_and_its_figures(edge_python, nih_dir, tmp_path):
    ok(run(edge_python, "stats.py", "--data-dir", nih_dir))
    proc = ok(run(edge_python, "stats.py", "--plot", tmp_path))  # the shipped split and table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats_cooccurrence.png",
                                                          "stats_prevalence.png"]
    assert "wrote" in proc.stdout


# ---------------------------------------------------------------------------------------------
# A user who installed less: each missing package is one line naming it and the pip command

# Put first on PYTHONPATH, this makes the packages named in HIDE_PACKAGES unimportable, as on
# a machine where they were never installed.
HIDE = """
import os, sys
hidden = set(os.environ.get("HIDE_PACKAGES", "").split(","))
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name.split(".")[0])
sys.meta_path.insert(0, Hide())
"""
PANDAS_ETC = "pandas,tqdm,matplotlib,pydicom,pylibjpeg,libjpeg,openjpeg,pynetdicom,highdicom"


@pytest.fixture
def hiding(tmp_path):
    """A function: run(...) with some packages hidden, in the edge environment when there is
    one (else this one, with torch hidden as well)."""
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(HIDE)

    def run_hiding(packages, *args):
        python = EDGE or sys.executable
        hidden = packages + ("" if EDGE else ",torch,torchvision")
        return run(python, *args, env={"HIDE_PACKAGES": hidden, "PYTHONPATH": tmp_path / "hide"})
    return run_hiding


@pytest.mark.system
def test_the_hiding_works(hiding):
    proc = hiding("matplotlib", "-c", "import matplotlib")
    assert "No module named 'matplotlib'" in proc.stderr


@pytest.mark.parametrize("hidden, command, message", [
    ("matplotlib", ["--image", "PNG", "--cam", "CAMS"],
     "error: --cam needs the matplotlib package: pip install matplotlib"),
    ("pydicom", ["--image", "DICOM"], "IM000001: reading DICOM needs the pydicom package: "
     "pip install pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"),
    ("openvino", ["--image", "PNG"],
     "error: --mode fp32/int8 needs the openvino package: pip install openvino"),
])
@pytest.mark.system
def test_a_missing_package_is_one_line(hiding, small_model, images, tmp_path, hidden, command,
                                       message):
    args = [{"PNG": images["png"], "DICOM": images["j2k"], "CAMS": tmp_path}.get(a, a)
            for a in command]
    proc = hiding(hidden, "infer.py", "--mode", "int8", "--model-dir", small_model[0] / "models",
                  *args)
    assert message in assert_clean_error(proc), proc.stderr
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.system
def test_stats_without_matplotlib_or_pandas(hiding, tmp_path):
    assert "error: --plot needs the matplotlib package: pip install matplotlib" in \
        assert_clean_error(hiding("matplotlib", "stats.py", "--plot", tmp_path))
    assert "reading the label table needs the pandas package: pip install pandas" in \
        assert_clean_error(hiding("pandas", "stats.py", "--plot", tmp_path))
    assert not list(tmp_path.glob("*.png"))  # nothing half done: not one of the two figures


@pytest.mark.system
def test_openvino_numpy_pillow_scikit_learn_alone(hiding, small_model, nih_dir, images, tmp_path):
    """What the README once said an edge box needs: evaluation (its figures a one-line note)
    and --image on PNG and JPEG work; a broken matplotlib says which dependency is missing."""
    models = tmp_path / "models"  # the model, without what other tests' evaluations wrote
    shutil.copytree(small_model[0] / "models", models,
                    ignore=shutil.ignore_patterns("predictions*", "localization*"))
    proc = hiding(PANDAS_ETC, "infer.py", "--mode", "int8", "--model-dir", models, "--data-dir",
                  nih_dir, "--limit", "20", "--n-boot", "100")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    notes = [ln for ln in proc.stdout.splitlines() if "matplotlib" in ln]
    assert notes == ["note: drawing the ROC, PR and reliability figures needs the matplotlib "
                     "package: pip install matplotlib"], proc.stdout
    assert (models / "predictions_int8_report.md").is_file()
    assert not list(models.glob("*.png"))
    proc = hiding(PANDAS_ETC, "infer.py", "--mode", "int8", "--model-dir", models,
                  "--image", images["png"], images["jpeg"])
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    # matplotlib present but one of its own dependencies missing
    broken = hiding("pyparsing", "infer.py", "--mode", "int8", "--model-dir", models,
                    "--image", images["png"], "--cam", tmp_path / "cams")
    assert ("--cam needs the matplotlib package (its dependency 'pyparsing' is missing): "
            "pip install matplotlib") in assert_clean_error(broken)


@pytest.mark.system
def test_a_broken_package_says_why(tmp_path):
    """A package that is there but fails to load (a system library missing) names the reason."""
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise ImportError("libGL.so.1: cannot open shared object file: '
        'No such file or directory")')
    proc = run(EDGE or sys.executable, "stats.py", "--plot", tmp_path / "plots",
               env={"PYTHONPATH": tmp_path / "site"})
    assert ("--plot needs the matplotlib package (libGL.so.1: cannot open shared object file: No "
            "such file or directory): pip install matplotlib") in assert_clean_error(proc)


@pytest.mark.system
def test_the_dicom_node_runs_in_the_edge_environment(edge_python, edge_model, images, tmp_path):
    """serve.py in the edge environment (no torch): it starts, answers GET /health and POST
    /predict with the probabilities infer.py --image gives there for the same PNG."""
    import json
    import socket
    import time
    import urllib.request

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    http = free_port()
    node = subprocess.Popen(
        [str(edge_python), "serve.py", "--model-dir", edge_model, "--spool", tmp_path / "spool",
         "--allow-any-ae", "--port", str(free_port()), "--http-port", str(http),
         "--destination", f"PACS@127.0.0.1:{free_port()}",  # nothing listens: results wait
         "--no-operating-points"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        url = f"http://127.0.0.1:{http}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                assert node.poll() is None, node.stdout.read()
                assert time.monotonic() < deadline, "the node did not answer /health in 120 s"
                time.sleep(0.5)
        assert health["model"]["classes"]
        request = urllib.request.Request(f"{url}/predict", data=images["png"].read_bytes())
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        node.terminate()
        node.wait(timeout=30)
    shown = ok(run(edge_python, "infer.py", "--mode", "int8", "--model-dir", edge_model,
                   "--image", images["png"])).stdout
    printed = {ln.split()[0]: ln.split()[1] for ln in shown.splitlines() if ln.startswith("  ")}
    assert len(answer["findings"]) == len(health["model"]["classes"])
    for row in answer["findings"]:
        assert printed[row["finding"]] == f"{row['probability']:.4f}", (row, shown)
